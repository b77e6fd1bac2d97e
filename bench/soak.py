"""Soak: mixed RPCs at a steady rate for minutes; errors must be 0, p99 latency and server RSS must stay flat.

    python -m bench.soak --model-dir models/vae-mnist --duration 180        # `make soak` (3 minutes)
    python -m bench.soak --model-dir DIR --duration 20 --windows 4          # the smoke run the tests do

Starts `python -m serving.server` on free 127.0.0.1 ports, warms it up, then `--workers` threads call
Sample, Decode, Encode, Interpolate, SampleStream, GetModelInfo and health in turn, paced to `--rate`
calls/s in total. Every answer is checked: a seeded Sample, and Decode/Encode/Interpolate of fixed inputs,
must equal the first answer bit for bit; a stream must bring all its rows. The run is cut into `--windows`
equal windows: per window the p99 latency and the server's RSS (/proc/PID/status) at its end. Drift is
last window against first: p99 ratio, RSS difference. Prints a table, then one JSON line; exits 1 when
there were errors or the RSS grew more than `--max-rss-growth-mib`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.server_process import ServerProcess
from serving.client import VaeClient, VaeError


@dataclass
class Window:
    latencies_s: list[float] = field(default_factory=list)
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rss_bytes: int = 0

    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_s, 99) * 1000) if self.latencies_s else float("nan")


class Mix:
    """The calls a worker makes in turn; each checks its answer against the first one seen."""

    def __init__(self, latent_dim: int) -> None:
        rng = np.random.default_rng(0)
        self.latents = rng.standard_normal((8, latent_dim)).astype(np.float32)
        self.images = rng.random((8, 1, 28, 28), dtype=np.float32)
        self.first: dict[Any, bytes] = {}
        self.lock = threading.Lock()

    def same_as_first(self, key: Any, *arrays: np.ndarray) -> None:
        data = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
        with self.lock:
            expected = self.first.setdefault(key, data)
        if data != expected:
            raise AssertionError(f"{key}: the answer changed")

    def calls(self, client: VaeClient) -> list[tuple[str, Callable[[int], None]]]:
        def sample(i: int) -> None:
            drawn = client.sample(8, seed=i % 16)
            self.same_as_first(("sample", i % 16), drawn.images, drawn.latents)

        def decode(i: int) -> None:
            self.same_as_first("decode", client.decode(self.latents, output_dtype="uint8").images)

        def encode(i: int) -> None:
            posterior = client.encode(self.images)
            self.same_as_first("encode", posterior.mu, posterior.log_var)

        def interpolate(i: int) -> None:
            path = client.interpolate(self.latents[:2], self.latents[2:4], 8, "slerp")
            self.same_as_first("slerp", path.images, path.latents)

        def stream(i: int) -> None:
            rows = sum(len(chunk.latents) for chunk in client.sample_stream(200, seed=i % 4))
            if rows != 200:
                raise AssertionError(f"SampleStream brought {rows} rows of 200")

        def info(i: int) -> None:
            self.same_as_first("info", np.frombuffer(json.dumps(client.model_info().manifest).encode(), np.uint8))
            if client.health() != "SERVING":
                raise AssertionError("health is not SERVING")

        return [("Sample", sample), ("Decode", decode), ("Encode", encode), ("Interpolate", interpolate),
                ("SampleStream", stream), ("GetModelInfo", info)]  # fmt: skip


def soak(target: str, rss: Callable[[], int], duration_s: float, rate: float, workers: int, windows: int) -> dict:
    """Run the mix against `target`; returns the report (per-window figures and the drifts)."""
    with VaeClient(target) as client:
        mix = Mix(client.model_info().latent_dim)
        for _, call in mix.calls(client):  # warm-up, and the reference answers
            call(0)
    window_s = duration_s / windows
    slots = [Window() for _ in range(windows)]
    lock = threading.Lock()
    started = time.monotonic()
    interval_s = workers / rate  # per worker

    def work(worker: int) -> None:
        with VaeClient(target, timeout_s=30) as client:
            calls = mix.calls(client)
            next_at = time.monotonic() + worker * interval_s / workers
            i = worker
            while True:
                now = time.monotonic()
                if now - started >= duration_s:
                    return
                if next_at > now:
                    time.sleep(next_at - now)
                next_at += interval_s
                name, call = calls[i % len(calls)]
                begin = time.monotonic()
                error = None
                try:
                    call(i)
                except VaeError as failure:
                    error = f"{name}:{failure.code.name}"
                except AssertionError as failure:
                    error = f"{name}:WRONG_ANSWER ({failure})"
                end = time.monotonic()
                slot = slots[min(int((begin - started) / window_s), windows - 1)]
                with lock:
                    slot.calls += 1
                    slot.latencies_s.append(end - begin)
                    if error:
                        slot.errors[error] = slot.errors.get(error, 0) + 1
                i += workers

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    for index in range(windows):  # RSS at the end of each window
        time.sleep(max(0.0, started + (index + 1) * window_s - time.monotonic()))
        slots[index].rss_bytes = rss()
    for thread in threads:
        thread.join(timeout=60)
    errors: dict[str, int] = {}
    for slot in slots:
        for key, count in slot.errors.items():
            errors[key] = errors.get(key, 0) + count
    first, last = slots[0], slots[-1]
    return {
        "duration_s": duration_s,
        "calls": sum(slot.calls for slot in slots),
        "calls_per_s": round(sum(slot.calls for slot in slots) / duration_s, 1),
        "errors": errors,
        "error_count": sum(errors.values()),
        "windows": [
            {"calls": s.calls, "p99_ms": round(s.p99_ms(), 2), "rss_mib": round(s.rss_bytes / 2**20, 1)} for s in slots
        ],
        "p99_first_ms": round(first.p99_ms(), 2),
        "p99_last_ms": round(last.p99_ms(), 2),
        "p99_drift_ratio": round(last.p99_ms() / first.p99_ms(), 3),
        "rss_first_mib": round(first.rss_bytes / 2**20, 1),
        "rss_last_mib": round(last.rss_bytes / 2**20, 1),
        "rss_growth_mib": round((last.rss_bytes - first.rss_bytes) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/vae-mnist"), help="served by a new server")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--rate", type=float, default=60.0, help="calls per second in total (default 60)")
    parser.add_argument("--workers", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--windows", type=int, default=6, help="windows the run is cut into (default 6)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=32.0, help="fail above this (default 32)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    args = parser.parse_args(argv)
    if not (args.model_dir.is_dir()):
        print(f"error: {args.model_dir}: no model directory (run `make run` and `make export` first)", file=sys.stderr)
        return 2
    server = ServerProcess.vae_server(f"--model-dir={args.model_dir}", "--intra-op-threads=1", *args.server_arg)
    try:
        server.wait_started(timeout_s=120)
        report = soak(server.target, server.rss_bytes, args.duration, args.rate, args.workers, args.windows)
    finally:
        report_exit = server.stop()
    report["server_exit_code"] = report_exit
    print(f"soak: {report['calls']} calls in {args.duration:g} s ({report['calls_per_s']}/s), mixed RPCs")
    print(f"{'window':>6} {'calls':>7} {'p99 ms':>8} {'RSS MiB':>8}")
    for index, window in enumerate(report["windows"]):
        print(f"{index:>6} {window['calls']:>7} {window['p99_ms']:>8} {window['rss_mib']:>8}")
    print(
        f"errors {report['error_count']} {report['errors'] or ''}; p99 drift x{report['p99_drift_ratio']} "
        f"({report['p99_first_ms']} → {report['p99_last_ms']} ms); RSS drift {report['rss_growth_mib']:+} MiB "
        f"({report['rss_first_mib']} → {report['rss_last_mib']} MiB); server exit {report_exit}"
    )
    print(json.dumps(report))
    ok = report["error_count"] == 0 and report["rss_growth_mib"] <= args.max_rss_growth_mib and report_exit == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
