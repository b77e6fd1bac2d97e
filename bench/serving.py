"""The serving sweep: the server with and without dynamic batching, against the in-process limit, in one run.

    python -m bench.serving --model-dir models/vae-mnist              # full sweep (~4 minutes), `make bench`
    python -m bench.serving --model-dir DIR --duration 0.3 --concurrency 1 4 --out /tmp/smoke   # smoke

Server pinned to CPU 0 and the load generator to CPU 1 (onnxruntime with 1 intra-op thread on both sides of
every comparison); each point is a fresh closed-loop run of bench/loadgen.py against a server started for
the mode it measures: batching on (`--max-batch-size 64`, the default adaptive wait), batching on with the
`fixed` wait (every batch waits out `--max-delay-ms` unless full: the earlier policy), batching off
(`--max-batch-size 1`). For Decode and Sample: (a) 1 caller x 64 rows per request, (b) 1..64 callers x 1
row. Also start-up time to SERVING and the server's RSS. And the same Decode loads against the two
reference servers of bench/baseline_servers.py: `minimal` (the decoder run inline in the handler: no
batching, validation or metrics) and `echo` (no model: what gRPC and the load generator alone cost and
allow). Each point also carries the server process's CPU time over its measured part (/proc/PID/stat, all
threads), per request: steadier than wall-clock rates when other jobs share the machine, and what one core
buys (1 / CPU seconds per request = requests/s per core). Writes `serving.json` and `serving.png` under
`--out` and prints the headline figures (docs/performance.md).
`--provider cuda` runs the server and the limit on onnxruntime's CUDA provider (where a GPU is).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.limit import measure as measure_limit
from bench.loadgen import LoadResult, pin_to_cpus, run_load
from bench.server_process import ServerProcess

_AVAILABLE = sorted(os.sched_getaffinity(0))
# The first two CPUs this process may use: the server on one, the load generator on the other.
SERVER_CPUS, LOAD_CPUS = str(_AVAILABLE[0]), str(_AVAILABLE[min(1, len(_AVAILABLE) - 1)])
# Server flags of each mode of our server.
MODES: dict[str, list[str]] = {
    "batching": ["--max-batch-size=64", "--batch-wait=adaptive"],
    "batching-fixed": ["--max-batch-size=64", "--batch-wait=fixed"],
    "no-batching": ["--max-batch-size=1"],
}
BASELINES = ("minimal", "echo")  # bench/baseline_servers.py kinds (Decode only)
BASELINE_LABELS = {
    "minimal": "minimal server (decoder inline, no batching)",
    "echo": "echo server (no model): gRPC + load generator cap",
}


@contextmanager
def server(
    model_dir: Path, mode: str, flags: Sequence[str], max_delay_ms: float, provider: str
) -> Iterator[tuple[ServerProcess, float]]:
    """Our server with `flags` (or the baseline `mode`) as a process on the server's CPU: yields it and its
    seconds to SERVING."""
    started = time.perf_counter()
    if mode in BASELINES:
        baseline = ["-m", "bench.baseline_servers", f"--kind={mode}", f"--model-dir={model_dir}", "--port=0"]
        process = ServerProcess(["taskset", "-c", SERVER_CPUS, sys.executable, *baseline, f"--provider={provider}"])
    else:
        common = [f"--model-dir={model_dir}", "--intra-op-threads=1", f"--provider={provider}"]
        process = ServerProcess.vae_server(*common, f"--max-delay-ms={max_delay_ms}", *flags, cpus=SERVER_CPUS)
    with process:
        yield process, time.perf_counter() - started


def measure_point(process: ServerProcess, rpc: str, rows: int, concurrency: int, duration_s: float) -> dict[str, Any]:
    """One closed-loop load against `process`, with the server's CPU seconds over its measured part."""
    cpu: list[float] = []
    result: LoadResult = asyncio.run(
        run_load(
            process.target, rpc, rows, concurrency, duration_s=duration_s, warmup_s=min(1.0, duration_s),
            on_measuring=lambda: cpu.append(process.cpu_seconds()),
            on_measured=lambda: cpu.append(process.cpu_seconds()),
        )
    )  # fmt: skip
    # Whole clock ticks (10 ms), so rounding to the millisecond loses nothing and removes the float noise of the
    # subtraction; the per-request figure is computed from the seconds as stored, so a reader's division agrees.
    server_cpu_s = round(cpu[1] - cpu[0], 3)
    return {
        **asdict(result),
        "server_cpu_s": server_cpu_s,
        # every request counted (errors too) cost the server CPU; the figure is exact to one tick, ~0.25 % over
        # a 4-second point at one busy core
        "server_cpu_ms_per_request": round(1e3 * server_cpu_s / max(result.requests, 1), 4),
    }


def sweep(
    model_dir: Path,
    concurrencies: list[int],
    duration_s: float,
    max_delay_ms: float,
    provider: str = "cpu",
    modes: Mapping[str, Sequence[str]] = MODES,
    baselines: Sequence[str] = BASELINES,
    rpcs: Sequence[str] = ("decode", "sample"),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every load against a fresh server per mode of ours (`modes`: name → server flags) and per baseline."""
    points: list[dict[str, Any]] = []
    process_figures: dict[str, Any] = {}
    for mode in (*modes, *baselines):
        with server(model_dir, mode, modes.get(mode, ()), max_delay_ms, provider) as (process, startup_s):
            figures = process_figures[mode] = {"startup_to_serving_s": round(startup_s, 3)}
            if provider == "cuda":  # the warm-up ran at start-up, before the server said it serves
                figures["gpu_memory_bytes_after_warm_up"] = process.gpu_memory_bytes()
            mode_rpcs = ("decode",) if mode in baselines else rpcs
            loads = [(rpc, 64, 1) for rpc in mode_rpcs]
            loads += [(rpc, 1, c) for rpc in mode_rpcs for c in concurrencies]
            for rpc, rows, concurrency in loads:
                points.append({"mode": mode, **measure_point(process, rpc, rows, concurrency, duration_s)})
                print(json.dumps(points[-1]), flush=True)
            figures["rss_bytes"] = process.rss_bytes()
            if provider == "cuda":
                figures["gpu_memory_bytes_after_loads"] = process.gpu_memory_bytes()
    return points, process_figures


def point(points: list[dict[str, Any]], mode: str, rpc: str, rows: int, concurrency: int) -> dict[str, Any] | None:
    """The point of that load, or None where this run did not measure it."""
    key = (mode, rpc, rows, concurrency)
    return next((p for p in points if (p["mode"], p["rpc"], p["rows"], p["concurrency"]) == key), None)


def find(points: list[dict[str, Any]], mode: str, rpc: str, rows: int, concurrency: int) -> dict[str, Any]:
    """The point of a load the summary needs."""
    found = point(points, mode, rpc, rows, concurrency)
    if found is None:
        raise KeyError(f"no {mode} {rpc} point for {concurrency} callers x {rows} rows")
    return found


def summary(points: list[dict[str, Any]], limit: list[dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """The headline figures of docs/performance.md (ratios measured in this run)."""
    limit_64 = next(r["rows_per_s"] for r in limit if r["graph"] == "decode" and r["batch"] == 64)
    decode_64 = find(points, "batching", "decode", 64, 1)
    figures: dict[str, Any] = {
        "decode_1x64_rows_per_s": decode_64["rows_per_s"],
        "limit_decode_batch64_rows_per_s": limit_64,
        "decode_1x64_vs_limit": round(decode_64["rows_per_s"] / limit_64, 3),
        "idle_decode_1row_p50_ms": find(points, "batching", "decode", 1, concurrencies[0])["p50_ms"],
    }
    many = 32 if 32 in concurrencies else max(concurrencies)  # the headline load: 32 callers
    on, off = find(points, "batching", "decode", 1, many), find(points, "no-batching", "decode", 1, many)
    figures[f"decode_{many}x1_requests_per_s_batching"] = on["requests_per_s"]
    figures[f"decode_{many}x1_requests_per_s_no_batching"] = off["requests_per_s"]
    figures[f"decode_{many}x1_batching_vs_off"] = round(on["requests_per_s"] / max(off["requests_per_s"], 1e-9), 2)
    figures[f"decode_{many}x1_p99_ms_batching"] = on["p99_ms"]
    # The earlier policy (every batch waits out the delay), measured in the same run.
    fixed = find(points, "batching-fixed", "decode", 1, many)
    figures[f"decode_{many}x1_requests_per_s_fixed_wait"] = fixed["requests_per_s"]
    figures[f"decode_{many}x1_p99_ms_fixed_wait"] = fixed["p99_ms"]
    idle_fixed = find(points, "batching-fixed", "decode", 1, concurrencies[0])
    figures["idle_decode_1row_p50_ms_fixed_wait"] = idle_fixed["p50_ms"]
    figures["decode_1x64_vs_limit_fixed_wait"] = round(
        find(points, "batching-fixed", "decode", 64, 1)["rows_per_s"] / limit_64, 3
    )
    # The minimal server on the same load: what our server's machinery (batcher, executor hop, validation,
    # metrics) costs at 1 x 64, and how close the simplest grpc.aio model server gets to the limit.
    minimal_64 = find(points, "minimal", "decode", 64, 1)["rows_per_s"]
    figures["minimal_decode_1x64_rows_per_s"] = minimal_64
    figures["minimal_decode_1x64_vs_limit"] = round(minimal_64 / limit_64, 3)
    figures["decode_1x64_vs_minimal"] = round(decode_64["rows_per_s"] / minimal_64, 3)
    figures[f"minimal_decode_{many}x1_requests_per_s"] = find(points, "minimal", "decode", 1, many)["requests_per_s"]
    # No model behind it: the transport floor and what the load generator can drive.
    echo_64 = find(points, "echo", "decode", 64, 1)["rows_per_s"]
    figures["echo_decode_1x64_rows_per_s"] = echo_64
    # With zero server overhead a request still costs compute (64/limit) plus the echo round trip (64/echo).
    figures["decode_1x64_vs_limit_bound"] = round(echo_64 / (echo_64 + limit_64), 3)
    figures[f"echo_decode_{many}x1_requests_per_s"] = find(points, "echo", "decode", 1, many)["requests_per_s"]
    figures.update(cpu_per_request(points, many))
    return figures


def cpu_per_request(points: list[dict[str, Any]], many: int) -> dict[str, float]:
    """The server's CPU milliseconds per Decode request, ours (batching) beside the minimal server's, for 1 x 64
    rows and `many` x 1 row, measured in the same run (one core buys 1000 / ms requests/s)."""
    figures: dict[str, float] = {}
    for rows, callers in ((64, 1), (1, many)):
        ours = find(points, "batching", "decode", rows, callers)["server_cpu_ms_per_request"]
        minimal = find(points, "minimal", "decode", rows, callers)["server_cpu_ms_per_request"]
        load = f"decode_{callers}x{rows}"
        figures[f"{load}_server_cpu_ms_per_request"] = ours
        figures[f"minimal_{load}_server_cpu_ms_per_request"] = minimal
        figures[f"{load}_server_cpu_vs_minimal"] = round(ours / max(minimal, 1e-9), 3)
    return figures


def cpu_table(points: list[dict[str, Any]]) -> str:
    """Server CPU milliseconds per request of every Decode load, one column per server (Markdown)."""
    modes = list(dict.fromkeys(p["mode"] for p in points))
    loads = list(dict.fromkeys((p["rows"], p["concurrency"]) for p in points if p["rpc"] == "decode"))
    lines = ["| Decode, callers x rows | " + " | ".join(f"{m} CPU ms/req" for m in modes) + " |"]
    lines.append("|" + " --- |" * (1 + len(modes)))
    for rows, callers in loads:
        found = [point(points, mode, "decode", rows, callers) for mode in modes]
        cells = [f"{p['server_cpu_ms_per_request']:.3f}" if p else "" for p in found]
        lines.append(f"| {callers} x {rows} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(points: list[dict[str, Any]]) -> str:
    """The points as a Markdown table (what the README shows): one row per load, one column group per mode."""
    modes = list(dict.fromkeys(p["mode"] for p in points))
    loads = list(dict.fromkeys((p["rpc"], p["rows"], p["concurrency"]) for p in points))
    header = "| RPC | callers x rows | " + " | ".join(f"{m} req/s | p50 / p99 ms" for m in modes) + " |"
    lines = [header, "|" + " --- |" * (2 + 2 * len(modes))]
    for rpc, rows, concurrency in loads:
        cells = []
        for mode in modes:
            found = point(points, mode, rpc, rows, concurrency)
            cells += (
                [f"{found['requests_per_s']:,.0f}", f"{found['p50_ms']:.2f} / {found['p99_ms']:.2f}"]
                if found
                else ["", ""]
            )
        lines.append(f"| {rpc.capitalize()} | {concurrency} x {rows} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], limit: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for column, rpc in enumerate(("decode", "sample")):
        styles = [("batching", "o-"), ("batching-fixed", "^-."), ("no-batching", "s--")]
        if rpc == "decode":
            styles += [("minimal", "d-"), ("echo", "x:")]
        for mode, style in styles:
            label = BASELINE_LABELS.get(mode, f"server, {mode}")
            series = sorted(
                (p for p in points if p["mode"] == mode and p["rpc"] == rpc and p["rows"] == 1),
                key=lambda p: p["concurrency"],
            )
            x = [p["concurrency"] for p in series]
            axes[0][column].plot(x, [p["requests_per_s"] for p in series], style, label=label)
            axes[1][column].plot(x, [p["p99_ms"] for p in series], style, label=label)
        limit_1 = next(r["rows_per_s"] for r in limit if r["graph"] == "decode" and r["batch"] == 1)
        limit_64 = next(r["rows_per_s"] for r in limit if r["graph"] == "decode" and r["batch"] == 64)
        axes[0][column].axhline(limit_64, color="grey", linestyle=":", label="in-process decoder, batch 64")
        axes[0][column].axhline(limit_1, color="black", linestyle=":", label="in-process decoder, batch 1")
        axes[0][column].set_title(f"{rpc.capitalize()}, 1 row per request")
        axes[0][column].set_ylabel("requests/s")
        axes[1][column].set_ylabel("p99 latency (ms)")
        axes[1][column].set_xlabel("concurrent callers")
        for row in axes:
            row[column].set_xscale("log", base=2)
            row[column].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("VAE server: throughput and p99 latency against concurrency (server on CPU 0, load on CPU 1)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/vae-mnist"), help="model repository entry")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64], help="callers, 1 row each")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per point")
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help="batching window of the server")
    parser.add_argument(
        "--provider", choices=("cpu", "cuda"), default="cpu", help="execution provider of the server and the limit"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where serving.json/png go")
    args = parser.parse_args(argv)
    if SERVER_CPUS == LOAD_CPUS:
        print("warning: fewer than 2 CPUs available; server and load share one", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    load_average_at_start = [round(x, 2) for x in os.getloadavg()]

    pin_to_cpus(SERVER_CPUS)  # the in-process limit runs where the server will
    limit = measure_limit(
        args.model_dir, threads=1, batch_sizes=(1, 64), block_seconds=min(0.5, args.duration), provider=args.provider
    )
    pin_to_cpus(LOAD_CPUS)  # from here on this process is the load generator
    points, process_figures = sweep(args.model_dir, args.concurrency, args.duration, args.max_delay_ms, args.provider)
    figures = summary(points, limit, args.concurrency)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "server_cpus": SERVER_CPUS,
            "load_cpus": LOAD_CPUS,
            "load_average_at_start": load_average_at_start,  # 1, 5, 15 minutes: other work on the machine
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "max_delay_ms": args.max_delay_ms,
            "provider": args.provider,
            "duration_s_per_point": args.duration,
        },
        "limit": limit,
        "points": points,
        "process": process_figures,
        "summary": figures,
    }
    (args.out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(points, limit, args.out / "serving.png")
    print(markdown_table(points))
    print(cpu_table(points))
    print(json.dumps({"summary": figures, "process": process_figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
