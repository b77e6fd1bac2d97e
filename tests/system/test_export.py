"""training.export: checkpoint → verified version directory, published atomically or not at all."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from contract.repository import list_versions, load_version
from tests.helpers import DirectGraphs, bce_nats, kl_per_dim_nats, mnist_5k_images, train_tiny_checkpoint
from training import export as export_module
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import load_dataset
from training.export import OPSET, ExportError, check_parity, export, main, publish, staging_directory
from training.model import VAE, VAEConfig


def entries(directory: Path) -> set[str]:
    """Everything in a directory, hidden temporary directories included."""
    return {path.name for path in directory.iterdir()}


def test_round_trip_matches_pytorch_at_several_batch_sizes(exported_repository: Path, tiny_checkpoint: Path) -> None:
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    loaded = load_version(exported_repository)
    encoder = ort.InferenceSession(loaded.encoder.model_bytes, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(loaded.decoder.model_bytes, providers=["CPUExecutionProvider"])
    digits = mnist_5k_images(300)
    for batch in (1, 2, 64, 300):
        images = digits[:batch]
        with torch.inference_mode():
            mu, log_var = model.encode(images)
            decoded = model.decode(mu)
        onnx_mu, onnx_log_var = encoder.run(None, {"x": images.numpy()})
        (onnx_decoded,) = decoder.run(None, {"z": mu.numpy()})
        for actual, expected in ((onnx_mu, mu), (onnx_log_var, log_var), (onnx_decoded, decoded)):
            assert actual.shape == expected.shape
            np.testing.assert_allclose(actual, expected.numpy(), rtol=0, atol=1e-5)


def test_graphs_pass_the_checker_and_carry_metadata(exported_repository: Path) -> None:
    for role, input_name in (("encoder", "x"), ("decoder", "z")):
        proto = onnx.load_model_from_string((exported_repository / "1" / f"{role}.onnx").read_bytes())
        onnx.checker.check_model(proto, full_check=True)
        assert proto.producer_name == "vae-service training.export"
        assert proto.model_version == 1
        assert {p.domain: p.version for p in proto.opset_import}[""] == OPSET
        metadata = {p.key: p.value for p in proto.metadata_props}
        assert metadata["model_name"] == "vae-mnist" and metadata["model_version"] == "1"
        assert metadata["graph"] == role and metadata["latent_dim"] == "20"
        (graph_input,) = proto.graph.input
        assert graph_input.name == input_name
        assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_manifest_describes_the_version(exported_repository: Path) -> None:
    manifest = json.loads((exported_repository / "1" / "model.json").read_text())
    assert (manifest["name"], manifest["version"], manifest["latent_dim"]) == ("vae-mnist", 1, 20)
    assert manifest["image"] == {"shape": [1, 28, 28], "dtype": "float32", "value_range": [0.0, 1.0]}
    assert manifest["graphs"]["encoder"]["outputs"][1] == {
        "name": "log_var",
        "dtype": "float32",
        "shape": ["batch", 20],
    }
    assert manifest["opset"] == OPSET
    assert set(manifest["exporter"]) >= {"torch", "onnx", "onnxruntime", "producer"}
    assert manifest["training"]["dataset"] == "mnist-5k" and manifest["training"]["epochs"] == 1
    assert "val_loss" in manifest["training"]["metrics"]
    assert manifest["parity"]["batch_sizes"] == [1, 7, 256]
    assert max(manifest["parity"]["max_abs_diff"].values()) <= 1e-5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created_at"])


def test_the_baseline_is_the_graphs_scores_of_the_validation_split(exported_repository: Path) -> None:
    baseline = json.loads((exported_repository / "1" / "model.json").read_text())["baseline"]
    validation = load_dataset("mnist-5k").validation.images  # the tiny checkpoint's data, split as in training
    graphs = DirectGraphs(exported_repository)
    mu, log_var = graphs.encode(validation.numpy())
    reconstruction = bce_nats(validation.numpy(), graphs.decode(mu))
    kl = kl_per_dim_nats(mu, log_var)
    scores = reconstruction + kl.sum(1)
    assert (baseline["dataset"], baseline["split"], baseline["images"]) == ("mnist-5k", "validation", len(validation))
    for quantile, nats in baseline["score_quantiles"].items():
        assert nats == pytest.approx(np.quantile(scores, float(quantile)), abs=0.01)
    assert list(baseline["score_quantiles"]) == ["0.01", "0.05", "0.5", "0.95", "0.99"]
    np.testing.assert_allclose(baseline["kl_per_dim"], kl.mean(0), atol=1e-4)
    assert baseline["active_dimensions"] == [d for d, value in enumerate(kl.mean(0)) if value > 0.01]


def test_export_without_the_training_data_has_no_baseline_and_says_so(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = export(tiny_checkpoint, tmp_path, "vae-mnist", data_dir=tmp_path / "no-such-dir")
    assert "baseline" not in json.loads((target / "model.json").read_text())
    assert "warning: exporting without a validation baseline" in capsys.readouterr().err
    assert load_version(tmp_path / "vae-mnist").score_quantiles == {}


def test_repeated_export_makes_version_2_and_version_force_behave(
    exported_repository: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(exported_repository, repository / "vae-mnist")
    args = ["--checkpoint", str(tiny_checkpoint), "--repository", str(repository), "--name", "vae-mnist"]

    assert main(args) == 0
    assert f"exported vae-mnist version 2 to {repository / 'vae-mnist' / '2'}" in capsys.readouterr().out

    assert main([*args, "--version", "2"]) == 1
    error = capsys.readouterr().err
    version_2 = repository / "vae-mnist" / "2"
    assert error == f"error: {version_2} already exists (use --force to replace it, or omit --version)\n"

    (repository / "vae-mnist" / "2" / "stale-marker").touch()
    assert main([*args, "--version", "2", "--force"]) == 0
    assert not (repository / "vae-mnist" / "2" / "stale-marker").exists()

    assert main([*args, "--version", "5"]) == 0
    assert list_versions(repository / "vae-mnist") == [1, 2, 5]
    assert entries(repository / "vae-mnist") == {"1", "2", "5"}  # no temporary directories left
    assert load_version(repository / "vae-mnist").number == 5


@pytest.mark.parametrize("latent_dim", [2, 32])
def test_other_latent_sizes_export(latent_dim: int, tmp_path: Path) -> None:
    checkpoint = train_tiny_checkpoint(tmp_path / "best.pt", latent_dim=latent_dim, steps=3)
    assert main(["--checkpoint", str(checkpoint), "--repository", str(tmp_path / "models"), "--name", "m"]) == 0
    loaded = load_version(tmp_path / "models" / "m")
    assert loaded.latent_dim == latent_dim
    assert loaded.decoder.inputs[0].shape == ("batch", latent_dim)
    assert loaded.encoder.outputs[0].shape == ("batch", latent_dim)


def test_parity_failure_exits_nonzero_and_publishes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # any difference, even 0, fails
    assert main(["--checkpoint", str(tiny_checkpoint), "--repository", str(tmp_path / "models")]) == 1
    assert re.fullmatch(r"error: parity check failed: mu differs .* nothing published\n", capsys.readouterr().err)
    assert not (tmp_path / "models").exists()


def test_parity_check_catches_graphs_that_are_not_the_model(exported_repository: Path) -> None:
    other_model = VAE(VAEConfig(latent_dim=20)).eval()  # same shapes, other weights
    graph_bytes = {role: (exported_repository / "1" / f"{role}.onnx").read_bytes() for role in ("encoder", "decoder")}
    with pytest.raises(ExportError, match=r"parity check failed: mu differs from PyTorch by .* at batch 1"):
        check_parity(other_model, graph_bytes)


@pytest.mark.parametrize("failing_call", ["rename", "fsync"])
def test_publish_failure_leaves_nothing_behind(
    exported_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: str
) -> None:
    files = {path.name: path.read_bytes() for path in (exported_repository / "1").iterdir()}
    model_dir = tmp_path / "models" / "vae-mnist"

    def read_only(*args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    failure = pytest.raises(ExportError, match=r"cannot publish .*vae-mnist/1: Read-only file system")
    with failure, staging_directory(model_dir, 1) as staging:
        monkeypatch.setattr(os, failing_call, read_only)
        publish(staging, files, "vae-mnist", 1)
    monkeypatch.undo()
    assert not (tmp_path / "models").exists()  # the directories this export made are gone too

    with staging_directory(model_dir, 1) as staging:  # and the same files publish where writing works
        assert publish(staging, files, "vae-mnist", 1) == model_dir / "1"
    assert entries(model_dir) == {"1"} and load_version(model_dir).number == 1


def test_failed_force_replacement_keeps_the_old_version(
    exported_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "vae-mnist"
    shutil.copytree(exported_repository, model_dir)
    files = {path.name: path.read_bytes() for path in (model_dir / "1").iterdir()}
    real_rename = os.rename

    def rename_fails_for_the_new_version(source: str | Path, target: str | Path) -> None:
        if Path(source).name.startswith(".export-"):
            raise OSError(errno.EIO, "Input/output error")
        real_rename(source, target)

    failure = pytest.raises(ExportError, match=r"cannot publish .*vae-mnist/1: Input/output error")
    with failure, staging_directory(model_dir, 1) as staging:
        monkeypatch.setattr(os, "rename", rename_fails_for_the_new_version)
        publish(staging, files, "vae-mnist", 1, force=True)
    assert entries(model_dir) == {"1"}
    assert load_version(model_dir).encoder.model_bytes == files["encoder.onnx"]


def test_repository_under_a_regular_file_fails_cleanly(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "not-a-directory").write_text("")
    repository = tmp_path / "not-a-directory" / "models"
    assert main(["--checkpoint", str(tiny_checkpoint), "--repository", str(repository)]) == 1
    assert capsys.readouterr().err == f"error: cannot create {repository / 'vae-mnist'}: Not a directory\n"
    assert entries(tmp_path) == {"not-a-directory"}


def _can_mount_read_only() -> bool:
    probe = "mount -t tmpfs -o ro,size=1k tmpfs /mnt"
    return (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=10).returncode == 0
    )


@pytest.mark.skipif(not _can_mount_read_only(), reason="needs unshare and mount (a private read-only bind mount)")
def test_export_into_a_read_only_repository_fails_with_one_line(
    exported_repository: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A read-only bind mount in a private mount namespace refuses writes even to root, and leaks no mount."""
    repository = tmp_path / "models"
    shutil.copytree(exported_repository, repository / "vae-mnist")
    before = {path: path.stat().st_mtime_ns for path in repository.rglob("*")}
    where = shlex.quote(str(repository))
    script = (
        f"mount --bind {where} {where} && mount -o remount,ro,bind {where} && exec {shlex.quote(sys.executable)} "
        f"-m training.export --checkpoint {shlex.quote(str(tiny_checkpoint))} --repository {where}"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"error: cannot write to {repository / 'vae-mnist'}: Read-only file system\n"
    assert before == {path: path.stat().st_mtime_ns for path in repository.rglob("*")}


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "checkpoint not found"), (b"garbage", "cannot read checkpoint")],
)
def test_bad_checkpoint_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    checkpoint = tmp_path / "best.pt"
    if content is not None:
        checkpoint.write_bytes(content)
    assert main(["--checkpoint", str(checkpoint), "--repository", str(tmp_path / "models")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1
    assert not (tmp_path / "models").exists()
