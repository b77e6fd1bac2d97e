"""The GPU check's dry run (`make gpu-check ARGS="--provider cpu --quick"`): every step runs end to end on the
CPU and writes real figures, so the one run on a GPU is not spent on a typo.

The steps run without their budgets (`--no-budgets`): the budgets stop a GPU run that hangs, and on a loaded
machine a slow step is no hang. That a step past its budget is killed is tests/unit/test_gpu_check.py's; a
hung dry run is stopped by the bounds here, far above what it takes (about a minute on an idle machine).
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.gpu_check import STEPS, TOLERANCE
from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(900)  # the dry run is the first test's fixture: it counts against that test


def gpu_check(out: Path, *args: str, timeout: float = 840) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    command = [sys.executable, "-m", "bench.gpu_check", "--quick", "--no-budgets", "--out", str(out), *args]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (results,) = out.glob("gpu-check-*.json")
    return finished, json.loads(results.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    finished, report = gpu_check(out, "--provider", "cpu")
    return finished, report, out


def test_dry_run_passes_every_step_and_names_its_files(dry_run: tuple[Any, dict[str, Any], Path]) -> None:
    finished, report, out = dry_run
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert list(report["steps"]) == [step.name for step in STEPS]
    assert all(entry["status"] == "ok" for entry in report["steps"].values()), report["steps"]
    assert all(entry["seconds"] > 0 and entry["budget_s"] is None for entry in report["steps"].values())
    stem = f"gpu-check-{datetime.date.today().isoformat()}-cpu"  # no GPU: the provider names the file
    assert (out / f"{stem}.json").is_file()
    summary = (out / f"{stem}.txt").read_text()
    assert "PASSED" in summary and all(step.name in summary for step in STEPS)
    assert report["passed"] is True and report["provider"] == "cpu" and report["timeout_s"] is None


def test_dry_run_measures_training_and_export_on_the_chosen_device(dry_run: tuple[Any, dict[str, Any], Path]) -> None:
    steps = dry_run[1]["steps"]
    assert "CPUExecutionProvider" in steps["environment"]["onnxruntime"]["providers_offered"]
    assert steps["environment"]["torch"]["version"] and steps["environment"]["machine"]["cpus"] >= 1
    (epoch,) = steps["training"]["epochs"]  # --quick: one epoch
    assert epoch["seconds"] > 0 and epoch["samples_per_second"] > 0 and steps["training"]["device"] == "cpu"
    assert steps["training"]["evaluation"]  # the trainer's own evaluation of best.pt
    speed = {(v["bf16"], v["compile"]): v for v in steps["training_speed"]["variants"]}
    assert set(speed) == {(bf16, compiled) for bf16 in (False, True) for compiled in (False, True)}
    for bf16 in (False, True):
        assert speed[bf16, False]["samples_per_s"] > 0 and speed[bf16, False]["projected_20_epochs_of_60k_s"] > 0
        assert speed[bf16, True]["status"].startswith("skipped in --quick on the CPU: torch.compile")  # not silent


def test_dry_run_serves_the_exported_model_and_compares_outputs(dry_run: tuple[Any, dict[str, Any], Path]) -> None:
    serving = dry_run[1]["steps"]["serving"]
    assert serving["model"]["source"] == "the training step's best.pt"
    for server in serving["servers"].values():  # the tested one (here on the CPU too) and the CPU reference
        assert server["logged_provider"] == server["model_info_provider"] == "CPUExecutionProvider"
        assert server["exit_code"] == 0 and server["startup_to_serving_s"] > 0
    assert set(serving["servers"]) == {"tested", "cpu_reference"}
    diffs = serving["max_abs_diff_vs_cpu"]
    assert set(diffs) == {"decode_images", "encode_mu", "encode_log_var"}
    assert all(0 <= diff <= TOLERANCE for diff in diffs.values())


def test_dry_run_measures_limit_sweep_and_memory(dry_run: tuple[Any, dict[str, Any], Path]) -> None:
    steps = dry_run[1]["steps"]
    limit = {(r["graph"], r["batch"], r["io_binding"]): r["rows_per_s"] for r in steps["limit"]["limit"]}
    expected = {(g, b, io) for g in ("decode", "encode") for b in (1, 64, 256, 1024) for io in ("off", "on", "pinned")}
    assert set(limit) == expected and all(rate > 0 for rate in limit.values())
    assert steps["limit"]["cuda_graphs"][0]["status"].startswith("unsupported: CUDA graphs need the CUDA provider")
    sweep = steps["sweep"]
    modes = {point["mode"] for point in sweep["points"]}
    assert modes == {"batching", "minimal"}
    assert all(p["errors"] == {} and p["requests"] > 0 and p["server_cpu_s"] >= 0 for p in sweep["points"])
    cpu = sweep["cpu_per_request"]
    assert cpu["decode_1x64_server_cpu_ms_per_request"] > 0 and cpu["minimal_decode_1x64_server_cpu_ms_per_request"] > 0
    memory = steps["memory"]
    assert set(memory["arenas"]) == {"same-as-requested, 256 MiB cap"}  # --quick: the one with both options
    for figures in (memory["server"], *memory["arenas"].values()):  # the server, then each arena in-process
        assert figures["rss_bytes_after_warm_up"] > 10_000_000 and figures["rss_bytes_after_loads"] > 10_000_000
        assert figures["gpu_memory_bytes_after_loads"] is None  # no GPU memory held: said, not invented
    assert memory["arenas"]["same-as-requested, 256 MiB cap"]["provider"] == "CPUExecutionProvider"


def test_a_failing_step_is_recorded_and_the_next_still_runs(tmp_path: Path) -> None:
    """`--provider cuda` where torch sees no GPU: both steps fail with the reason, the results file still comes."""
    import torch

    finished, report = gpu_check(tmp_path, "--provider", "cuda", "--steps", "environment", "training", timeout=600)
    steps = report["steps"]
    assert list(steps) == ["environment", "training"]
    assert steps["environment"]["onnxruntime"]["providers_offered"]  # the figures a step got are kept either way
    if torch.cuda.is_available():  # on a GPU machine the same command passes (`make gpu-check` checks the rest)
        assert finished.returncode == 0 and all(entry["status"] == "ok" for entry in steps.values())
        return
    assert finished.returncode == 1 and report["passed"] is False
    assert steps["environment"]["status"].startswith("failed: torch sees no CUDA device")
    assert (
        steps["training"]["status"].startswith("failed: torch") and "sees no CUDA device" in steps["training"]["status"]
    )
    assert "log_tail" in steps["training"]
