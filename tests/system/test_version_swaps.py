"""Versions swapped under a running server's feet: by the project's exporter, under load, and 50 times in a row.

The figures (swaps, requests, RSS) are printed; docs/performance.md quotes a run of them.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving.client import VaeClient
from tests.helpers import (
    Callers,
    DirectGraphs,
    ServerProcess,
    publish_copy,
    running_server,
    train_tiny_checkpoint,
    wait_until,
)

POLL_SECONDS = 0.2


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model (another seed): its answers differ from version 1's."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("other") / "best.pt", latent_dim=20, seed=1)


def test_a_version_exported_while_callers_run_takes_over_and_nothing_fails(
    model_dir: Path, other_checkpoint: Path
) -> None:
    from training.export import export

    with running_server(model_dir, poll_seconds=POLL_SECONDS) as server, Callers(server.target, threads=4) as callers:
        wait_until(lambda: len(callers.versions_seen()) >= 8, what="callers answered by version 1")
        export(other_checkpoint, model_dir.parent, model_dir.name)  # the project's exporter publishes version 2
        published = time.monotonic()
        # the bound only stops a server that never takes the new version; the time it took is a figure, not a test
        wait_until(lambda: callers.versions_seen()[-1] == 2, timeout_s=60, what="version 2 answering")
        takeover_s = time.monotonic() - published
        publish_copy(model_dir, 3, source=2, corrupt=True)
        wait_until(lambda: server.metric("vae_model_loads_total", result="failed") == 1, what="version 3 refused")
        answered_before = len(callers.versions_seen())
        wait_until(lambda: len(callers.versions_seen()) > answered_before + 8, what="more answers")
        with VaeClient(server.target) as client:
            info = client.model_info()
            assert client.health() == "SERVING"

    replies = len(callers.replies)
    print(f"version 2 answered {takeover_s:.2f} s after its publish (poll {POLL_SECONDS} s); {replies} requests")
    assert callers.errors == []
    versions = callers.versions_seen()
    assert set(versions) == {1, 2} and versions[answered_before:] == [2] * (len(versions) - answered_before)
    graphs = {version: DirectGraphs(model_dir, version) for version in (1, 2)}
    for version, latents, images in callers.replies:  # each reply is the answer of the version it names
        np.testing.assert_allclose(images, graphs[version].decode(latents), atol=1e-5)
    assert not np.allclose(graphs[1].decode(latents), graphs[2].decode(latents), atol=1e-3)  # they differ
    rows = {row.version: row for row in info.versions}
    assert info.model_version == 2 and rows[2].state == "AVAILABLE" and rows[2].is_default
    assert rows[3].state == "FAILED" and "3/decoder.onnx: sha256 mismatch" in rows[3].error
    assert 1 not in rows  # unloaded once version 2 served


def swap_to(server: ServerProcess, client: VaeClient, model_dir: Path, version: int) -> None:
    """Publish `version` (a copy of the one before), SIGHUP, wait until it alone is served; remove the one before."""
    publish_copy(model_dir, version, source=version - 1)
    server.process.send_signal(signal.SIGHUP)

    def swapped() -> bool:
        return [row.version for row in client.model_info().versions] == [version]

    wait_until(swapped, timeout_s=30, what=f"version {version} alone")
    shutil.rmtree(model_dir / str(version - 1))


def wait_for_answers(callers: Callers, count: int) -> None:
    """Wait until the callers have had `count` more answers."""
    seen = len(callers.versions_seen())
    wait_until(lambda: len(callers.versions_seen()) >= seen + count, what=f"{count} more answers")


class HealthWatch:
    """Polls health every 10 ms from a thread; `statuses` holds every answer."""

    def __init__(self, target: str) -> None:
        self.statuses: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(target,), daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _watch(self, target: str) -> None:
        with VaeClient(target, timeout_s=5, retries=0) as client:
            while not self._stop.wait(0.01):
                self.statuses.append(client.health("vae.v1.VaeService"))


def test_32_callers_see_no_failure_while_versions_are_swapped_20_times(model_dir: Path) -> None:
    """Half of them through the typed API, half through the Open Inference Protocol: both lease versions alike."""
    with (
        ServerProcess.vae_server(f"--model-dir={model_dir}", "--poll-seconds=0", "--intra-op-threads=1") as server,
        VaeClient(server.target) as client,
        HealthWatch(server.target) as health,
        Callers(server.target, threads=32, rows=1, protocols=("typed", "oip"), model=model_dir.name) as callers,
    ):
        wait_for_answers(callers, 64)
        for version in range(2, 22):
            swap_to(server, client, model_dir, version)
            wait_for_answers(callers, 32)
    versions = callers.versions_seen()
    print(f"swaps 20, requests {len(versions)}, failed {len(callers.errors)}, health checks {len(health.statuses)}")
    assert callers.errors == []
    assert set(versions) <= set(range(1, 22)) and 21 in versions
    assert all(callers.by_caller[thread] for thread in (0, 1))  # both protocols were answered
    # each reply came from a version served when its request arrived: a caller's versions only move forward
    assert all(seen == sorted(seen) for seen in callers.by_caller)
    assert set(health.statuses) == {"SERVING"} and len(health.statuses) > 20
    assert server.exit_code == 0


def test_50_swaps_in_a_row_leave_memory_where_the_first_left_it(model_dir: Path) -> None:
    with (
        ServerProcess.vae_server(f"--model-dir={model_dir}", "--poll-seconds=0", "--intra-op-threads=1") as server,
        VaeClient(server.target) as client,
    ):
        latents = np.random.default_rng(0).standard_normal((64, 20)).astype(np.float32)
        rss = []
        for version in range(2, 52):
            swap_to(server, client, model_dir, version)
            for _ in range(4):  # traffic on each version: its sessions and batchers really run
                client.decode(latents)
            rss.append(server.rss_bytes())
    growth = rss[-1] / rss[0] - 1
    mib = [round(value / 2**20, 1) for value in rss]
    print(f"RSS after swap 1: {mib[0]} MiB, after swap 50: {mib[-1]} MiB ({growth:+.1%}); every 10th: {mib[::10]}")
    assert abs(growth) < 0.10, mib
    loaded = [event for event in server.events() if event["event"] == "model_loaded"]
    unloaded = [event for event in server.events() if event["event"] == "model_unloaded"]
    assert len(loaded) == 51 and len(unloaded) == 51  # every version freed, the last one at shutdown
