"""Hostile and careless callers, as the abuse benchmark and the system tests play them against a server.

    async with silent_calls(target, connections=10, calls_per_connection=100) as calls:   # A
        ...                                                                                # a cheap caller meanwhile
    codes = await calls.ended()                                                            # how each call ended

- `silent_calls` (A): calls that send their HEADERS and never their message, on connections of their own.
- `idle_connections` (B): TCP connections that send nothing at all (not even HTTP/2's preface).
- `score_burst` (C): many concurrent Score calls of 1,024 images (3.2 MB messages).
- `bulk_load` (D): one client keeping N expensive but valid requests in flight (Score with K = 1,024, a
  Traverse of every dimension, a 1,024-step Interpolate, or read-as-fast-as-possible SampleStreams).
- `cheap_caller`: the innocent bystander, one 1-row Decode after another on a connection it already had
  (`connected`), its latencies and status codes; `new_connection_status`: a client arriving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from serving.api import SERVICE_NAME, pb, pb_grpc
from serving.api.tensors import tensor_to_proto

LATENT_DIM = 20
IMAGE_SHAPE = (1, 28, 28)


def _channel(target: str) -> grpc.aio.Channel:
    """A channel with a connection of its own (channels to one target otherwise share their subchannel)."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
    return grpc.aio.insecure_channel(target, options=options)


@dataclass
class SilentCalls:
    """Calls that never sent their message; `ended()` waits for the server to end them, and counts how."""

    calls: list[Any] = field(default_factory=list)

    async def ended(self, timeout_s: float = 60.0) -> Counter[str]:
        async def code(call: Any) -> str:
            try:
                await call
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "OK"

        codes = await asyncio.wait_for(asyncio.gather(*(code(call) for call in self.calls)), timeout_s)
        return Counter(codes)


@contextlib.asynccontextmanager
async def silent_calls(target: str, connections: int, calls_per_connection: int) -> AsyncIterator[SilentCalls]:
    """A: `connections` connections × `calls_per_connection` Decode calls that never send their request."""
    never = asyncio.Event()

    async def nothing() -> AsyncIterator[bytes]:
        await never.wait()
        yield b""  # pragma: no cover - never reached

    channels = [_channel(target) for _ in range(connections)]
    silent = SilentCalls()
    method = f"/{SERVICE_NAME}/Decode"
    try:
        for channel in channels:
            # A request-streaming call: gRPC sends its HEADERS at once and its message when the iterator yields.
            send = channel.stream_unary(method, request_serializer=None, response_deserializer=None)
            silent.calls += [send(nothing(), timeout=3600) for _ in range(calls_per_connection)]
        yield silent
    finally:
        for call in silent.calls:
            call.cancel()
        for channel in channels:
            await channel.close()


@contextlib.contextmanager
def idle_connections(host: str, port: int, count: int) -> Iterator[list[socket.socket]]:
    """B: `count` TCP connections that send nothing; closed on leaving."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                sockets.append(socket.create_connection((host, port), timeout=5))
            except OSError:  # refused or reset: the server is not taking more
                break
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (what it sent before closing, its SETTINGS or GOAWAY, is read away)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def _decode_request(rows: int) -> pb.DecodeRequest:
    return pb.DecodeRequest(latents=tensor_to_proto(np.zeros((rows, LATENT_DIM), np.float32)))


def _images(count: int) -> pb.Tensor:
    rng = np.random.default_rng(count)
    return tensor_to_proto(rng.random((count, *IMAGE_SHAPE), dtype=np.float32))


async def _status(call: Awaitable[Any]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def score_burst(target: str, calls: int, images: int = 1024) -> Counter[str]:
    """C: `calls` concurrent Score calls of `images` images each, every one on its own connection."""
    request = pb.ScoreRequest(images=_images(images))
    channels = [_channel(target) for _ in range(calls)]
    try:
        stubs = [pb_grpc.VaeServiceStub(channel) for channel in channels]
        return Counter(await asyncio.gather(*(_status(stub.Score(request, timeout=120)) for stub in stubs)))
    finally:
        for channel in channels:
            await channel.close()


BULK_KINDS = ("score-k1024", "traverse-all", "interpolate-1024", "streams")


def _bulk_call(stub: pb_grpc.VaeServiceStub, kind: str) -> Callable[[], Awaitable[Any]]:
    """One expensive request of `kind`, as a coroutine factory."""
    if kind == "score-k1024":
        request: Any = pb.ScoreRequest(images=_images(1), importance_samples=1024)
        return lambda: stub.Score(request, timeout=120)
    if kind == "traverse-all":
        request = pb.TraverseRequest(origin=tensor_to_proto(np.zeros((1, LATENT_DIM), np.float32)), steps=51)
        return lambda: stub.Traverse(request, timeout=120)
    if kind == "interpolate-1024":
        ends = np.zeros((1, LATENT_DIM), np.float32)
        request = pb.InterpolateRequest(start=tensor_to_proto(ends), end=tensor_to_proto(ends + 1), steps=1024)
        return lambda: stub.Interpolate(request, timeout=120)
    if kind == "streams":
        request = pb.SampleRequest(num_samples=1_000_000)

        async def read_all() -> None:
            async for _ in stub.SampleStream(request, timeout=3600):
                pass

        return read_all
    raise ValueError(f"unknown bulk kind {kind!r}: one of {', '.join(BULK_KINDS)}")


@dataclass
class CallCounts:
    """How an attacker's calls ended, by status code name, and how long its refusals took (seconds)."""

    codes: Counter[str] = field(default_factory=Counter)
    refused_s: list[float] = field(default_factory=list)  # RESOURCE_EXHAUSTED answers' latencies

    def refused_p99_ms(self) -> float | None:
        return round(float(np.quantile(self.refused_s, 0.99)) * 1000, 2) if self.refused_s else None


@contextlib.asynccontextmanager
async def bulk_load(target: str, kind: str, concurrency: int) -> AsyncIterator[CallCounts]:
    """D: one client (one connection) keeping `concurrency` requests of `kind` in flight until the block ends;
    yields the running count of how its calls ended."""
    counts = CallCounts()
    stop = asyncio.Event()
    async with _channel(target) as channel:
        call = _bulk_call(pb_grpc.VaeServiceStub(channel), kind)

        async def keep_going() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                code = await _status(call())
                counts.codes[code] += 1
                if code == "RESOURCE_EXHAUSTED":
                    counts.refused_s.append(time.perf_counter() - started)

        workers = [asyncio.ensure_future(keep_going()) for _ in range(concurrency)]
        try:
            yield counts
        finally:
            stop.set()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


@dataclass
class CheapCalls:
    """What the cheap caller saw: each call's latency (seconds) and status code name."""

    latencies_s: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)

    def quantile_ms(self, q: float) -> float:
        return round(float(np.quantile(self.latencies_s, q)) * 1000, 2) if self.latencies_s else float("nan")


@contextlib.asynccontextmanager
async def connected(target: str) -> AsyncIterator[pb_grpc.VaeServiceStub]:
    """A stub on a connection of its own, already connected (one call made): a client that was there before."""
    async with _channel(target) as channel:
        stub = pb_grpc.VaeServiceStub(channel)
        await stub.Decode(_decode_request(1), timeout=30)
        yield stub


async def cheap_caller(stub: pb_grpc.VaeServiceStub, duration_s: float, timeout_s: float = 10.0) -> CheapCalls:
    """One 1-row Decode after another for `duration_s` through `stub`."""
    seen = CheapCalls()
    request = _decode_request(1)
    deadline = time.perf_counter() + duration_s
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        code = await _status(stub.Decode(request, timeout=timeout_s))
        seen.latencies_s.append(time.perf_counter() - started)
        seen.codes[code] += 1
    return seen


async def new_connection_status(target: str) -> str:
    """How a 1-row Decode on a brand-new connection ends (a client arriving now)."""
    async with _channel(target) as channel:
        return await _status(pb_grpc.VaeServiceStub(channel).Decode(_decode_request(1), timeout=10))
