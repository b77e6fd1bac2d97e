"""The GPU check's own machinery: result file names, a step past its budget and a step without one, the
training-speed step when no variant runs, and the in-process runs of the options the server does not take
(IOBinding, CUDA arena options) on the CPU. The dry run of every step is tests/system/test_gpu_check.py."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from bench import gpu_training
from bench.gpu_check import Step, StepRecord, results_name, run_step
from bench.gpu_serving import arena_memory
from bench.runtime_options import ARENAS, IoBoundGraph, graph_session
from contract.repository import load_version
from serving.dataplane.runtime import CPU, RuntimeSettings, load_sessions

# A step module of the test's own: `hangs` sleeps far past any budget a test gives it; `finishes` writes its
# status and the deadline it was given at once.
FAKE_STEP = """
import json, sys, time
name, options = sys.argv[1], dict(arg[2:].split("=", 1) for arg in sys.argv[2:] if "=" in arg)
if name == "hangs":
    time.sleep(60)
with open(options["result"], "w") as result:
    json.dump({"status": "ok", "deadline": options["deadline"]}, result)
"""


@pytest.fixture
def fake_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The work directory, with `python -m fake_step` importable by the step processes run_step starts."""
    (tmp_path / "fake_step.py").write_text(FAKE_STEP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def test_results_are_named_by_date_and_gpu() -> None:
    assert results_name("NVIDIA H200", "cuda", "2026-12-01") == "gpu-check-2026-12-01-nvidia-h200"
    assert results_name("NVIDIA H100 80GB HBM3", "cuda", "2026-12-01") == "gpu-check-2026-12-01-nvidia-h100-80gb-hbm3"
    assert results_name(None, "cuda", "2026-12-01") == "gpu-check-2026-12-01-unknown-gpu"
    assert results_name("NVIDIA H200", "cpu", "2026-12-01") == "gpu-check-2026-12-01-cpu"  # the dry run on a GPU box


def test_a_step_past_its_budget_is_killed_and_says_so(fake_step: Path) -> None:
    hangs = Step("hangs", "fake_step", budget_s=0.2, quick_budget_s=0.2)  # sleeps 60 s: killed, however loaded
    entry = run_step(hangs, argparse.Namespace(provider="cpu", quick=True), fake_step, budget_s=0.2)
    assert entry["status"].startswith("timeout: killed after its budget of 0.2 s")
    assert entry["budget_s"] == 0.2 and "log_tail" in entry


def test_a_step_without_a_budget_runs_to_its_end(fake_step: Path) -> None:
    finishes = Step("finishes", "fake_step", budget_s=0.2, quick_budget_s=0.2)
    entry = run_step(finishes, argparse.Namespace(provider="cpu", quick=True), fake_step, budget_s=None)
    assert entry["status"] == "ok" and entry["budget_s"] is None
    assert entry["deadline"] == "inf"  # what the step reads from --deadline: no time is short


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


@pytest.mark.parametrize("io_binding", ["on", "pinned"])
def test_io_binding_gives_the_images_of_session_run(
    exported_repository: Path, io_binding: Literal["on", "pinned"]
) -> None:
    version = load_version(exported_repository)
    served = load_sessions(version, RuntimeSettings(provider="cpu", intra_op_threads=1))  # plain session.run
    decoder, encoder = (
        IoBoundGraph(spec, graph_session(spec, "cpu"), io_binding) for spec in (version.decoder, version.encoder)
    )
    latents = np.random.default_rng(2).standard_normal((5, 20)).astype(np.float32)
    (images,) = decoder.run(latents)
    np.testing.assert_array_equal(images, served.decoder.run(latents)[0])
    decoder.run(-latents)  # the same row count again: "pinned" reuses its output buffers
    np.testing.assert_array_equal(images, served.decoder.run(latents)[0])  # a returned result stays put
    for ours, theirs in zip(encoder.run(images), served.encoder.run(images), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_arena_memory_runs_the_graphs_in_process_and_reports_what_it_holds(exported_repository: Path) -> None:
    figures = arena_memory(exported_repository, "cpu", ARENAS["same-as-requested, 256 MiB cap"], (1, 8), 1)
    assert figures["provider"] == CPU  # the CUDA options are the CUDA provider's: the CPU provider runs without
    for after in ("warm_up", "loads"):
        assert figures[f"rss_bytes_after_{after}"] > 10_000_000
        assert figures[f"gpu_memory_bytes_after_{after}"] is None  # no GPU memory held: said, not invented
