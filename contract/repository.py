"""The versioned model repository: its layout, and reading and verifying one version of it.

    models/<name>/<version>/encoder.onnx   x[batch,1,28,28] float32 in [0,1] → mu[batch,D], log_var[batch,D]
    models/<name>/<version>/decoder.onnx   z[batch,D] float32 → x[batch,1,28,28] float32 in [0,1]
    models/<name>/<version>/model.json     the manifest (`contract.manifest`), written by `training/export.py`
    models/<name>/labels.json              names of versions (`contract.labels`)

A version is served only when everything agrees: the manifest decodes (`contract.manifest`), names the
directory's name and version, each graph's bytes hash to the manifest's sha256, the graph's real inputs and
outputs (read by onnxruntime from those bytes) are the ones the manifest declares, and the declared ones are
the contract above for the manifest's latent_dim. Sessions are built from the verified bytes
(`GraphSpec.model_bytes`), never by re-reading the file. Export verifies its staging directory with the
same `read_version_dir` before publishing, so a version serving would refuse is never published.

Every file is bounded before it is read (`read_bounded`): the manifest to MAX_MANIFEST_BYTES, a graph to
the manifest's `size_bytes` and MAX_GRAPH_BYTES, so a huge (or endless) file is refused without reading it.
A version number is 1 .. MAX_VERSION (what the gRPC contract carries); a directory named by a larger
number is not a version (`scan_versions` says why).

No torch here: onnxruntime (a serving dependency already) reads the graphs' signatures, so serving needs no
`onnx` package, and a graph that onnxruntime cannot load is refused at load time, not at the first call.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from contract.manifest import BATCH_AXIS, MAX_VERSION, Manifest, ManifestError, TensorSpec, decode, public_json

MANIFEST_FILE = "model.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
MAX_MANIFEST_BYTES = 1024 * 1024  # model.json is ~4 KB
MAX_GRAPH_BYTES = 256 * 1024 * 1024  # one ONNX graph; the default model's are ~3.3 MB

# The graphs' signatures, the contract between export and serving. D is the manifest's latent_dim.
ENCODER_INPUT, ENCODER_OUTPUTS = "x", ("mu", "log_var")
DECODER_INPUT, DECODER_OUTPUT = "z", "x"
ROLES = ("encoder", "decoder")

# onnxruntime's type strings → numpy dtype names (the manifest's spelling)
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}

Signature = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]  # (inputs, outputs)


class ModelRepositoryError(Exception):
    """A model directory or version is missing, malformed, or its files disagree with its manifest."""


@dataclass(frozen=True)
class GraphSpec:
    path: Path
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_bytes: bytes  # the verified bytes; sessions are built from these

    def __repr__(self) -> str:  # keep the bytes out of logs and test failures
        digest = self.sha256[:12]
        return f"GraphSpec(path={self.path!s}, sha256={digest}…, inputs={self.inputs}, outputs={self.outputs})"


@dataclass(frozen=True)
class ModelVersion:
    """A verified version: its manifest, and its graphs' verified bytes."""

    name: str
    number: int
    path: Path  # e.g. models/vae-mnist/1
    manifest: Manifest
    encoder: GraphSpec  # x [batch,1,28,28] float32 → mu, log_var [batch, latent_dim]
    decoder: GraphSpec  # z [batch, latent_dim] float32 → x [batch,1,28,28] in [0,1]

    @property
    def latent_dim(self) -> int:
        return self.manifest.latent_dim

    @property
    def manifest_json(self) -> str:
        """The manifest's public view as compact JSON (what GetModelInfo sends): no path of the exporter's."""
        return public_json(self.manifest)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.manifest.image.shape

    @property
    def score_quantiles(self) -> dict[str, float]:
        """The baseline's quantiles of the validation images' score ("0.5" → nats); {} without a baseline."""
        return dict(self.manifest.baseline.score_quantiles) if self.manifest.baseline else {}

    @property
    def active_dimensions(self) -> tuple[int, ...] | None:
        """The latent dimensions the model uses, ascending; None when its manifest does not say."""
        return tuple(sorted(self.manifest.baseline.active_dimensions)) if self.manifest.baseline else None


def expected_signatures(latent_dim: int, image_shape: tuple[int, ...]) -> dict[str, Signature]:
    """The (inputs, outputs) each graph must have for this latent size: what export writes, what serving reads."""
    images = TensorSpec(ENCODER_INPUT, "float32", (BATCH_AXIS, *image_shape))
    mu, log_var = (TensorSpec(name, "float32", (BATCH_AXIS, latent_dim)) for name in ENCODER_OUTPUTS)
    latents = TensorSpec(DECODER_INPUT, "float32", (BATCH_AXIS, latent_dim))
    decoded = TensorSpec(DECODER_OUTPUT, "float32", (BATCH_AXIS, *image_shape))
    return {"encoder": ((images,), (mu, log_var)), "decoder": ((latents,), (decoded,))}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_number_name(name: str) -> bool:
    """A decimal integer >= 1 without leading zeros (of any size)."""
    return name.isdecimal() and name.isascii() and not name.startswith("0")


def is_version_name(name: str) -> bool:
    """Whether a directory name is a version: a decimal integer 1 .. MAX_VERSION without leading zeros."""
    return _is_number_name(name) and int(name) <= MAX_VERSION


@dataclass(frozen=True)
class VersionListing:
    """The version directories of a model directory, and those named like one that cannot be a version."""

    versions: tuple[int, ...]  # ascending
    refused: dict[str, str]  # directory name → why it is not a version (a number above MAX_VERSION)


def scan_versions(model_dir: Path) -> VersionListing:
    """The integer-named subdirectories of `model_dir` (temporary export directories, `latest`, `01` are skipped
    silently; a number above MAX_VERSION is skipped and listed in `refused`, as the gRPC contract cannot carry it)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelRepositoryError(f"{model_dir}: model directory not found")
    versions: list[int] = []
    refused: dict[str, str] = {}
    for entry in model_dir.iterdir():
        if not (_is_number_name(entry.name) and entry.is_dir()):
            continue
        if is_version_name(entry.name):
            versions.append(int(entry.name))
        else:
            refused[entry.name] = f"version number above {MAX_VERSION} (2^63 - 1), the largest a version may be"
    return VersionListing(tuple(sorted(versions)), dict(sorted(refused.items())))


def list_versions(model_dir: Path) -> list[int]:
    """The versions of `model_dir`, ascending (`scan_versions`)."""
    return list(scan_versions(model_dir).versions)


def read_bounded(path: Path, max_bytes: int, what: str, exact_bytes: int | None = None) -> bytes:
    """The bytes of the regular file `path`, its size checked before anything is read.

    Refused with ModelRepositoryError naming the file and the limit: a size other than `exact_bytes` (when
    given), more than `max_bytes`, or not a regular file (a FIFO or a device could block or never end).
    Opened without blocking and checked with fstat, so the file checked is the file read. OSError
    (FileNotFoundError included) passes through for the caller to word.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelRepositoryError(f"{path}: the {what} is not a regular file")
        if exact_bytes is not None and info.st_size != exact_bytes:
            raise ModelRepositoryError(
                f"{path}: {info.st_size} bytes, but the manifest says size_bytes {exact_bytes}: "
                "the file changed after export"
            )
        if info.st_size > max_bytes:
            raise ModelRepositoryError(
                f"{path}: {info.st_size} bytes, more than the {max_bytes} bytes ({_binary_size(max_bytes)}) "
                f"a {what} may have"
            )
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes or (exact_bytes is not None and len(data) != exact_bytes):  # it changed meanwhile
        raise ModelRepositoryError(f"{path}: the {what} changed while it was read")
    return data


def _binary_size(size_bytes: int) -> str:
    return f"{size_bytes // 1024} KiB" if size_bytes < 1024 * 1024 else f"{size_bytes // (1024 * 1024)} MiB"


# An absolute path in a message: "/" at the start or after a space, quote, bracket, "=" or ":".
_ABSOLUTE_PATH = re.compile(r"""(?:^|(?<=[\s'"(\[=:]))/[^\s'"),\]]*""")


def without_paths(message: str, model_dir: Path) -> str:
    """`message` as a client may see it: paths under `model_dir` relative to it (`3/decoder.onnx: ...`), any
    other absolute path cut to its base name. The server's own log keeps the full message."""
    for root in sorted({str(Path(model_dir)), str(Path(model_dir).resolve())}, key=len, reverse=True):
        message = message.replace(root.rstrip("/") + "/", "")  # the longer first: the other may be its tail
    return _ABSOLUTE_PATH.sub(lambda match: os.path.basename(match.group().rstrip("/")) or "/", message)


def load_version(model_dir: Path, version: int | None = None) -> ModelVersion:
    """Read and fully verify one version (the newest when `version` is None)."""
    model_dir = Path(model_dir)
    versions = list_versions(model_dir)
    if version is None:
        if not versions:
            raise ModelRepositoryError(f"{model_dir}: no versions (expected integer-named subdirectories)")
        version = versions[-1]
    elif version not in versions:
        available = ", ".join(map(str, versions)) or "none"
        raise ModelRepositoryError(f"{model_dir / str(version)}: version not found (available: {available})")
    return read_version_dir(model_dir / str(version), name=model_dir.name, version=version)


def read_manifest(path: Path) -> Manifest:
    """The manifest in `path`; ModelRepositoryError naming the file and, where it is malformed, the JSON path."""
    try:
        data = read_bounded(path, MAX_MANIFEST_BYTES, "manifest")
    except FileNotFoundError:
        raise ModelRepositoryError(f"{path}: manifest missing") from None
    except OSError as exc:
        raise ModelRepositoryError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from None
    try:
        return decode(data)
    except ManifestError as exc:
        raise ModelRepositoryError(f"{path}: {exc}") from None


def read_version_dir(path: Path, name: str, version: int) -> ModelVersion:
    """Verify the version stored in directory `path` against the name and version it is published as."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    manifest = read_manifest(manifest_path)
    for key, declared, published_as in (("name", manifest.name, name), ("version", manifest.version, version)):
        if declared != published_as:
            raise ModelRepositoryError(
                f"{manifest_path}: {key} {declared!r} does not match the directory ({published_as!r})"
            )
    expected = expected_signatures(manifest.latent_dim, manifest.image.shape)
    encoder, decoder = (_read_graph(path, manifest, role, expected[role]) for role in ROLES)
    baseline = manifest.baseline
    if baseline is not None and any(d >= manifest.latent_dim for d in baseline.active_dimensions):
        raise ModelRepositoryError(
            f"{manifest_path}: baseline.active_dimensions must lie in [0, {manifest.latent_dim}), "
            f"got {list(baseline.active_dimensions)}"
        )
    return ModelVersion(name=name, number=version, path=path, manifest=manifest, encoder=encoder, decoder=decoder)


def _read_graph(version_dir: Path, manifest: Manifest, role: str, expected: Signature) -> GraphSpec:
    """One graph of the version, its bytes checked against the manifest and the contract."""
    entry = getattr(manifest.graphs, role)
    where = f"{version_dir / MANIFEST_FILE}: graphs.{role}"
    if Path(entry.file).name != entry.file or entry.file in ("", ".", ".."):
        raise ModelRepositoryError(f"{where}.file must be a plain file name, got {entry.file!r}")
    for kind, declared, wanted in zip(("inputs", "outputs"), (entry.inputs, entry.outputs), expected, strict=True):
        if declared != wanted:
            raise ModelRepositoryError(
                f"{where}.{kind} {_describe(declared)} do not match the {role} contract "
                f"for latent_dim {manifest.latent_dim}: expected {_describe(wanted)}"
            )
    graph_path = version_dir / entry.file
    try:  # its size checked against the manifest and MAX_GRAPH_BYTES before a byte is read
        model_bytes = read_bounded(graph_path, MAX_GRAPH_BYTES, "graph", exact_bytes=entry.size_bytes)
    except FileNotFoundError:
        raise ModelRepositoryError(f"{graph_path}: graph file missing") from None
    except OSError as exc:
        raise ModelRepositoryError(f"{graph_path}: cannot read graph: {exc.strerror or exc}") from None
    actual_sha = sha256_hex(model_bytes)
    if actual_sha != entry.sha256:
        raise ModelRepositoryError(
            f"{graph_path}: sha256 mismatch (manifest {entry.sha256[:16]}…, file {actual_sha[:16]}…): "
            "the file changed after export"
        )
    actual = graph_signature(model_bytes, graph_path)
    for kind, declared, real in zip(("inputs", "outputs"), (entry.inputs, entry.outputs), actual, strict=True):
        if declared != real:
            raise ModelRepositoryError(
                f"{graph_path}: graph {kind} {_describe(real)} do not match the manifest's {_describe(declared)}"
            )
    return GraphSpec(graph_path, actual_sha, entry.inputs, entry.outputs, model_bytes)


def graph_signature(model_bytes: bytes, path: Path) -> Signature:
    """The (inputs, outputs) of an ONNX graph as onnxruntime loads it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the signature is needed
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (non-exported) exception types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelRepositoryError(f"{path}: onnxruntime cannot load the graph: {message}") from None

    def specs(args: list[Any]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(
                arg.name, _ORT_DTYPES.get(arg.type, arg.type), tuple(d if d is not None else "?" for d in arg.shape)
            )
            for arg in args
        )

    return specs(session.get_inputs()), specs(session.get_outputs())


def _describe(specs: tuple[TensorSpec, ...]) -> str:
    return "[" + ", ".join(f"{s.name} {s.dtype}[{','.join(map(str, s.shape))}]" for s in specs) + "]"
