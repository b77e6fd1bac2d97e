"""labels.json: written atomically, read back, and refused with the file and the label named when malformed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.labels import (
    LABELS_FILE,
    MAX_LABELS,
    MAX_LABELS_BYTES,
    Routes,
    check_label,
    read_labels,
    read_routes,
    write_labels,
)
from contract.repository import ModelRepositoryError


def test_labels_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    write_labels(tmp_path, {"stable": 3, "canary": 4})
    assert read_labels(tmp_path) == {"canary": 4, "stable": 3}
    assert [p.name for p in tmp_path.iterdir()] == [LABELS_FILE]  # no temporary file left behind
    assert (tmp_path / LABELS_FILE).stat().st_mode & 0o777 == 0o644  # readable by a server running as another user
    assert read_labels(tmp_path / "missing") == {}


def test_a_failed_write_leaves_the_old_labels(tmp_path: Path) -> None:
    write_labels(tmp_path, {"stable": 3})
    with pytest.raises(TypeError):
        write_labels(tmp_path, {"stable": object()})  # type: ignore[dict-item]
    assert read_labels(tmp_path) == {"stable": 3}
    assert [p.name for p in tmp_path.iterdir()] == [LABELS_FILE]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "labels must be a JSON object of label → version"),
        ("[1]", "labels must be a JSON object .* Expected object, got array"),
        ('{"Stable": 1}', "label 'Stable' is not allowed"),
        ('{"stable": "1"}', r"label 'stable' must name a version number \(1 \.\. 9223372036854775807\), got \"1\""),
        ('{"stable": 0}', "label 'stable' must name a version number .* got 0"),
        ('{"stable": true}', "label 'stable' must name a version number .* got true"),
        ('{"stable": 18446744073709551616}', "label 'stable' must name a version number .* got 18446744073709551616"),
        ('{"stable": 2, "canary": [[[[1]]]]}', r"label 'canary' must name a version number .* got \[\[\[\[1\]\]\]\]"),
        ('{"stable": ' + "[" * 30_000 + "]" * 30_000 + "}", "labels must be a JSON object .* got array"),  # < 64 KiB
        ('{"stable": ' + "[" * 100_000 + "]" * 100_000 + "}", "200012 bytes, more than the 65536 bytes"),
    ],
)
def test_malformed_labels_are_refused_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / LABELS_FILE).write_text(content)
    with pytest.raises(ModelRepositoryError, match=f"{LABELS_FILE}: {message}"):
        read_labels(tmp_path)


@pytest.mark.parametrize("label", ["stable", "canary-2", "a", "shadow_b"])
def test_label_names_start_with_a_letter(label: str) -> None:
    assert check_label(label) == label


@pytest.mark.parametrize("label", ["", "3", "Stable", "-x", "a b", "x" * 64])
def test_other_label_names_are_refused_saying_what_is_allowed(label: str) -> None:
    with pytest.raises(ValueError, match="lower-case letters, digits, '-' and '_', starting with a letter"):
        check_label(label)


def test_a_labels_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    with open(tmp_path / LABELS_FILE, "wb") as stream:
        stream.truncate(MAX_LABELS_BYTES + 1)  # sparse: reading it would find zeros, not JSON
    with pytest.raises(
        ModelRepositoryError, match=f"{LABELS_FILE}: 65537 bytes, more than the 65536 bytes \\(64 KiB\\)"
    ):
        read_labels(tmp_path)


def test_more_labels_than_the_limit_are_refused(tmp_path: Path) -> None:
    most = {f"label-{i}": 1 for i in range(MAX_LABELS)}
    write_labels(tmp_path, most)
    assert read_labels(tmp_path) == most
    (tmp_path / LABELS_FILE).write_text(json.dumps({**most, "one-more": 1}))
    with pytest.raises(ModelRepositoryError, match=f"{LABELS_FILE}: 33 labels, more than the 32 a model may have"):
        read_labels(tmp_path)
    with pytest.raises(ValueError, match="33 labels, more than the 32"):
        write_labels(tmp_path, {**most, "one-more": 1})


def test_a_canary_weight_writes_the_second_form_and_both_forms_are_read(tmp_path: Path) -> None:
    write_labels(tmp_path, {"stable": 3, "canary": 4}, canary_weight=0.05)
    assert json.loads((tmp_path / LABELS_FILE).read_text()) == {
        "labels": {"canary": 4, "stable": 3},
        "canary_weight": 0.05,
    }
    assert read_routes(tmp_path) == Routes({"canary": 4, "stable": 3}, 0.05)
    assert read_labels(tmp_path) == {"canary": 4, "stable": 3}
    write_labels(tmp_path, {"stable": 3})
    assert json.loads((tmp_path / LABELS_FILE).read_text()) == {"stable": 3}  # what older servers read
    assert read_routes(tmp_path) == Routes({"stable": 3}, None)
    (tmp_path / LABELS_FILE).write_text('{"labels": 2}')  # the first form, with a label named "labels"
    assert read_routes(tmp_path) == Routes({"labels": 2}, None)
    (tmp_path / LABELS_FILE).write_text('{"labels": {"stable": 3}}')  # the second form without a weight
    assert read_routes(tmp_path) == Routes({"stable": 3}, None)
    with pytest.raises(ValueError, match=r"canary weight 1\.5 is not allowed: a share of requests, from 0 to 1"):
        write_labels(tmp_path, {"stable": 3}, canary_weight=1.5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"labels": {"stable": 3}, "canary_weight": 1.5}', "canary_weight must be a number from 0 to 1, got 1.5"),
        ('{"labels": {"stable": 3}, "canary_weight": "x"}', 'canary_weight must be a number from 0 to 1, got "x"'),
        ('{"labels": {"stable": 3}, "weight": 0.1}', "unknown field 'weight': the file is"),
        ('{"labels": {"stable": 0}, "canary_weight": 0.1}', "label 'stable' must name a version number .* got 0"),
        ('{"labels": {"Stable": 1}}', "label 'Stable' is not allowed"),
    ],
)
def test_a_malformed_second_form_is_refused_saying_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / LABELS_FILE).write_text(content)
    with pytest.raises(ModelRepositoryError, match=f"{LABELS_FILE}: {message}"):
        read_routes(tmp_path)
