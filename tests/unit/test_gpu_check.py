"""The GPU check's own machinery: result file names, and a step that overruns its budget (the dry run of every
step is tests/integration/test_gpu_check.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.gpu_check import STEPS, results_name, run_step


def test_results_are_named_by_date_and_gpu() -> None:
    assert results_name("NVIDIA H200", "cuda", "2026-12-01") == "gpu-check-2026-12-01-nvidia-h200"
    assert results_name("NVIDIA H100 80GB HBM3", "cuda", "2026-12-01") == "gpu-check-2026-12-01-nvidia-h100-80gb-hbm3"
    assert results_name(None, "cuda", "2026-12-01") == "gpu-check-2026-12-01-unknown-gpu"
    assert results_name("NVIDIA H200", "cpu", "2026-12-01") == "gpu-check-2026-12-01-cpu"  # the dry run on a GPU box


def test_a_step_past_its_budget_is_killed_and_says_so(tmp_path: Path) -> None:
    environment = next(step for step in STEPS if step.name == "environment")  # imports torch: well over 0.3 s
    started = time.perf_counter()
    entry = run_step(environment, argparse.Namespace(provider="cpu", quick=True), tmp_path, budget_s=0.3)
    assert time.perf_counter() - started < 10
    assert entry["status"].startswith("timeout: killed after its budget of 0.3 s")
    assert entry["budget_s"] == 0.3 and "log_tail" in entry
