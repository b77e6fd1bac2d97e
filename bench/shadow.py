"""What shadow scoring costs the callers and the server, measured side by side in one run against three servers.

    python -m bench.shadow --model-dir models/vae-mnist  # `make bench-shadow` (~1.5 min): bench/results/shadow.json

The model directory is copied to a temporary one where version 2 is a copy of version 1 (the same graphs: the
cost of shadowing does not depend on how good the candidate is), with labels.json `{"stable": 1, "canary": 2}`.
Three servers (`python -m serving.server --default-version stable`, the flags of bench/oip.py) run on it, started
once and kept for the run, pinned to the first CPU and driven one at a time from the second, as the other
benches pin them: shadow scoring `off` (`--shadow-fraction 0`), at `10 %` (the default) and at `100 %` (every
stable input scored again: the upper bound). The canary weight is 0: every caller is answered by stable, and only
the shadow work differs. The loads: Score of 8 images (one seeded posterior draw each, the request shadowing
re-scores on the candidate while stable's numbers come from the reply) from 16 closed-loop callers and from 1,
through bench/oip.py's `closed_loop`. Each round (`--rounds`) runs every (server, load) for `--seconds` after
`--warmup`, shuffled as bench/tracing.py shuffles them. A window ends when its callers stop and the server's
shadow queue has drained (its shadow job counters stand still): the server CPU per request (/proc/PID/stat, all
threads) includes the shadow work the window's requests caused. Ratios are paired within a round against `off`
(p99 also as the ratio of the two medians); shadow jobs per request are the server's `vae_shadow_jobs_total`
over the window's requests (scored, and dropped: the queue was full). The ratios' per-round values are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import build_request, pin_to_cpus
from bench.oip import (
    SERVER_FLAGS,
    Measured,
    figures,
    load_average_now,
    machine,
    model_info,
    server_code,
    typed_closed_loop,
    warnings_logged,
)
from bench.server_process import ServerProcess
from bench.serving import LOAD_CPUS, SERVER_CPUS
from bench.tracing import paired, ratio, round_order
from contract.labels import write_labels
from contract.repository import MANIFEST_FILE

FRACTIONS = {"off": 0.0, "shadow_10": 0.1, "shadow_100": 1.0}
LOADS = ((16, 8), (1, 8))  # (callers, images per Score)
RESULTS = ("scored", "dropped", "abandoned")
FIGURES = (
    "requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request", "rows_per_run", "shadow_scored_per_request",
    "shadow_dropped_per_request",
)  # fmt: skip


@dataclass(frozen=True)
class Window:
    """One measured window of one load on one server."""

    mode: str
    load: str
    round: int
    rows: int
    concurrency: int
    seconds: float
    requests: int
    errors: dict[str, int]
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float
    server_cpu_us_per_request: float
    rows_per_run: float
    shadow_scored_per_request: float
    shadow_dropped_per_request: float

    @property
    def key(self) -> str:
        return f"{self.mode}_{self.load}"


def copy_version(model_dir: Path, version: int, source: int = 1, change: Callable[[Path], None] | None = None) -> Path:
    """Publish a copy of version `source` as `version` the way export does (written aside, renamed into place):
    the same graphs, the manifest naming the new number; `change(staging)` edits the copy before it is renamed."""
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".publish-{version}-"))
    for file in (model_dir / str(source)).iterdir():
        shutil.copy2(file, staging / file.name)
    manifest = json.loads((staging / MANIFEST_FILE).read_text())
    manifest["version"] = version
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if change is not None:
        change(staging)
    os.rename(staging, model_dir / str(version))
    return model_dir / str(version)


def shadow_jobs(server: ServerProcess) -> dict[str, float]:
    """The server's vae_shadow_jobs_total by result, from /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = dict.fromkeys(RESULTS, 0.0)
    for result, value in re.findall(r'^vae_shadow_jobs_total\{result="(\w+)"\} (\S+)$', text, re.MULTILINE):
        found[result] = float(value)
    return found


class MeasuredWithShadow(Measured):
    """Measured, beginning and ending only once the shadow queue has drained (the warm-up's jobs are not the
    window's, the window's are), with the shadow jobs of the window."""

    def begin(self) -> None:
        self.jobs = [drained(self.server)]
        super().begin()

    def end(self) -> None:
        jobs = drained(self.server)
        super().end()
        self.jobs.append(jobs)

    def per_request(self, result: str, requests: int) -> float:
        return round((self.jobs[1][result] - self.jobs[0][result]) / max(requests, 1), 3)


def drained(server: ServerProcess) -> dict[str, float]:
    """The shadow job counters once they stand still for three looks 50 ms apart: the shadow queue is empty."""
    last, still = shadow_jobs(server), 0
    while still < 3:
        time.sleep(0.05)
        now = shadow_jobs(server)
        still = still + 1 if now == last else 0
        last = now
    return last


async def run_load(
    mode: str, server: ServerProcess, callers: int, rows: int, latent_dim: int, warmup_s: float, seconds: float,
    round_: int,
) -> Window:  # fmt: skip
    """One window of `callers` x `rows`-image Score against `server`."""
    measured = MeasuredWithShadow(server)
    request = build_request("score", rows, latent_dim)[1]
    elapsed, latencies, codes = await typed_closed_loop(
        server.target, "Score", request, callers, warmup_s, seconds, measured
    )
    done = len(latencies)
    return Window(
        mode=mode,
        load=f"{callers}x{rows}",
        round=round_,
        rows=rows,
        concurrency=callers,
        **figures(elapsed, latencies, codes, measured),
        shadow_scored_per_request=measured.per_request("scored", done),
        shadow_dropped_per_request=measured.per_request("dropped", done),
    )


def medians(windows: Sequence[Window]) -> dict[str, dict[str, Any]]:
    """Per (mode, load): the median of each figure over the rounds."""
    table: dict[str, dict[str, Any]] = {}
    for key in sorted({(w.mode, w.load) for w in windows}):
        chosen = [w for w in windows if (w.mode, w.load) == key]
        table[f"{key[0]}_{key[1]}"] = {
            figure: round(statistics.median(getattr(w, figure) for w in chosen), 3) for figure in FIGURES
        } | {"windows": len(chosen)}
    return table


def summary(windows: Sequence[Window], table: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each shadowing server against `off`: callers' p99 and server CPU per request, for every load."""
    result: dict[str, Any] = {}
    for mode in ("shadow_10", "shadow_100"):
        for callers, rows in LOADS:
            load = f"{callers}x{rows}"
            top, bottom = f"{mode}_{load}", f"off_{load}"
            result[f"{mode}_vs_off_{load}"] = {
                "p99_ratio_paired": paired(windows, top, bottom, "p99_ms", ratio),
                "p99_ratio_of_medians": round(table[top]["p99_ms"] / table[bottom]["p99_ms"], 3),
                "server_cpu_per_request_ratio_paired": paired(windows, top, bottom, "server_cpu_us_per_request", ratio),
                "requests_per_s_ratio_paired": paired(windows, top, bottom, "requests_per_s", ratio),
            }
    return result


def markdown(table: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| shadow scoring | callers x images | req/s | p50 / p99 ms | server CPU µs/req | shadow jobs/req (dropped) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    names = {"off": "off", "shadow_10": "10 %", "shadow_100": "100 %"}
    for callers, rows in LOADS:
        for mode, name in names.items():
            row = table[f"{mode}_{callers}x{rows}"]
            lines.append(
                f"| {name} | {callers} x {rows} | {row['requests_per_s']:,.0f} | {row['p50_ms']:.2f} / "
                f"{row['p99_ms']:.2f} | {row['server_cpu_us_per_request']:,.0f} | "
                f"{row['shadow_scored_per_request']:.3f} ({row['shadow_dropped_per_request']:.3f}) |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shadow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/vae-mnist"), help="model repository entry")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per window")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, windows shuffled in each; medians reported")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where shadow.json goes")
    args = parser.parse_args(argv)
    if SERVER_CPUS == LOAD_CPUS:
        print("warning: fewer than 2 CPUs available; server and load share one", file=sys.stderr)
    started = time.perf_counter()
    code, load_average_at_start = server_code(), load_average_now()
    pin_to_cpus(LOAD_CPUS)
    windows: list[Window] = []
    failures: list[dict[str, Any]] = []
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-shadow-")))
        model_dir = Path(shutil.copytree(args.model_dir / "1", folder / args.model_dir.name / "1")).parent
        copy_version(model_dir, 2)
        write_labels(model_dir, {"stable": 1, "canary": 2})
        flags = [f"--model-dir={model_dir}", "--default-version=stable", "--version-policy=specific:1", *SERVER_FLAGS]
        servers = {
            mode: stack.enter_context(
                ServerProcess.vae_server(*flags, f"--shadow-fraction={fraction}", cpus=SERVER_CPUS)
            )
            for mode, fraction in FRACTIONS.items()
        }
        info = asyncio.run(model_info(servers["off"].target))
        for round_ in range(args.rounds):
            for mode, (callers, rows) in round_order(round_, tuple(FRACTIONS), LOADS):
                measured = asyncio.run(
                    run_load(mode, servers[mode], callers, rows, info.latent_dim, args.warmup, args.seconds, round_)
                )
                if measured.errors:
                    failures.append({"window": f"{mode}_{measured.load}", "round": round_, "errors": measured.errors})
                windows.append(measured)
                print(json.dumps(asdict(measured)), flush=True)
        jobs = {mode: shadow_jobs(server) for mode, server in servers.items()}
        exit_codes = {mode: server.stop() for mode, server in servers.items()}
    logged = {mode: warnings_logged(server) for mode, server in servers.items()}
    table = medians(windows)
    run_seconds = round(time.perf_counter() - started, 1)
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([parser.prog, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(load_average_at_start),
        "settings": {
            "model": args.model_dir.name,
            "model_version": info.version,
            "server_code": code,
            "server_flags": flags[1:],
            "shadow_fractions": FRACTIONS,
            "loads": [f"{callers}x{rows}" for callers, rows in LOADS],
            "seconds_per_window": args.seconds,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "run_seconds": run_seconds,
        },
        "medians": table,
        "summary": summary(windows, table),
        "shadow_jobs_at_end": jobs,
        "server_exit_codes": exit_codes,
        "server_log_warnings_and_errors": logged,
        "failures": failures,
        "windows": [asdict(w) for w in windows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(table))
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out / 'shadow.json'} ({run_seconds} s)")
    if failures:
        print(f"error: {len(failures)} window(s) had errors: {json.dumps(failures)[:2000]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
