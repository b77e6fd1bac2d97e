"""The Open Inference Protocol beside the typed API, measured side by side in one run against one server process.

    python -m bench.oip --model-dir models/vae-mnist          # `make bench-oip` (~3 min), bench/results/oip.json
    python -m bench.oip --model-dir DIR --seconds 0.3 --rounds 1 --no-perf-analyzer --out /tmp/smoke   # smoke

One server (`python -m serving.server`, batching on as it ships, one onnxruntime thread) pinned to the first
CPU and the load on the second, as bench/serving.py pins them. Every load decodes latents on the decoder:
- the typed API's `Decode` and the protocol's `ModelInfer` on `<name>-decoder` (raw tensor bytes), from the same
  closed-loop driver (`closed_loop`: N callers, each sending its next request when the last returns; one
  request message built up front), at 1 caller x 64 rows, 1 x 1 and 32 callers x 1 row;
- `ModelStreamInfer`, one row per message: 32 streams with one message outstanding each (one stream per caller,
  as tritonclient's `start_stream` and perf_analyzer's `--streaming` open them), and one stream with 32
  messages outstanding (the server runs 16 of them at once by default, `--max-stream-requests-in-flight`);
- REST `POST /v2/models/<name>-decoder/infer` with Triton's binary tensor extension (aiohttp, 32 and 1
  keep-alive connections), binary reply;
- Triton's perf_analyzer (bench/perf_analyzer.sh: tritonclient 2.60.0's binary under Debian trixie's glibc),
  gRPC unary, gRPC `--streaming` and HTTP, concurrency 1 and 32 at batch 1 and `-b 64` at concurrency 1,
  `--input-data zero`, count windows, in a subprocess on the load CPU.
Each of our loads runs once per round (`--rounds`) for `--seconds` after a short warm-up, grouped by shape (the
loads a ratio compares run seconds apart), groups and loads shuffled; perf_analyzer's runs come in the first
`--perf-rounds` rounds, each run its own warm-up and three stable count windows of about a second (not
`--request-count`: in 2.60.0 a fixed count's throughput is its requests over whole seconds, 1,000 requests in
0.7 s read 999.9/s). The table gives the median over the rounds; each ratio is the median of the ratios paired
within a round. Beside requests/s and latency: the server's CPU time over the measured part (/proc/PID/stat,
all threads) per request or stream message, steadier than wall-clock rates on a shared machine, and the rows
per onnxruntime run of its decoder (`vae_batch_rows` on /metrics, read just outside the CPU reading; it also
counts perf_analyzer's requests). The OIP client here is the server's own generated stub
(`serving.api.oip_grpc`); perf_analyzer runs in a process of its own (tritonclient's protobuf package clashes
with the server's `inference` package).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np

from bench.loadgen import build_request, pin_to_cpus
from bench.server_process import ServerProcess
from bench.serving import LOAD_CPUS, SERVER_CPUS
from serving.api import oip, oip_grpc, pb, pb_grpc

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / "bench" / "perf_analyzer.sh"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
TIMEOUT_S = 30.0
STREAM_IN_FLIGHT = 32  # messages one stream keeps outstanding
# The server as bench/serving.py's `batching` mode runs it (the shipped defaults, said out loud).
SERVER_FLAGS = ["--intra-op-threads=1", "--provider=cpu", "--max-batch-size=64", "--batch-wait=adaptive"]
SERVER_FLAGS += ["--max-delay-ms=2"]
# Targets the protocol's implementation was given (docs/performance.md, "Open Inference Protocol").
TARGETS = {
    "modelinfer_vs_decode_requests_per_s_1x64": (">=", 0.9),
    "modelinfer_vs_decode_requests_per_s_32x1": (">=", 0.9),
    "streams_vs_modelinfer_server_cpu_per_message": ("<=", 0.5),
    "rest_vs_grpc_requests_per_s": (">=", 0.8),
}


@dataclass(frozen=True)
class Load:
    """One load of our own: `kind` is decode (VaeService.Decode), infer (ModelInfer), streams (ModelStreamInfer,
    `concurrency` streams of one message outstanding each), stream (ModelStreamInfer, `concurrency` messages
    outstanding on one stream) or rest (binary REST)."""

    kind: str
    rows: int
    concurrency: int

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.concurrency}x{self.rows}"


@dataclass(frozen=True)
class PerfLoad:
    """One perf_analyzer run: protocol grpc or http, unary or streaming, `-b rows`, `--concurrency-range`."""

    protocol: str
    streaming: bool
    rows: int
    concurrency: int

    @property
    def key(self) -> str:
        kind = "pa_stream" if self.streaming else f"pa_{self.protocol}"
        return f"{kind}_{self.concurrency}x{self.rows}"


LOADS = [
    Load(kind, rows, concurrency)
    for rows, concurrency in ((64, 1), (1, 1), (1, 32))
    for kind in ("decode", "infer", "rest")
] + [Load("streams", 1, 32), Load("stream", 1, STREAM_IN_FLIGHT)]  # fmt: skip
PERF_LOADS = [
    PerfLoad(protocol, streaming, rows, concurrency)
    for protocol, streaming in (("grpc", False), ("grpc", True), ("http", False))
    for rows, concurrency in ((64, 1), (1, 1), (1, 32))
]
LABELS = {
    "decode": ("ours", "Decode (typed API)"),
    "infer": ("ours", "ModelInfer, gRPC"),
    "streams": ("ours", "ModelStreamInfer, a stream per caller"),
    "stream": ("ours", "ModelStreamInfer, 1 stream"),
    "rest": ("ours", "REST /v2 infer, binary"),
    "pa_grpc": ("perf_analyzer", "ModelInfer, gRPC"),
    "pa_stream": ("perf_analyzer", "ModelStreamInfer (--streaming)"),
    "pa_http": ("perf_analyzer", "REST /v2 infer, binary (-i http)"),
}


@dataclass(frozen=True)
class Window:
    """One measured window of one load."""

    key: str
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
    rows_per_run: float  # the server's decoder: rows per onnxruntime run (how well batches filled)


class Measured:
    """What the server spent over the measured part of a load (`begin` and `end` mark it): its CPU seconds, and
    the rows and runs of its decoder (/metrics: `vae_batch_rows`, read just outside the CPU reading)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.cpu: list[float] = []
        self.decoder: list[tuple[float, float]] = []

    def begin(self) -> None:
        self.decoder = [decoder_runs(self.server)]
        self.cpu = [self.server.cpu_seconds()]

    def end(self) -> None:
        self.cpu.append(self.server.cpu_seconds())
        self.decoder.append(decoder_runs(self.server))

    @property
    def cpu_s(self) -> float:
        return round(self.cpu[1] - self.cpu[0], 3)  # whole clock ticks

    @property
    def rows(self) -> float:
        return self.decoder[1][0] - self.decoder[0][0]

    @property
    def rows_per_run(self) -> float:
        return round(self.rows / max(self.decoder[1][1] - self.decoder[0][1], 1), 2)


def decoder_runs(server: ServerProcess) -> tuple[float, float]:
    """(rows, onnxruntime runs) the server's decoder has done so far (all versions), from /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = [0.0, 0.0]
    for series, value in re.findall(r'^vae_batch_rows_(sum|count)\{graph="decoder"[^}]*\} (\S+)$', text, re.MULTILINE):
        found[series == "count"] += float(value)
    return found[0], found[1]


def window(
    load: str,
    round_: int,
    rows: int,
    concurrency: int,
    elapsed: float,
    latencies: list[float],
    codes: Counter[str],
    measured: Measured,
) -> Window:
    return Window(
        key=load, round=round_, rows=rows, concurrency=concurrency, **figures(elapsed, latencies, codes, measured)
    )


def figures(elapsed: float, latencies: list[float], codes: Counter[str], measured: Measured) -> dict[str, Any]:
    """A measured window's figures: requests, errors by code, requests/s, p50/p99, server CPU and rows per run."""
    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    done = len(latencies)
    return {
        "seconds": round(elapsed, 3),
        "requests": done,
        "errors": {code: count for code, count in sorted(codes.items()) if code != "OK"},
        "requests_per_s": round(codes.get("OK", 0) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "server_cpu_s": measured.cpu_s,
        "server_cpu_us_per_request": round(1e6 * measured.cpu_s / max(done, 1), 1),
        "rows_per_run": measured.rows_per_run,
    }


async def closed_loop(
    call: Callable[[], Awaitable[None]], concurrency: int, warmup_s: float, seconds: float, measured: Measured
) -> tuple[float, list[float], Counter[str]]:
    """`concurrency` callers, each awaiting `call()` again as soon as the last returns (bench/loadgen.py's loop
    for any call); an exception counts as an error named by its gRPC code or class. Returns the measured
    seconds, the latencies and the outcomes."""
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    measuring = False

    async def caller(stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await call()
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            except (aiohttp.ClientError, RuntimeError) as exc:
                code = type(exc).__name__
            if measuring:
                latencies.append(time.perf_counter() - started)
                codes[code] += 1

    await asyncio.gather(*(caller(time.perf_counter() + warmup_s) for _ in range(concurrency)))
    measured.begin()
    measuring = True
    began = time.perf_counter()
    await asyncio.gather(*(caller(began + seconds) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    measured.end()
    return elapsed, latencies, codes


async def typed_closed_loop(
    target: str, method: str, request: Any, concurrency: int, warmup_s: float, seconds: float, measured: Measured
) -> tuple[float, list[float], Counter[str]]:
    """`closed_loop` on one VaeService method (e.g. "Decode"), every caller sending the one request built up front."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        rpc = getattr(pb_grpc.VaeServiceStub(channel), method)

        async def call() -> None:
            await rpc(request, timeout=TIMEOUT_S)

        return await closed_loop(call, concurrency, warmup_s, seconds, measured)


def latents(rows: int, latent_dim: int) -> np.ndarray:
    """The latents every load of ours sends: what bench/loadgen.py's Decode request holds."""
    request = build_request("decode", rows, latent_dim)[1]
    return np.frombuffer(request.latents.data, np.float32).reshape(rows, latent_dim)


def infer_request(model: str, z: np.ndarray) -> Any:
    """A ModelInfer request for the decoder as tritonclient builds one: raw little-endian bytes."""
    tensor = oip.ModelInferRequest.InferInputTensor(name="z", datatype="FP32", shape=list(z.shape))
    return oip.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[z.tobytes()])


def rest_body(z: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A binary REST inference body (JSON header + raw input bytes) and its headers; binary outputs asked."""
    tensor = {"name": "z", "shape": list(z.shape), "datatype": "FP32", "parameters": {"binary_data_size": z.nbytes}}
    header = {"inputs": [tensor], "parameters": {"binary_data_output": True}}
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    return head + z.tobytes(), headers


async def run_load(
    load: Load, server: ServerProcess, model: str, latent_dim: int, warmup_s: float, seconds: float, round_: int
) -> Window:
    """One window of one of our loads against `server`."""
    z = latents(load.rows, latent_dim)
    measured = Measured(server)
    reply_bytes = load.rows * 28 * 28 * 4
    if load.kind == "rest":
        body, headers = rest_body(z)
        url = f"{server.http_url}/v2/models/{model}/infer"
        connector = aiohttp.TCPConnector(limit=load.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def post() -> None:
                async with session.post(url, data=body, headers=headers) as response:
                    data = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
                    json_length = int(response.headers["Inference-Header-Content-Length"])
                    if len(data) != json_length + reply_bytes:
                        raise RuntimeError(f"reply of {len(data)} bytes; expected {json_length} + {reply_bytes}")

            elapsed, latencies, codes = await closed_loop(post, load.concurrency, warmup_s, seconds, measured)
        return window(load.key, round_, load.rows, load.concurrency, elapsed, latencies, codes, measured)
    async with grpc.aio.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        if load.kind in ("stream", "streams"):
            count, in_flight = (1, load.concurrency) if load.kind == "stream" else (load.concurrency, 1)
            elapsed, latencies, codes = await streams(
                channel, infer_request(model, z), count, in_flight, warmup_s, seconds, measured
            )
        elif load.kind == "decode":
            decode_request = build_request("decode", load.rows, latent_dim)[1]
            decode = pb_grpc.VaeServiceStub(channel).Decode

            async def typed() -> None:
                await decode(decode_request, timeout=TIMEOUT_S)

            elapsed, latencies, codes = await closed_loop(typed, load.concurrency, warmup_s, seconds, measured)
        else:
            request = infer_request(model, z)
            model_infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer

            async def protocol() -> None:
                reply = await model_infer(request, timeout=TIMEOUT_S)
                if len(reply.raw_output_contents[0]) != reply_bytes:
                    raise RuntimeError("short reply")

            elapsed, latencies, codes = await closed_loop(protocol, load.concurrency, warmup_s, seconds, measured)
    return window(load.key, round_, load.rows, load.concurrency, elapsed, latencies, codes, measured)


async def streams(
    channel: grpc.aio.Channel,
    request: Any,
    count: int,
    in_flight: int,
    warmup_s: float,
    seconds: float,
    measured: Measured,
) -> tuple[float, list[float], Counter[str]]:
    """`count` ModelStreamInfer calls on one channel, each with `in_flight` messages outstanding: a new message
    goes out on a stream as each of its replies comes back (matched by `id`). Warm-up, then `seconds` measured;
    then the streams are closed."""
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    state = {"measuring": False, "stop": False}
    stub = oip_grpc.GRPCInferenceServiceStub(channel)

    async def one_stream() -> None:
        call = stub.ModelStreamInfer(timeout=warmup_s + seconds + TIMEOUT_S)
        message = type(request)()
        message.CopyFrom(request)  # one message object per stream: its next id is set once the last write returned
        room = asyncio.Semaphore(in_flight)
        sent: dict[str, float] = {}

        async def write() -> None:
            number = 0
            while True:
                await room.acquire()
                if state["stop"]:
                    break
                message.id = str(number)
                sent[message.id] = time.perf_counter()
                await call.write(message)
                number += 1
            await call.done_writing()

        async def read() -> None:
            async for reply in call:
                failed = re.search(r"request id '(\d+)'", reply.error_message)
                latency = time.perf_counter() - sent.pop(failed.group(1) if failed else reply.infer_response.id)
                room.release()
                if state["measuring"] and not state["stop"]:
                    latencies.append(latency)
                    codes["ERROR" if reply.error_message else "OK"] += 1

        writer = asyncio.ensure_future(write())
        await read()
        await writer

    running = asyncio.gather(*(one_stream() for _ in range(count)))
    await asyncio.sleep(warmup_s)
    measured.begin()
    state["measuring"] = True
    began = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - began
    measured.end()
    state["stop"] = True
    await running
    return elapsed, latencies, codes


def perf_command(load: PerfLoad, server: ServerProcess, model: str, *, steady: bool = True) -> list[str]:
    """perf_analyzer's command line for `load` (bench/perf_analyzer.sh runs it). `steady=False` accepts any
    three windows as stable: a test that asks whether every request succeeds must not fail on a busy machine
    because throughput varied between windows."""
    address = server.target if load.protocol == "grpc" else server.http_url.removeprefix("http://")
    window_requests = 50 if load.rows > 1 else 300  # count windows of about a second at these rates
    command = [
        "bench/perf_analyzer.sh", "-m", model, "-i", load.protocol, "-u", address,
        "--input-data", "zero", "-b", str(load.rows), "--concurrency-range", str(load.concurrency),
        "--measurement-mode", "count_windows", "--measurement-request-count", str(window_requests),
        "--warmup-request-count", str(window_requests // 2),
        "--stability-percentage", "50" if steady else "10000", "--max-trials", "6" if steady else "3",
    ]  # fmt: skip
    return [*command, "--streaming"] if load.streaming else command


def run_perf_analyzer(
    load: PerfLoad, server: ServerProcess, model: str, round_: int, *, steady: bool = True
) -> tuple[Window | None, str]:
    """One perf_analyzer run: its throughput and latency (its CSV), with the server's CPU per request over the
    whole run (requests counted by the server). None and perf_analyzer's output when it fails."""
    with tempfile.TemporaryDirectory() as folder:
        csv_path = Path(folder) / "pa.csv"
        command = ["taskset", "-c", LOAD_CPUS, str(PERF_ANALYZER)]
        command += [*perf_command(load, server, model, steady=steady)[1:], "-f", str(csv_path)]
        measured = Measured(server)
        measured.begin()
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
        elapsed = time.perf_counter() - began
        measured.end()
        requests = round(measured.rows / load.rows)
        output = done.stdout + done.stderr
        if done.returncode != 0 or not csv_path.exists():
            return None, f"rc {done.returncode}: {output[-2000:]}"
        with csv_path.open() as file:
            row = next(csv.DictReader(file))
    ips = float(row["Inferences/Second"])
    return Window(
        key=load.key,
        round=round_,
        rows=load.rows,
        concurrency=load.concurrency,
        seconds=round(elapsed, 3),  # the whole process: warm-up and every window
        requests=requests,
        errors={},
        requests_per_s=round(ips / load.rows, 1),
        p50_ms=round(float(row["p50 latency"]) / 1e3, 3),
        p99_ms=round(float(row["p99 latency"]) / 1e3, 3),
        server_cpu_s=measured.cpu_s,
        server_cpu_us_per_request=round(1e6 * measured.cpu_s / max(requests, 1), 1),
        rows_per_run=measured.rows_per_run,
    ), output


def round_order(round_: int, perf_loads: Sequence[PerfLoad]) -> list[Load | PerfLoad]:
    """A round's loads: ours grouped by shape (so the loads a ratio pairs run seconds apart), the groups and the
    loads in each shuffled; perf_analyzer's runs, shuffled, after ours in even rounds and before in odd ones."""
    rng = random.Random(round_)
    shapes = list(dict.fromkeys((load.rows, load.concurrency) for load in LOADS))
    rng.shuffle(shapes)
    ours: list[Load | PerfLoad] = []
    for shape in shapes:
        group = [load for load in LOADS if (load.rows, load.concurrency) == shape]
        rng.shuffle(group)
        ours += group
    theirs: list[Load | PerfLoad] = list(perf_loads)
    rng.shuffle(theirs)
    return ours + theirs if round_ % 2 == 0 else theirs + ours


def medians(windows: Sequence[Window]) -> dict[str, dict[str, Any]]:
    """Per load: the median over its rounds of each figure."""
    table: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(w.key for w in windows):
        mine = [w for w in windows if w.key == key]
        table[key] = {
            "rows": mine[0].rows,
            "concurrency": mine[0].concurrency,
            "rounds": len(mine),
            **{
                figure: round(statistics.median(getattr(w, figure) for w in mine), 3)
                for figure in ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request", "rows_per_run")
            },
            "rows_per_s": round(statistics.median(w.requests_per_s * w.rows for w in mine), 1),
            # CPU seconds per second: 1.0 is the server's core saturated; below it, the client is the limit
            "server_busy": round(statistics.median(w.server_cpu_s / w.seconds for w in mine), 2),
        }
    return table


def paired(windows: Sequence[Window], top: str, bottom: str, figure: str) -> dict[str, Any] | None:
    """The median over the rounds of top's `figure` / bottom's, paired within each round."""
    by_round = {(w.key, w.round): getattr(w, figure) for w in windows}
    ratios = [
        by_round[(top, r)] / by_round[(bottom, r)]
        for r in sorted({w.round for w in windows})
        if (top, r) in by_round and by_round.get((bottom, r))
    ]
    if not ratios:
        return None
    return {"median": round(statistics.median(ratios), 3), "rounds": [round(x, 3) for x in ratios]}


def summary(windows: Sequence[Window]) -> dict[str, Any]:
    """The ratios against their targets, and perf_analyzer's figures beside our own."""
    ratios = {
        "modelinfer_vs_decode_requests_per_s_1x64": ("infer_1x64", "decode_1x64", "requests_per_s"),
        "modelinfer_vs_decode_requests_per_s_32x1": ("infer_32x1", "decode_32x1", "requests_per_s"),
        "modelinfer_vs_decode_requests_per_s_1x1": ("infer_1x1", "decode_1x1", "requests_per_s"),
        "modelinfer_vs_decode_server_cpu_per_request_1x64": ("infer_1x64", "decode_1x64", "server_cpu_us_per_request"),
        "modelinfer_vs_decode_server_cpu_per_request_32x1": ("infer_32x1", "decode_32x1", "server_cpu_us_per_request"),
        "streams_vs_modelinfer_server_cpu_per_message": ("streams_32x1", "infer_32x1", "server_cpu_us_per_request"),
        "streams_vs_modelinfer_requests_per_s": ("streams_32x1", "infer_32x1", "requests_per_s"),
        "one_stream_vs_modelinfer_server_cpu_per_message": (
            f"stream_{STREAM_IN_FLIGHT}x1", "infer_32x1", "server_cpu_us_per_request"
        ),
        "one_stream_vs_modelinfer_requests_per_s": (f"stream_{STREAM_IN_FLIGHT}x1", "infer_32x1", "requests_per_s"),
        "rest_vs_grpc_requests_per_s": ("rest_32x1", "infer_32x1", "requests_per_s"),
        "rest_vs_grpc_requests_per_s_1x64": ("rest_1x64", "infer_1x64", "requests_per_s"),
        "rest_vs_grpc_server_cpu_per_request_32x1": ("rest_32x1", "infer_32x1", "server_cpu_us_per_request"),
        "pa_grpc_vs_ours_modelinfer_requests_per_s_32x1": ("pa_grpc_32x1", "infer_32x1", "requests_per_s"),
        "pa_grpc_vs_ours_modelinfer_requests_per_s_1x64": ("pa_grpc_1x64", "infer_1x64", "requests_per_s"),
        "pa_stream_vs_pa_grpc_server_cpu_per_request_32x1": (
            "pa_stream_32x1", "pa_grpc_32x1", "server_cpu_us_per_request"
        ),
        "pa_http_vs_pa_grpc_requests_per_s_32x1": ("pa_http_32x1", "pa_grpc_32x1", "requests_per_s"),
    }  # fmt: skip
    figures: dict[str, Any] = {}
    for name, (top, bottom, figure) in ratios.items():
        found = paired(windows, top, bottom, figure)
        if found is not None:
            figures[name] = found
    targets = {}
    for name, (sense, bound) in TARGETS.items():
        if name in figures:
            measured = figures[name]["median"]
            met = measured >= bound if sense == ">=" else measured <= bound
            targets[name] = {"target": f"{sense} {bound}", "measured": measured, "met": met}
    return {"ratios": figures, "targets": targets}


def label(key: str) -> tuple[str, str, str]:
    """(client, protocol, load) of a load key, for the table."""
    kind, _, shape = key.rpartition("_")
    client, protocol = LABELS[kind]
    callers, rows = shape.split("x")
    if kind == "stream":
        return client, protocol, f"{callers} in flight x {rows}"
    return client, protocol, f"{callers} x {rows}"


def markdown(table: dict[str, dict[str, Any]]) -> str:
    """The medians as a Markdown table, grouped by load shape."""
    lines = [
        "| client | API | callers x rows | requests/s | p50 / p99 ms | server CPU µs/req | rows/run | server busy |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    shapes = [(64, 1), (1, 1), (1, 32), (1, STREAM_IN_FLIGHT)]
    ordered = sorted(
        table,
        key=lambda k: (shapes.index((table[k]["rows"], table[k]["concurrency"])), k.startswith("pa_"), k),
    )
    for key in ordered:
        row = table[key]
        client, protocol, shape = label(key)
        lines.append(
            f"| {client} | {protocol} | {shape} | {row['requests_per_s']:,.0f} | "
            f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f} | {row['server_cpu_us_per_request']:,.0f} | "
            f"{row['rows_per_run']:.1f} | {row['server_busy']:.2f} |"
        )
    return "\n".join(lines)


def server_code() -> dict[str, Any]:
    """The commit the server ran from, and the files of serving/ that differed from it when the run began."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "serving", "contract").splitlines()  # "XY path": 2 columns
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": [line[3:] for line in changed]}


def machine(load_average_at_start: list[float]) -> dict[str, Any]:
    """The machine a run measured: cores, CPU model, the server's and the load's CPUs, the load average before
    the run (`load_average_now()` then) and now."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "server_cpus": SERVER_CPUS,
        "load_cpus": LOAD_CPUS,
        "load_average_at_start": load_average_at_start,
        "load_average_at_end": load_average_now(),
    }


def load_average_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def warnings_logged(server: ServerProcess) -> dict[str, int]:
    """What the server logged above info level (its plaintext warning aside): what the run's requests provoked."""
    return dict(
        Counter(
            f"{event.get('level')}: {event.get('event')}"
            for event in server.events()
            if event.get("level") not in ("debug", "info") and event.get("event") != "grpc_plaintext"
        )
    )


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.oip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/vae-mnist"), help="model repository entry")
    parser.add_argument("--seconds", type=float, default=1.0, help="measured seconds per load of ours per round")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, loads shuffled in each; medians reported")
    parser.add_argument("--perf-rounds", type=int, default=3, help="the first rounds that run perf_analyzer too")
    parser.add_argument("--no-perf-analyzer", action="store_true", help="our own loads only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where oip.json goes")
    args = parser.parse_args(argv)
    if SERVER_CPUS == LOAD_CPUS:
        print("warning: fewer than 2 CPUs available; server and load share one", file=sys.stderr)
    perf_loads = [] if args.no_perf_analyzer else PERF_LOADS
    version = ""
    if perf_loads:  # set up (quick once done) before the clock starts
        subprocess.run([str(PERF_ANALYZER), "--setup"], check=True)
        shown = subprocess.run([str(PERF_ANALYZER), "--version"], capture_output=True, text=True)
        version = (shown.stdout + shown.stderr).strip()
    started = time.perf_counter()
    code = server_code()
    load_average_at_start = load_average_now()
    pin_to_cpus(LOAD_CPUS)
    model = f"{args.model_dir.name}-decoder"
    windows: list[Window] = []
    failures: list[dict[str, Any]] = []
    with ServerProcess.vae_server(f"--model-dir={args.model_dir}", *SERVER_FLAGS, cpus=SERVER_CPUS) as server:
        info = asyncio.run(model_info(server.target))
        # as run, less `taskset -c LOAD_CPUS` before and `-f CSV` after; the ports are this run's
        commands = {load.key: " ".join(perf_command(load, server, model)) for load in perf_loads}
        for round_ in range(args.rounds):
            for load in round_order(round_, perf_loads if round_ < args.perf_rounds else []):
                if isinstance(load, Load):
                    measured = asyncio.run(
                        run_load(load, server, model, info.latent_dim, args.warmup, args.seconds, round_)
                    )
                    if measured.errors:
                        failures.append({"load": load.key, "round": round_, "errors": measured.errors})
                else:
                    found, output = run_perf_analyzer(load, server, model, round_)
                    if found is None:
                        failures.append({"load": load.key, "round": round_, "perf_analyzer": output})
                        print(f"perf_analyzer failed on {load.key}: {output}", file=sys.stderr, flush=True)
                        continue
                    measured = found
                windows.append(measured)
                print(json.dumps(asdict(measured)), flush=True)
        rss = server.rss_bytes()
    logged = warnings_logged(server)
    table = medians(windows)
    figures = summary(windows)
    run_seconds = round(time.perf_counter() - started, 1)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(load_average_at_start),
        "settings": {
            "model": model,
            "model_version": info.version,
            "server_code": code,
            "server_flags": SERVER_FLAGS,
            "seconds_per_load": args.seconds,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "perf_analyzer_rounds": min(args.perf_rounds, args.rounds) if perf_loads else 0,
            "stream_messages_in_flight": STREAM_IN_FLIGHT,
            "perf_analyzer": version,
            "perf_analyzer_commands": commands,
            "run_seconds": run_seconds,
        },
        "medians": table,
        "summary": figures,
        "server_rss_bytes_at_end": rss,
        "server_log_warnings_and_errors": logged,
        "failures": failures,
        "windows": [asdict(w) for w in windows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "oip.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(table))
    print(json.dumps(figures, indent=2))
    print(f"wrote {args.out / 'oip.json'} ({run_seconds} s)")
    if failures:
        print(f"error: {len(failures)} load(s) failed: {json.dumps(failures)[:2000]}", file=sys.stderr)
        return 1
    return 0


async def model_info(target: str) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        return await pb_grpc.VaeServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S)


if __name__ == "__main__":
    sys.exit(main())
