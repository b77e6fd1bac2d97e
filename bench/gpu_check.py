"""The GPU check: everything the CUDA path claims, run once, in one bounded command, into one JSON file.

    make gpu-check                                    # python -m bench.gpu_check (about 5-8 minutes on a GPU)
    python -m bench.gpu_check --provider cpu --quick --out /tmp/dry-run     # the dry run (about a minute)

Steps, in this order, each a child process with its own time budget (so a step that fails, hangs or crashes
the CUDA driver loses only itself; what it measured before that is kept):
  environment     GPU, driver, CUDA / cuDNN as torch and onnxruntime see them, providers offered
  training        20 epochs of mnist-5k with training.train on the GPU; its best.pt is what is served next
  serving         export, then the real server on the provider: its log and ModelInfo name the provider,
                  and its Encode / Decode match a CPU-provider server's on the same inputs (max abs diff)
  limit           bench/limit.py's in-process limit at batch 1 / 64 / 256 / 1024 with session.run and with
                  IOBinding (on, pinned), and with CUDA graphs where onnxruntime captures these graphs
  sweep           the bench/serving.py loads against the server and the minimal server beside it, server
                  CPU time per request, GPU memory after warm-up and after the loads
  memory          GPU memory the server holds after warm-up and after large batches; in-process, the
                  CUDA memory arena options the server does not take (bench/runtime_options.py)
  training_speed  one epoch of 60,000 synthetic 28x28 images: samples/s with and without bf16 autocast and
                  torch.compile (last: compiling is the slowest part and may use what time is left)
Writes `gpu-check-<date>-<gpu>.json` (every step: status, seconds, budget, figures) and a `.txt` summary
beside it under `--out`; exits 0 when every step passed. `--quick` shrinks every step (a few hundred images,
one epoch, short loads) but runs the same code paths; docs/performance.md has the figures of a GPU run.
`--no-budgets` lets every step run to its end (tests/system/test_gpu_check.py: on a loaded machine a slow
step is no hang, and pytest's own timeout stops a hung test).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # max abs difference allowed between the CUDA and the CPU provider's float32 outputs


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # python -m <module> <name> ... runs it
    budget_s: float  # on a GPU, full size
    quick_budget_s: float  # --quick


STEPS = (
    Step("environment", "bench.gpu_check", 45, 45),
    Step("training", "bench.gpu_training", 90, 60),
    Step("serving", "bench.gpu_serving", 75, 60),
    Step("limit", "bench.gpu_serving", 75, 45),
    Step("sweep", "bench.gpu_serving", 120, 60),
    Step("memory", "bench.gpu_serving", 45, 45),
    Step("training_speed", "bench.gpu_training", 150, 60),
)
MIN_STEP_S = 10.0  # a step with less time than this left is skipped, saying so


class StepRecord:
    """What a step measured so far, written to its result file after every update (a killed step keeps it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.figures: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.figures[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.figures, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def step_arguments(description: str, steps: tuple[str, ...]) -> argparse.Namespace:
    """The command line every step process gets from the check."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("step", choices=steps)
    parser.add_argument("--provider", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, required=True, help="the check's work directory (shared by steps)")
    parser.add_argument("--result", type=Path, required=True, help="the step's JSON result file")
    parser.add_argument("--deadline", type=float, required=True, help="time.time() by which the step must end")
    return parser.parse_args()


def seconds_left(deadline: float) -> float:
    return deadline - time.time()


# ---- step 1: the environment (run as a child like the others: importing CUDA libraries can hang) ----


def environment(record: StepRecord, provider: str) -> None:
    record["nvidia_smi"] = nvidia_smi_gpus()
    record["machine"] = {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
    }
    import onnxruntime as ort
    from onnxruntime.capi import build_and_package_info

    record["onnxruntime"] = {
        "version": ort.__version__,
        "package": build_and_package_info.package_name,
        "built_for_cuda": getattr(build_and_package_info, "cuda_version", None),
        "providers_offered": ort.get_available_providers(),
    }
    record["cuda_wheels"] = installed_versions(
        "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cufft", "nvidia-curand"
    )
    import torch

    cuda = torch.cuda.is_available()
    record["torch"] = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
    }
    smi_names = [g["name"] for g in record.figures["nvidia_smi"] or [] if "name" in g]
    gpu = record.figures["torch"]["device"] or next(iter(smi_names), None)
    record["gpu"] = gpu
    if provider == "cuda":
        problems = [
            *([] if cuda else ["torch sees no CUDA device"]),
            *([] if "CUDAExecutionProvider" in ort.get_available_providers() else ["onnxruntime offers no CUDA"]),
        ]
        record["status"] = "failed: " + "; ".join(problems) if problems else "ok"
    else:
        record["status"] = "ok"


def nvidia_smi_gpus() -> list[dict[str, str | None]] | None:
    """One dict per GPU from nvidia-smi (name, driver, memory, compute capability); None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ("name", "driver_version", "memory.total", "compute_cap", "cuda_version")
    query = ["nvidia-smi", f"--query-gpu={','.join(fields[:4])}", "--format=csv,noheader"]
    try:
        rows = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (subprocess.SubprocessError, OSError) as exc:  # a driver / library mismatch: say so, go on
        return [{"error": f"nvidia-smi failed: {exc}"}]
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return [
        {**dict(zip(fields[:4], (cell.strip() for cell in row.split(",")), strict=True)), fields[4]: cuda and cuda[1]}
        for row in rows
        if row.strip()
    ]


def cpu_model() -> str | None:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    found = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    return found[1] if found else None


def installed_versions(*packages: str) -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


# ---- the check: run the steps, collect, write ----


def run_step(step: Step, args: argparse.Namespace, work: Path, budget_s: float | None) -> dict[str, Any]:
    """Run one step as a child process group, killed at its budget (none: runs to its end); returns its entry
    for the results file."""
    result_path, log_path = work / f"{step.name}.json", work / f"{step.name}.log"
    deadline = math.inf if budget_s is None else time.time() + budget_s - 3
    command = [sys.executable, "-m", step.module, step.name, f"--provider={args.provider}", f"--work={work}"]
    command += [f"--result={result_path}", f"--deadline={deadline:.3f}"]
    command += ["--quick"] if args.quick else []
    started = time.perf_counter()
    budget = "no budget" if budget_s is None else f"budget {budget_s:.0f} s"
    print(f"[gpu-check] {step.name}: running ({budget})", file=sys.stderr, flush=True)
    with log_path.open("w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = child.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError):  # the step and what it started (servers), if still there
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    figures = json.loads(result_path.read_text()) if result_path.is_file() else {}
    status = figures.pop("status", None)
    if code is None:
        status = f"timeout: killed after its budget of {budget_s:.3g} s (figures measured before that are kept)"
    elif code != 0:
        status = f"error: exit code {code}: {last_error_line(log_path)}"
    elif status is None:
        status = "error: the step wrote no status"
    entry = {
        "status": status,
        "seconds": round(time.perf_counter() - started, 1),
        "budget_s": None if budget_s is None else round(budget_s, 1),
    }
    if not status.startswith("ok"):
        entry["log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
    print(f"[gpu-check] {step.name}: {status} ({entry['seconds']} s)", file=sys.stderr, flush=True)
    return {**entry, **figures}


def last_error_line(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def results_name(gpu: str | None, provider: str, date: str) -> str:
    """gpu-check-<date>-<gpu>: the GPU's name as a file-name slug ("cpu" for a CPU-provider run)."""
    label = (gpu or "unknown-gpu") if provider == "cuda" else "cpu"
    return f"gpu-check-{date}-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}"


def git_commit() -> str | None:
    try:
        command = ["git", "rev-parse", "--short", "HEAD"]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        return None


def summary_text(report: dict[str, Any]) -> str:
    """A few lines per step: status, time and the figures that answer the issue's questions."""
    steps = report["steps"]
    lines = [
        f"gpu-check {report['started_at']} provider={report['provider']}{' quick' if report['quick'] else ''} "
        f"gpu={report.get('gpu')} commit={report.get('git_commit')}: {'PASSED' if report['passed'] else 'FAILED'} "
        f"in {report['seconds']} s"
    ]
    for name, entry in steps.items():
        budget = ", no budget" if entry["budget_s"] is None else f" of {entry['budget_s']} s"
        lines.append(f"{name:15} {entry['status']} ({entry['seconds']} s{budget})")
        for key in entry.get("headline", []):
            lines.append(f"{'':15}   {key}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["environment"]:  # step 1 as its own process, like the others
        step_args = step_arguments("environment step", ("environment",))
        environment(StepRecord(step_args.result), step_args.provider)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="onnxruntime and torch device")
    parser.add_argument("--quick", action="store_true", help="shrink every step (the dry run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--timeout-s", type=float, help="the whole check's bound (default 470; --quick 170)")
    parser.add_argument(
        "--no-budgets",
        action="store_true",
        help="no step budgets and no --timeout-s: every step runs to its end (the tests' dry run on a busy machine)",
    )
    parser.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], help="run only these steps")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (logs, model, runs)")
    args = parser.parse_args(argv)
    timeout_s = None if args.no_budgets else args.timeout_s or (170.0 if args.quick else 470.0)
    began, started_at = time.time(), datetime.datetime.now().astimezone()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report: dict[str, Any] = {
        "check": "gpu-check",
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
        "provider": args.provider,
        "quick": args.quick,
        "git_commit": git_commit(),
        "timeout_s": timeout_s,
        "steps": {},
    }
    for step in STEPS:
        if args.steps and step.name not in args.steps:
            continue
        step_budget = step.quick_budget_s if args.quick else step.budget_s
        budget = None if timeout_s is None else min(step_budget, timeout_s - (time.time() - began))
        if budget is not None and budget < MIN_STEP_S:
            status = f"skipped: {budget:.0f} s left of the check's {timeout_s:.0f} s"
            report["steps"][step.name] = {"status": status, "seconds": 0, "budget_s": round(max(budget, 0))}
            continue
        report["steps"][step.name] = run_step(step, args, work, budget)
        if step.name == "environment":
            report["gpu"] = report["steps"]["environment"].get("gpu")
    report["seconds"] = round(time.time() - began, 1)
    report["passed"] = all(entry["status"].startswith("ok") for entry in report["steps"].values())
    report["work_dir"] = str(work) if args.keep_work else None
    stem = results_name(report.get("gpu"), args.provider, started_at.strftime("%Y-%m-%d"))
    results, summary = args.out / f"{stem}.json", args.out / f"{stem}.txt"
    results.write_text(json.dumps(report, indent=2, default=str) + "\n")
    summary.write_text(summary_text(report))
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(summary.read_text(), end="")
    print(f"results: {results}\nsummary: {summary}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
