"""No unsafe deserialization: checkpoints load weights only, and serving never unpickles or evaluates."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT
from training.checkpoint import CheckpointError, load_checkpoint


class _Payload:
    """A pickle that would write a file when unpickled (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.write_text, (self.marker, "code ran"))


def test_a_checkpoint_with_a_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model_args": _Payload(marker), "model": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "code ran"


def test_serving_never_unpickles_or_evaluates() -> None:
    unsafe_modules = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "torch", "cloudpickle"}
    for path in sorted(p for p in (ROOT / "serving").rglob("*.py") if "proto" not in p.parts):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {name.split(".")[0] for name in names} & unsafe_modules, f"{path.name} imports {names}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "__import__"), f"{path.name} calls {node.func.id}"
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                raise AssertionError(f"{path.name} passes allow_pickle")
