"""The manifest of a model version (`model.json`): one typed definition that export writes and serving reads.

The schema is a tree of msgspec Structs. msgspec rather than pydantic, because decoding is strict where a
manifest must be (a bool is not an int, "3" is not a number, no coercion to switch off), an error names the
JSON path of what is wrong (`Expected str, got int - at $.graphs.decoder.sha256`), fields it does not know
are ignored (a newer exporter of the same format may add some, as `baseline` was added), and it is one small
dependency with no code generated at run time. The same Structs encode the file (`encode`), so the writer
cannot drift from the reader.

What the types cannot say (checksums against the files, the graphs' real signatures, name and version
against the directory, active dimensions within latent_dim) `contract.repository` checks by hand.

What leaves the server is `public_view`: the manifest without the paths of the machine that exported it
(the `training` section's `checkpoint` and its `train_config` fields that are paths, cut to their base names).

Format 1 is the only format so far. A change that old readers would misread gets format 2, and this module
keeps a reader for format 1 (tests/unit/test_manifest.py decodes a committed format-1 file).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated, Any, Literal

import msgspec

FORMAT_VERSION: Literal[1] = 1
# Versions travel as uint64 in the gRPC contract; int64 is what JSON readers (msgspec, protobuf's JSON mapping of
# int64 elsewhere) hold exactly, so the repository keeps to it: a larger number is refused, never wrapped.
MAX_VERSION = 2**63 - 1
BATCH_AXIS = "batch"  # the name of the dynamic first axis of every input and output
# train_config's fields that hold paths on the machine that trained (TrainConfig's out, data_dir, resume)
TRAIN_CONFIG_PATH_FIELDS = ("out", "data_dir", "resume")

Sha256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
Positive = Annotated[int, msgspec.Meta(ge=1)]
VersionNumber = Annotated[int, msgspec.Meta(ge=1, le=MAX_VERSION)]


class ManifestError(ValueError):
    """model.json is not a manifest of a supported format; the message names the JSON path at fault."""


class TensorSpec(msgspec.Struct, frozen=True):
    """One input or output of a graph."""

    name: str
    dtype: str  # numpy's name, e.g. "float32"
    shape: tuple[int | str, ...]  # BATCH_AXIS for the dynamic axis, e.g. ("batch", 1, 28, 28)


class Graph(msgspec.Struct, frozen=True):
    """One ONNX file of the version and what it must be."""

    file: str  # a plain file name in the version directory
    sha256: Sha256  # of the file's bytes
    size_bytes: Positive
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class Graphs(msgspec.Struct, frozen=True):
    encoder: Graph  # x [batch, *image.shape] → mu, log_var [batch, latent_dim]
    decoder: Graph  # z [batch, latent_dim] → x [batch, *image.shape] in [0, 1]


class Image(msgspec.Struct, frozen=True):
    shape: tuple[Positive, Positive, Positive]  # channels, height, width
    dtype: Literal["float32"] = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)


class Exporter(msgspec.Struct, frozen=True):
    """The versions of what produced the graphs."""

    producer: str
    torch: str
    onnx: str
    onnxscript: str
    onnxruntime: str


class Parity(msgspec.Struct, frozen=True):
    """How closely onnxruntime reproduced PyTorch at export."""

    provider: str
    batch_sizes: tuple[Positive, ...]
    tolerance: float
    max_abs_diff: dict[str, float]  # output → max |onnxruntime − PyTorch|


class Training(msgspec.Struct, frozen=True):
    """The run the version came from (the checkpoint's own fields, as it recorded them)."""

    checkpoint: str
    checkpoint_sha256: Sha256
    dataset: str | None
    epochs: int | None
    metrics: dict[str, Any]
    model_args: dict[str, Any]
    train_config: dict[str, Any]


class Baseline(msgspec.Struct, frozen=True):
    """What the exported graphs make of the run's validation images: the drift reference, the active dimensions."""

    dataset: str
    split: str
    images: Positive
    score: str  # which score the quantiles are of, in words
    score_quantiles: dict[str, float]  # contract.scores.quantile_key(q) → nats
    score_mean: float
    kl_per_dim: tuple[float, ...]  # mean KL of each latent dimension, nats
    active_threshold_nats: float
    active_dimensions: tuple[Annotated[int, msgspec.Meta(ge=0)], ...]  # mean KL above the threshold, ascending


class Manifest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """model.json, format 1 (fields in the order the file has them; `baseline` is left out when None)."""

    format_version: Literal[1]
    name: str
    version: VersionNumber
    latent_dim: Positive
    image: Image
    graphs: Graphs
    opset: Positive
    exporter: Exporter
    parity: Parity
    training: Training
    baseline: Baseline | None = None  # absent in versions exported without their dataset
    created_at: str  # UTC, e.g. "2026-11-30T12:00:00Z"


class _Format(msgspec.Struct):
    format_version: Any = None


def encode(manifest: Manifest) -> bytes:
    """model.json's bytes: indented JSON, fields in the order of the definitions, one newline at the end."""
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n"


def decode(data: bytes) -> Manifest:
    """The manifest in `data`; ManifestError naming the JSON path of the first problem."""
    try:
        found = msgspec.json.decode(data, type=_Format).format_version
    except msgspec.DecodeError as exc:
        raise ManifestError(f"not a JSON object: {str(exc).replace('`', '')}") from None
    except RecursionError:
        raise ManifestError("not a manifest: JSON nested too deeply") from None
    if found != FORMAT_VERSION or isinstance(found, bool):
        raise ManifestError(f"format_version {found!r} is not supported (this reader knows {FORMAT_VERSION})")
    try:
        return msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:  # ValidationError included: "Expected int, got str - at $.latent_dim"
        raise ManifestError(str(exc).replace("`", "")) from None
    except RecursionError:
        raise ManifestError("not a manifest: JSON nested too deeply") from None


def to_json(manifest: Manifest) -> str:
    """The manifest as compact JSON text."""
    return msgspec.json.encode(manifest).decode()


def public_view(manifest: Manifest) -> Manifest:
    """The manifest as a client may see it: every path of the exporting machine cut to its base name
    (the `training` section's `checkpoint`, its train_config's TRAIN_CONFIG_PATH_FIELDS and any other absolute
    path there), so that no path leaves the server. model.json on disk keeps them (the exporter's provenance)."""
    run = manifest.training
    train_config = {
        key: _base_name(value) if key in TRAIN_CONFIG_PATH_FIELDS or _is_absolute(value) else value
        for key, value in run.train_config.items()
    }
    public_run = msgspec.structs.replace(run, checkpoint=_base_name(run.checkpoint), train_config=train_config)
    return msgspec.structs.replace(manifest, training=public_run)


def public_json(manifest: Manifest) -> str:
    """`public_view` as compact JSON text: GetModelInfo's manifest_json."""
    return to_json(public_view(manifest))


def _is_absolute(value: Any) -> bool:
    return isinstance(value, str) and PurePath(value).is_absolute()


def _base_name(value: Any) -> Any:
    """A path's last part ("runs/beta-1/best.pt" → "best.pt"); anything but a non-empty string as it is."""
    if not isinstance(value, str):
        return value
    return PurePath(value).name or value
