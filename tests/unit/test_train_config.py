"""TrainConfig: its schedules, its checks, and the command line and environment generated from it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from contract.settings import SettingError
from training.train import TrainConfig, config_from_args


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
