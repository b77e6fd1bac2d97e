"""What import-linter cannot see: the modules a fresh interpreter really loads; and one map of status codes.

The layer rules themselves are import-linter contracts (pyproject.toml, run by `make lint`); they read the
import statements. These tests run the imports and look at `sys.modules`, which also catches a module that
something loads at run time (torch pulled in by a dependency, onnxruntime by a lazy import).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

SERVING = ROOT / "serving"


def loaded_after_import(*modules: str) -> set[str]:
    """The top-level and serving.* modules a fresh interpreter holds after importing `modules`."""
    code = f"import sys, json; import {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(result.stdout))


def test_the_client_loads_neither_onnxruntime_nor_the_server() -> None:
    loaded = loaded_after_import("serving.client")
    assert "onnxruntime" not in loaded and "numpy" in loaded and "grpc" in loaded
    server_side = ("contract", "serving.dataplane", "serving.lifecycle", "serving.grpc", "serving.server")
    assert not {
        name for name in loaded if name.startswith(server_side) or name in ("serving.metrics", "serving.errors")
    }


def test_nothing_in_serving_loads_torch() -> None:
    loaded = loaded_after_import("serving.server.app", "serving.client.cli", "serving.admin")
    assert not {"torch", "onnx", "training"} & loaded


def _grpc_status_codes_named_in(path: Path) -> list[int]:
    """Line numbers in `path` that name a grpc.StatusCode member other than OK."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "StatusCode"
        and node.attr != "OK"
    ]


def test_one_module_maps_errors_to_status_codes() -> None:
    """Server code names status codes only in serving/grpc/status.py (the client reads them from replies)."""
    allowed = {SERVING / "grpc" / "status.py", SERVING / "client" / "client.py", SERVING / "client" / "results.py"}
    modules = (path for path in SERVING.rglob("*.py") if "proto" not in path.parts and path not in allowed)
    offenders = {
        str(path.relative_to(SERVING)): lines for path in modules if (lines := _grpc_status_codes_named_in(path))
    }
    assert offenders == {}
