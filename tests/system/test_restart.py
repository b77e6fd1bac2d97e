"""Restarts and model integrity: nothing accepted is lost, and no answer ever comes from an unverified model.

- SIGTERM under steady mixed load: every call is answered correctly or refused with UNAVAILABLE, the process
  drains and exits 0, and a new server on the same model serves the very same seeded samples.
- A graph failing its checksum or a manifest of another latent size stops start-up; replacing the model
  directory under a running server changes no answer (it serves the bytes it verified at start-up).
(test_server_process.py has the SIGTERM drain with queued requests, and start-up failures as a process.)
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from contract.repository import ModelRepositoryError
from serving.client import VaeClient, VaeError
from serving.server.app import start_server
from tests.helpers import DirectGraphs, ServerProcess, running_server, server_config

GRACE_SECONDS = 5.0
SEEDS = range(8)


def start_process(model_dir: Path) -> ServerProcess:
    return ServerProcess.vae_server(
        f"--model-dir={model_dir}", "--intra-op-threads=1", f"--grace-seconds={GRACE_SECONDS}"
    ).wait_started()


def test_sigterm_under_steady_load_loses_nothing_and_a_new_server_serves_the_same_samples(
    exported_repository: Path,
) -> None:
    latents = np.random.default_rng(2).standard_normal((4, 20)).astype(np.float32)
    expected_images = DirectGraphs(exported_repository).decode(latents)
    first = start_process(exported_repository)
    answered: dict[int, np.ndarray] = {}
    codes: list[grpc.StatusCode] = []
    details: list[str] = []
    signalled = threading.Event()
    try:

        def steady_load(worker: int) -> None:  # mixed calls until the server refuses one
            # The client's retries matter: a call that races the listener closing is refused by gRPC core with
            # CANCELLED before it reaches the service; the client retries it and then gets UNAVAILABLE.
            with VaeClient(first.target, timeout_s=20) as client:
                for call in range(10_000):
                    try:
                        if call % 2:
                            np.testing.assert_allclose(client.decode(latents).images, expected_images, atol=1e-5)
                        else:
                            seed = SEEDS[(worker + call) % len(SEEDS)]
                            answered[seed] = client.sample(4, seed=seed).images
                        codes.append(grpc.StatusCode.OK)
                    except VaeError as error:
                        codes.append(error.code)
                        details.append(error.details)
                        return
                    if call == 20 and worker == 0:
                        signalled.set()

        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(steady_load, worker) for worker in range(4)]
            assert signalled.wait(timeout=60)
            first.process.send_signal(signal.SIGTERM)
            for worker in workers:
                worker.result(timeout=60)
        assert first.wait(timeout_s=GRACE_SECONDS + 20) == 0
        events = [event["event"] for event in first.events() if event["event"].startswith("server_")]
        assert events == ["server_started", "server_draining", "server_stopped"]  # drained, not killed
    finally:
        if first.process.poll() is None:
            first.process.kill()
    assert codes.count(grpc.StatusCode.OK) >= 20 and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, (
        details
    )
    assert len(answered) == len(SEEDS)

    second = start_process(exported_repository)
    try:
        with VaeClient(second.target) as client:
            for seed, images in answered.items():
                np.testing.assert_array_equal(client.sample(4, seed=seed).images, images)  # bit for bit
    finally:
        assert second.stop() == 0


def _tamper_encoder(version_dir: Path) -> None:
    with (version_dir / "encoder.onnx").open("r+b") as graph:
        graph.seek(100)
        byte = graph.read(1)
        graph.seek(100)
        graph.write(bytes([byte[0] ^ 0xFF]))


def _manifest_of_latent_8(version_dir: Path) -> None:
    """The manifest a latent-8 export would write (self-consistent), beside the latent-20 graphs."""
    path = version_dir / "model.json"
    manifest = json.loads(path.read_text())
    manifest["latent_dim"] = 8
    for output in manifest["graphs"]["encoder"]["outputs"]:
        output["shape"] = ["batch", 8]
    manifest["graphs"]["decoder"]["inputs"][0]["shape"] = ["batch", 8]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_tamper_encoder, r"encoder\.onnx: sha256 mismatch"),
        (_manifest_of_latent_8, r"encoder\.onnx: graph outputs \[mu float32\[batch,20\]"),
    ],
    ids=["checksum", "latent-size"],
)
def test_a_model_that_fails_verification_never_starts_serving(
    model_dir: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(model_dir / "1")
    with pytest.raises(ModelRepositoryError, match=message):
        asyncio.run(start_server(server_config(model_dir)))


def test_replacing_the_model_directory_while_serving_changes_no_answer(model_dir: Path) -> None:
    images = np.random.default_rng(3).random((4, 1, 28, 28), dtype=np.float32)

    def answers(client: VaeClient) -> tuple[list[np.ndarray], tuple[int, dict[str, Any]]]:
        """The arrays of a seeded Sample and an Encode, and which version answered with which manifest."""
        drawn, posterior, info = client.sample(8, seed=5), client.encode(images), client.model_info()
        return [drawn.images, drawn.latents, posterior.mu, posterior.log_var], (info.model_version, info.manifest)

    with running_server(model_dir, poll_seconds=0) as server, VaeClient(server.target) as client:
        before = answers(client)
        version_dir = model_dir / "1"
        (version_dir / "decoder.onnx").write_bytes((version_dir / "encoder.onnx").read_bytes())  # wrong graph
        _manifest_of_latent_8(version_dir)
        server.refresh()  # a version is immutable: the same number is not reloaded
        after_replacing = answers(client)
        shutil.rmtree(model_dir)  # and then gone altogether
        server.refresh()  # an unreadable directory is logged; the server keeps what it serves
        after_removing = answers(client)
    for arrays, answered_by in (after_replacing, after_removing):
        for array_before, array_after in zip(before[0], arrays, strict=True):
            np.testing.assert_array_equal(array_before, array_after)
        assert answered_by == before[1] and answered_by[0] == 1
    with pytest.raises(ModelRepositoryError, match="model directory not found"):
        asyncio.run(start_server(server_config(model_dir)))
