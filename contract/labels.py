"""labels.json: names (`stable`, `canary`, ...) that point at versions of a model directory.

    models/vae-mnist/labels.json     {"canary": 4, "stable": 3}

Written atomically (`write_labels`), so a server polling the directory reads the old file or the new one.
A label is lower-case letters, digits, '-' and '_', starting with a letter (so never a number); a version is
an integer the gRPC contract can carry (1 .. 2^63 - 1). A file holds at most MAX_LABELS labels and
MAX_LABELS_BYTES bytes (checked before it is read): every label is a Prometheus label value and a poll reads
the file, so both stay small.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import msgspec

from contract.files import atomic_replace
from contract.manifest import MAX_VERSION
from contract.repository import ModelRepositoryError, read_bounded

LABELS_FILE = "labels.json"
MAX_LABELS = 32
MAX_LABELS_BYTES = 64 * 1024  # 32 labels of 63 characters take ~2.5 KB
LABEL_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_Version = Annotated[int, msgspec.Meta(ge=1, le=MAX_VERSION)]
_Labels = dict[str, _Version]
_EXAMPLE = '{"stable": 3}'


def check_label(label: str) -> str:
    """`label` when it is a valid label name; ValueError saying what is allowed otherwise."""
    if not LABEL_PATTERN.fullmatch(label):
        raise ValueError(
            f"label {label!r} is not allowed: lower-case letters, digits, '-' and '_', starting with a letter"
        )
    return label


def read_labels(model_dir: Path) -> dict[str, int]:
    """labels.json of `model_dir` ({} when there is none); ModelRepositoryError naming the file when malformed."""
    path = Path(model_dir) / LABELS_FILE
    try:
        data = read_bounded(path, MAX_LABELS_BYTES, "labels file")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ModelRepositoryError(f"{path}: cannot read labels: {exc.strerror or exc}") from None
    try:
        labels = msgspec.json.decode(data, type=_Labels)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ModelRepositoryError(f"{path}: {_what_is_wrong(data, exc)}") from None
    if len(labels) > MAX_LABELS:
        raise ModelRepositoryError(f"{path}: {len(labels)} labels, more than the {MAX_LABELS} a model may have")
    for label in labels:
        try:
            check_label(label)
        except ValueError as exc:
            raise ModelRepositoryError(f"{path}: {exc}") from None
    return labels


def _what_is_wrong(data: bytes, error: Exception) -> str:
    """The decoding error in words, naming the label whose version is wrong where one is."""
    expected = f"labels must be a JSON object of label → version (1 .. {MAX_VERSION}), e.g. {_EXAMPLE}"
    if isinstance(error, RecursionError):
        return f"{expected}; this one is nested too deeply"
    try:
        raw = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, RecursionError):
        return f"{expected}: {str(error).replace('`', '')}"
    for label, value in raw.items():
        try:
            msgspec.json.decode(value, type=_Version)
        except msgspec.DecodeError:
            return f"label {label!r} must name a version number (1 .. {MAX_VERSION}), got {bytes(value).decode()[:40]}"
    return f"{expected}: {str(error).replace('`', '')}"


def write_labels(model_dir: Path, labels: dict[str, int]) -> None:
    """Replace labels.json atomically: readers see the old file or the new one, never a partial one.

    ValueError, writing nothing, for more than MAX_LABELS labels (a reader would refuse the file)."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels, more than the {MAX_LABELS} a model may have: remove some first")
    with atomic_replace(Path(model_dir) / LABELS_FILE) as temporary:
        temporary.write_bytes(msgspec.json.format(msgspec.json.encode(dict(sorted(labels.items()))), indent=2) + b"\n")
