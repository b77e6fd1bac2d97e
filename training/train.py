"""Train the VAE and write a run directory.

    python -m training.train --dataset mnist-5k --epochs 1 --out runs/smoke        (also `vae-train`)
    python -m training.train --resume runs/smoke/last.pt --epochs 5                (continue that run)

The run directory gets config.json, metrics.jsonl (one line per epoch), last.pt (every epoch), best.pt
(lowest validation loss), evaluation.json (training.evaluate on the best checkpoint) and the pictures.
Every option is a field of TrainConfig; the command line is generated from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from contract import settings
from contract.settings import SettingError, check_settings, setting
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from training.data import DATASETS, DataError, Dataset, load_dataset
from training.evaluate import elbo_terms, evaluate
from training.model import VAE, VAEConfig, vae_loss

MIN_IMPROVEMENT = 1e-3  # nats: a smaller drop of the validation loss does not reset early stopping
ENV_PREFIX = "VAE_TRAIN_"  # each option's environment twin: VAE_TRAIN_EPOCHS, VAE_TRAIN_BETA, ...


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; the defaults are the default recipe (measured in bench/train_quality.py)."""

    dataset: str = setting("auto", f"dataset: {' | '.join(DATASETS)}", metavar="NAME")
    data_dir: str | None = setting(
        None, "directory with the raw MNIST / Fashion-MNIST files", metavar="DIR", shown_default="data/"
    )
    out: str = setting("runs/default", "run directory (created)", metavar="DIR")
    epochs: int = setting(100, "maximum epochs; early stopping usually ends sooner", minimum=1)
    batch_size: int = setting(64, "images per step", minimum=1)
    lr: float = setting(2e-3, "peak Adam learning rate", above=0)
    lr_schedule: Literal["cosine", "constant"] = setting("cosine", "cosine (decays to min_lr at the last epoch)")
    min_lr: float = setting(1e-5, "learning rate at the end of the cosine schedule", minimum=0)
    beta: float = setting(1.0, "weight of the KL term (beta-VAE); 1 is the true ELBO", minimum=0)
    warmup_epochs: int = setting(10, "KL warm-up: beta grows linearly over this many epochs (0: none)", minimum=0)
    patience: int = setting(10, "stop after this many epochs without a better validation loss (0: never)", minimum=0)
    latent_dim: int = setting(20, "size of z", minimum=1)
    seed: int = setting(0, "seed of initialization, shuffling and sampling")
    split_seed: int = setting(0, "seed of the train/validation split (keep it fixed to compare runs)")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to train (auto: CUDA when available)")
    precision: Literal["auto", "bf16", "fp32"] = setting(
        "auto", "auto (bf16 where the hardware has it); evaluation is always fp32"
    )
    limit: int | None = setting(None, "train on only the first N training images (quick runs, tests)", minimum=1)
    resume: str | None = setting(
        None, "checkpoint (last.pt) to continue; its config is the base for this run", metavar="CHECKPOINT"
    )
    eval_iwae_samples: int = setting(1000, "evaluation at the end: importance samples per image", minimum=0)
    eval_iwae_images: int = setting(200, "evaluation at the end: test images in the IWAE estimate", minimum=0)
    plot_points: int = setting(2000, "test images in the PCA / t-SNE latent pictures", minimum=1)
    plots: bool = setting(True, "draw the pictures at the end")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.dataset not in DATASETS:
            raise SettingError(
                "{dataset} must be one of {names}, got {value!r}", names=", ".join(DATASETS), value=self.dataset
            )

    def beta_at(self, epoch: int) -> float:
        """Beta during epoch `epoch` (0-based): linear warm-up reaching `beta` in the last warm-up epoch."""
        return self.beta * min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs else self.beta

    def lr_at(self, epoch: int) -> float:
        """Learning rate during epoch `epoch` (0-based)."""
        if self.lr_schedule == "constant" or self.epochs == 1:
            return self.lr
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * epoch / (self.epochs - 1)))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingError("{device} cuda requested but no CUDA GPU is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware runs it fast: CUDA with bf16, or a CPU with AMX / AVX512-BF16
    (there it measured ~1.4x faster; see bench/train_speed.py). Elsewhere it would be slower than fp32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def shuffled_batches(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of batches: a seeded permutation, then tensor indexing (no DataLoader, no per-sample work)."""
    order = torch.randperm(len(images), generator=generator).to(images.device)
    for start in range(0, len(images), batch_size):
        yield images[order[start : start + batch_size]].contiguous(memory_format=torch.channels_last)


TrainStep = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def make_train_step(model: VAE, optimizer: torch.optim.Optimizer, bf16: bool) -> TrainStep:
    """One optimizer step on a batch; returns detached (reconstruction, KL) so nothing syncs per step."""
    device_type = next(model.parameters()).device.type

    def step(batch: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            logits, mu, log_var = model(batch)
        terms = vae_loss(logits, batch, mu, log_var, beta)  # in fp32 (vae_loss upcasts)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        return terms.reconstruction.detach(), terms.kl.detach()

    return step


def make_optimizer(model: VAE, lr: float) -> torch.optim.Adam:
    # fused Adam: one kernel over all parameters instead of a Python loop (measured faster on CPU too)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


@dataclass
class EarlyStopping:
    """The early-stopping counters; saved in every checkpoint so that a resumed run stops where a straight one would."""

    best_val_loss: float = math.inf
    epochs_without_improvement: int = 0

    def update(self, val_loss: float, epoch: int, warmup_epochs: int) -> bool:
        """Record epoch `epoch`'s validation loss; returns whether it beat the best by more than MIN_IMPROVEMENT."""
        if val_loss < self.best_val_loss - MIN_IMPROVEMENT:
            self.best_val_loss = val_loss
            self.epochs_without_improvement = 0
            return True
        if epoch + 1 > warmup_epochs:  # the loss keeps changing meaning while beta warms up
            self.epochs_without_improvement += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """Whether `patience` epochs have passed without improvement (patience 0: never)."""
        return bool(patience) and self.epochs_without_improvement >= patience


@dataclass
class TrainingState:
    """What last.pt captures and resume restores: the model, its optimizer, the RNGs, the epoch, early stopping."""

    model: VAE
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # shuffles the batches; torch's global RNG drives the model's sampling
    device: torch.device
    epoch: int = 0  # epochs completed
    stopping: EarlyStopping = field(default_factory=EarlyStopping)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run a training as configured; returns the evaluation of the best checkpoint."""
    device = resolve_device(config.device)
    resumed = load_checkpoint(Path(config.resume)) if config.resume else None
    config, dataset, train_images = load_training_data(config, device)
    state = build_training_state(config, resumed, device)
    if resumed:
        restore_resume_state(state, resumed, source=str(config.resume))
    out = Path(config.out)
    history = start_run_directory(out, config, state.epoch)
    history += train_epochs(state, config, dataset, train_images, out)
    return evaluate_best(out, dataset, history, config, device)


def load_training_data(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, Dataset, torch.Tensor]:
    """Load the dataset onto `device`; returns the config with "auto" resolved, the dataset and the training images."""
    dataset = load_dataset(config.dataset, config.data_dir, config.split_seed).to(device)
    config = replace(config, dataset=dataset.name) if config.dataset == "auto" else config
    train_images = dataset.train.head(config.limit).images.contiguous(memory_format=torch.channels_last)
    return config, dataset, train_images


def build_training_state(config: TrainConfig, resumed: dict[str, Any] | None, device: torch.device) -> TrainingState:
    """Seed torch, then build the model (fresh, or the resumed checkpoint's), its optimizer and the data generator."""
    torch.manual_seed(config.seed)
    model = (model_from_checkpoint(resumed) if resumed else VAE(VAEConfig(latent_dim=config.latent_dim))).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config.lr)
    return TrainingState(model, optimizer, torch.Generator().manual_seed(config.seed), device)


def restore_resume_state(state: TrainingState, checkpoint: dict[str, Any], source: str) -> None:
    """Continue where the checkpoint's run stopped: its optimizer, epoch, early-stopping counters and RNG states."""
    if "optimizer" not in checkpoint or "extra" not in checkpoint:
        raise CheckpointError(f"cannot resume from {source}: it holds no optimizer state (use last.pt)")
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.epoch = checkpoint["epoch"]
    extra = checkpoint["extra"]
    state.stopping = EarlyStopping(extra["best_val_loss"], extra["epochs_without_improvement"])
    torch.set_rng_state(extra["rng_state"])
    state.generator.set_state(extra["data_rng_state"])
    if state.device.type == "cuda" and "cuda_rng_state" in extra:
        torch.cuda.set_rng_state(extra["cuda_rng_state"], state.device)


def start_run_directory(out: Path, config: TrainConfig, start_epoch: int) -> list[dict[str, Any]]:
    """Write config.json and cut metrics.jsonl back to `start_epoch` (resume redoes later epochs); returns its rows."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    history = [row for row in read_metrics(out / "metrics.jsonl") if row["epoch"] <= start_epoch]
    write_metrics(out / "metrics.jsonl", history)
    return history


def train_epochs(
    state: TrainingState, config: TrainConfig, dataset: Dataset, train_images: torch.Tensor, out: Path
) -> list[dict[str, Any]]:
    """Train from `state.epoch` to `config.epochs` or early stopping, saving after each epoch; returns the new rows."""
    bf16 = use_bf16(config.precision, state.device)
    step = make_train_step(state.model, state.optimizer, bf16)
    sizes = f"{len(train_images)} train / {len(dataset.validation)} validation images"
    print(
        f"training on {dataset.name} ({sizes}), {state.device}, {'bf16' if bf16 else 'fp32'}, run dir {out}",
        file=sys.stderr,
    )
    rows = []
    for epoch in range(state.epoch, config.epochs):
        if state.stopping.exhausted(config.patience):
            break
        row = run_epoch(state.model, step, state.optimizer, train_images, dataset, config, epoch, state.generator)
        rows.append(row)
        improved = state.stopping.update(row["val_loss"], epoch, config.warmup_epochs)
        state.epoch = epoch + 1
        append_metrics(out / "metrics.jsonl", row)
        save_checkpoints(out, state, config, row, improved)
        if state.stopping.exhausted(config.patience):
            tqdm.write(f"early stop: no better validation loss for {config.patience} epochs", file=sys.stderr)
            break
    return rows


def save_checkpoints(out: Path, state: TrainingState, config: TrainConfig, row: dict[str, Any], improved: bool) -> None:
    """Write last.pt, and best.pt too when the validation loss improved."""
    fields = checkpoint_fields(state, config, row)
    if improved:
        save_checkpoint(out / "best.pt", state.model, **fields)
    save_checkpoint(out / "last.pt", state.model, **fields)


def checkpoint_fields(state: TrainingState, config: TrainConfig, row: dict[str, Any]) -> dict[str, Any]:
    """The fields beside the weights (see training.checkpoint); "extra" is what restore_resume_state reads."""
    cuda_rng = {"cuda_rng_state": torch.cuda.get_rng_state(state.device)} if state.device.type == "cuda" else {}
    return {
        "train_config": asdict(config),
        "dataset": config.dataset,
        "epoch": state.epoch,
        "metrics": {key: value for key, value in row.items() if key.startswith("val_")},
        "optimizer": state.optimizer.state_dict(),
        "extra": {
            **asdict(state.stopping),
            "rng_state": torch.get_rng_state(),
            "data_rng_state": state.generator.get_state(),
            **cuda_rng,
        },
    }


def evaluate_best(
    out: Path, dataset: Dataset, history: list[dict[str, Any]], config: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Evaluate best.pt into evaluation.json and draw the pictures from it; returns the evaluation."""
    best = model_from_checkpoint(load_checkpoint(out / "best.pt", map_location=device)).to(device)
    result = evaluate(best, dataset, config.eval_iwae_samples, config.eval_iwae_images, seed=config.seed)
    (out / "evaluation.json").write_text(json.dumps(result) + "\n")
    if config.plots:
        from training.plots import draw_all

        draw_all(best, dataset, history, out, plot_points=config.plot_points, seed=config.seed)
    return result


def run_epoch(
    model: VAE,
    step: TrainStep,
    optimizer: torch.optim.Optimizer,
    train_images: torch.Tensor,
    dataset: Dataset,
    config: TrainConfig,
    epoch: int,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Train one epoch, then validate; returns the metrics.jsonl row."""
    beta, lr = config.beta_at(epoch), config.lr_at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    started = time.perf_counter()
    sums = train_pass(step, train_images, config.batch_size, generator, beta, f"epoch {epoch + 1}/{config.epochs}")
    seconds = time.perf_counter() - started
    train_reconstruction, train_kl = (sums / len(train_images)).tolist()
    model.eval()
    val_reconstruction, val_kl = elbo_terms(model, dataset.validation.images, seed=config.seed)
    row = {
        "epoch": epoch + 1,
        "beta": beta,
        "lr": lr,
        "train_reconstruction": train_reconstruction,
        "train_kl": train_kl,
        "train_loss": train_reconstruction + beta * train_kl,
        "val_reconstruction": val_reconstruction,
        "val_kl": val_kl,
        "val_loss": val_reconstruction + config.beta * val_kl,
        "val_neg_elbo": val_reconstruction + val_kl,
        "seconds": seconds,
        "samples_per_second": len(train_images) / seconds,
    }
    print_epoch(row)
    return row


def train_pass(
    step: TrainStep,
    train_images: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    beta: float,
    description: str,
) -> torch.Tensor:
    """Step through one shuffled pass under a progress bar; returns the summed (reconstruction, KL), device synced."""
    sums = torch.zeros(2, device=train_images.device)
    bar = tqdm(total=len(train_images), desc=description, unit="img", leave=False)
    for index, batch in enumerate(shuffled_batches(train_images, batch_size, generator)):
        reconstruction, kl = step(batch, beta)
        sums += torch.stack([reconstruction, kl]) * len(batch)
        bar.update(len(batch))
        if index % 10 == 0:  # the only host sync of the loop: the running loss on the bar
            bar.set_postfix(loss=f"{(sums[0] + beta * sums[1]).item() / bar.n:.2f}")
    bar.close()
    if train_images.device.type == "cuda":
        torch.cuda.synchronize()
    return sums


def print_epoch(row: dict[str, Any]) -> None:
    """One stderr line per epoch, written above the progress bar."""
    tqdm.write(
        f"epoch {row['epoch']}: train {row['train_loss']:.2f} "
        f"(rec {row['train_reconstruction']:.2f}, kl {row['train_kl']:.2f}) "
        f"val {row['val_loss']:.2f} (rec {row['val_reconstruction']:.2f}, kl {row['val_kl']:.2f}) "
        f"beta {row['beta']:.2f} lr {row['lr']:.2g} {row['samples_per_second']:,.0f} img/s",
        file=sys.stderr,
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Add one epoch's row; metrics.jsonl grows as the run goes, so it is readable while training."""
    with path.open("a") as stream:
        stream.write(json.dumps(row) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """One --flag per TrainConfig field (contract.settings), each with its VAE_TRAIN_* twin."""
    return settings.build_parser(TrainConfig, ENV_PREFIX, prog="python -m training.train", description=__doc__)


def config_from_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> TrainConfig:
    """The defaults, or the resumed run's config, overridden by VAE_TRAIN_* variables, then by the flags given."""
    flags = vars(build_parser().parse_args(argv))
    environ = os.environ if environ is None else environ
    resume = flags.get("resume", environ.get(ENV_PREFIX + "RESUME"))
    base: dict[str, Any] = {}
    if resume:
        saved = load_checkpoint(Path(resume)).get("train_config", {})
        base = {name: value for name, value in saved.items() if name in settings.flat(TrainConfig())}
        base["out"] = str(Path(resume).parent)
    return settings.from_sources(TrainConfig, flags, environ, ENV_PREFIX, base=base)


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
        result = train(config)
    except (SettingError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: last.pt holds the last finished epoch (continue with --resume)", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
