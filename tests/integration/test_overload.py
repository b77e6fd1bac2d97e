"""Overload, slow and vanishing clients: the server sheds what it cannot take, and leaks nothing.

- A burst well past the queue bound: the excess gets RESOURCE_EXHAUSTED at once, every accepted request is
  answered correctly, the server process's RSS stays bounded, health stays SERVING.
- Cancelled calls and expired deadlines never run and give their queue slots back.
- A client process killed mid-stream, or one that stops reading, does not keep the server working or leak.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api import pb, pb_grpc
from serving.api.tensors import tensor_from_proto, tensor_to_proto
from serving.client import VaeClient, VaeError
from tests.helpers import (
    DirectGraphs,
    ServerProcess,
    ServerThread,
    patient_config,
    rss_bytes,
    running_server,
    scrape,
    wait_until,
)

LATENT_DIM = 20
REQUEST_ROWS = 256
BURST = 96  # requests at once: 24,576 rows against a queue of 512


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


@pytest.fixture(scope="module")
def patient_server(exported_repository: Path) -> Iterator[ServerThread]:
    """16 rows fill both a batch and the queue (tests.helpers.patient_config)."""
    server = ServerThread(patient_config(exported_repository, max_batch_size=16))
    yield server
    server.stop()


def test_cancelled_and_expired_calls_never_run_and_give_their_slots_back(
    patient_server: ServerThread, exported_repository: Path
) -> None:
    server = patient_server
    runs = server.metric("vae_batch_rows_count", graph="decoder")
    latents = np.random.default_rng(1).standard_normal((16, LATENT_DIM)).astype(np.float32)
    with VaeClient(server.target, retries=0) as client:
        cancelled = client._stub.Decode.future(pb.DecodeRequest(latents=tensor_to_proto(latents[:7])), timeout=30)
        wait_until(lambda: server.metric("vae_queue_depth", graph="decoder") == 7, what="7 rows queued")
        with pytest.raises(VaeError) as expired:
            client.decode(latents[:7], timeout_s=0.3)  # 14 rows: no full batch, the delay outlasts the deadline
        assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        cancelled.cancel()
        assert cancelled.cancelled()
        with pytest.raises(VaeError) as full:  # both still hold their rows until the worker sweeps them out
            client.decode(latents[:16])
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_until(lambda: server.metric("vae_queue_depth", graph="decoder") == 0, what="the slots to be freed")
        assert server.metric("vae_batch_rows_count", graph="decoder") == runs  # neither ran
        images = client.decode(latents).images  # the whole queue is free again
    np.testing.assert_allclose(images, DirectGraphs(exported_repository).decode(latents), atol=1e-5)
    wait_until(lambda: server.metric("vae_inflight_requests") == 0, what="no request in flight")
    assert server.metric("vae_requests_total", method="Decode", code="CANCELLED") == 1
    assert server.metric("vae_requests_total", method="Decode", code="DEADLINE_EXCEEDED") == 1
    assert server.metric("vae_batch_rows_count", graph="decoder") == runs + 1


def _stream_state(server: ServerThread) -> tuple[float, int]:
    return server.metric("vae_inflight_requests"), server.running.models.stream_slots.in_use


STREAMING_CLIENT = """
import sys, time
from serving.client import VaeClient
client = VaeClient(sys.argv[1])
stream = client.sample_stream(1_000_000, seed=1)
next(stream); next(stream)
print("streaming", flush=True)
time.sleep(60)
"""


def test_a_client_killed_mid_stream_leaks_nothing_and_stops_the_work(exported_repository: Path) -> None:
    with running_server(exported_repository) as server:
        client = subprocess.Popen(
            [sys.executable, "-c", STREAMING_CLIENT, server.target], stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout is not None and client.stdout.readline().strip() == "streaming"
            assert _stream_state(server) == (1, 1)
            client.kill()  # vanishes: no cancel, no goodbye, the socket just closes
        finally:
            client.kill()
            client.wait(timeout=10)
        wait_until(lambda: _stream_state(server) == (0, 0), what="the stream to end on the server")
        rows = server.metric("vae_batch_rows_sum", graph="decoder")
        time.sleep(0.5)
        # The one batch the engine was already running when the socket closed may still finish...
        settled = server.metric("vae_batch_rows_sum", graph="decoder")
        assert settled - rows <= server.running.models.engine().policy.max_batch_size
        time.sleep(0.5)
        assert server.metric("vae_batch_rows_sum", graph="decoder") == settled  # ...but nothing more is started
        assert settled < 100_000  # of the 1,000,000 asked for
        assert server.metric("vae_requests_total", method="SampleStream", code="CANCELLED") == 1
        assert server.running.models.engine().decoder.queued_rows == 0


def test_a_client_that_stops_reading_holds_the_stream_back(exported_repository: Path) -> None:
    with running_server(exported_repository) as server, VaeClient(server.target) as client:
        stream = client.sample_stream(1_000_000, seed=1)
        next(stream)  # then reads nothing more
        time.sleep(1.0)
        rows = server.metric("vae_batch_rows_sum", graph="decoder")
        time.sleep(1.0)
        produced = server.metric("vae_batch_rows_sum", graph="decoder")
        assert produced == rows, "the server kept decoding for a client that reads nothing"
        assert produced < 100_000, produced  # flow control: a few MB of chunks at most, not the whole stream
        stream.close()
        wait_until(lambda: _stream_state(server) == (0, 0), what="the stream to end on the server")
