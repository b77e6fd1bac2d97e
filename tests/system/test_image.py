"""The server image, built offline and run as the pod runs it, on a Docker daemon the test starts and stops.

The daemon is the project's own (deploy/docker/daemon.sh: its data under build/image/docker/, no bridge, no
firewall rules), the image the `cpu` target built by deploy/docker/build.sh with the tiny exported model baked
in. The container runs like the Deployment's pod: read-only root, a tmpfs /tmp, uid 10001, no capabilities,
no privilege escalation, the ConfigMap's settings, host networking on loopback (the kernel picks free ports).
A first run on a clean machine installs Docker and debootstrap, builds the base and downloads the wheels (3-5
minutes on 2 cores); reruns reuse build/image/ and the daemon's build cache (about 30 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import VaeClient
from tests.helpers import ROOT, ServerProcess, rss_bytes, running_server, scrape

DOCKER_DIR = ROOT / "deploy" / "docker"
BUILD_DIR = ROOT / "build" / "image"
IMAGE = "vae-server:cpu-test"
CONTAINER = "vae-server-image-test"
MAX_CPU_IMAGE_BYTES = 400_000_000
SERVICE = "vae.v1.VaeService"

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Docker:
    """The docker CLI (the one packaged with the daemon) talking to the test's daemon."""

    cli: Path
    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        return [str(self.cli), "--host", self.env["DOCKER_HOST"], *args]

    def __call__(self, *args: str, timeout_s: float = 120) -> str:
        result = subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True, timeout=timeout_s)
        assert result.returncode == 0, f"docker {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
        return result.stdout

    def remove(self, container: str) -> None:
        subprocess.run(self.command("rm", "--force", container), env=self.env, capture_output=True, timeout=60)

    def script(self, name: str, *args: str, timeout_s: float = 600) -> str:
        """Run deploy/docker/<name> from the checkout's root; its stdout."""
        result = subprocess.run(
            [str(DOCKER_DIR / name), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=timeout_s, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{name} {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
        return result.stdout


def pod() -> tuple[dict, dict]:
    """The base Deployment's pod spec and its server container (grace period, resources)."""
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    spec = deployment["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    """The project's Docker daemon, installed where missing and started; stopped again unless it was running."""
    daemon = str(DOCKER_DIR / "daemon.sh")
    subprocess.run([daemon, "install"], cwd=ROOT, check=True, timeout=600)
    exports = subprocess.run([daemon, "env"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    variables = dict(item.split("=", 1) for item in exports.removeprefix("export ").split())
    env = {**os.environ, **variables, "PYTHON": sys.executable}  # PYTHON: the pip wheelhouse.sh runs
    client = Docker(Path(variables["DOCKER"]), env)
    was_running = subprocess.run(client.command("version"), env=env, capture_output=True).returncode == 0
    client.script("daemon.sh", "start", timeout_s=120)
    try:
        yield client
    finally:
        if not was_running:
            client.script("daemon.sh", "stop", timeout_s=120)


@pytest.fixture(scope="module")
def cpu_image(docker: Docker, exported_repository: Path) -> str:
    """The cpu target with the tiny exported model baked in (deploy/docker/build.sh, as `make image` runs it)."""
    model = BUILD_DIR / "models" / "vae-mnist"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(exported_repository, model)
    output = docker.script("build.sh", "cpu", IMAGE, str(model.relative_to(ROOT)), timeout_s=900)
    print(output.strip().splitlines()[-1])  # built ... in N s: M MB (the figure the docs quote)
    return IMAGE


@dataclass
class Served:
    process: ServerProcess
    started_s: float  # docker run → health SERVING for the model service
    rss_bytes: int


@pytest.fixture(scope="module")
def served(docker: Docker, cpu_image: str) -> Iterator[Served]:
    """The image running as the pod runs it; the container is removed at the end whatever happened."""
    docker.remove(CONTAINER)
    command = docker.command(
        "run", "--name", CONTAINER,
        "--read-only", "--tmpfs", "/tmp:size=64m", "--user", "10001:10001",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--network", "host", "--env-file", str(ROOT / "deploy" / "k8s" / "base" / "server.env"),
        "--env", "VAE_HOST=127.0.0.1", "--env", "VAE_GRPC_PORT=0", "--env", "VAE_METRICS_PORT=0",
        "--env", "VAE_HTTP_PORT=0", "--env", "VAE_HEALTH_PORT=0", cpu_image,
    )  # fmt: skip
    start = time.monotonic()
    process = ServerProcess(command)
    # ServerProcess reads stderr of `docker run` (attached): the container's log lines, the server_started one
    # with the ports the kernel picked. SIGTERM is sent with `docker stop`, not to the CLI.
    try:
        process.wait_started(timeout_s=120)
        with VaeClient(process.target, timeout_s=30) as client:
            deadline = time.monotonic() + 60
            while client.health(SERVICE) != "SERVING":
                assert time.monotonic() < deadline, "the container never reported SERVING"
                time.sleep(0.05)
        started_s = time.monotonic() - start
        pid = int(docker("inspect", "--format", "{{.State.Pid}}", CONTAINER))
        yield Served(process, started_s, rss_bytes(pid))
    finally:
        docker.remove(CONTAINER)
        process.process.wait(timeout=60)


def test_the_cpu_image_carries_no_cuda_and_stays_under_400_mb(docker: Docker, cpu_image: str) -> None:
    assert int(docker("image", "inspect", "--format", "{{.Size}}", cpu_image)) <= MAX_CPU_IMAGE_BYTES
    probe = (
        "import pathlib, onnxruntime as o; print(o.__version__, *o.get_available_providers(), "
        "*sorted(p.name for p in pathlib.Path(o.__file__).parent.glob('capi/libonnxruntime_providers_*')))"
    )
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "python", cpu_image, "-c", probe).split()
    assert out[0] == "1.31.1"  # the version pyproject.toml pins for onnxruntime-gpu
    assert "CPUExecutionProvider" in out
    assert not [word for word in out if "cuda" in word.lower() or "tensorrt" in word.lower()], out


def test_the_container_serves_what_a_local_server_serves(served: Served, exported_repository: Path) -> None:
    with VaeClient(served.process.target, timeout_s=30) as client:
        assert client.health("") == "SERVING"
        drawn = client.sample(8, seed=1234)
        info = client.model_info()
    with running_server(exported_repository) as local, VaeClient(local.target, timeout_s=30) as client:
        expected = client.sample(8, seed=1234)
    np.testing.assert_array_equal(drawn.latents, expected.latents)
    np.testing.assert_array_equal(drawn.images, expected.images)
    assert info.provider == "CPUExecutionProvider"
    print(f"container: SERVING {served.started_s:.1f} s after docker run, RSS {served.rss_bytes / 2**20:.0f} MiB")
    assert served.rss_bytes < mebibytes(pod()[1]["resources"]["requests"]["memory"]) * 2**20


def test_the_probes_health_port_answers_plaintext(served: Served) -> None:
    started = next(event for event in served.process.events() if event["event"] == "server_started")
    with grpc.insecure_channel(started["health_address"]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_container_serves_metrics(served: Served) -> None:
    with VaeClient(served.process.target, timeout_s=30) as client:
        client.sample(2, seed=1)
    samples = scrape(served.process.metrics_url)
    assert any(labels["method"] == "Sample" and labels["code"] == "OK" for labels, _ in samples["vae_requests_total"])
    assert [labels["name"] for labels, _ in samples["vae_model_info"]] == ["vae-mnist"]


def test_sigterm_drains_to_exit_0_and_every_log_line_is_json(docker: Docker, served: Served) -> None:
    """Last in this module: it stops the container the tests above share."""
    grace_seconds = pod()[0]["terminationGracePeriodSeconds"]
    start = time.monotonic()
    docker("stop", "--time", str(grace_seconds), CONTAINER, timeout_s=grace_seconds + 30)
    stopped_s = time.monotonic() - start
    # 0, not 137: the server drained and exited on SIGTERM, before docker's SIGKILL at the end of the grace period
    assert docker("inspect", "--format", "{{.State.ExitCode}}", CONTAINER).strip() == "0"
    print(f"container: docker stop → exit 0 in {stopped_s:.1f} s (grace period {grace_seconds} s)")
    logs = subprocess.run(
        docker.command("logs", CONTAINER), env=docker.env, capture_output=True, text=True, timeout=30, check=True
    )
    lines = (logs.stdout + logs.stderr).splitlines()
    not_json = [line for line in lines if json_object(line) is None]
    assert not not_json, f"the container printed lines that are not JSON objects: {not_json[:5]}"
    events = [json.loads(line)["event"] for line in lines]
    assert "server_started" in events and "server_draining" in events and events[-1] == "server_stopped", events


def json_object(line: str) -> dict | None:
    try:
        parsed = json.loads(line)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None
