"""The image's requirement locks (deploy/docker/requirements-*.txt) agree with pyproject.toml's pins."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from types import ModuleType

import pytest

from tests.helpers import ROOT

DOCKER_DIR = ROOT / "deploy" / "docker"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCK_LINE = re.compile(r"^(?P<name>[a-z0-9_.-]+)==(?P<version>\S+) --hash=sha256:[0-9a-f]{64}$")


def lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock", DOCKER_DIR / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    """name → version of `name==version` requirements (extras dropped)."""
    found = {}
    for line in lines:
        requirement = line.split(" --hash")[0]
        name, version = requirement.split("==")
        found[normalized(name.split("[")[0])] = version
    return found


def locked(name: str) -> tuple[list[str], dict[str, str]]:
    """The lock's header lines and its pins."""
    lines = (DOCKER_DIR / f"requirements-{name}.txt").read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    body = [line for line in lines if not line.startswith("#")]
    assert all(LOCK_LINE.match(line) for line in body), "every lock line is name==version --hash=sha256:..."
    return header, pins(body)


@pytest.mark.parametrize("name", ["cpu", "gpu", "codegen"])
def test_each_lock_was_written_from_the_current_pins(name: str) -> None:
    """A pin changed in pyproject.toml without `python deploy/docker/lock.py` fails here."""
    requirements = lock_module().lock_inputs(PROJECT)[name]
    header, locked_pins = locked(name)
    if name == "gpu":  # one resolution, written as two locks: the CUDA wheels and the rest
        cuda_header, cuda_pins = locked("cuda")
        assert f"# Resolved from: {' '.join(requirements)}" in cuda_header
        locked_pins = {**locked_pins, **cuda_pins}
    assert f"# Resolved from: {' '.join(requirements)}" in header
    for package, version in pins(requirements).items():
        assert locked_pins.get(package) == version, f"requirements-{name}.txt: {package} is not {version}"


def test_the_cuda_lock_holds_the_gpu_resolutions_nvidia_wheels_and_only_those() -> None:
    """The gpu image installs requirements-cuda.txt in a layer of its own (GBs that a grpcio bump must not
    re-ship), so every CUDA wheel is there and nothing else is."""
    _, gpu = locked("gpu")
    _, cuda = locked("cuda")
    assert cuda, "requirements-cuda.txt is empty"
    assert all(package.startswith("nvidia-") for package in cuda), cuda
    assert not [package for package in gpu if package.startswith("nvidia-")], gpu
    assert {"nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime"} <= cuda.keys()


def test_the_cpu_image_has_the_gpu_images_onnxruntime_and_no_cuda() -> None:
    extras = PROJECT["optional-dependencies"]
    assert pins(extras["cpu"])["onnxruntime"] == pins(extras["gpu"])["onnxruntime-gpu"]
    _, cpu = locked("cpu")
    _, gpu = locked("gpu")
    assert cpu["onnxruntime"] == gpu["onnxruntime-gpu"]
    assert not [package for package in cpu if package.startswith(("nvidia", "onnxruntime-gpu"))]
    # Every package both images carry is the same version in both.
    assert {package: cpu[package] for package in cpu.keys() & gpu.keys()} == {
        package: gpu[package] for package in cpu.keys() & gpu.keys()
    }
