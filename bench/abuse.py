"""What hostile and careless callers do to everyone else: a cheap caller's latency beside each attack, in one run.

    python -m bench.abuse --model-dir models/vae-mnist              # `make bench-abuse` → bench/results/abuse.json
    python -m bench.abuse --model-dir DIR --seconds 2 --out FILE    # a short run

The server (`python -m serving.server`, default limits, one onnxruntime thread) runs pinned to CPU 0 and this
process to CPU 1 where the machine has two. For the idle baseline and then for each attack of
bench/attacks.py, a cheap caller sends one 1-row Decode after another for `--seconds` on a connection of its
own: its p50 and p99 (ms), and the ratio to its idle p50, are measured beside the attack in the same run, with
the server's peak RSS and the CPU seconds it spent. The attacks:

  silent        10 connections x 100 calls that send their HEADERS and never their message
  idle-conns    2,000 TCP connections that send nothing (the server holds at most --max-connections)
  score-burst   32 concurrent Score calls of 1,024 images each (3.2 MB messages), again and again
  score-k1024, traverse-all, interpolate-1024, streams: one client keeping 8 such requests in flight (64
                read-as-fast-as-possible SampleStreams); mix: all four at once, 2 of each

For every attack the attacker's calls are counted by status code, with the p99 latency of its refusals
(RESOURCE_EXHAUSTED should come at once). Prints a table, writes the JSON to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.attacks import (
    BULK_KINDS,
    CallCounts,
    bulk_load,
    cheap_caller,
    connected,
    idle_connections,
    new_connection_status,
    score_burst,
    silent_calls,
)
from bench.server_process import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results" / "abuse.json"
Attack = Callable[[ServerProcess], contextlib.AbstractAsyncContextManager[CallCounts]]


@contextlib.asynccontextmanager
async def _silent(server: ServerProcess) -> AsyncIterator[CallCounts]:
    counts = CallCounts()
    async with silent_calls(server.target, connections=10, calls_per_connection=100) as calls:
        yield counts
        counts.codes.update(await calls.ended(timeout_s=120))


@contextlib.asynccontextmanager
async def _idle(server: ServerProcess) -> AsyncIterator[CallCounts]:
    host, port = server.target.rsplit(":", 1)
    with idle_connections(host, int(port), 2000) as sockets:
        yield CallCounts(Counter({"connections opened": len(sockets)}))


@contextlib.asynccontextmanager
async def _burst(server: ServerProcess) -> AsyncIterator[CallCounts]:
    counts = CallCounts()
    stop = asyncio.Event()

    async def again() -> None:
        while not stop.is_set():
            counts.codes.update(await score_burst(server.target, calls=32, images=1024))

    task = asyncio.ensure_future(again())
    try:
        yield counts
    finally:
        stop.set()
        await task


def _bulk(kind: str, concurrency: int) -> Attack:
    return lambda server: bulk_load(server.target, kind, concurrency)


@contextlib.asynccontextmanager
async def _mix(server: ServerProcess) -> AsyncIterator[CallCounts]:
    merged = CallCounts()
    async with contextlib.AsyncExitStack() as stack:
        counts = [await stack.enter_async_context(bulk_load(server.target, kind, 2)) for kind in BULK_KINDS]
        yield merged
    for count in counts:
        merged.codes.update(count.codes)
        merged.refused_s += count.refused_s


ATTACKS: dict[str, Attack] = {
    "silent": _silent,
    "idle-conns": _idle,
    "score-burst": _burst,
    **{kind: _bulk(kind, 64 if kind == "streams" else 8) for kind in BULK_KINDS},
    "mix": _mix,
}


class PeakRss:
    """The server's largest resident size while the block runs (sampled every 10 ms)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.peak = server, server.rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.server.rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def measure(server: ServerProcess, attack: Attack | None, seconds: float) -> dict[str, Any]:
    """The cheap caller's figures beside `attack` (None: alone), with the server's peak RSS and CPU."""
    cpu_before, started = server.cpu_seconds(), time.perf_counter()
    newcomer = "OK"
    async with connected(server.target) as stub:  # the cheap caller was connected before the attack began
        with PeakRss(server) as rss:
            if attack is None:
                cheap, counts = await cheap_caller(stub, seconds), CallCounts()
            else:
                async with attack(server) as counts:
                    await asyncio.sleep(0.5)  # the attack is under way
                    cheap = await cheap_caller(stub, seconds)
                    newcomer = await new_connection_status(server.target)
    return {
        "cheap_p50_ms": cheap.quantile_ms(0.5),
        "cheap_p99_ms": cheap.quantile_ms(0.99),
        "cheap_calls": dict(cheap.codes),
        "new_connection": newcomer,
        "attacker_calls": dict(counts.codes),
        "attacker_refused_p99_ms": counts.refused_p99_ms(),
        "server_peak_rss_mib": round(rss.peak / 2**20, 1),
        "server_rss_after_mib": round(server.rss_bytes() / 2**20, 1),
        "server_cpu_s": round(server.cpu_seconds() - cpu_before, 2),
        "wall_s": round(time.perf_counter() - started, 2),
    }


def _pin_to(cpu: int) -> str | None:
    """Pin this process to `cpu` and return the other CPU for the server, where the machine has two or more."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, {cpus[cpu]})
    return str(cpus[1 - cpu])


def _raise_descriptor_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="e.g. models/vae-mnist")
    parser.add_argument("--seconds", type=float, default=5.0, help="the cheap caller's time beside each attack")
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS), help="which to run")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args(argv)
    _raise_descriptor_limit(2200)  # the idle-connection attack's sockets
    server_cpu = _pin_to(1)
    flags = (f"--model-dir={args.model_dir}", "--intra-op-threads=1")
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, server pinned to CPU {server_cpu}"
        if server_cpu
        else f"{os.cpu_count()} CPU",
        "seconds": args.seconds,
        "runs": {},
    }
    with ServerProcess.vae_server(*flags, cpus=server_cpu) as server:
        idle = asyncio.run(measure(server, None, args.seconds))
        results["runs"]["idle"] = idle
        for name in args.attacks:
            run = asyncio.run(measure(server, ATTACKS[name], args.seconds))
            run["cheap_p50_ratio"] = round(run["cheap_p50_ms"] / idle["cheap_p50_ms"], 1)
            results["runs"][name] = run
            time.sleep(1.0)  # the attack's leftovers end before the next one
    _print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _print_table(results: dict[str, Any]) -> None:
    print(f"{results['date']}, {results['machine']}, the cheap caller {results['seconds']} s beside each attack")
    head = f"{'attack':<19}{'p50 ms':>8}{'p99 ms':>9}{'x idle':>8}{'cheap calls':>13}{'new conn':>13}"
    print(head + f"{'peak RSS':>10}{'CPU s':>7}{'refused p99':>12}  attacker's calls")
    for name, run in results["runs"].items():
        cheap = ", ".join(f"{code} {count}" for code, count in run["cheap_calls"].items())
        attacker = ", ".join(f"{code} {count}" for code, count in run["attacker_calls"].items()) or "-"
        refused = run["attacker_refused_p99_ms"]
        print(
            f"{name:<19}{run['cheap_p50_ms']:>8}{run['cheap_p99_ms']:>9}"
            f"{run.get('cheap_p50_ratio', 1.0):>8}{cheap:>13}{run['new_connection']:>13}"
            f"{run['server_peak_rss_mib']:>9}M{run['server_cpu_s']:>7}{'-' if refused is None else refused:>12}"
            f"  {attacker}"
        )


if __name__ == "__main__":
    sys.exit(main())
