"""What OpenTelemetry tracing costs the server, measured side by side in one run against four server processes.

    python -m bench.tracing --model-dir models/vae-mnist  # `make bench-tracing` (~2.5 min): bench/results/tracing.json

Four servers (`python -m serving.server`, the flags of bench/oip.py), started once and kept for the run, all
pinned to the first CPU and driven one at a time from the second, as bench/serving.py pins them:
- `without`: the server code of a revision before tracing existed (`--without`, default f6cfc75), checked out
  with `git worktree add --detach` into a temporary folder (its gRPC code generated there by `python -m
  serving.codegen`) and started from there with this venv's python, so that `-m` imports that tree's `serving`
  (checked before the run: no `serving/tracing.py` there, and the process's cwd and PYTHONPATH are the tree);
- `unconfigured`: this checkout's code with no `OTEL_*` variable at all (the bench's own are not passed on);
- `sampled_10`: `OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.1`, exporting over
  OTLP/gRPC to a receiver (bench/otlp_receiver.py) in this process;
- `sampled_100`: `OTEL_TRACES_SAMPLER=always_on`, exporting to a second such receiver.
The sampled servers keep the SDK's default export schedule (`OTEL_BSP_SCHEDULE_DELAY=5000`, written out), as
the deployment's tracing component does. The receivers count the spans they get (by name) and keep none; they
run in this process, so their CPU is on the load CPU beside the load generator (`load CPU` per request says
how much). The loads: `Decode` of 1 row from 32 closed-loop callers, and from 1 caller (the per-request cost
without batching), each through bench/oip.py's `closed_loop` with one request message built up front. Each
round (`--rounds`) runs every (server, load) for `--seconds` after `--warmup`, the loads in shuffled order and
the servers in shuffled order within each load (the windows a ratio pairs run seconds apart); the servers not
being driven sit idle. The table gives the median over the rounds; each ratio or difference is the median of
those paired within a round (for p99 also the ratio of the two medians, steadier: a window's p99 at 32 callers
is decided by a few stalls). Server CPU is the driven server's CPU time over the measured part
(/proc/PID/stat, all threads), per request; rows/run the decoder's rows per onnxruntime run (`vae_batch_rows`
on /metrics); spans per request the spans a receiver got from its server over the whole run (flushed at its
stop) over the Decode requests that server counted (`vae_requests_total`), with `vae_trace_spans_dropped_total`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

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
from bench.otlp_receiver import OtlpReceiver, ReceivedSpan
from bench.server_process import ServerProcess
from bench.serving import LOAD_CPUS, SERVER_CPUS

ROOT = Path(__file__).resolve().parent.parent
WITHOUT = "f6cfc75"  # the last commit before tracing: `--without`'s default
MODES = ("without", "unconfigured", "sampled_10", "sampled_100")
SAMPLERS = {  # the sampled modes' OTEL_TRACES_SAMPLER (and _ARG)
    "sampled_10": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    "sampled_100": {"OTEL_TRACES_SAMPLER": "always_on"},
}
BSP_SCHEDULE_DELAY_MS = "5000"  # the SDK's default, which the deployment's tracing component keeps
LOADS = ((32, 1), (1, 1))  # (callers, rows) of Decode
# The targets tracing was given, at 32 callers x 1 row: unconfigured, the same as without it "within noise", read
# here as at most 5 % above it in server CPU per request (the ratio paired within rounds) and 10 % in p99 (the
# ratio of the two medians over the rounds: a window's p99 there is 13-18 ms, or 21-27 ms when a stall falls in
# it, so ratios paired within a round swing by ±40 % and the medians by ±20 % from run to run; one-sided, since
# a figure below 1 is that noise, not a gain); 10 % sampling, at most +100 µs of server CPU per request over
# unconfigured.
TARGETS: dict[str, tuple[str, float]] = {
    "unconfigured_vs_without_server_cpu_per_request_32x1": ("<=", 1.05),
    "unconfigured_vs_without_median_p99_32x1": ("<=", 1.10),
    "sampled_10_minus_unconfigured_server_cpu_us_per_request_32x1": ("<=", 100.0),
}


@dataclass(frozen=True)
class Window:
    """One measured window of one load against one server."""

    mode: str
    load: str  # "32x1": callers x rows
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
    load_cpu_us_per_request: float  # this process: the load generator and the span receivers

    @property
    def key(self) -> str:
        return f"{self.mode}_{self.load}"


class CountingReceiver(OtlpReceiver):
    """An OtlpReceiver that counts the spans it gets by name and keeps none (a run's spans would fill memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.counts.update(span.name for span in spans)
            self.exports += 1


class MeasuredHere(Measured):
    """bench/oip.py's `Measured` (the server's CPU and decoder rows), with this process's CPU time beside it."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(server)
        self.own: list[float] = []

    def begin(self) -> None:
        super().begin()
        self.own = [own_cpu_seconds()]

    def end(self) -> None:
        self.own.append(own_cpu_seconds())
        super().end()


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def base_environment() -> dict[str, str]:
    """This process's environment less every OTEL_* variable: what each server starts from."""
    return {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}


@contextmanager
def checkout(revision: str) -> Iterator[tuple[Path, str]]:
    """`revision` checked out in a temporary git worktree with its gRPC code generated: (folder, full commit)."""
    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}").strip()
    parent = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    tree = parent / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True, capture_output=True)
    try:
        codegen = [sys.executable, "-m", "serving.codegen"]
        subprocess.run(codegen, cwd=tree, env=without_environment(tree), check=True, capture_output=True)
        yield tree, commit
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False, capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False, capture_output=True)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def without_environment(tree: Path) -> dict[str, str]:
    return {**base_environment(), "PYTHONPATH": str(tree)}


def check_without(tree: Path, server: ServerProcess) -> dict[str, Any]:
    """That the `without` server runs `tree`'s code: no tracing module there, `serving` imported from there (the
    same interpreter, folder and environment), and the process's cwd and PYTHONPATH the tree. Raises if not."""
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('serving').origin)"],
        cwd=tree, env=without_environment(tree), capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    pid = server.process.pid
    cwd = os.readlink(f"/proc/{pid}/cwd")
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    checks = {
        "tree_has_serving_tracing": (tree / "serving" / "tracing.py").exists(),
        "serving_imported_from": found,
        "process_cwd": cwd,
        "process_pythonpath": environ.get("PYTHONPATH"),
        "process_otel_variables": sorted(name for name in environ if name.startswith("OTEL_")),
    }
    ok = (
        not checks["tree_has_serving_tracing"]
        and Path(found).resolve() == (tree / "serving" / "__init__.py").resolve()
        and Path(cwd).resolve() == tree.resolve()
        and checks["process_pythonpath"] == str(tree)
        and not checks["process_otel_variables"]
    )
    if not ok:
        raise RuntimeError(f"the `without` server does not run the checked-out revision: {checks}")
    return checks


def otel_variables(server: ServerProcess) -> list[str]:
    environ = Path(f"/proc/{server.process.pid}/environ").read_text().split("\0")
    return sorted(item for item in environ if item.startswith("OTEL_"))


def scrape(server: ServerProcess) -> dict[str, float]:
    """Decode requests the server has counted (all codes), and the spans tracing dropped, from /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    decode = sum(
        float(value)
        for labels, value in re.findall(r"^vae_requests_total\{([^}]*)\} (\S+)$", text, re.MULTILINE)
        if 'method="Decode"' in labels
    )
    dropped = re.search(r"^vae_trace_spans_dropped_total(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    return {"decode_requests": decode, "spans_dropped": float(dropped.group(1)) if dropped else float("nan")}


async def run_load(
    mode: str, server: ServerProcess, callers: int, rows: int, latent_dim: int, warmup_s: float, seconds: float,
    round_: int,
) -> Window:  # fmt: skip
    """One window of `callers` x `rows`-row Decode against `server`."""
    measured = MeasuredHere(server)
    request = build_request("decode", rows, latent_dim)[1]
    elapsed, latencies, codes = await typed_closed_loop(
        server.target, "Decode", request, callers, warmup_s, seconds, measured
    )
    done = len(latencies)
    return Window(
        mode=mode,
        load=f"{callers}x{rows}",
        round=round_,
        rows=rows,
        concurrency=callers,
        **figures(elapsed, latencies, codes, measured),
        load_cpu_us_per_request=round(1e6 * (measured.own[1] - measured.own[0]) / max(done, 1), 1),
    )


def round_order(
    round_: int, modes: Sequence[str] = MODES, loads: Sequence[tuple[int, int]] = LOADS
) -> list[tuple[str, tuple[int, int]]]:
    """A round's windows: the loads shuffled, and the servers (`modes`) shuffled within each load."""
    rng = random.Random(round_)
    shuffled_loads = list(loads)
    rng.shuffle(shuffled_loads)
    order = []
    for load in shuffled_loads:
        servers = list(modes)
        rng.shuffle(servers)
        order += [(mode, load) for mode in servers]
    return order


def medians(windows: Sequence[Window]) -> dict[str, dict[str, Any]]:
    """Per (server, load): the median over its rounds of each figure."""
    table: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(w.key for w in windows):
        mine = [w for w in windows if w.key == key]
        figures = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request", "rows_per_run",
                   "load_cpu_us_per_request")  # fmt: skip
        table[key] = {
            "mode": mine[0].mode,
            "load": mine[0].load,
            "rounds": len(mine),
            **{figure: round(statistics.median(getattr(w, figure) for w in mine), 3) for figure in figures},
            "server_busy": round(statistics.median(w.server_cpu_s / w.seconds for w in mine), 2),
        }
    return table


class KeyedWindow(Protocol):
    """A measured window `paired` can pair: its server and load (`key`), its round, and its figures."""

    @property
    def key(self) -> str: ...

    @property
    def round(self) -> int: ...


def paired(
    windows: Sequence[KeyedWindow], top: str, bottom: str, figure: str, combine: Callable[[float, float], float]
) -> dict[str, Any] | None:
    """The median over the rounds of combine(top's `figure`, bottom's), paired within each round."""
    by_round = {(w.key, w.round): float(getattr(w, figure)) for w in windows}
    values = [
        combine(by_round[(top, r)], by_round[(bottom, r)])
        for r in sorted({w.round for w in windows})
        if (top, r) in by_round and by_round.get((bottom, r))
    ]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "rounds": [round(x, 3) for x in values]}


def ratio(top: float, bottom: float) -> float:
    return top / bottom


def difference(top: float, bottom: float) -> float:
    return top - bottom


def summary(windows: Sequence[Window], table: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each server against `unconfigured` (and `unconfigured` against `without`), and the targets: ratios and
    differences paired within rounds, medians over them; for p99 also the ratio of the two medians (`table`)."""
    comparisons = (("unconfigured", "without"), ("sampled_10", "unconfigured"), ("sampled_100", "unconfigured"),
                   ("sampled_10", "without"))  # fmt: skip
    figures: dict[str, Any] = {}
    for top, bottom in comparisons:
        for callers, rows in LOADS:
            load = f"{callers}x{rows}"
            pair = (f"{top}_{load}", f"{bottom}_{load}")
            found = {
                f"{top}_vs_{bottom}_server_cpu_per_request_{load}": paired(
                    windows, *pair, "server_cpu_us_per_request", ratio
                ),
                f"{top}_minus_{bottom}_server_cpu_us_per_request_{load}": paired(
                    windows, *pair, "server_cpu_us_per_request", difference
                ),
                f"{top}_vs_{bottom}_p99_{load}": paired(windows, *pair, "p99_ms", ratio),
                f"{top}_vs_{bottom}_requests_per_s_{load}": paired(windows, *pair, "requests_per_s", ratio),
            }
            figures.update({name: value for name, value in found.items() if value is not None})
            if pair[0] in table and pair[1] in table:
                top_p99, bottom_p99 = table[pair[0]]["p99_ms"], table[pair[1]]["p99_ms"]
                figures[f"{top}_vs_{bottom}_median_p99_{load}"] = {
                    "median": round(top_p99 / bottom_p99, 3),  # one figure: the ratio of the medians over the rounds
                    "p99_ms": [top_p99, bottom_p99],
                }
    targets = {}
    for name, (sense, bound) in TARGETS.items():
        if name in figures:
            measured = figures[name]["median"]
            met = measured <= bound if sense == "<=" else measured >= bound
            targets[name] = {"target": f"{sense} {bound:g}", "measured": measured, "met": met}
    return {"figures": figures, "targets": targets}


def markdown(table: Mapping[str, Mapping[str, Any]], spans: Mapping[str, Mapping[str, Any]]) -> str:
    """The medians as a Markdown table, by load, then server."""
    lines = [
        "| server | callers x rows | requests/s | p50 / p99 ms | server CPU µs/req | rows/run | server busy | "
        "load CPU µs/req | spans/req |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for callers, rows in LOADS:
        for mode in MODES:
            row = table.get(f"{mode}_{callers}x{rows}")
            if row is None:
                continue
            per_request = spans.get(mode, {}).get("spans_per_request")
            shown = "–" if per_request is None else f"{per_request:.2f}"
            lines.append(
                f"| {mode} | {callers} x {rows} | {row['requests_per_s']:,.0f} | "
                f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f} | {row['server_cpu_us_per_request']:,.0f} | "
                f"{row['rows_per_run']:.1f} | {row['server_busy']:.2f} | {row['load_cpu_us_per_request']:,.0f} | "
                f"{shown} |"
            )
    return "\n".join(lines)


LIFECYCLE_SPANS = "vae.version."  # the prefix of the version lifecycle's spans (a load at start-up), no request's


def spans_figures(receiver: CountingReceiver, scraped: Mapping[str, float]) -> dict[str, Any]:
    """What a sampled server sent over the run (its start-up's version load aside), per Decode request it served."""
    requests = max(scraped["decode_requests"], 1.0)
    of_requests = {name: count for name, count in receiver.counts.items() if not name.startswith(LIFECYCLE_SPANS)}
    return {
        "decode_requests": int(scraped["decode_requests"]),
        "spans_received": sum(receiver.counts.values()),
        "lifecycle_spans": sum(receiver.counts.values()) - sum(of_requests.values()),
        "exports": receiver.exports,
        "spans_per_request": round(sum(of_requests.values()) / requests, 3),
        "by_name_per_request": {name: round(count / requests, 3) for name, count in sorted(of_requests.items())},
        "spans_dropped": scraped["spans_dropped"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/vae-mnist"), help="model repository entry")
    parser.add_argument("--without", default=WITHOUT, help="git revision whose server is the `without` mode")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per window")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each")
    parser.add_argument("--rounds", type=int, default=7, help="rounds, windows shuffled in each; medians reported")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where tracing.json goes")
    args = parser.parse_args(argv)
    if SERVER_CPUS == LOAD_CPUS:
        print("warning: fewer than 2 CPUs available; server and load share one", file=sys.stderr)
    started = time.perf_counter()
    code = server_code()
    load_average_at_start = load_average_now()
    pin_to_cpus(LOAD_CPUS)  # before the receivers' threads start: they inherit it
    model_dir = str(args.model_dir.resolve())
    flags = [f"--model-dir={model_dir}", *SERVER_FLAGS]
    windows: list[Window] = []
    failures: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tree, without_commit = stack.enter_context(checkout(args.without))
        receivers = {mode: CountingReceiver() for mode in SAMPLERS}
        for receiver in receivers.values():
            stack.enter_context(receiver)
        schedule = {"OTEL_BSP_SCHEDULE_DELAY": BSP_SCHEDULE_DELAY_MS}
        environments = {"without": without_environment(tree), "unconfigured": base_environment()}
        for mode, sampler in SAMPLERS.items():
            environments[mode] = {**base_environment(), **receivers[mode].env(**sampler, **schedule)}
        servers = {
            mode: stack.enter_context(
                ServerProcess.vae_server(
                    *flags, cpus=SERVER_CPUS, cwd=tree if mode == "without" else ROOT, env=environments[mode]
                )
            )
            for mode in MODES
        }
        without_checks = check_without(tree, servers["without"])
        started_with = {
            mode: {
                "otel_variables": [v.split("=", 1)[0] for v in otel_variables(server)],
                "tracing_events": [
                    e["event"] for e in server.events() if str(e.get("event", "")).startswith("tracing")
                ],
            }
            for mode, server in servers.items()
        }
        if started_with["unconfigured"]["otel_variables"] or started_with["unconfigured"]["tracing_events"]:
            raise RuntimeError(f"the unconfigured server saw tracing settings: {started_with['unconfigured']}")
        for mode in SAMPLERS:
            if started_with[mode]["tracing_events"] != ["tracing_enabled"]:
                raise RuntimeError(f"{mode}: tracing did not start: {started_with[mode]}")
        info = asyncio.run(model_info(servers["unconfigured"].target))
        for round_ in range(args.rounds):
            for mode, (callers, rows) in round_order(round_):
                measured = asyncio.run(
                    run_load(mode, servers[mode], callers, rows, info.latent_dim, args.warmup, args.seconds, round_)
                )
                if measured.errors:
                    failures.append({"window": measured.key, "round": round_, "errors": measured.errors})
                windows.append(measured)
                print(json.dumps(asdict(measured)), flush=True)
        scraped = {mode: scrape(server) for mode, server in servers.items()}
        rss = {mode: server.rss_bytes() for mode, server in servers.items()}
        exit_codes = {mode: server.stop() for mode, server in servers.items()}  # the sampled ones flush their spans
        spans = {mode: spans_figures(receivers[mode], scraped[mode]) for mode in SAMPLERS}
    logged = {mode: warnings_logged(server) for mode, server in servers.items()}
    table = medians(windows)
    figures = summary(windows, table)
    run_seconds = round(time.perf_counter() - started, 1)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(load_average_at_start),
        "settings": {
            "model": args.model_dir.name,
            "model_version": info.version,
            "server_code": code,
            "without": {"revision": args.without, "commit": without_commit, "checks": without_checks},
            "server_flags": SERVER_FLAGS,
            "samplers": SAMPLERS,
            "otel_bsp_schedule_delay_ms": int(BSP_SCHEDULE_DELAY_MS),
            "servers_started_with": started_with,
            "loads": [f"{callers}x{rows}" for callers, rows in LOADS],
            "seconds_per_window": args.seconds,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "run_seconds": run_seconds,
        },
        "medians": table,
        "summary": figures,
        "spans": spans,
        "server_rss_bytes_at_end": rss,
        "server_exit_codes": exit_codes,
        "server_log_warnings_and_errors": logged,
        "failures": failures,
        "windows": [asdict(w) for w in windows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracing.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(table, spans))
    print(json.dumps({"targets": figures["targets"], "spans": spans}, indent=2))
    print(f"wrote {args.out / 'tracing.json'} ({run_seconds} s)")
    if failures:
        print(f"error: {len(failures)} window(s) had errors: {json.dumps(failures)[:2000]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
