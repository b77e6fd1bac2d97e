"""The soak run (bench/soak.py) for 20 seconds: mixed RPCs at a steady rate, no errors, RSS flat."""

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
    assert report["calls"] >= 200 and all(window["calls"] > 0 for window in report["windows"])
    assert report["rss_growth_mib"] < 32
    # Latency must not creep up over the run (a leak or a growing queue would): the last window's p99 within 3x
    # the first's. The first window holds the warm-up, so a steady server's ratio is usually below 1.
    assert report["p99_drift_ratio"] < 3, report["windows"]
    assert report["server_exit_code"] == 0
