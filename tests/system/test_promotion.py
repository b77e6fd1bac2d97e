"""A candidate proves itself on live inputs before it takes the traffic, end to end.

Three versions trained by the tests' recipe on real digits: stable (150 Adam steps), a deliberately bad one (8
steps: one pass over its 512 images) and a good one (600 steps). Callers send Score, Reconstruct and Encode
requests all along; the bad version, then the good one, is the canary (taking 10 % of the default route) and is
shadow-scored against stable; `vae-models promote` (the console script users run) refuses the bad one with its
figures and promotes the good one, and no caller sees an error.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from contract.labels import read_labels, write_labels
from serving.client import VaeClient
from tests.helpers import Callers, ServerThread, running_server, train_tiny_checkpoint, wait_until

VAE_MODELS = Path(sys.executable).parent / "vae-models"
PAIRS = 200  # promote's default --min-pairs


@pytest.fixture(scope="module")
def three_versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vae-mnist 1 (stable), 2 (bad) and 3 (good), exported by the project's exporter."""
    from training.export import export

    folder = tmp_path_factory.mktemp("promotion")
    for name, steps, seed in (("stable", 150, 0), ("bad", 8, 1), ("good", 600, 2)):
        export(train_tiny_checkpoint(folder / f"{name}.pt", latent_dim=20, steps=steps, seed=seed), folder, "vae-mnist")
    return folder / "vae-mnist"


@pytest.fixture
def server(three_versions: Path) -> Iterator[ServerThread]:
    write_labels(three_versions, {"stable": 1, "canary": 2}, canary_weight=0.1)
    config = {"version_policy": "specific:1", "default_version": "stable", "shadow_fraction": 0.5}
    with running_server(three_versions, poll_seconds=0.2, **config) as running:
        yield running


def vae_models(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VAE_MODELS), *args], capture_output=True, text=True, timeout=120)


def test_the_bad_candidate_is_refused_and_the_good_one_promoted_under_live_traffic(
    server: ServerThread, three_versions: Path
) -> None:
    model_dir, target = str(three_versions), server.target
    with VaeClient(target) as client, Callers(target, threads=3, rows=4, protocols=("inputs",)) as traffic:
        wait_until(lambda: client.compare_versions(2).paired_inputs >= PAIRS, timeout_s=120, what="pairs on 2")
        bad = client.compare_versions(2)
        refused = vae_models("promote", model_dir, "2", "--target", target)
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.startswith(
            "error: not promoted: version 2 may score live inputs worse than stable by more than the margin"
        )
        assert "evidence: version 2 against stable 1 on " in refused.stderr
        assert read_labels(three_versions) == {"stable": 1, "canary": 2}
        assert {2, 1} <= set(traffic.versions_seen())  # the canary took its share of the default route meanwhile

        assert vae_models("canary", model_dir, "3").returncode == 0  # the next candidate; the weight stays
        wait_until(lambda: client.compare_versions().candidate == 3, what="version 3 compared")
        wait_until(lambda: client.compare_versions(3).paired_inputs >= PAIRS, timeout_s=120, what="pairs on 3")
        good = client.compare_versions(3)
        promoted = vae_models("promote", model_dir, "3", "--target", target)
        assert promoted.returncode == 0, promoted.stderr
        assert promoted.stdout.startswith("vae-mnist: stable -> version 3 (was 1)\nevidence: version 3 against")
        wait_until(lambda: client.model_info().model_version == 3, what="stable's route to move to version 3")
        answered = len(traffic.versions_seen())
        wait_until(lambda: len(traffic.versions_seen()) > answered + 20, what="callers answered after the promotion")
        assert traffic.versions_seen()[-1] == 3
    assert traffic.errors == []
    # The evidence the verdicts stood on: the bad version explains nearly every image worse, the good one better.
    assert bad.median_difference_low > 1 and bad.share_worse > 0.9
    assert good.median_difference_high < 0 and good.share_worse < 0.2
    assert bad.stable == good.stable == 1
    print(f"bad: {bad}\ngood: {good}")
    assert np.isfinite([bad.stable_median_negative_elbo, good.candidate_median_negative_elbo]).all()
