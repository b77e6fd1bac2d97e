"""Export a checkpoint into the versioned model repository that serving reads.

    python -m training.export --checkpoint runs/smoke/best.pt --repository models --name vae-mnist \
        [--version N] [--force]

writes `models/vae-mnist/<N>/{encoder.onnx, decoder.onnx, model.json}`; N is the next free integer unless
`--version` is given, and an existing version is replaced only with `--force`. Both graphs come from
`torch.onnx.export(dynamo=True)` with a dynamic batch axis, pass `onnx.checker` (full check) and must match
PyTorch (eval mode) on onnxruntime's CPU provider within 1e-5 at batch 1, 7 and 256. Everything is built in
memory, written into a temporary directory beside the versions, verified with the same reader the server
uses (`contract.repository`) and renamed into place: a failure or a crash never leaves a half version.

The manifest's `baseline` is what the exported graphs make of the training run's validation images, scored
exactly as the server scores its inputs for drift (`contract.scores`): quantiles of the plug-in negative
ELBO (the drift alert's reference), the mean KL of each latent dimension and the active ones (Traverse reports them).
Where the dataset cannot be loaded (`--data-dir` points at it), the version is exported without a baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from contract import manifest as schema
from contract import repository as repo
from contract import scores
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.data import DataError, load_dataset
from training.model import VAE

OPSET = 23  # the newest opset that both torch's exporter and onnxruntime 1.31 implement in full
PARITY_BATCH_SIZES = (1, 7, 256)
PARITY_TOLERANCE = 1e-5  # max absolute difference, onnxruntime CPU vs PyTorch eval, for mu, log_var and images
PRODUCER = "vae-service training.export"
ACTIVE_KL_NATS = 0.01  # a latent dimension whose mean KL is at most this carries no information: inactive
BASELINE_BATCH = 1000
# What the baseline's quantiles are of: the one definition the drift telemetry uses too (contract/scores.py says why).
BASELINE_SCORE = "plug-in negative ELBO in nats: -log p(x | z = mu) + KL (contract.scores.plugin_negative_elbo_nats)"


class ExportError(Exception):
    """The export cannot produce or publish a version; nothing was published."""


class _Encoder(nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.encode(x)


class _Decoder(nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def export_graphs(model: VAE, name: str, version: int) -> dict[str, onnx.ModelProto]:
    """Trace encoder and decoder into checked ONNX models with a dynamic batch axis and our metadata."""
    model = model.eval()
    signatures = repo.expected_signatures(model.config.latent_dim, model.config.image_shape)
    batch = torch.export.Dim(repo.BATCH_AXIS, min=1)
    modules = {"encoder": _Encoder(model).eval(), "decoder": _Decoder(model).eval()}
    examples = {"encoder": torch.rand(2, *model.config.image_shape), "decoder": torch.randn(2, model.config.latent_dim)}
    graphs = {}
    for role, module in modules.items():
        inputs, outputs = signatures[role]
        input_names = [spec.name for spec in inputs]
        try:
            program = torch.onnx.export(
                module,
                (examples[role],),
                dynamo=True,
                opset_version=OPSET,
                input_names=input_names,
                output_names=[spec.name for spec in outputs],
                dynamic_shapes={input_names[0]: {0: batch}},
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; the message is what matters
            raise ExportError(f"ONNX export of the {role} failed: {type(exc).__name__}: {exc}") from None
        assert program is not None  # dynamo=True always returns the program
        proto = program.model_proto
        _stamp_metadata(proto, name, version, role, model.config.latent_dim)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{role} graph fails onnx.checker: {exc}") from None
        graphs[role] = proto
    return graphs


def _stamp_metadata(proto: onnx.ModelProto, name: str, version: int, role: str, latent_dim: int) -> None:
    proto.producer_name = PRODUCER
    proto.producer_version = package_version("vae-service")
    proto.model_version = version
    proto.graph.name = f"{name}-{role}"
    proto.doc_string = f"{name} version {version}: VAE {role} (latent_dim {latent_dim})"
    fields = {"model_name": name, "model_version": str(version), "graph": role, "latent_dim": str(latent_dim)}
    fields["exporter"] = f"torch {torch.__version__} (torch.onnx.export dynamo=True)"
    onnx.helper.set_model_props(proto, fields)


def check_parity(model: VAE, graph_bytes: dict[str, bytes], tolerance: float | None = None) -> dict[str, float]:
    """Max |onnxruntime CPU − PyTorch eval| per output over PARITY_BATCH_SIZES; ExportError above the tolerance."""
    tolerance = PARITY_TOLERANCE if tolerance is None else tolerance
    sessions = {
        role: ort.InferenceSession(data, providers=["CPUExecutionProvider"]) for role, data in graph_bytes.items()
    }
    generator = torch.Generator().manual_seed(0)
    worst = {"mu": 0.0, "log_var": 0.0, "images": 0.0}
    for batch in PARITY_BATCH_SIZES:
        images = torch.rand(batch, *model.config.image_shape, generator=generator)
        latents = torch.randn(batch, model.config.latent_dim, generator=generator)
        with torch.inference_mode():
            expected = dict(zip(("mu", "log_var"), model.encode(images), strict=True))
            expected["images"] = model.decode(latents)
        mu, log_var = sessions["encoder"].run(None, {repo.ENCODER_INPUT: images.numpy()})
        (decoded,) = sessions["decoder"].run(None, {repo.DECODER_INPUT: latents.numpy()})
        actual = {"mu": mu, "log_var": log_var, "images": decoded}
        for output, value in actual.items():
            if value.shape != tuple(expected[output].shape):
                raise ExportError(
                    f"parity check failed: {output} has shape {value.shape} at batch {batch}, PyTorch "
                    f"{tuple(expected[output].shape)}; nothing published"
                )
            diff = float(np.max(np.abs(value - expected[output].numpy())))
            worst[output] = max(worst[output], diff)
            if not diff <= tolerance:  # also catches NaN
                raise ExportError(
                    f"parity check failed: {output} differs from PyTorch by {diff:.3g} at batch {batch} "
                    f"(allowed {tolerance:g}); nothing published"
                )
    return worst


def validation_baseline(
    graph_bytes: dict[str, bytes], images: np.ndarray, dataset: str, split: str = "validation"
) -> schema.Baseline:
    """The exported graphs' scores of `images` (the validation split): quantiles, KL per dimension, active ones."""
    sessions = {
        role: ort.InferenceSession(data, providers=["CPUExecutionProvider"]) for role, data in graph_bytes.items()
    }
    plugin, kl_rows = [], []
    for start in range(0, len(images), BASELINE_BATCH):
        batch = images[start : start + BASELINE_BATCH]
        mu, log_var = sessions["encoder"].run(None, {repo.ENCODER_INPUT: batch})
        (decoded,) = sessions["decoder"].run(None, {repo.DECODER_INPUT: mu})
        plugin.append(scores.plugin_negative_elbo_nats(batch, mu, log_var, decoded))
        kl_rows.append(scores.kl_nats(mu[..., None], log_var[..., None]))  # per dimension: [batch, D]
    values = np.concatenate(plugin)
    kl_per_dim = np.concatenate(kl_rows).mean(axis=0)
    return schema.Baseline(
        dataset=dataset,
        split=split,
        images=len(images),
        score=BASELINE_SCORE,
        score_quantiles={
            scores.quantile_key(q): round(float(np.quantile(values, q)), 3) for q in scores.BASELINE_QUANTILES
        },
        score_mean=round(float(values.mean()), 3),
        kl_per_dim=tuple(round(float(v), 4) for v in kl_per_dim),
        active_threshold_nats=ACTIVE_KL_NATS,
        active_dimensions=tuple(d for d, v in enumerate(kl_per_dim.tolist()) if v > ACTIVE_KL_NATS),
    )


def checkpoint_baseline(
    checkpoint: dict[str, Any], graph_bytes: dict[str, bytes], data_dir: Path | None
) -> schema.Baseline | None:
    """`validation_baseline` on the checkpoint's own validation split; None (with a warning) without its data."""
    train_config = checkpoint.get("train_config") or {}
    name = checkpoint.get("dataset")
    try:
        if not isinstance(name, str):
            raise DataError("the checkpoint does not name its dataset")
        dataset = load_dataset(name, data_dir or train_config.get("data_dir"), int(train_config.get("split_seed", 0)))
    except DataError as exc:
        print(f"warning: exporting without a validation baseline (no drift reference): {exc}", file=sys.stderr)
        return None
    return validation_baseline(graph_bytes, dataset.validation.images.numpy(), dataset.name)


def build_manifest(
    name: str,
    version: int,
    model: VAE,
    checkpoint: dict[str, Any],
    checkpoint_path: Path,
    graph_bytes: dict[str, bytes],
    parity: dict[str, float],
    baseline: schema.Baseline | None = None,
) -> schema.Manifest:
    """model.json: what serving verifies (names, shapes, checksums) and what people ask about a version."""
    config = model.config
    signatures = repo.expected_signatures(config.latent_dim, config.image_shape)
    files = {"encoder": repo.ENCODER_FILE, "decoder": repo.DECODER_FILE}
    graphs = {
        role: schema.Graph(
            file=files[role],
            sha256=repo.sha256_hex(data),
            size_bytes=len(data),
            inputs=signatures[role][0],
            outputs=signatures[role][1],
        )
        for role, data in graph_bytes.items()
    }
    return schema.Manifest(
        format_version=schema.FORMAT_VERSION,
        name=name,
        version=version,
        latent_dim=config.latent_dim,
        image=schema.Image(shape=config.image_shape),
        graphs=schema.Graphs(**graphs),
        opset=OPSET,
        exporter=schema.Exporter(
            producer=f"{PRODUCER} {package_version('vae-service')}",
            torch=str(torch.__version__),
            onnx=str(onnx.__version__),
            onnxscript=package_version("onnxscript"),
            onnxruntime=str(ort.__version__),
        ),
        parity=schema.Parity(
            provider="CPUExecutionProvider",
            batch_sizes=PARITY_BATCH_SIZES,
            tolerance=PARITY_TOLERANCE,
            max_abs_diff=parity,
        ),
        training=schema.Training(
            checkpoint=str(checkpoint_path),
            checkpoint_sha256=repo.sha256_hex(checkpoint_path.read_bytes()),
            dataset=checkpoint.get("dataset"),
            epochs=checkpoint.get("epoch"),
            metrics=_json_ready(checkpoint.get("metrics", {})),
            model_args=asdict(config),
            train_config=_json_ready(checkpoint.get("train_config", {})),
        ),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        baseline=baseline,
    )


def _json_ready(fields: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint fields are meant to be primitives; a stray tensor or Path still makes a readable manifest."""
    result: dict[str, Any] = json.loads(json.dumps(fields, default=_json_value))
    return result


def _json_value(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def next_version(model_dir: Path) -> int:
    """One more than the newest version in `model_dir` (1 when there is none yet)."""
    versions = repo.list_versions(model_dir) if model_dir.is_dir() else []
    return versions[-1] + 1 if versions else 1


@contextlib.contextmanager
def staging_directory(model_dir: Path, version: int) -> Iterator[Path]:
    """A new temporary directory beside the versions; on leaving, it and any directories made for it are gone
    unless it was published (renamed to `model_dir/version`)."""
    created = _make_dirs(model_dir)
    try:
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".export-{version}-"))
        staging.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
    except OSError as exc:
        _remove_empty(created)
        raise ExportError(f"cannot write to {model_dir}: {exc.strerror or exc}") from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone when it was published
        if not (model_dir / str(version)).exists():
            _remove_empty(created)


def publish(staging: Path, files: dict[str, bytes], name: str, version: int, force: bool = False) -> Path:
    """Write `files` into `staging`, verify it as serving would, then rename it to `<its parent>/version`."""
    target = staging.parent / str(version)
    try:
        for file_name, data in files.items():
            with open(staging / file_name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        repo.read_version_dir(staging, name=name, version=version)
        _rename_into_place(staging, target, replace=force)
    except repo.ModelRepositoryError as exc:
        raise ExportError(f"the exported version does not verify: {exc}") from None
    except OSError as exc:
        raise ExportError(f"cannot publish {target}: {exc.strerror or exc}") from None
    return target


def _rename_into_place(staging: Path, target: Path, replace: bool) -> None:
    if not (replace and target.exists()):
        try:
            os.rename(staging, target)
        except OSError:
            if target.exists():
                raise ExportError(f"{target} was published by someone else meanwhile; nothing replaced") from None
            raise
        return
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".replaced-{target.name}-"))
    os.rename(target, retired / target.name)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(retired / target.name, target)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (outermost first)."""
    missing = [directory for directory in (path, *path.parents) if not directory.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {path}: {exc.strerror or exc}") from None
    return list(reversed(missing))


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):  # innermost first
        with contextlib.suppress(OSError):
            directory.rmdir()


def export(
    checkpoint_path: Path,
    repository: Path,
    name: str,
    version: int | None = None,
    force: bool = False,
    data_dir: Path | None = None,
) -> Path:
    """Checkpoint → `repository/name/version`; returns the published directory."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    model_dir = repository / name
    try:
        version = version if version is not None else next_version(model_dir)
    except repo.ModelRepositoryError as exc:
        raise ExportError(str(exc)) from None
    if version < 1:
        raise ExportError(f"--version must be >= 1, got {version}")
    if (model_dir / str(version)).exists() and not force:  # fail before spending seconds on the export
        raise ExportError(f"{model_dir / str(version)} already exists (use --force to replace it, or omit --version)")
    with staging_directory(model_dir, version) as staging:  # an unwritable repository fails here, also fast
        graphs = export_graphs(model, name, version)
        graph_bytes = {role: proto.SerializeToString() for role, proto in graphs.items()}
        parity = check_parity(model, graph_bytes)
        baseline = checkpoint_baseline(checkpoint, graph_bytes, data_dir)
        manifest = build_manifest(name, version, model, checkpoint, checkpoint_path, graph_bytes, parity, baseline)
        files = {
            repo.ENCODER_FILE: graph_bytes["encoder"],
            repo.DECODER_FILE: graph_bytes["decoder"],
            repo.MANIFEST_FILE: schema.encode(manifest),
        }
        return publish(staging, files, name, version, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="e.g. runs/smoke/best.pt")
    parser.add_argument("--repository", type=Path, default=Path("models"), help="model repository root")
    parser.add_argument("--name", default="vae-mnist", help="model name: the directory under the repository")
    parser.add_argument("--version", type=int, default=None, help="version to write (default: next free)")
    parser.add_argument("--force", action="store_true", help="replace the version if it exists")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where the run's dataset is (default: the run's own --data-dir)"
    )
    args = parser.parse_args(argv)
    if not args.name or Path(args.name).name != args.name or args.name.startswith("."):
        parser.error(f"--name must be a plain directory name, got {args.name!r}")
    try:
        target = export(args.checkpoint, args.repository, args.name, args.version, args.force, args.data_dir)
    except (ExportError, CheckpointError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # torch's can span pages
        print(f"error: {first_line}", file=sys.stderr)
        return 1
    manifest = repo.read_manifest(target / repo.MANIFEST_FILE)
    worst = max(manifest.parity.max_abs_diff.values())
    print(f"exported {args.name} version {manifest.version} to {target} (parity max abs diff {worst:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
