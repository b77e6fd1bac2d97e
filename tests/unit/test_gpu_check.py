"""The GPU check's own machinery: result file names, and a step that overruns its budget (the dry run of every
step is tests/integration/test_gpu_check.py), and the training-speed step when no variant runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from bench import gpu_training
from bench.gpu_check import STEPS, StepRecord, results_name, run_step


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


def test_training_speed_with_no_variant_running_says_what_each_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise RuntimeError("inductor: no C compiler")

    monkeypatch.setattr(gpu_training, "epoch_rate", broken)
    record = StepRecord(tmp_path / "speed.json")
    with pytest.raises(RuntimeError, match=r"no training variant ran: failed: inductor: no C compiler; "):
        gpu_training.training_speed(record, "cpu", quick=True, deadline=time.time() + 600)
    assert all(v["status"].startswith(("failed", "skipped")) for v in record.figures["variants"])  # kept on file
