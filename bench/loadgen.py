"""Closed-loop gRPC load generator: N concurrent callers, each sending its next request when the last returns.

    python bench/loadgen.py --target 127.0.0.1:50051 --rpc decode --rows 1 --concurrency 32 --duration 10 --cpus 1

Prints one JSON line: requests/s, rows/s, latency p50/p90/p99/max in ms, and errors by status code. One
request message is built up front and sent again and again, so the generator spends its time on gRPC, not on
numpy. `--cpus` pins the process (like `taskset`), so a server and its load can share a machine in a stated way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import numpy as np

from serving.api import pb, pb_grpc

RPCS = ("decode", "encode", "sample", "interpolate", "score", "score-iwae8", "reconstruct", "traverse")


@dataclass(frozen=True)
class LoadResult:
    rpc: str
    rows: int
    concurrency: int
    duration_s: float
    requests: int
    requests_per_s: float
    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]


def _tensor(array: np.ndarray) -> Any:
    dtype = pb.DTYPE_UINT8 if array.dtype == np.uint8 else pb.DTYPE_FLOAT32
    return pb.Tensor(shape=list(array.shape), dtype=dtype, data=np.ascontiguousarray(array).tobytes())


def build_request(rpc: str, rows: int, latent_dim: int, seed: int = 0) -> tuple[str, Any]:
    """(stub method name, request message) for `rows` items of `rpc`."""
    rng = np.random.default_rng(seed)
    if rpc == "decode":
        return "Decode", pb.DecodeRequest(latents=_tensor(rng.standard_normal((rows, latent_dim), dtype=np.float32)))
    if rpc == "encode":
        return "Encode", pb.EncodeRequest(images=_tensor(rng.random((rows, 1, 28, 28), dtype=np.float32)))
    if rpc == "sample":
        return "Sample", pb.SampleRequest(num_samples=rows)
    if rpc == "interpolate":
        start, end = (rng.standard_normal((rows, latent_dim), dtype=np.float32) for _ in range(2))
        return "Interpolate", pb.InterpolateRequest(start=_tensor(start), end=_tensor(end), steps=8)
    images = _tensor(rng.random((rows, 1, 28, 28), dtype=np.float32))
    if rpc in ("score", "score-iwae8"):
        return "Score", pb.ScoreRequest(images=images, importance_samples=8 if rpc == "score-iwae8" else 0)
    if rpc == "reconstruct":
        return "Reconstruct", pb.ReconstructRequest(images=images)
    if rpc == "traverse":  # about `rows` images: min(rows, D) dimensions x max(2, rows // D) steps
        origin = _tensor(rng.standard_normal((1, latent_dim), dtype=np.float32))
        dims = min(rows, latent_dim)
        return "Traverse", pb.TraverseRequest(origin=origin, dimensions=range(dims), steps=max(2, rows // dims))
    raise ValueError(f"unknown rpc {rpc!r}; one of {', '.join(RPCS)}")


async def run_load(
    target: str,
    rpc: str,
    rows: int,
    concurrency: int,
    duration_s: float | None = None,
    requests: int | None = None,
    warmup_s: float = 1.0,
    timeout_s: float = 10.0,
    on_measuring: Callable[[], None] | None = None,
    on_measured: Callable[[], None] | None = None,
) -> LoadResult:
    """Drive the server closed-loop; measure after `warmup_s`, for `duration_s` or until `requests` are done.

    `on_measuring` and `on_measured` are called as the measured part begins and ends (bench/serving.py reads
    the server's CPU time there).
    """
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.VaeServiceStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s)
        method_name, request = build_request(rpc, rows, info.latent_dim)
        method = getattr(stub, method_name)
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        measuring = False
        remaining = requests

        async def caller(stop_at: float) -> None:
            nonlocal remaining
            while time.perf_counter() < stop_at:
                if measuring and remaining is not None:
                    if remaining <= 0:
                        return
                    remaining -= 1
                started = time.perf_counter()
                try:
                    await method(request, timeout=timeout_s)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                if measuring:
                    latencies.append(time.perf_counter() - started)
                    codes[code] += 1

        if warmup_s > 0:
            await asyncio.gather(*(caller(time.perf_counter() + warmup_s) for _ in range(concurrency)))
        if on_measuring is not None:
            on_measuring()
        measuring = True
        began = time.perf_counter()
        stop_at = began + (duration_s if duration_s is not None else 3600.0)
        await asyncio.gather(*(caller(stop_at) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        if on_measured is not None:
            on_measured()
    done = len(latencies)
    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    ok = codes.get("OK", 0)
    return LoadResult(
        rpc=rpc,
        rows=rows,
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=done,
        requests_per_s=round(ok / elapsed, 1),
        rows_per_s=round(ok * rows / elapsed, 1),
        p50_ms=round(float(np.percentile(ms, 50)), 3),
        p90_ms=round(float(np.percentile(ms, 90)), 3),
        p99_ms=round(float(np.percentile(ms, 99)), 3),
        max_ms=round(float(ms.max()), 3),
        errors={code: count for code, count in sorted(codes.items()) if code != "OK"},
    )


def pin_to_cpus(spec: str) -> None:
    """Restrict this process to the CPUs in `spec` ("1", "0,1", "2-3"), as `taskset -c` would."""
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    os.sched_setaffinity(0, cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address (host:port)")
    parser.add_argument("--rpc", choices=RPCS, default="decode", help="which RPC to call")
    parser.add_argument("--rows", type=int, default=1, help="items per request (latents, images, samples, pairs)")
    parser.add_argument("--concurrency", type=int, default=1, help="concurrent closed-loop callers")
    parser.add_argument("--duration", type=float, help="seconds to measure (default 10 unless --requests)")
    parser.add_argument("--requests", type=int, help="measure this many requests instead of a duration")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load first")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline in seconds")
    parser.add_argument("--cpus", help="pin the generator to these CPUs, e.g. 1 or 2-3")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.concurrency < 1:
        parser.error("--rows and --concurrency must be >= 1")
    if args.cpus:
        pin_to_cpus(args.cpus)
    duration = args.duration if args.duration is not None or args.requests is not None else 10.0
    try:
        result = asyncio.run(
            run_load(
                args.target, args.rpc, args.rows, args.concurrency, duration, args.requests, args.warmup, args.timeout
            )
        )
    except grpc.aio.AioRpcError as exc:
        print(f"error: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
