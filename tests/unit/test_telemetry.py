"""onnxruntime's telemetry stays off in the server: nothing written under HOME, nothing printed at import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def import_in_fresh_process(code: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new interpreter whose environment holds only PATH, HOME=`home` and `env`.

    onnxruntime decides on telemetry from the environment: it stays off where any CI system's variable is set
    (CI, GITHUB_ACTIONS, JENKINS_URL, ...) or ORT_RUNNING_UNIT_TESTS, and writes under $XDG_CACHE_HOME when that
    is set, else under $HOME/.cache. Nothing of the caller's environment may leak in, or the controls below see
    nothing on a CI machine.
    """
    minimal = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**minimal, **env},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def files_under(home: Path) -> list[Path]:
    return [path for path in home.rglob("*") if path.is_file()]


def test_onnxruntime_alone_writes_a_device_id_under_home(tmp_path: Path) -> None:
    """The behaviour the server turns off (so the next tests can see it if it came back)."""
    import_in_fresh_process("import onnxruntime", tmp_path)
    assert any(path.name == "deviceid" for path in files_under(tmp_path)), files_under(tmp_path)


def test_the_server_imports_onnxruntime_with_telemetry_off(tmp_path: Path) -> None:
    result = import_in_fresh_process("import serving.server.app, onnxruntime", tmp_path)
    assert files_under(tmp_path) == []
    assert result.stderr == ""


def test_without_a_writable_home_the_server_prints_nothing(tmp_path: Path) -> None:
    """The image's case (read-only root, uid 10001 has no home): onnxruntime would print a coloured warning."""
    (tmp_path / "file").touch()
    result = import_in_fresh_process("import serving.server.app, onnxruntime", tmp_path / "file" / "home")
    assert result.stderr == ""


def test_an_operator_can_opt_in_with_ort_disable_telemetry_0(tmp_path: Path) -> None:
    import_in_fresh_process("import serving.server.app", tmp_path, ORT_DISABLE_TELEMETRY="0")
    assert any(path.name == "deviceid" for path in files_under(tmp_path))
