"""Smoke runs of the serving benchmarks with tiny settings: they run end to end and report what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, running_server


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=True
    )


def test_loadgen_reports_throughput_latency_and_errors(exported_repository: Path) -> None:
    with running_server(exported_repository) as server:
        result = run_module(
            "bench.loadgen", "--target", server.target, "--rpc", "decode", "--rows", "4", "--concurrency", "3",
            "--requests", "60", "--warmup", "0.2",
        )  # fmt: skip
        decoded = server.metric("vae_requests_total", method="Decode", code="OK")
    line = json.loads(result.stdout)
    assert line["requests"] == 60 and line["errors"] == {}
    assert abs(line["rows_per_s"] - 4 * line["requests_per_s"]) < 1  # both rounded to 0.1
    assert 0 < line["p50_ms"] <= line["p90_ms"] <= line["p99_ms"] <= line["max_ms"]
    assert decoded >= 60  # the server saw them (plus the warm-up)


def test_limit_measures_both_graphs_at_each_batch_size(exported_repository: Path) -> None:
    result = run_module(
        "bench.limit", "--model-dir", str(exported_repository), "--batch", "1", "8", "--block-seconds", "0.02",
        "--repeats", "2",
    )  # fmt: skip
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(line["graph"], line["batch"]) for line in lines} == {(g, b) for g in ("decode", "encode") for b in (1, 8)}
    assert all(line["rows_per_s"] > 0 and line["provider"] == "CPUExecutionProvider" for line in lines)


def test_the_protocol_bench_measures_every_load_and_checks_its_targets(
    exported_repository: Path, tmp_path: Path
) -> None:
    """`make bench-oip`'s own loads (perf_analyzer left out: its glibc is fetched by `make bench-oip` only)."""
    run_module(
        "bench.oip", "--model-dir", str(exported_repository), "--seconds", "0.3", "--warmup", "0.2", "--rounds", "1",
        "--no-perf-analyzer", "--out", str(tmp_path), timeout=240,
    )  # fmt: skip
    report = json.loads((tmp_path / "oip.json").read_text())
    assert report["failures"] == [] and report["server_log_warnings_and_errors"] == {}
    loads = {f"{api}_{shape}" for api in ("decode", "infer", "rest") for shape in ("1x64", "32x1", "1x1")}
    assert set(report["medians"]) == loads | {"streams_32x1", "stream_32x1"}
    assert all(load["requests_per_s"] > 0 for load in report["medians"].values())
    targets = report["summary"]["targets"]
    assert set(targets) == {
        "modelinfer_vs_decode_requests_per_s_1x64", "modelinfer_vs_decode_requests_per_s_32x1",
        "streams_vs_modelinfer_server_cpu_per_message", "rest_vs_grpc_requests_per_s",
    }  # fmt: skip
    for target in targets.values():  # each verdict is what its figure says (the figures themselves: bench, not test)
        bound = float(target["target"].split()[1])
        measured = target["measured"]
        assert target["met"] == (measured >= bound if target["target"].startswith(">=") else measured <= bound)


def test_the_shadow_bench_shadows_only_where_asked_and_pairs_each_server_with_off(
    exported_repository: Path, tmp_path: Path
) -> None:
    """`make bench-shadow`, one short round: behaviour, not timing."""
    args = ("--model-dir", str(exported_repository), "--seconds", "0.3", "--warmup", "0.2", "--rounds", "1",
            "--out", str(tmp_path))  # fmt: skip
    run_module("bench.shadow", *args, timeout=240)
    report = json.loads((tmp_path / "shadow.json").read_text())
    assert report["command"] == " ".join(("python -m bench.shadow", *args))  # what reproduces the figures
    assert {"date", "machine", "settings", "windows"} <= set(report) and report["machine"]["nproc"] >= 1
    assert report["failures"] == [] and report["server_log_warnings_and_errors"] == {
        "off": {},
        "shadow_10": {},
        "shadow_100": {},
    }
    medians = report["medians"]
    assert set(medians) == {f"{mode}_{load}" for mode in ("off", "shadow_10", "shadow_100") for load in ("16x8", "1x8")}
    for load in ("16x8", "1x8"):
        assert medians[f"off_{load}"]["shadow_scored_per_request"] == 0  # off scores nothing again
        assert medians[f"shadow_100_{load}"]["shadow_scored_per_request"] == 1  # every request, once, in its window
        assert medians[f"shadow_100_{load}"]["shadow_dropped_per_request"] == 0
    jobs = report["shadow_jobs_at_end"]
    assert jobs["off"]["scored"] == 0 < jobs["shadow_10"]["scored"] < jobs["shadow_100"]["scored"]
    assert set(report["summary"]) == {
        f"{mode}_vs_off_{load}" for mode in ("shadow_10", "shadow_100") for load in ("16x8", "1x8")
    }


def test_serving_sweep_writes_results_plot_and_summary(exported_repository: Path, tmp_path: Path) -> None:
    run_module(
        "bench.serving", "--model-dir", str(exported_repository), "--duration", "0.2", "--concurrency", "1", "2",
        "--out", str(tmp_path), timeout=240,
    )  # fmt: skip
    report = json.loads((tmp_path / "serving.json").read_text())
    assert (tmp_path / "serving.png").stat().st_size > 10_000
    modes = {point["mode"] for point in report["points"]}
    assert modes == {"batching", "batching-fixed", "no-batching", "minimal", "echo"}
    # per mode of our server: 2 RPCs x (1x64 + callers 1 and 2); the two baseline servers: Decode only
    assert len(report["points"]) == 3 * 2 * (1 + 2) + 2 * (1 + 2)
    assert all(point["errors"] == {} and point["requests"] > 0 for point in report["points"])
    # The summary is computed from the points and the in-process limit of this same run.
    summary, points = report["summary"], report["points"]

    def rate(mode: str, rows: int, callers: int, key: str) -> float:
        point = next(
            p for p in points if (p["mode"], p["rpc"], p["rows"], p["concurrency"]) == (mode, "decode", rows, callers)
        )
        return float(point[key])

    limit_64 = next(r["rows_per_s"] for r in report["limit"] if (r["graph"], r["batch"]) == ("decode", 64))
    ours, minimal, echo = (rate(mode, 64, 1, "rows_per_s") for mode in ("batching", "minimal", "echo"))
    assert summary["decode_1x64_vs_limit"] == round(ours / limit_64, 3)
    assert summary["decode_1x64_vs_minimal"] == round(ours / minimal, 3)
    assert summary["decode_1x64_vs_limit_bound"] == round(echo / (echo + limit_64), 3)
    on, off = (rate(mode, 1, 2, "requests_per_s") for mode in ("batching", "no-batching"))
    assert summary["decode_2x1_batching_vs_off"] == round(on / off, 2)
    for mode in modes:
        assert report["process"][mode]["startup_to_serving_s"] > 0  # a figure; ServerProcess bounds a hung start
        assert report["process"][mode]["rss_bytes"] > 10_000_000
    # The server's CPU time over each point, per request; ours beside the minimal server's in the summary.
    for point in points:
        assert 0 <= point["server_cpu_s"] <= point["duration_s"] * 1.5  # pinned to one CPU (plus clock ticks)
        assert point["server_cpu_ms_per_request"] == round(1e3 * point["server_cpu_s"] / point["requests"], 4)
    assert rate("batching", 64, 1, "server_cpu_s") > 0  # 64-row decodes for 0.2 s cost the server CPU
    for load, rows, callers in (("decode_1x64", 64, 1), ("decode_2x1", 1, 2)):
        ours, minimal = (rate(mode, rows, callers, "server_cpu_ms_per_request") for mode in ("batching", "minimal"))
        assert summary[f"{load}_server_cpu_ms_per_request"] == ours
        assert summary[f"minimal_{load}_server_cpu_ms_per_request"] == minimal


def test_model_rpcs_compares_every_vae_rpc_with_encode_and_decode(exported_repository: Path) -> None:
    result = run_module(
        "bench.model_rpcs", "--model-dir", str(exported_repository), "--seconds", "0.3", "--rounds", "1",
        "--concurrency", "2", timeout=180,
    )  # fmt: skip
    report = json.loads(result.stdout.splitlines()[-1])
    by_rpc = {row["rpc"]: row for row in report["results"]}
    assert set(by_rpc) == {"encode", "decode", "score", "score-iwae8", "reconstruct", "traverse", "interpolate"}
    assert all(row["requests_per_s"] > 0 and row["p50_ms"] > 0 for row in by_rpc.values())
    encode, decode = (1 / by_rpc[rpc]["requests_per_s"] for rpc in ("encode", "decode"))
    assert by_rpc["encode"]["ratio"] == pytest.approx(encode / (encode + decode), rel=1e-6)


def test_ood_benchmark_trains_two_models_and_reports_auroc_of_each_score(tmp_path: Path) -> None:
    out = tmp_path / "ood.json"
    run_module("bench.ood", "--quick", "--importance-samples", "2", "--out", str(out), timeout=400)
    report = json.loads(out.read_text())
    assert [case["case"][:3] for case in report["cases"]] == ["(a)", "(b)"]
    for case in report["cases"]:
        assert set(case["auroc"]) == {"negative_elbo", "corrected", "iwae"}
        assert all(0.0 <= value <= 1.0 for value in case["auroc"].values())
        assert case["in_distribution_images"] == case["out_of_distribution_images"] == 64
