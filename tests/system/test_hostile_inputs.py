"""Hostile and careless inputs to the server from outside the gRPC port: what the model directory holds (version
names, labels.json, failed versions) and what the metrics port is sent. (Replies a client must refuse:
tests/integration/test_client_replies.py; graph and manifest sizes: tests/unit/test_repository.py; callers of
the gRPC port: tests/system/test_hostile_callers.py.) Every server listens on 127.0.0.1; the tests assert
behaviour, never speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from contract.labels import LABELS_FILE, MAX_LABELS, write_labels
from contract.manifest import MAX_VERSION
from serving.api import pb, pb_grpc
from serving.client import VaeClient
from serving.lifecycle import manager
from serving.server.metrics_port import DEFAULT_MAX_METRICS_CONNECTIONS, METRICS_TIMEOUT_SECONDS
from tests.helpers import ServerProcess, publish_copy, running_server, wait_until

DEEP_LABELS = '{"stable": ' + "[" * 30_000 + "]" * 30_000 + "}"  # 60 KB: under the size limit, 30,000 arrays deep


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of the log records named `name` (the server's JSON lines, as caught in-process)."""
    return [getattr(record, "fields", {}) for record in caplog.records if record.getMessage() == name]


# An absolute path in text: "/" at the start or after a space, quote, bracket, "=" or ":".
ABSOLUTE_PATH = re.compile(r"""(?:^|[\s'"(\[=:])/""")


def strings(value: Any) -> Iterator[str]:
    """Every string in a decoded JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def test_a_directory_named_beyond_the_largest_version_is_ignored(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """E: 2^64 cannot travel as a version (uint64 replies, int64 manifests); the server serves version 1."""
    publish_copy(model_dir, 2**64)
    with (
        caplog.at_level(logging.INFO, logger="serving"),
        running_server(model_dir, poll_seconds=0) as server,
        VaeClient(server.target, retries=0) as client,
    ):
        server.refresh()  # a second look logs nothing new
        assert client.sample(2, seed=1).model_version == 1
        info = client.model_info()
        assert info.model_version == 1 and [row.version for row in info.versions] == [1]
        assert client.health() == "SERVING"
    (ignored,) = events(caplog, "version_dir_ignored")
    assert ignored["path"] == str(model_dir / str(2**64)) and str(MAX_VERSION) in ignored["reason"]


def test_a_labels_file_too_deep_to_read_does_not_stop_start_up(model_dir: Path) -> None:
    """F: a broken labels.json at start-up is logged once and the server starts without labels; its default
    route (a label) falls back to the newest version; new versions still load while it stays broken."""
    (model_dir / LABELS_FILE).write_text(DEEP_LABELS)
    with ServerProcess.vae_server(
        f"--model-dir={model_dir}", "--default-version=stable", "--poll-seconds=0.2", "--intra-op-threads=1"
    ) as server:
        with VaeClient(server.target, retries=0) as client:
            assert client.sample(1, seed=1).model_version == 1
            publish_copy(model_dir, 2)
            wait_until(lambda: client.sample(1, seed=1).model_version == 2, timeout_s=60, what="version 2 to serve")
        assert server.stop() == 0
    names = [event["event"] for event in server.events()]
    assert names.count("labels_unreadable") == 1  # once, not on every poll
    assert "default_route_unresolved" in names
    assert "Traceback" not in "".join(server.lines)
    (unreadable,) = (event for event in server.events() if event["event"] == "labels_unreadable")
    assert "labels must be a JSON object of label → version" in unreadable["error"] and unreadable["keeping"] == {}


def test_new_versions_load_while_the_labels_file_is_broken(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """F: every look at the directory (poll or SIGHUP) loads new versions whatever labels.json holds."""
    (model_dir / LABELS_FILE).write_text(DEEP_LABELS)
    with (
        caplog.at_level(logging.INFO, logger="serving"),
        running_server(model_dir, poll_seconds=0) as server,
        VaeClient(server.target, retries=0) as client,
    ):
        publish_copy(model_dir, 2)
        server.refresh()
        assert client.sample(1, seed=1).model_version == 2
        assert [row.version for row in client.model_info().versions if row.state == "AVAILABLE"] == [2]
    assert len(events(caplog, "labels_unreadable")) == 1


def test_what_clients_see_of_a_version_names_no_path(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """G: GetModelInfo's errors name files relative to the model directory and its manifest carries no path of
    the exporting machine; the server's own log keeps the full path."""
    publish_copy(model_dir, 2, corrupt=True)
    with (
        caplog.at_level(logging.INFO, logger="serving"),
        running_server(model_dir, poll_seconds=0) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        reply = pb_grpc.VaeServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    failed = {row.version: row.error for row in reply.versions if row.state == pb.FAILED}
    assert set(failed) == {2} and failed[2].startswith("2/decoder.onnx: sha256 mismatch (manifest ")
    manifest = json.loads(reply.manifest_json)
    assert manifest["training"]["checkpoint"] == "best.pt"
    texts = [reply.manifest_json, *failed.values(), *strings(manifest)]
    for text in texts:
        assert str(model_dir) not in text and str(model_dir.resolve()) not in text and "/tmp" not in text, text
        assert not ABSOLUTE_PATH.search(text), text
    (logged,) = events(caplog, "model_load_failed")
    assert logged["error"].startswith(f"{model_dir / '2' / 'decoder.onnx'}: sha256 mismatch")


def test_a_large_labels_file_is_refused_and_metrics_stay_small(
    model_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H: a 10 MB labels.json is refused before it is read (the server keeps serving, with the labels it had);
    the most labels a file may hold keep /metrics small; the directory is read off the event loop."""
    write_labels(model_dir, {"stable": 1})
    readers: set[str] = set()  # the threads that list the directory and read labels.json

    def in_thread(read: Callable[[Path], Any]) -> Callable[[Path], Any]:
        def recorded(path: Path) -> Any:
            readers.add(threading.current_thread().name)
            return read(path)

        return recorded

    for name in ("scan_versions", "read_routes"):
        monkeypatch.setattr(manager, name, in_thread(getattr(manager, name)))
    with (
        caplog.at_level(logging.INFO, logger="serving"),
        running_server(model_dir, poll_seconds=0) as server,
        VaeClient(server.target, retries=0) as client,
    ):
        many = json.dumps({f"label-{i}": 1 for i in range(600_000)})  # 10 MB, every label a metric label value
        assert len(many) > 10_000_000
        (model_dir / LABELS_FILE).write_text(many)
        server.refresh()
        (unreadable,) = events(caplog, "labels_unreadable")
        assert "more than the 65536 bytes (64 KiB) a labels file may have" in unreadable["error"]
        assert client.using(label="stable").sample(1, seed=1).model_version == 1
        assert client.model_info().versions[0].labels == ("stable",)

        longest = {f"l{i:02d}" + "x" * 60: 1 for i in range(MAX_LABELS)}  # 63 characters each, the longest allowed
        write_labels(model_dir, longest)
        server.refresh()
        assert set(client.model_info().versions[0].labels) == set(longest)
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            body = response.read()
        assert len(body) < 64 * 1024 and all(label.encode() in body for label in longest)
    assert readers and all(name.startswith("model-loader") for name in readers), readers


def process_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_idle_connections_to_the_metrics_port_hold_no_threads(exported_repository: Path) -> None:
    """I: 200 connections that send nothing take no thread each, do not stop a scrape, and are closed within
    the timeout; the port still serves GET /metrics only."""
    with ServerProcess.vae_server(f"--model-dir={exported_repository}", "--intra-op-threads=1") as server:
        host, port = server.metrics_url.removeprefix("http://").removesuffix("/metrics").split(":")
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            assert response.status == 200
        before = process_threads(server.process.pid)
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(200)]
        try:
            with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
                assert response.status == 200 and b"vae_requests_total" in response.read()
            assert process_threads(server.process.pid) <= before + DEFAULT_MAX_METRICS_CONNECTIONS
            for connection in idle:  # closed by the server: end of file (or a reset), not a timeout here
                connection.settimeout(METRICS_TIMEOUT_SECONDS + 10)
                with contextlib.suppress(ConnectionResetError):
                    assert connection.recv(1) == b""
        finally:
            for connection in idle:
                connection.close()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(server.metrics_url.removesuffix("metrics"), timeout=10)
        assert missing.value.code == 404
        assert process_threads(server.process.pid) <= before + DEFAULT_MAX_METRICS_CONNECTIONS
        server.process.send_signal(signal.SIGTERM)
        assert server.wait() == 0
    assert "Traceback" not in "".join(server.lines)
