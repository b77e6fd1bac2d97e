"""Training throughput: the tutorial's plain loop vs the project's trainer step, same architecture, same steps.

    python -m bench.train_speed                   (about a minute on 2 CPU cores)

plain     DataLoader(TensorDataset, batch 128, shuffle), Adam(1e-3) as constructed by default, zero_grad(),
          loss.item() every step: the tutorial's loop.
trainer   training.train's own pieces: shuffled_batches (a seeded permutation indexing one in-memory tensor),
          make_optimizer (fused Adam), channels_last, bf16 autocast where the CPU/GPU has it (use_bf16).
Between them, the ablation rows add one change at a time. Each repeat runs every variant for --steps steps,
interleaved (so load from other processes hits all of them alike); the figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, TensorDataset

from training.data import load_dataset
from training.model import VAE, vae_loss
from training.train import make_optimizer, make_train_step, shuffled_batches, use_bf16

BATCH = 128


def plain_loop(images: torch.Tensor) -> Callable[[int], float]:
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(images), batch_size=BATCH, shuffle=True)
    batches = iter(loader)

    def run(steps: int) -> float:
        nonlocal batches
        started, seen = time.perf_counter(), 0
        for _ in range(steps):
            try:
                (batch,) = next(batches)
            except StopIteration:
                batches = iter(loader)
                (batch,) = next(batches)
            logits, mu, log_var = model(batch)
            loss = vae_loss(logits, batch, mu, log_var).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
            seen += len(batch)
        return seen / (time.perf_counter() - started)

    return run


def trainer_loop(images: torch.Tensor, fused: bool, channels_last: bool, bf16: bool) -> Callable[[int], float]:
    model = VAE()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-3) if fused else torch.optim.Adam(model.parameters(), lr=1e-3)
    step = make_train_step(model, optimizer, bf16)
    generator = torch.Generator().manual_seed(0)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            for batch in shuffled_batches(images, BATCH, generator):
                yield batch if channels_last else batch.contiguous()

    stream = batches()

    def run(steps: int) -> float:
        started, seen = time.perf_counter(), 0
        total = torch.zeros(())
        for _ in range(steps):
            batch = next(stream)
            reconstruction, kl = step(batch, 1.0)
            total += reconstruction + kl  # kept on the device; read once at the end
            seen += len(batch)
        total.item()
        return seen / (time.perf_counter() - started)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per variant per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    images = load_dataset("mnist-5k").train.images
    bf16 = use_bf16("auto", torch.device("cpu"))
    variants = {
        "plain (tutorial loop)": plain_loop(images),
        "+ in-memory index batching": trainer_loop(images, fused=False, channels_last=False, bf16=False),
        "+ fused Adam": trainer_loop(images, fused=True, channels_last=False, bf16=False),
        f"+ bf16 autocast ({'on' if bf16 else 'off: no bf16 hardware'})": trainer_loop(
            images, fused=True, channels_last=False, bf16=bf16
        ),
        "trainer (+ channels_last)": trainer_loop(images, fused=True, channels_last=True, bf16=bf16),
    }
    for run in variants.values():  # warm-up: allocator, oneDNN primitive caches
        run(5)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            rates[name].append(run(args.steps))

    baseline = statistics.median(rates["plain (tutorial loop)"])
    print(
        f"{torch.get_num_threads()} threads, batch {BATCH}, {args.steps} steps x {args.repeats} repeats (interleaved)"
    )
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:48} {median:8,.0f} samples/s   x{median / baseline:.2f}")


if __name__ == "__main__":
    main()
