"""New versions reaching a running server: polling, SIGHUP, labels, the version policy, the default route."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from contract.labels import read_labels
from serving.admin import set_label
from serving.client import VaeClient, VaeError
from tests.helpers import (
    DirectGraphs,
    ServerThread,
    patient_config,
    publish_copy,
    running_server,
    wait_until,
)


def test_a_failed_version_is_logged_once_counted_and_retried_only_when_its_files_change(model_dir: Path) -> None:
    with running_server(model_dir, poll_seconds=0) as server, VaeClient(server.target) as client:
        bad = publish_copy(model_dir, 2, corrupt=True)
        server.refresh()
        server.refresh()
        assert server.metric("vae_model_loads_total", result="failed") == 1  # not retried: nothing changed
        assert client.sample(1).model_version == 1 and client.health() == "SERVING"
        shutil.copy2(model_dir / "1" / "decoder.onnx", bad / "decoder.onnx")  # repaired in place
        server.refresh()
        assert client.sample(1).model_version == 2
        assert server.metric("vae_model_loads_total", result="loaded") == 2


def test_requests_name_a_version_or_a_label_and_unknown_ones_get_not_found(model_dir: Path) -> None:
    publish_copy(model_dir, 2)
    set_label(model_dir, "stable", 1)
    set_label(model_dir, "canary", 2)
    with (
        running_server(model_dir, default_version="stable", poll_seconds=0) as server,
        VaeClient(server.target) as client,
    ):
        assert client.sample(1).model_version == 1  # the default route is the label `stable`
        for view, expected in ((client.using(label="canary"), 2), (client.using(model_version=1), 1)):
            assert view.decode(np.zeros((1, 20), np.float32)).model_version == expected
            assert view.model_info().model_version == expected
        for view, message in (
            (client.using(label="beta"), "label 'beta' names no version; served versions: 1 (stable), 2 (canary)"),
            (client.using(model_version=9), "model version 9 is not served; served versions: 1 (stable), 2 (canary)"),
        ):
            with pytest.raises(VaeError) as missing:
                view.sample(1)
            assert missing.value.code == grpc.StatusCode.NOT_FOUND and missing.value.details == message
        rows = [(row.version, row.state, row.labels, row.is_default) for row in client.model_info().versions]
        assert rows == [(2, "AVAILABLE", ("canary",), False), (1, "AVAILABLE", ("stable",), True)]
        assert server.metric("vae_model_info", version="1", labels="stable") == 1
        assert server.metric("vae_model_default_version") == 1
        assert server.metric("vae_requests_total", method="Decode", version="2", code="OK") == 1
        assert server.metric("vae_requests_total", method="Sample", version="", code="NOT_FOUND") == 2
        with pytest.raises(VaeError):  # refused by version 2's validation: the metrics say which version refused
            client.using(label="canary").decode(np.zeros((1, 3), np.float32))
        assert server.metric("vae_requests_total", method="Decode", version="2", code="INVALID_ARGUMENT") == 1


def test_moving_a_label_moves_its_traffic_on_the_next_look(model_dir: Path) -> None:
    publish_copy(model_dir, 2)
    set_label(model_dir, "stable", 1)
    with running_server(model_dir, poll_seconds=0, default_version="stable") as server, VaeClient(server.target) as vae:
        assert vae.sample(1).model_version == 1
        assert set_label(model_dir, "stable", 2) == "vae-mnist: stable -> version 2 (was 1)"
        server.refresh()
        assert vae.sample(1).model_version == 2
        assert [row.version for row in vae.model_info().versions] == [2]  # version 1: no label, not latest
    assert read_labels(model_dir) == {"stable": 2}


def test_the_version_policy_chooses_what_is_served_and_the_last_version_is_never_dropped(model_dir: Path) -> None:
    for version in (2, 3):
        publish_copy(model_dir, version)
    with (
        running_server(model_dir, poll_seconds=0, version_policy="latest:2") as server,
        VaeClient(server.target) as vae,
    ):
        assert [row.version for row in vae.model_info().versions] == [3, 2]
        shutil.rmtree(model_dir / "3")
        server.refresh()
        assert [row.version for row in vae.model_info().versions] == [2, 1]  # 3 is gone; 1 is among the newest two
        for version in (1, 2):
            shutil.rmtree(model_dir / str(version))
        server.refresh()  # nothing left on disk: the server keeps what it serves
        assert [row.version for row in vae.model_info().versions] == [2, 1]
        assert vae.sample(1).model_version == 2 and vae.health() == "SERVING"


@pytest.fixture
def patient_server(model_dir: Path) -> Iterator[ServerThread]:
    server = ServerThread(patient_config(model_dir, max_batch_size=16))
    yield server
    server.stop()


def test_a_request_queued_on_the_old_version_finishes_on_it(patient_server: ServerThread, model_dir: Path) -> None:
    """A lone request waits 1.5 s for company (fixed wait): version 2 takes over meanwhile."""
    latents = np.random.default_rng(0).standard_normal((1, 20)).astype(np.float32)
    with VaeClient(patient_server.target) as client:
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(client.decode, latents)
            wait_until(lambda: patient_server.metric("vae_queue_depth", version="1") == 1, what="the request queued")
            publish_copy(model_dir, 2)
            patient_server.refresh()  # version 2 takes new requests; version 1 is unloading
            states = {row.version: row.state for row in client.model_info().versions}
            assert states == {2: "AVAILABLE", 1: "UNLOADING"}
            decoded = queued.result(timeout=30)
            assert decoded.model_version == 1
            np.testing.assert_allclose(decoded.images, DirectGraphs(model_dir, 1).decode(latents), atol=1e-5)
        wait_until(lambda: [row.version for row in client.model_info().versions] == [2], what="version 1 unloaded")
        assert patient_server.metric("vae_model_info", version="1") == 0  # its series are gone


def test_the_cli_asks_for_a_label_or_a_version_and_says_which_answered(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serving.client import cli

    publish_copy(model_dir, 2)
    set_label(model_dir, "stable", 1)
    with running_server(model_dir, poll_seconds=0) as server:
        output = tmp_path / "stable.png"
        assert cli.main(["--target", server.target, "--label", "stable", "sample", "-n", "4", "-o", str(output)]) == 0
        assert capsys.readouterr().out.endswith(" from version 1\n") and output.is_file()
        assert cli.main(["--target", server.target, "--model-version", "2", "info"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["version"] == 2
        assert [(row["version"], row["labels"], row["is_default"]) for row in info["versions"]] == [
            (2, [], True),
            (1, ["stable"], False),
        ]
        assert cli.main(["--target", server.target, "--model-version", "7", "info"]) == 1
        assert "NOT_FOUND: model version 7 is not served" in capsys.readouterr().err


async def test_shutdown_waits_for_a_retired_version_that_is_still_closing(model_dir: Path) -> None:
    """A version retired under a lease closes in a task of its own once the lease ends; `close` must await
    that task, so that shutdown leaves nothing running (and no task pending when the event loop ends)."""
    from serving.dataplane.batcher import BatchSettings
    from serving.dataplane.engine import LimitSettings
    from serving.dataplane.runtime import RuntimeSettings
    from serving.lifecycle.manager import ModelManager, RepositorySettings
    from serving.metrics import Metrics

    class Recording(Metrics):
        def __init__(self) -> None:
            super().__init__(["Decode"])
            self.unloaded: list[int] = []

        def model_unloaded(self, version: int) -> None:
            self.unloaded.append(version)
            super().model_unloaded(version)

    observer = Recording()
    with ThreadPoolExecutor(1) as executor:
        manager = ModelManager(
            RepositorySettings(model_dir=model_dir, poll_seconds=0),
            RuntimeSettings(provider="cpu", intra_op_threads=1),
            BatchSettings(),
            LimitSettings(),
            executor,
            observer,
        )
        await manager.start()
        async with manager.lease() as engine:
            publish_copy(model_dir, 2)
            await manager.refresh("test")  # version 2 takes new requests; version 1 retires once this lease ends
            assert engine.version.number == 1 and manager.engine().version.number == 2
        closing = [task for task in asyncio.all_tasks() if task.get_name() == "model-close"]
        assert len(closing) == 1 and not closing[0].done()  # version 1 closes in a task of its own
        await manager.close()
        assert closing[0].done() and closing[0].exception() is None
        assert observer.unloaded == [1]
