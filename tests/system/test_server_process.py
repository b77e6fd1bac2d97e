"""The server as a process, as a pod runs it: start-up refusals, a SIGTERM drain in the middle of a burst,
SIGHUP, and a burst well past the queue bound (the excess gets RESOURCE_EXHAUSTED at once, every accepted
request is answered correctly, the process's RSS stays bounded, health stays SERVING).

Each test starts `python -m serving.server` (`bench/server_process.py`), which is why they are system tests.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api import pb, pb_grpc
from serving.api.tensors import tensor_from_proto, tensor_to_proto
from serving.client import VaeClient, VaeError
from tests.helpers import DirectGraphs, ServerProcess, publish_copy, rss_bytes, scrape, wait_until

LATENT_DIM = 20
REQUEST_ROWS = 256
BURST = 96  # requests at once: 24,576 rows against a queue of 512


@pytest.fixture
def server_process(exported_repository: Path) -> Iterator[ServerProcess]:
    # every batch waits out the delay (fixed wait), so requests stay queued
    with ServerProcess.vae_server(
        f"--model-dir={exported_repository}", "--max-delay-ms=2000", "--batch-wait=fixed", "--grace-seconds=10",
        "--intra-op-threads=1",
    ) as server:  # fmt: skip
        yield server


def test_sigterm_during_a_burst_loses_no_accepted_request_and_exits_0(
    server_process: ServerProcess, exported_repository: Path
) -> None:
    latents = np.random.default_rng(0).standard_normal((16, 20)).astype(np.float32)
    stop_looping = threading.Event()
    loop_codes: list[grpc.StatusCode] = []

    def keep_calling() -> None:  # the rest of the burst: answered, or refused with UNAVAILABLE, nothing else
        with VaeClient(server_process.target, retries=0, timeout_s=20) as client:
            while not stop_looping.is_set():
                try:
                    client.decode(latents[:1])
                    loop_codes.append(grpc.StatusCode.OK)
                except VaeError as error:
                    loop_codes.append(error.code)
                    return

    with VaeClient(server_process.target, retries=0, timeout_s=20) as client, ThreadPoolExecutor(20) as pool:
        loopers = [pool.submit(keep_calling) for _ in range(4)]
        accepted = [pool.submit(client.decode, latents[i : i + 1]) for i in range(16)]
        # all 16, and one call of each looper, are queued (a batch waits up to 2 s for 64 rows) when the signal comes
        wait_until(lambda: _queued_rows(server_process) == 20, what="20 rows queued")
        server_process.process.send_signal(signal.SIGTERM)
        wait_until(lambda: _draining(server_process.target), what="health to leave SERVING")
        with pytest.raises(VaeError) as refused:
            client.decode(latents[:1])
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        answers = [future.result(timeout=30).images for future in accepted]
        stop_looping.set()
        for looper in loopers:
            looper.result(timeout=30)

    expected = DirectGraphs(exported_repository).decode(latents)
    np.testing.assert_allclose(np.concatenate(answers), expected, atol=1e-5)
    assert set(loop_codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, loop_codes
    assert loop_codes.count(grpc.StatusCode.OK) >= 4  # the loopers' queued calls were accepted, so answered
    assert server_process.wait() == 0
    events = [event["event"] for event in server_process.events() if event["event"].startswith("server_")]
    assert events == ["server_started", "server_draining", "server_stopped"]


def _queued_rows(server: ServerProcess) -> float:
    samples = scrape(server.metrics_url)
    return sum(value for labels, value in samples["vae_queue_depth"] if labels["graph"] == "decoder")


def _draining(target: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAVAILABLE
    return reply.status != health_pb2.HealthCheckResponse.SERVING


def test_a_model_that_fails_verification_stops_start_up(exported_repository: Path, tmp_path: Path) -> None:
    broken = tmp_path / "vae-mnist"
    shutil.copytree(exported_repository, broken)
    with (broken / "1" / "decoder.onnx").open("ab") as graph:
        graph.write(b"tampered")
    result = subprocess.run(
        [sys.executable, "-m", "serving.server", "--model-dir", str(broken), "--port", "0", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "decoder.onnx: " in last and "the file changed after export" in last
    assert "Traceback" not in result.stderr


def test_a_missing_model_directory_stops_start_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serving.server", "--port", "0", "--metrics-port", "0"],
        env={"VAE_MODEL_DIR": str(tmp_path / "nowhere"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'}: model directory not found"


def test_sighup_looks_at_the_directory_at_once(model_dir: Path) -> None:
    with ServerProcess.vae_server(f"--model-dir={model_dir}", "--poll-seconds=0") as server:
        with VaeClient(server.target) as client:
            publish_copy(model_dir, 2)
            assert client.sample(1).model_version == 1  # no polling: nothing happens by itself
            server.process.send_signal(signal.SIGHUP)
            wait_until(lambda: client.sample(1).model_version == 2, timeout_s=20, what="version 2 after SIGHUP")
        assert server.stop() == 0
    events = [event for event in server.events() if event["event"] in ("model_loaded", "model_unloaded")]
    assert [(event["event"], event["version"]) for event in events] == [
        ("model_loaded", 1),
        ("model_loaded", 2),
        ("model_unloaded", 1),
        ("model_unloaded", 2),  # at shutdown
    ]


@pytest.fixture(scope="module")
def burst_server(exported_repository: Path) -> Iterator[ServerProcess]:
    with ServerProcess.vae_server(
        f"--model-dir={exported_repository}", "--intra-op-threads=1", "--max-batch-size=64", "--max-queue-rows=512",
        f"--max-items-per-request={REQUEST_ROWS}", "--max-delay-ms=2",
    ) as server:  # fmt: skip
        yield server


async def _burst(target: str, latents: list[np.ndarray]) -> tuple[list[tuple[int, object]], list[int]]:
    """BURST concurrent Decode calls (request i sends latents[i % len]); health is polled meanwhile."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as channel:
        stub = pb_grpc.VaeServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def decode(i: int) -> tuple[int, object]:
            request = pb.DecodeRequest(latents=tensor_to_proto(latents[i % len(latents)]))
            try:
                reply = await stub.Decode(request, timeout=60)
            except grpc.aio.AioRpcError as error:
                return i, error.code()
            return i, tensor_from_proto(reply.images, "images")

        async def poll_health() -> list[int]:
            statuses = []
            for _ in range(5):
                statuses.append((await health.Check(health_pb2.HealthCheckRequest(), timeout=30)).status)
                await asyncio.sleep(0.01)
            return statuses

        results, statuses = await asyncio.gather(asyncio.gather(*(decode(i) for i in range(BURST))), poll_health())
    return list(results), statuses


def test_a_burst_past_the_queue_bound_sheds_the_excess_and_answers_the_rest(
    burst_server: ServerProcess, exported_repository: Path
) -> None:
    rng = np.random.default_rng(0)
    latents = [rng.standard_normal((REQUEST_ROWS, LATENT_DIM)).astype(np.float32) for _ in range(4)]
    expected = [DirectGraphs(exported_repository).decode(z) for z in latents]
    with VaeClient(burst_server.target) as client:
        client.decode(latents[0])  # first allocations done before measuring
    pid = burst_server.process.pid
    rss = [rss_bytes(pid)]
    accepted = shed = 0
    for _ in range(3):
        results, statuses = asyncio.run(_burst(burst_server.target, latents))
        rss.append(rss_bytes(pid))
        assert set(statuses) == {health_pb2.HealthCheckResponse.SERVING}
        for i, result in results:
            if isinstance(result, np.ndarray):
                np.testing.assert_allclose(result, expected[i % len(latents)], atol=1e-5)
                accepted += 1
            else:
                assert result == grpc.StatusCode.RESOURCE_EXHAUSTED, result
                shed += 1
    assert accepted >= 3 and shed >= 3, (accepted, shed)  # the queue holds 2 requests: most of each burst is shed
    samples = scrape(burst_server.metrics_url)
    codes = {labels["code"]: value for labels, value in samples["vae_requests_total"] if labels["method"] == "Decode"}
    assert codes.get("RESOURCE_EXHAUSTED") == shed and codes.get("OK") == accepted + 1
    growth_mib = (rss[-1] - rss[0]) / 2**20
    print(f"RSS MiB per burst: {[round(r / 2**20, 1) for r in rss]}; accepted {accepted}, shed {shed}")
    assert growth_mib < 64, rss  # bounded by the queue, not by the burst
    assert rss[-1] - rss[1] < 16 * 2**20, rss  # flat from one burst to the next
