"""Overload, slow and vanishing clients: the server sheds what it cannot take, and leaks nothing.

(A burst against the server as a process: tests/system/test_server_process.py.)

- Cancelled calls and expired deadlines never run and give their queue slots back.
- A client process killed mid-stream, or one that stops reading, does not keep the server working or leak.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.api import pb
from serving.api.tensors import tensor_to_proto
from serving.client import VaeClient, VaeError
from tests.helpers import (
    DirectGraphs,
    ServerThread,
    patient_config,
    running_server,
    wait_until,
)

LATENT_DIM = 20


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
