"""Write the image's hash-checked requirement locks from pyproject.toml's pins (run after changing a pin).

    python deploy/docker/lock.py          # rewrites deploy/docker/requirements-{cpu,gpu,cuda,codegen}.txt

Each lock is what pip resolves for a set of pyproject.toml's requirements on this platform (Linux x86_64,
CPython 3.11, as in the image): every package, direct or not, pinned to one version with the sha256 of its
wheel. deploy/docker/wheelhouse.sh downloads exactly those wheels and the image installs them with
`--no-index --require-hashes`, so a build needs no network and cannot pick up anything else.

- cpu: the serving dependencies and the `cpu` extra (onnxruntime);
- gpu: the serving dependencies and the `cuda` extra (onnxruntime-gpu with the CUDA and cuDNN wheels),
  written as two locks from one resolution: requirements-cuda.txt holds its nvidia-* wheels (2.17 GB
  installed) and requirements-gpu.txt the rest, so the gpu image installs the CUDA wheels in a layer of
  their own that a bump of any other pin leaves as it was;
- codegen: grpcio-tools, which generates the gRPC code in the build stage (not in the image).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK_DIR = Path(__file__).resolve().parent


def lock_inputs(project: dict) -> dict[str, list[str]]:
    """Lock name → the pyproject.toml requirements it resolves."""
    extras = project["optional-dependencies"]
    codegen = [requirement for requirement in extras["dev"] if requirement.startswith("grpcio-tools")]
    return {
        "cpu": [*project["dependencies"], *extras["cpu"]],
        "gpu": [*project["dependencies"], *extras["cuda"]],
        "codegen": codegen,
    }


SPLIT_NOTES = {
    "gpu": ["# The gpu resolution but for its nvidia-* wheels, which are in requirements-cuda.txt"],
    "cuda": ["# The gpu resolution's nvidia-* wheels: the gpu image installs them in a layer of their own"],
}


def is_cuda_wheel(package: str) -> bool:
    """The NVIDIA CUDA and cuDNN runtime wheels (nvidia-cublas, nvidia-cudnn-cu13, ...)."""
    return package.startswith("nvidia-")


def resolve(requirements: list[str]) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of every wheel pip would install for `requirements` on a clean interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--only-binary=:all:", "--report", str(report), *requirements],
            check=True,
        )  # fmt: skip
        installs = json.loads(report.read_text())["install"]
    pins = []
    for item in installs:
        metadata, archive = item["metadata"], item["download_info"]["archive_info"]
        pins.append((metadata["name"].lower(), metadata["version"], archive["hashes"]["sha256"]))
    return sorted(pins)


def locks(name: str, pins: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    """Lock file name → its pins: the gpu resolution is split into its CUDA wheels and the rest."""
    if name != "gpu":
        return {name: pins}
    return {
        "gpu": [pin for pin in pins if not is_cuda_wheel(pin[0])],
        "cuda": [pin for pin in pins if is_cuda_wheel(pin[0])],
    }


def render(name: str, requirements: list[str], pins: list[tuple[str, str, str]]) -> str:
    header = [
        f"# The image's {name} lock: written by `python deploy/docker/lock.py` from pyproject.toml; do not edit.",
        f"# Resolved from: {' '.join(requirements)}",
    ]
    header += SPLIT_NOTES.get(name, [])
    return "\n".join([*header, *(f"{pkg}=={version} --hash=sha256:{sha}" for pkg, version, sha in pins)]) + "\n"


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for resolution, requirements in lock_inputs(project).items():
        for name, pins in locks(resolution, resolve(requirements)).items():
            path = LOCK_DIR / f"requirements-{name}.txt"
            path.write_text(render(name, requirements, pins))
            print(f"wrote {path.relative_to(ROOT)}: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
