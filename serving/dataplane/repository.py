"""Read and verify a versioned model repository: the only thing serving knows about training.

    models/<name>/<version>/encoder.onnx   x[batch,1,28,28] float32 in [0,1] → mu[batch,D], log_var[batch,D]
    models/<name>/<version>/decoder.onnx   z[batch,D] float32 → x[batch,1,28,28] float32 in [0,1]
    models/<name>/<version>/model.json     the manifest (written by `training/export.py`)

A version is served only when everything agrees: the manifest is well-formed, each graph's bytes hash to the
manifest's sha256, the graph's real inputs and outputs (read by onnxruntime from those bytes) are the ones
the manifest declares, and the declared ones are the contract above for the manifest's latent_dim.
Sessions are built from the verified bytes (`GraphSpec.model_bytes`), never by re-reading the file.

    python -m serving.dataplane.repository check models/vae-mnist [--version N]
    python -m serving.dataplane.repository label models/vae-mnist stable 3        # `make promote`
    python -m serving.dataplane.repository label models/vae-mnist canary --remove

No torch here: onnxruntime (already a serving dependency) reads the graphs' signatures, so serving needs
no `onnx` package, and a graph that onnxruntime cannot load is refused at load time, not at the first call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import reprlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

MANIFEST_FILE = "model.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
FORMAT_VERSION = 1  # of model.json; bumped on incompatible changes
BATCH_AXIS = "batch"  # the name of the dynamic first axis of every input and output

# The graphs' signatures, the contract between export and serving. D is the manifest's latent_dim.
ENCODER_INPUT, ENCODER_OUTPUTS = "x", ("mu", "log_var")
DECODER_INPUT, DECODER_OUTPUT = "z", "x"

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


class ModelRepositoryError(Exception):
    """A model directory or version is missing, malformed, or its files disagree with its manifest."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int | str, ...]  # BATCH_AXIS for the dynamic axis, e.g. ("batch", 1, 28, 28)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


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
    name: str
    version: int
    path: Path  # e.g. models/vae-mnist/1
    latent_dim: int
    image_shape: tuple[int, int, int]
    encoder: GraphSpec  # x [batch,1,28,28] float32 → mu, log_var [batch, latent_dim]
    decoder: GraphSpec  # z [batch, latent_dim] float32 → x [batch,1,28,28] in [0,1]
    manifest: dict[str, Any]  # model.json as read
    # From the manifest's optional "baseline" (the validation set at export; absent in older versions):
    score_quantiles: dict[str, float] = field(default_factory=dict)  # "0.5" → negative ELBO in nats
    active_dimensions: tuple[int, ...] | None = None  # latent dimensions with mean KL above the threshold

    @property
    def manifest_json(self) -> str:
        return json.dumps(self.manifest, sort_keys=True)


def expected_signatures(latent_dim: int, image_shape: tuple[int, ...]) -> dict[str, tuple[tuple[TensorSpec, ...], ...]]:
    """The (inputs, outputs) each graph must have for this latent size: what export writes, what serving reads."""
    images = TensorSpec(ENCODER_INPUT, "float32", (BATCH_AXIS, *image_shape))
    mu, log_var = (TensorSpec(name, "float32", (BATCH_AXIS, latent_dim)) for name in ENCODER_OUTPUTS)
    latents = TensorSpec(DECODER_INPUT, "float32", (BATCH_AXIS, latent_dim))
    decoded = TensorSpec(DECODER_OUTPUT, "float32", (BATCH_AXIS, *image_shape))
    return {"encoder": ((images,), (mu, log_var)), "decoder": ((latents,), (decoded,))}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_versions(model_dir: Path) -> list[int]:
    """The integer-named subdirectories of `model_dir`, ascending (temporary export directories are skipped)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelRepositoryError(f"{model_dir}: model directory not found")
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and _is_version_name(p.name))


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


def read_version_dir(path: Path, name: str, version: int) -> ModelVersion:
    """Verify the version stored in directory `path` against the name and version it is published as.

    Export calls this on its temporary directory before publishing, so a version that serving would refuse
    is never published.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    manifest = _read_manifest(manifest_path)
    field = _ManifestFields(manifest_path, manifest)
    for key, kind, published_as in (("name", str, name), ("version", int, version)):
        if field.get(key, kind) != published_as:
            raise ModelRepositoryError(
                f"{manifest_path}: {key} {manifest[key]!r} does not match the directory ({published_as!r})"
            )
    latent_dim = field.get("latent_dim", int)
    if latent_dim < 1:
        raise ModelRepositoryError(f"{manifest_path}: latent_dim must be >= 1, got {latent_dim}")
    declared_image_shape = field.shape("image", "shape")
    image_shape = tuple(d for d in declared_image_shape if isinstance(d, int) and d > 0)
    if len(image_shape) != 3 or len(declared_image_shape) != 3:
        raise ModelRepositoryError(
            f"{manifest_path}: image.shape must be 3 positive integers, got {list(declared_image_shape)}"
        )
    expected = expected_signatures(latent_dim, image_shape)
    graphs = {role: _read_graph(path, field, role, *expected[role]) for role in ("encoder", "decoder")}
    score_quantiles, active_dimensions = _read_baseline(manifest_path, manifest.get("baseline"), latent_dim)
    return ModelVersion(
        name=name,
        version=version,
        path=path,
        latent_dim=latent_dim,
        image_shape=(image_shape[0], image_shape[1], image_shape[2]),
        encoder=graphs["encoder"],
        decoder=graphs["decoder"],
        manifest=manifest,
        score_quantiles=score_quantiles,
        active_dimensions=active_dimensions,
    )


def _read_baseline(
    manifest_path: Path, baseline: Any, latent_dim: int
) -> tuple[dict[str, float], tuple[int, ...] | None]:
    """The manifest's optional "baseline": (score quantiles, active dimensions); ({}, None) when it has none."""
    if baseline is None:
        return {}, None
    quantiles = baseline.get("score_quantiles") if isinstance(baseline, dict) else None
    active = baseline.get("active_dimensions") if isinstance(baseline, dict) else None
    if not (
        isinstance(quantiles, dict)
        and all(isinstance(q, str) and _is_number(v) for q, v in quantiles.items())
        and isinstance(active, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < latent_dim for d in active)
    ):
        raise ModelRepositoryError(
            f"{manifest_path}: baseline must hold score_quantiles (quantile → nats) and active_dimensions "
            f"(integers in [0, {latent_dim}))"
        )
    return {q: float(v) for q, v in quantiles.items()}, tuple(sorted(active))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_version_name(name: str) -> bool:
    return name.isdecimal() and name.isascii() and not name.startswith("0")


def read_json_object(path: Path, what: str) -> dict[str, Any] | None:
    """The JSON object in `path` (None when there is no such file); ModelRepositoryError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelRepositoryError(f"{path}: cannot read {what}: {exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelRepositoryError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelRepositoryError(f"{path}: {what} must be a JSON object")
    return value


def _read_manifest(manifest_path: Path) -> dict[str, Any]:
    manifest = read_json_object(manifest_path, "manifest")
    if manifest is None:
        raise ModelRepositoryError(f"{manifest_path}: manifest missing")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelRepositoryError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    return manifest


class _ManifestFields:
    """Typed access to manifest fields; a missing or mistyped field is an error naming the file and the field."""

    def __init__(self, manifest_path: Path, manifest: dict[str, Any]) -> None:
        self.manifest_path = manifest_path
        self.manifest = manifest

    def get(self, *keys_and_type: Any) -> Any:
        """`get("graphs", "encoder", "inputs", 0, "name", str)`: the value, checked to be a `str`."""
        *keys, kind = keys_and_type
        where = ".".join(map(str, keys))
        value: Any = self.manifest
        for key in keys:
            if isinstance(value, dict):
                present = key in value
            else:
                present = isinstance(value, list) and isinstance(key, int) and key < len(value)
            if not present:
                raise ModelRepositoryError(f"{self.manifest_path}: missing field {where}")
            value = value[key]
        # bool is an int in Python; a manifest saying `"latent_dim": true` is still wrong
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            shown = reprlib.repr(value)  # a whole sub-object would make an unreadable message
            raise ModelRepositoryError(f"{self.manifest_path}: field {where} must be {kind.__name__}, got {shown}")
        return value

    def shape(self, *keys: Any) -> tuple[int | str, ...]:
        value = self.get(*keys, list)
        if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in value):
            where = ".".join(map(str, keys))
            raise ModelRepositoryError(f"{self.manifest_path}: field {where} must list ints or axis names")
        return tuple(value)

    def tensors(self, *keys: str) -> tuple[TensorSpec, ...]:
        count = len(self.get(*keys, list))
        return tuple(
            TensorSpec(self.get(*keys, i, "name", str), self.get(*keys, i, "dtype", str), self.shape(*keys, i, "shape"))
            for i in range(count)
        )


def _read_graph(
    version_dir: Path,
    field: _ManifestFields,
    role: str,
    expected_inputs: tuple[TensorSpec, ...],
    expected_outputs: tuple[TensorSpec, ...],
) -> GraphSpec:
    manifest_path = field.manifest_path
    file_name = field.get("graphs", role, "file", str)
    if Path(file_name).name != file_name:
        raise ModelRepositoryError(f"{manifest_path}: graphs.{role}.file must be a plain file name, got {file_name!r}")
    declared_sha = field.get("graphs", role, "sha256", str)
    declared_inputs = field.tensors("graphs", role, "inputs")
    declared_outputs = field.tensors("graphs", role, "outputs")
    for kind, declared, expected in (
        ("inputs", declared_inputs, expected_inputs),
        ("outputs", declared_outputs, expected_outputs),
    ):
        if declared != expected:
            raise ModelRepositoryError(
                f"{manifest_path}: graphs.{role}.{kind} {_describe(declared)} do not match the {role} contract "
                f"for latent_dim {field.manifest['latent_dim']}: expected {_describe(expected)}"
            )

    graph_path = version_dir / file_name
    try:
        model_bytes = graph_path.read_bytes()
    except FileNotFoundError:
        raise ModelRepositoryError(f"{graph_path}: graph file missing") from None
    except OSError as exc:
        raise ModelRepositoryError(f"{graph_path}: cannot read graph: {exc}") from None
    actual_sha = sha256_hex(model_bytes)
    if actual_sha != declared_sha:
        raise ModelRepositoryError(
            f"{graph_path}: sha256 mismatch (manifest {declared_sha[:16]}…, file {actual_sha[:16]}…): "
            "the file changed after export"
        )
    actual_inputs, actual_outputs = graph_signature(model_bytes, graph_path)
    for kind, declared, actual in (
        ("inputs", declared_inputs, actual_inputs),
        ("outputs", declared_outputs, actual_outputs),
    ):
        if declared != actual:
            raise ModelRepositoryError(
                f"{graph_path}: graph {kind} {_describe(actual)} do not match the manifest's {_describe(declared)}"
            )
    return GraphSpec(graph_path, actual_sha, actual_inputs, actual_outputs, model_bytes)


def graph_signature(model_bytes: bytes, path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
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


def check(model_dir: Path, version: int | None = None) -> bool:
    """Print one verdict line per version (all, or only `version`); True when every one passed."""
    versions = [version] if version is not None else list_versions(model_dir)
    if not versions:
        raise ModelRepositoryError(f"{model_dir}: no versions (expected integer-named subdirectories)")
    all_ok = True
    for number in versions:
        try:
            loaded = load_version(model_dir, number)
        except ModelRepositoryError as exc:
            print(f"{model_dir.name} {number}: FAILED: {exc}")
            all_ok = False
            continue
        print(
            f"{loaded.name} {loaded.version}: ok (latent_dim {loaded.latent_dim}, "
            f"encoder sha256 {loaded.encoder.sha256[:12]}, decoder sha256 {loaded.decoder.sha256[:12]}, "
            f"created {loaded.manifest.get('created_at', '?')})"
        )
    return all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.dataplane.repository", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="verify every version (or one) of a model directory")
    check_parser.add_argument("model_dir", type=Path, help="e.g. models/vae-mnist")
    check_parser.add_argument("--version", type=int, default=None, help="check only this version")
    label_parser = commands.add_parser("label", help="point a label (stable, canary, ...) at a version, atomically")
    label_parser.add_argument("model_dir", type=Path, help="e.g. models/vae-mnist")
    label_parser.add_argument("label", help="lower-case letters, digits, - and _, starting with a letter")
    label_parser.add_argument("version", type=int, nargs="?", help="a version that verifies")
    label_parser.add_argument("--remove", action="store_true", help="remove the label instead")
    args = parser.parse_args(argv)
    if args.command == "label" and (args.version is None) != args.remove:
        parser.error("label: give a VERSION, or --remove")
    try:
        if args.command == "label":
            from serving.dataplane.versions import set_label

            print(set_label(args.model_dir, args.label, None if args.remove else args.version))
            return 0
        ok = check(args.model_dir, args.version)
    except (ModelRepositoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
