"""labels.json: names (`stable`, `canary`, ...) that point at versions of a model directory, and the share of
the default route's requests the canary takes.

    models/vae-mnist/labels.json     {"canary": 4, "stable": 3}
                                     {"labels": {"canary": 4, "stable": 3}, "canary_weight": 0.05}

The first form (labels only) is what every release reads and what `write_labels` writes when no canary weight
is set, so a server of an older release keeps reading the file until someone sets one; the second adds
`canary_weight` (0 .. 1), which overrides the server's `--canary-weight` while the file says it. Both are
read (`read_routes`).

Written atomically (`write_labels`), so a server polling the directory reads the old file or the new one.
A label is lower-case letters, digits, '-' and '_', starting with a letter (so never a number); a version is
an integer the gRPC contract can carry (1 .. 2^63 - 1). A file holds at most MAX_LABELS labels and
MAX_LABELS_BYTES bytes (checked before it is read): every label is a Prometheus label value and a poll reads
the file, so both stay small.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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
_Weight = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_EXAMPLE = '{"stable": 3}'
_ROUTES_KEY = "labels"  # the second form's key; a label of the first form names a number, never an object


class _RoutesFile(msgspec.Struct, forbid_unknown_fields=True):
    """labels.json's second form."""

    labels: _Labels
    canary_weight: _Weight | None = None


@dataclass(frozen=True)
class Routes:
    """What labels.json says: its labels, and the canary's share of the default route (None: the server's)."""

    labels: dict[str, int] = field(default_factory=dict)
    canary_weight: float | None = None


def check_label(label: str) -> str:
    """`label` when it is a valid label name; ValueError saying what is allowed otherwise."""
    if not LABEL_PATTERN.fullmatch(label):
        raise ValueError(
            f"label {label!r} is not allowed: lower-case letters, digits, '-' and '_', starting with a letter"
        )
    return label


def read_labels(model_dir: Path) -> dict[str, int]:
    """The labels of `model_dir`'s labels.json ({} when there is none); ModelRepositoryError when malformed."""
    return read_routes(model_dir).labels


def read_routes(model_dir: Path) -> Routes:
    """labels.json of `model_dir`, either form (empty Routes when there is none); ModelRepositoryError naming the
    file and what is wrong when it is malformed."""
    path = Path(model_dir) / LABELS_FILE
    try:
        data = read_bounded(path, MAX_LABELS_BYTES, "labels file")
    except FileNotFoundError:
        return Routes()
    except OSError as exc:
        raise ModelRepositoryError(f"{path}: cannot read labels: {exc.strerror or exc}") from None
    try:
        if _is_second_form(data):
            routes = msgspec.json.decode(data, type=_RoutesFile)
            labels, weight = routes.labels, routes.canary_weight
        else:
            labels, weight = msgspec.json.decode(data, type=_Labels), None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ModelRepositoryError(f"{path}: {_what_is_wrong(data, exc)}") from None
    if len(labels) > MAX_LABELS:
        raise ModelRepositoryError(f"{path}: {len(labels)} labels, more than the {MAX_LABELS} a model may have")
    for label in labels:
        try:
            check_label(label)
        except ValueError as exc:
            raise ModelRepositoryError(f"{path}: {exc}") from None
    return Routes(labels, weight)


def _is_second_form(data: bytes) -> bool:
    """Whether labels.json is the second form: an object whose "labels" is an object (in the first, a number)."""
    try:
        raw = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, RecursionError):
        return False  # malformed either way: the first form's decoder says what is wrong
    return _names_an_object(raw)


def _names_an_object(raw: dict[str, msgspec.Raw]) -> bool:
    """Whether a decoded labels.json's "labels" is an object: the second form (in the first it is a number)."""
    return bytes(raw.get(_ROUTES_KEY, b"")).lstrip().startswith(b"{")


def _what_is_wrong(data: bytes, error: Exception) -> str:
    """The decoding error in words, naming the label whose version is wrong where one is."""
    expected = f"labels must be a JSON object of label → version (1 .. {MAX_VERSION}), e.g. {_EXAMPLE}"
    if isinstance(error, RecursionError):
        return f"{expected}; this one is nested too deeply"
    try:
        raw = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, RecursionError):
        return f"{expected}: {str(error).replace('`', '')}"
    if _names_an_object(raw):
        second = f'{{"labels": {_EXAMPLE}, "canary_weight": 0.05}} (canary_weight from 0 to 1, or absent)'
        if "canary_weight" in raw:
            try:
                msgspec.json.decode(raw["canary_weight"], type=_Weight | None)
            except msgspec.DecodeError:
                shown = bytes(raw["canary_weight"]).decode()[:40]
                return f"canary_weight must be a number from 0 to 1, got {shown}"
        unknown = sorted(set(raw) - {_ROUTES_KEY, "canary_weight"})
        if unknown:
            return f"unknown field {unknown[0]!r}: the file is {second}"
        raw = msgspec.json.decode(raw[_ROUTES_KEY], type=dict[str, msgspec.Raw])
    for label, value in raw.items():
        try:
            msgspec.json.decode(value, type=_Version)
        except msgspec.DecodeError:
            return f"label {label!r} must name a version number (1 .. {MAX_VERSION}), got {bytes(value).decode()[:40]}"
    return f"{expected}: {str(error).replace('`', '')}"


def write_labels(model_dir: Path, labels: dict[str, int], canary_weight: float | None = None) -> None:
    """Replace labels.json atomically: readers see the old file or the new one, never a partial one. The first
    form when `canary_weight` is None (what older servers read), else the second.

    ValueError, writing nothing, for more than MAX_LABELS labels or a weight outside 0 .. 1 (a reader would
    refuse the file)."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels, more than the {MAX_LABELS} a model may have: remove some first")
    if canary_weight is not None and not 0.0 <= canary_weight <= 1.0:
        raise ValueError(f"canary weight {canary_weight} is not allowed: a share of requests, from 0 to 1")
    ordered = dict(sorted(labels.items()))
    content = ordered if canary_weight is None else {_ROUTES_KEY: ordered, "canary_weight": canary_weight}
    with atomic_replace(Path(model_dir) / LABELS_FILE) as temporary:
        temporary.write_bytes(msgspec.json.format(msgspec.json.encode(content), indent=2) + b"\n")
