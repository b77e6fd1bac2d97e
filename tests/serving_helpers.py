"""Helpers for the serving tests: an in-process server on its own event loop, metrics scraping, graphs run directly."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from serving.server.app import RunningServer, start_server
from serving.server.config import ServerConfig
from serving.settings import build


def server_config(model_dir: Path, **overrides: Any) -> ServerConfig:
    """A server on free 127.0.0.1 ports with few threads, as the tests run it; overrides by setting name."""
    defaults = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "intra_op_threads": 1, "grace_seconds": 2.0}
    return build(ServerConfig, {**defaults, "model_dir": model_dir, **overrides})


class ServerThread:
    """`start_server` on an event loop in a daemon thread, so tests can use the blocking public client."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._started: Future[RunningServer] = Future()
        self._thread = threading.Thread(target=self._run, name="vae-test-server", daemon=True)
        self._thread.start()
        self.running = self._started.result(timeout=60)
        self.target = f"127.0.0.1:{self.running.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.running.metrics_port}/metrics"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._started.set_result(self.loop.run_until_complete(start_server(self.config)))
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        self.loop.run_forever()

    def stop(self, grace_seconds: float = 1.0) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(grace_seconds), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def metric(self, name: str, **labels: str) -> float:
        """A sample's current value from the server's registry (0 when absent)."""
        value = self.running.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


class ServerProcess:
    """`python -m serving.server` on free ports; its JSON log lines are collected from stderr."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "serving.server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
        self.process = subprocess.Popen([*command, *args], stderr=subprocess.PIPE, text=True)
        self.target = self.metrics_url = ""
        self.lines: list[str] = []
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if '"event": "server_started"' in line:
                started = json.loads(line)
                self.target = started["grpc_address"]
                self.metrics_url = f"http://{started['metrics_address']}/metrics"
                self.started.set()

    def wait_started(self) -> None:
        if not self.started.wait(timeout=60):
            self.process.kill()
            raise AssertionError("server did not start:\n" + "".join(self.lines))

    def finish(self, timeout_s: float = 30) -> int:
        code = self.process.wait(timeout=timeout_s)
        self.reader.join(timeout=5)
        return code


@contextmanager
def running_server(model_dir: Path, **overrides: Any) -> Iterator[ServerThread]:
    server = ServerThread(server_config(model_dir, **overrides))
    try:
        yield server
    finally:
        server.stop()


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET /metrics and parse it: sample name → [(labels, value)]."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)


class DirectGraphs:
    """The exported graphs run straight from their files: the reference the server's answers must equal."""

    def __init__(self, model_dir: Path, version: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        path = model_dir / str(version)
        self.encoder = ort.InferenceSession(str(path / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(path / "decoder.onnx"), options, providers=["CPUExecutionProvider"])

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, log_var = self.encoder.run(["mu", "log_var"], {"x": images.astype(np.float32)})
        return mu, log_var

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.decoder.run(["x"], {"z": latents.astype(np.float32)})[0]
