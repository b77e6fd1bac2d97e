"""The version policy, labels.json and the default route, as plain functions; and the label command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.dataplane.repository import ModelRepositoryError
from serving.dataplane.versions import (
    LABELS_FILE,
    VersionPolicy,
    read_labels,
    resolve_default,
    set_label,
    write_labels,
)
from tests.helpers import publish_copy


@pytest.mark.parametrize(
    ("policy", "present", "served"),
    [
        ("latest", [1, 2, 5], [5]),
        ("latest:2", [1, 2, 5], [2, 5]),
        ("latest:9", [1, 2], [1, 2]),
        ("specific:2,1", [1, 2, 5], [1, 2]),
        ("specific:3", [1, 2], []),
        ("all", [1, 2, 5], [1, 2, 5]),
        ("latest", [], []),
    ],
)
def test_the_policy_selects_among_the_versions_present(policy: str, present: list[int], served: list[int]) -> None:
    assert VersionPolicy.parse(policy).select(present) == served


@pytest.mark.parametrize("text", ["newest", "latest:0", "latest:x", "specific:", "specific:0", "all:2", ""])
def test_a_malformed_policy_says_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError, match="use latest, latest:N, specific:V1,V2 or all"):
        VersionPolicy.parse(text)


def test_the_default_route_is_latest_a_label_or_a_number_among_the_served() -> None:
    labels = {"stable": 2, "canary": 7}
    assert resolve_default("latest", [2, 3], labels) == 3
    assert resolve_default("stable", [2, 3], labels) == 2
    assert resolve_default("2", [2, 3], labels) == 2
    assert resolve_default("canary", [2, 3], labels) is None  # its version is not served
    assert resolve_default("latest", [], labels) is None


def test_labels_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    write_labels(tmp_path, {"stable": 3, "canary": 4})
    assert read_labels(tmp_path) == {"canary": 4, "stable": 3}
    assert [p.name for p in tmp_path.iterdir()] == [LABELS_FILE]  # no temporary file left behind
    assert read_labels(tmp_path / "missing") == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ("[1]", "labels .* must be a JSON object"),
        ('{"Stable": 1}', "label 'Stable' is not allowed"),
        ('{"stable": "1"}', "label 'stable' must name a version number >= 1, got '1'"),
        ('{"stable": 0}', "must name a version number >= 1, got 0"),
    ],
)
def test_malformed_labels_are_refused_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / LABELS_FILE).write_text(content)
    with pytest.raises(ModelRepositoryError, match=f"{LABELS_FILE}: .*{message}"):
        read_labels(tmp_path)


def test_a_label_points_only_at_a_version_that_verifies(model_dir: Path) -> None:
    publish_copy(model_dir, 2, corrupt=True)
    assert set_label(model_dir, "stable", 1) == "vae-mnist: stable -> version 1"
    with pytest.raises(ModelRepositoryError, match="sha256 mismatch"):
        set_label(model_dir, "canary", 2)
    with pytest.raises(ValueError, match="no version 5"):
        set_label(model_dir, "canary", 5)
    assert json.loads((model_dir / LABELS_FILE).read_text()) == {"stable": 1}


def test_the_label_command_sets_and_removes_labels(model_dir: Path) -> None:

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "serving.dataplane.repository", "label", str(model_dir), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert run("stable", "1").stdout == "vae-mnist: stable -> version 1\n"
    assert read_labels(model_dir) == {"stable": 1}
    assert run("stable", "--remove").stdout == "vae-mnist: removed label 'stable'\n"
    assert read_labels(model_dir) == {}
    refused = run("Bad", "1")
    assert refused.returncode == 1 and refused.stderr.startswith("error: label 'Bad' is not allowed")
    assert run("stable").returncode == 2  # neither a version nor --remove
