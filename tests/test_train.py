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

from serving.settings import SettingError
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


def test_kl_warmup_is_linear_and_cosine_lr_ends_at_min_lr() -> None:
    config = TrainConfig(beta=2.0, warmup_epochs=4, epochs=11, lr=1e-3, min_lr=1e-5)
    assert [config.beta_at(epoch) for epoch in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert config.lr_at(0) == pytest.approx(1e-3) and config.lr_at(10) == pytest.approx(1e-5)
    assert config.lr_at(5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert replace(config, warmup_epochs=0).beta_at(0) == 2.0


@pytest.mark.parametrize(
    ("field", "value"), [("beta", -1.0), ("dataset", "cifar"), ("epochs", 0), ("device", "tpu"), ("limit", 0)]
)
def test_config_rejects_values_out_of_range(field: str, value: Any) -> None:
    with pytest.raises(SettingError, match=field):
        replace(TrainConfig(), **{field: value})


def test_command_line_maps_onto_train_config() -> None:
    config = config_from_args(["--dataset", "mnist-5k", "--beta", "4", "--no-plots", "--limit", "100"], {})
    assert config == replace(TrainConfig(), dataset="mnist-5k", beta=4.0, plots=False, limit=100)


def test_every_option_has_an_environment_twin_and_flags_win() -> None:
    environ = {"VAE_TRAIN_EPOCHS": "7", "VAE_TRAIN_DATA_DIR": "/data", "VAE_TRAIN_LIMIT": "", "VAE_TRAIN_BETA": "2"}
    config = config_from_args(["--beta", "3"], environ)
    assert (config.epochs, config.data_dir, config.limit, config.beta) == (7, "/data", None, 3.0)
    with pytest.raises(SettingError, match=r"--epochs \(VAE_TRAIN_EPOCHS\) must be >= 1, got 0"):
        config_from_args([], {"VAE_TRAIN_EPOCHS": "0"})
    with pytest.raises(SettingError, match="VAE_TRAIN_LR='fast' is not a number"):
        config_from_args([], {"VAE_TRAIN_LR": "fast"})


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


def test_beta_sweep_table_has_one_row_per_beta() -> None:
    from training.beta_sweep import markdown_table

    row = {
        "reconstruction": 80.0,
        "kl": 20.0,
        "neg_elbo": 100.0,
        "iwae_nll": 95.0,
        "active_units": 12,
        "knn_acc": 0.9,
        "epochs": 30,
    }
    table = markdown_table([{**row, "beta": 0.5}, {**row, "beta": 4.0}]).splitlines()
    assert len(table) == 4 and table[0].startswith("| beta |")
    assert table[2].startswith("| 0.5 | 80.0 | 20.0 | 100.0 | 95.0 | 12 | 0.900 | 30 |")
