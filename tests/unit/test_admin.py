"""vae-models, the operator's commands: check, promote and label, as the console script users run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.labels import LABELS_FILE, read_labels
from contract.repository import ModelRepositoryError
from serving.lifecycle.admin import set_label
from tests.helpers import publish_copy

VAE_MODELS = Path(sys.executable).parent / "vae-models"  # installed by pip with the package (pyproject's scripts)


def vae_models(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VAE_MODELS), *args], capture_output=True, text=True, timeout=60)


def test_check_prints_a_verdict_per_version_with_its_labels(model_dir: Path) -> None:
    shutil.copytree(model_dir / "1", model_dir / "2")  # its manifest says version 1: refused
    (model_dir / LABELS_FILE).write_text('{"stable": 1}')
    result = vae_models("check", str(model_dir))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vae-mnist 1: ok (latent_dim 20") and lines[0].endswith(", labels stable)")
    assert lines[1].startswith("vae-mnist 2: FAILED: ") and "version 1 does not match the directory (2)" in lines[1]
    pinned = vae_models("check", str(model_dir), "--version", "1")
    assert pinned.returncode == 0 and pinned.stdout.startswith("vae-mnist 1: ok")


def test_an_error_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    result = vae_models("check", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: model directory not found"


def test_promote_points_stable_at_a_version_and_says_what_it_replaced(model_dir: Path) -> None:
    publish_copy(model_dir, 2)
    assert vae_models("promote", str(model_dir), "1").stdout == "vae-mnist: stable -> version 1\n"
    assert vae_models("promote", str(model_dir), "2").stdout == "vae-mnist: stable -> version 2 (was 1)\n"
    assert vae_models("promote", str(model_dir), "1", "--label", "canary").stdout == "vae-mnist: canary -> version 1\n"
    assert read_labels(model_dir) == {"stable": 2, "canary": 1}
    refused = vae_models("promote", str(model_dir), "7")
    assert refused.returncode == 1 and refused.stderr == f"error: {model_dir}: no version 7 (versions: [1, 2])\n"


def test_label_sets_and_removes_labels(model_dir: Path) -> None:
    assert vae_models("label", str(model_dir), "stable", "1").stdout == "vae-mnist: stable -> version 1\n"
    assert read_labels(model_dir) == {"stable": 1}
    assert vae_models("label", str(model_dir), "stable", "--remove").stdout == "vae-mnist: removed label 'stable'\n"
    assert read_labels(model_dir) == {}
    refused = vae_models("label", str(model_dir), "Bad", "1")
    assert refused.returncode == 1 and refused.stderr.startswith("error: label 'Bad' is not allowed")
    assert vae_models("label", str(model_dir), "stable").returncode == 2  # neither a version nor --remove


def test_a_label_points_only_at_a_version_that_verifies(model_dir: Path) -> None:
    publish_copy(model_dir, 2, corrupt=True)
    assert set_label(model_dir, "stable", 1) == "vae-mnist: stable -> version 1"
    with pytest.raises(ModelRepositoryError, match="sha256 mismatch"):
        set_label(model_dir, "canary", 2)
    with pytest.raises(ValueError, match="no version 5"):
        set_label(model_dir, "canary", 5)
    assert json.loads((model_dir / LABELS_FILE).read_text()) == {"stable": 1}


def test_check_fails_a_directory_named_beyond_the_largest_version(model_dir: Path) -> None:
    publish_copy(model_dir, 2**64)  # the manifest says 2**64 too: the directory's name is what is refused
    result = vae_models("check", str(model_dir))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vae-mnist 1: ok")
    assert lines[1] == (
        f"vae-mnist {2**64}: FAILED: {model_dir / str(2**64)}: version number above 9223372036854775807 (2^63 - 1), "
        "the largest a version may be"
    )
