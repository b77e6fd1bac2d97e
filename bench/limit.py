"""The ceiling: rows/s of the served graphs called in-process, with the sessions the server itself builds.

    python bench/limit.py --model-dir models/vae-mnist --threads 1 --cpus 0

No server can pass these figures on the same cores: a gRPC server adds decoding, validation, batching and
the network on top of exactly these `GraphSession.run` calls. Prints one JSON line per graph and batch size
(median rows/s over `--repeats` timed blocks of about `--block-seconds` each). `--io-binding on|pinned` runs the
same sessions through IOBinding instead (bench/runtime_options.py), which the server does not do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from bench.loadgen import pin_to_cpus
from bench.runtime_options import IO_BINDINGS, IoBinding, IoBoundGraph
from contract.repository import load_version
from serving.dataplane.runtime import Provider, RuntimeSettings, load_sessions

BATCH_SIZES = (1, 64, 1024)


class Runner(Protocol):
    """What is timed: a GraphSession, an IoBoundGraph, or bench/gpu_serving.py's CUDA-graph runner."""

    def run(self, rows: np.ndarray) -> Sequence[np.ndarray]: ...


def rows_per_second(runner: Runner, rows: np.ndarray, block_seconds: float, repeats: int) -> float:
    """Median over `repeats` blocks of back-to-back runs; each block lasts about `block_seconds`."""
    runner.run(rows)  # warm: first-run allocation is not part of the steady state
    started = time.perf_counter()
    runner.run(rows)
    per_run = max(time.perf_counter() - started, 1e-6)
    runs_per_block = max(1, int(block_seconds / per_run))
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(runs_per_block):
            runner.run(rows)
        rates.append(runs_per_block * len(rows) / (time.perf_counter() - started))
    return statistics.median(rates)


def measure(
    model_dir: Path,
    threads: int,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    block_seconds: float = 0.5,
    repeats: int = 5,
    provider: Provider = "cpu",
    io_binding: IoBinding = "off",
) -> list[dict[str, object]]:
    """rows/s of decoder and encoder at each batch size, as dicts ready for JSON."""
    model = load_version(model_dir)
    runtime = load_sessions(model, RuntimeSettings(provider=provider, intra_op_threads=threads))
    decoder, encoder = (
        graph if io_binding == "off" else IoBoundGraph(spec, graph.session, io_binding)
        for graph, spec in ((runtime.decoder, model.decoder), (runtime.encoder, model.encoder))
    )
    rng = np.random.default_rng(0)
    results: list[dict[str, object]] = []
    for rows in batch_sizes:
        inputs: dict[str, tuple[Runner, np.ndarray]] = {
            "decode": (decoder, rng.standard_normal((rows, model.latent_dim), dtype=np.float32)),
            "encode": (encoder, rng.random((rows, *model.image_shape), dtype=np.float32)),
        }
        for graph, (runner, batch) in inputs.items():
            rate = rows_per_second(runner, batch, block_seconds, repeats)
            results.append(
                {
                    "graph": graph,
                    "batch": rows,
                    "rows_per_s": round(rate, 1),
                    "threads": threads,
                    "provider": runtime.provider,
                    "io_binding": io_binding,
                }
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/vae-mnist"), help="model repository entry")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCH_SIZES), help="batch sizes")
    parser.add_argument("--block-seconds", type=float, default=0.5, help="length of one timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per figure (the median is shown)")
    parser.add_argument("--provider", choices=("cpu", "cuda", "auto"), default="cpu", help="execution provider")
    parser.add_argument(
        "--io-binding", choices=IO_BINDINGS, default="off", help="off: session.run, as served; on, pinned: IOBinding"
    )
    parser.add_argument("--cpus", help="pin to these CPUs, e.g. 0")
    args = parser.parse_args(argv)
    if args.cpus:
        pin_to_cpus(args.cpus)
    for line in measure(
        args.model_dir,
        args.threads,
        tuple(args.batch),
        args.block_seconds,
        args.repeats,
        args.provider,
        args.io_binding,
    ):
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
