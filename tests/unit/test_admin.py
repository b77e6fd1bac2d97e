"""vae-models, the operator's commands: check, canary and label, as the console script users run; promote's verdict
(promote itself asks a running server: tests/integration/test_canary.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from contract.labels import LABELS_FILE, Routes, read_labels, read_routes
from contract.repository import ModelRepositoryError
from serving.admin import describe, set_label, verdict
from serving.client import VersionComparison
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


def test_canary_sets_the_label_and_its_share_and_label_keeps_the_share(model_dir: Path) -> None:
    publish_copy(model_dir, 2)
    assert vae_models("canary", str(model_dir), "2", "--weight", "0.05").stdout == (
        "vae-mnist: canary -> version 2, taking 5% of the default route\n"
    )
    assert read_routes(model_dir) == Routes({"canary": 2}, 0.05)
    assert vae_models("label", str(model_dir), "stable", "1").returncode == 0
    assert read_routes(model_dir) == Routes({"canary": 2, "stable": 1}, 0.05)  # moving a label keeps the weight
    assert vae_models("canary", str(model_dir), "--weight", "0.25").stdout.endswith("taking 25% of the default route\n")
    assert (
        vae_models("canary", str(model_dir), "--remove").stdout == "vae-mnist: no canary (label and weight removed)\n"
    )
    assert json.loads((model_dir / LABELS_FILE).read_text()) == {"stable": 1}  # the first form again
    refused = vae_models("canary", str(model_dir), "--weight", "0.1")
    assert refused.returncode == 1 and "no canary label: name its version" in refused.stderr
    assert vae_models("canary", str(model_dir), "2", "--weight", "1.5").returncode == 2  # argparse: not a share
    assert vae_models("canary", str(model_dir), "2", "--remove").returncode == 2  # either, not both


def comparison(**fields: float) -> VersionComparison:
    values: dict[str, Any] = {
        "candidate": 4, "stable": 3, "paired_inputs": 500, "median_difference": 0.2, "median_difference_low": 0.1,
        "median_difference_high": 0.4, "confidence": 0.95, "share_worse": 0.55, "stable_median_negative_elbo": 101.5,
        "candidate_median_negative_elbo": 101.7, "dropped": 2, "abandoned": 0, "shadow_fraction": 0.1, "note": "",
    }  # fmt: skip
    return VersionComparison(**{**values, **fields})


def test_the_verdict_needs_enough_pairs_and_the_interval_within_the_margin() -> None:
    assert verdict(comparison(), margin=1.0, min_pairs=200) is None
    assert verdict(comparison(median_difference_high=1.2), margin=1.0, min_pairs=200) == (
        "version 4 may score live inputs worse than stable by more than the margin: the upper end of the median "
        "difference's interval is +1.200 nats, above 1"
    )
    assert verdict(comparison(median_difference_high=1.2), margin=1.5, min_pairs=200) is None
    assert verdict(comparison(paired_inputs=199), margin=1.0, min_pairs=200) == (
        "version 4 has 199 paired inputs, fewer than the 200 needed"
    )
    no_pairs = comparison(paired_inputs=0, median_difference_high=float("nan"))
    assert verdict(no_pairs, margin=1.0, min_pairs=0) is not None  # asking for no pairs still needs a median
    assert describe(comparison()) == (
        "version 4 against stable 3 on 500 paired inputs: median difference +0.200 nats (95% interval +0.100 .. "
        "+0.400), worse on 55.0%; median negative ELBO 101.70 against 101.50; 2 dropped, 0 abandoned (shadow "
        "fraction 0.1)"
    )


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
