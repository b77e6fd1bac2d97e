"""Triton's perf_analyzer drives the server unchanged: unary gRPC, `--streaming` and HTTP with the binary
extension, at batch 1 and 8, and every request succeeds. It is the binary of tritonclient 2.60.0, run by
bench/perf_analyzer.sh under Debian trixie's glibc (`make perf-analyzer`, part of `make test`, sets it up);
`make bench-oip` is where its figures are measured, beside our own clients'; here any three windows count as
stable, so a busy machine's uneven throughput cannot fail the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.oip import PerfLoad, run_perf_analyzer
from bench.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(exported_repository: Path) -> Iterator[ServerProcess]:
    with ServerProcess.vae_server(f"--model-dir={exported_repository}", "--intra-op-threads=1") as running:
        yield running


@pytest.mark.parametrize(
    "load",
    [PerfLoad("grpc", False, 1, 2), PerfLoad("grpc", True, 1, 4), PerfLoad("http", False, 8, 1)],
    ids=lambda load: load.key,
)
def test_perf_analyzer_runs_against_the_server_with_no_failed_request(server: ServerProcess, load: PerfLoad) -> None:
    window, output = run_perf_analyzer(load, server, "vae-mnist-decoder", 0, steady=False)
    assert window is not None, output
    assert window.requests > 0 and window.requests_per_s > 0 and window.rows_per_run >= 1
    assert "error" not in output.lower(), output[-2000:]
