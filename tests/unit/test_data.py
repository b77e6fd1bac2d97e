"""Datasets by name: mnist-5k and Fashion-MNIST for real, MNIST from raw idx files the test writes."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import write_idx
from training import data
from training.data import DataError, load_dataset, read_idx


def write_raw_mnist(directory: Path, train: int = 200, test: int = 50, gzipped: bool = True) -> dict[str, np.ndarray]:
    """A small MNIST in the raw idx format: random pixels, labels cycling through 0..9."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(test) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in data.RAW_FILES.items():
        write_idx(directory / (f"{stem}.gz" if gzipped else stem), arrays[key])
    return arrays


def test_mnist_5k_splits_4500_500_stratified_and_validation_is_test() -> None:
    dataset = load_dataset("mnist-5k")
    assert (len(dataset.train), len(dataset.validation)) == (4500, 500)
    assert dataset.test_is_validation and dataset.test is dataset.validation
    assert dataset.train.images.shape == (4500, 1, 28, 28) and dataset.train.images.dtype == torch.float32
    assert dataset.train.images.min() >= 0.0 and dataset.train.images.max() <= 1.0
    assert torch.bincount(dataset.validation.labels).tolist() == [50] * 10
    assert torch.bincount(dataset.train.labels).tolist() == [450] * 10
    assert len(torch.unique(dataset.train.labels[:50])) == 10  # shuffled, not sorted by label like the source


def test_split_is_reproducible_and_follows_the_seed() -> None:
    first, again, other = (load_dataset("mnist-5k", split_seed=seed) for seed in (0, 0, 1))
    assert torch.equal(first.validation.images, again.validation.images)
    assert torch.equal(first.train.labels, again.train.labels)
    assert not torch.equal(first.validation.images, other.validation.images)


def test_mnist_reads_raw_idx_files_from_data_dir(tmp_path: Path) -> None:
    arrays = write_raw_mnist(tmp_path)
    dataset = load_dataset("mnist", tmp_path)
    assert dataset.name == "mnist" and not dataset.test_is_validation
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (180, 20, 50)
    torch.testing.assert_close(dataset.test.images[:, 0], torch.from_numpy(arrays["test_images"] / 255.0).float())
    assert dataset.test.labels.tolist() == arrays["test_labels"].tolist()


def test_mnist_reads_torchvision_layout_uncompressed(tmp_path: Path) -> None:
    write_raw_mnist(tmp_path / "MNIST" / "raw", gzipped=False)
    assert len(load_dataset("mnist", tmp_path).test) == 50


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist package")
def test_fashion_mnist_reads_debian_layout(tmp_path: Path) -> None:
    dataset = load_dataset("fashion-mnist", tmp_path)  # nothing in tmp_path: falls back to /usr/share/datasets
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (54000, 6000, 10000)
    assert torch.bincount(dataset.validation.labels).tolist() == [600] * 10


def test_read_idx_rejects_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_unknown_name_and_missing_dir_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_mnist_without_files_or_network_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "network_reachable", lambda url: False)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist", tmp_path)


def test_auto_falls_back_to_mnist_5k_offline_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(data, "network_reachable", lambda url: False)
    assert load_dataset("auto", tmp_path).name == "mnist-5k"
    assert "using mnist-5k" in capsys.readouterr().err


def test_auto_prefers_full_mnist_when_present(tmp_path: Path) -> None:
    write_raw_mnist(tmp_path)
    assert load_dataset("auto", tmp_path).name == "mnist"


def test_network_probe_gives_up_on_a_silent_server() -> None:
    with socket.socket() as silent:  # listens (connections open) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        # The server never answers, so only the probe's timeout can end the call: its answer is that behaviour
        # (a probe that hung would be stopped by pytest's timeout), however slow the machine.
        assert not data.network_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}/x", timeout_seconds=0.5)
    assert not data.network_reachable("http://mnist.invalid/x", timeout_seconds=0.5)
