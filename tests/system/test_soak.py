"""The soak run (bench/soak.py) for 20 seconds: mixed RPCs at a steady rate, no errors, RSS flat.

Its calls per second and p99 drift are printed, not asserted: they are figures of the machine's load as much as
of the server (a job that starts beside the last window can triple its p99); `make soak` reports them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_a_20_second_soak_has_no_errors_and_flat_memory(exported_repository: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--model-dir", str(exported_repository), "--duration", "20",
         "--windows", "4", "--rate", "40"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert report["error_count"] == 0 and report["errors"] == {}
    assert all(window["calls"] > 0 for window in report["windows"])  # served throughout, however slowly
    assert report["rss_growth_mib"] < 32
    assert report["server_exit_code"] == 0
