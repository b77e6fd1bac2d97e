"""The training run: its files and pictures, determinism, resume, its config and its command-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.train import TrainConfig, config_from_args, train

PICTURES = ("loss_curves", "samples", "reconstructions", "interpolations", "latent_pca", "latent_tsne", "traversals")
METRIC_KEYS = {"epoch", "beta", "lr", "seconds", "samples_per_second"} | {
    f"{split}_{term}" for split in ("train", "val") for term in ("reconstruction", "kl", "loss")
}
# Small and fast: 256 training images, a few IWAE samples, t-SNE on 100 points.
QUICK = TrainConfig(dataset="mnist-5k", epochs=1, limit=256, eval_iwae_samples=20, eval_iwae_images=5, plot_points=100)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "smoke"
    train(replace(QUICK, out=str(out)))
    return out


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_second")} for row in rows]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint)["model"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_one_epoch_run_writes_every_file_and_picture(smoke_run: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "best.pt", "last.pt", "evaluation.json"):
        assert (smoke_run / name).is_file(), name
    for name in PICTURES:
        assert (smoke_run / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    (row,) = metrics(smoke_run)
    assert row.keys() >= METRIC_KEYS and row["epoch"] == 1
    assert json.loads((smoke_run / "config.json").read_text())["limit"] == 256
    evaluation = json.loads((smoke_run / "evaluation.json").read_text())
    assert {"neg_elbo", "iwae_nll", "active_units", "knn_acc", "kl_per_dim"} <= evaluation.keys()
    checkpoint = load_checkpoint(smoke_run / "best.pt")
    assert checkpoint["dataset"] == "mnist-5k" and checkpoint["epoch"] == 1
    assert checkpoint["model_args"]["latent_dim"] == 20 and checkpoint["train_config"]["limit"] == 256
    assert set(checkpoint["metrics"]) >= {"val_loss", "val_reconstruction", "val_kl"}


def test_same_seed_gives_the_same_run(tmp_path: Path) -> None:
    config = replace(QUICK, epochs=2, plots=False, eval_iwae_images=0)
    train(replace(config, out=str(tmp_path / "a")))
    train(replace(config, out=str(tmp_path / "b")))
    train(replace(config, out=str(tmp_path / "c"), seed=1))
    assert without_timing(metrics(tmp_path / "a")) == without_timing(metrics(tmp_path / "b"))
    a, b, c = (weights(tmp_path / run / "last.pt") for run in "abc")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["fc_mu.weight"], c["fc_mu.weight"])


def test_resume_continues_where_the_run_stopped(tmp_path: Path) -> None:
    config = replace(QUICK, plots=False, eval_iwae_images=0, lr_schedule="constant", warmup_epochs=2)
    train(replace(config, epochs=3, out=str(tmp_path / "straight")))
    train(replace(config, epochs=1, out=str(tmp_path / "stopped")))
    resumed = config_from_args(["--resume", str(tmp_path / "stopped" / "last.pt"), "--epochs", "3"])
    assert resumed.out == str(tmp_path / "stopped") and resumed.limit == 256  # the saved config is the base
    train(resumed)
    assert without_timing(metrics(tmp_path / "stopped")) == without_timing(metrics(tmp_path / "straight"))
    straight, stopped = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "stopped" / "last.pt")
    assert all(torch.equal(straight[key], stopped[key]) for key in straight)


def test_early_stopping_ends_the_run_after_patience_epochs(tmp_path: Path) -> None:
    # A learning rate of ~0 freezes the model: the validation loss never improves after epoch 1.
    config = replace(
        QUICK,
        epochs=10,
        patience=2,
        warmup_epochs=0,
        lr=1e-12,
        min_lr=0.0,
        plots=False,
        eval_iwae_images=0,
        out=str(tmp_path / "run"),
    )
    train(config)
    assert len(metrics(tmp_path / "run")) == 3


def test_evaluate_cli_prints_one_json_line(smoke_run: Path) -> None:
    result = run_cli(
        "-m",
        "training.evaluate",
        str(smoke_run / "best.pt"),
        "--dataset",
        "mnist-5k",
        "--iwae-images",
        "3",
        "--iwae-samples",
        "20",
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert {"neg_elbo", "iwae_nll", "active_units", "knn_acc"} <= json.loads(line).keys()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["training.train", "--dataset", "cifar"],
            "--dataset (VAE_TRAIN_DATASET) must be one of mnist, fashion-mnist, mnist-5k, auto, got 'cifar'",
        ),
        (["training.train", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "does not exist"),
        (["training.train", "--dataset", "mnist-5k", "--beta", "-1"], "--beta (VAE_TRAIN_BETA) must be >= 0, got -1.0"),
        (["training.train", "--resume", "{corrupt}"], "cannot read checkpoint"),
        (["training.evaluate", "{corrupt}"], "cannot read checkpoint"),
        (["training.evaluate", "/nonexistent/best.pt"], "checkpoint not found"),
    ],
)
def test_bad_input_gives_one_error_line_and_nonzero_exit(tmp_path: Path, args: list[str], message: str) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    result = run_cli("-m", *[arg.replace("{corrupt}", str(corrupt)) for arg in args])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
