"""Samples/s of the VAE's decoder and encoder: PyTorch eager against onnxruntime on the CPU provider.

    python -m bench.onnx_vs_torch [--checkpoint runs/smoke/best.pt] [--threads 2] [--repeats 7]

Variants, each at batch 1, 64 and 1024:
- torch eager: `torch.inference_mode()`, `torch.set_num_threads(--threads)`;
- ort default: `InferenceSession(bytes)` with default session options;
- ort tuned: the options the server uses (`serving.dataplane.runtime.session_options`): one inter-op thread,
  sequential execution, intra-op threads not spinning when idle, all graph optimizations;
- ort tuned, offline-optimized: the same options on a graph that onnxruntime optimized ahead of time
  (an optional optimized copy that export could ship; EXTENDED level, the portable one).
The variants run interleaved (one timed block of each per round, in a shuffled order, `--repeats` rounds),
so load from other processes hits them all alike; the table shows the median samples/s and the ratio to
torch eager.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from serving.dataplane.runtime import RuntimeSettings, session_options
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.export import export_graphs
from training.model import VAE, VAEConfig

BATCH_SIZES = (1, 64, 1024)


def tuned_session_options(threads: int) -> ort.SessionOptions:
    """The options the server runs with (serving.dataplane.runtime), on the CPU with `threads` intra-op threads."""
    return session_options(RuntimeSettings(provider="cpu", intra_op_threads=threads))


def offline_optimized(graph: bytes) -> bytes:
    """The graph after onnxruntime's portable (EXTENDED) optimizations, saved ahead of time."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # ALL is CPU-specific
    with tempfile.TemporaryDirectory() as directory:
        options.optimized_model_filepath = os.path.join(directory, "optimized.onnx")
        ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        return Path(options.optimized_model_filepath).read_bytes()


def session(graph: bytes, options: ort.SessionOptions | None = None) -> tuple[ort.InferenceSession, float]:
    """A CPU session and the milliseconds it took to create."""
    start = time.perf_counter()
    created = ort.InferenceSession(graph, options or ort.SessionOptions(), providers=["CPUExecutionProvider"])
    return created, (time.perf_counter() - start) * 1000


def ort_runner(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(None, feed)


def median_samples_per_second(
    variants: dict[str, Callable[[], object]], batch: int, repeats: int, seconds: float
) -> dict[str, float]:
    """Interleaved timing: each round times one block of every variant; medians over the rounds."""
    iterations = {}
    for name, run in variants.items():  # warm up and size each block to about `seconds`
        run()
        start = time.perf_counter()
        run()
        iterations[name] = max(1, int(seconds / max(time.perf_counter() - start, 1e-6)))
    rates: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)  # a fixed order measurably favours whichever variant runs last
        for name in order:
            run = variants[name]
            start = time.perf_counter()
            for _ in range(iterations[name]):
                run()
            rates[name].append(iterations[name] * batch / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a run's best.pt (default: a fresh VAE; speed ignores weights)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads and ort tuned threads")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median over these)")
    parser.add_argument("--seconds", type=float, default=0.1, help="length of one timed block")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = model_from_checkpoint(load_checkpoint(args.checkpoint)) if args.checkpoint else VAE(VAEConfig()).eval()
    graphs = {role: proto.SerializeToString() for role, proto in export_graphs(model, "bench", 1).items()}
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPU provider), {os.cpu_count()} cores, "
        f"--threads {args.threads}, latent_dim {model.config.latent_dim}, median of {args.repeats} interleaved rounds"
    )

    columns = ("torch eager", "ort default", "ort tuned", "ort tuned, offline-opt", "default/torch", "tuned/torch")
    print("| graph | batch | " + " | ".join(columns) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    creation_ms = {}
    for role, input_name in (("decoder", "z"), ("encoder", "x")):
        default, _ = session(graphs[role])
        tuned, creation_ms[f"{role} original"] = session(graphs[role], tuned_session_options(args.threads))
        offline, creation_ms[f"{role} offline-optimized"] = session(
            offline_optimized(graphs[role]), tuned_session_options(args.threads)
        )
        forward = model.decode if role == "decoder" else model.encode
        for batch in BATCH_SIZES:
            shape = (batch, model.config.latent_dim) if role == "decoder" else (batch, *model.config.image_shape)
            data = np.random.default_rng(0).random(shape, dtype=np.float32)
            tensor = torch.from_numpy(data)

            def torch_eager(tensor: torch.Tensor = tensor, forward: Callable[..., object] = forward) -> object:
                with torch.inference_mode():
                    return forward(tensor)

            feed = {input_name: data}
            rates = median_samples_per_second(
                {
                    "torch": torch_eager,
                    "default": ort_runner(default, feed),
                    "tuned": ort_runner(tuned, feed),
                    "offline": ort_runner(offline, feed),
                },
                batch,
                args.repeats,
                args.seconds,
            )
            print(
                f"| {role} | {batch} | {rates['torch']:,.0f} | {rates['default']:,.0f} | {rates['tuned']:,.0f} | "
                f"{rates['offline']:,.0f} | {rates['default'] / rates['torch']:.2f} | "
                f"{rates['tuned'] / rates['torch']:.2f} |",
                flush=True,
            )
    print("session creation (tuned options): " + ", ".join(f"{k} {v:.0f} ms" for k, v in creation_ms.items()))


if __name__ == "__main__":
    main()
