"""The GPU check's serving steps (bench/gpu_check.py runs them; each writes its figures as it goes).

    python -m bench.gpu_serving serving --provider cuda --work DIR --result DIR/serving.json --deadline T

serving  export DIR/train/best.pt (the training step's; a quick CPU-trained one if that step left none),
         then the real server with --provider: the provider its model_loaded log line and ModelInfo name,
         and its Encode / Decode of fixed inputs against a CPU-provider server's (max abs difference)
limit    bench/limit.py's in-process rows/s at batch 1 / 64 / 256 / 1024 with session.run (the server's
         call) and through IOBinding, on and pinned (bench/runtime_options.py), and with onnxruntime CUDA
         graphs (or the reason they do not run)
sweep    bench/serving.py's Decode loads (1 x 64 rows, 1 and 32 callers x 1 row) against the batching server
         and the minimal server: rows/s, latency, server CPU ms per request, GPU memory after warm-up and after
         the loads
memory   GPU memory (and RSS) the server holds after warm-up and after batches up to 1024 rows; then the same
         runs in-process, each in a fresh process, with the CUDA arena options of bench/runtime_options.py:
         the default arena, same-as-requested growth, and that with a 256 MiB cap
--quick: short blocks and loads, batches up to 256 rows in the memory step, one arena (the capped one).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import onnxruntime as ort

from bench.gpu_check import TOLERANCE, StepRecord, step_arguments
from bench.limit import measure as measure_limit
from bench.limit import rows_per_second
from bench.loadgen import pin_to_cpus
from bench.runtime_options import ARENAS, IO_BINDINGS, MIB, graph_session
from bench.server_process import ServerProcess, gpu_memory_bytes, gpu_used_total_bytes, rss_bytes
from bench.serving import LOAD_CPUS, MODES, cpu_per_request, cpu_table, find, sweep
from contract.repository import GraphSpec, load_version
from serving.client import VaeClient
from serving.dataplane.runtime import CPU, CUDA, Provider, RuntimeSettings, load_sessions

BATCH_SIZES = (1, 64, 256, 1024)
MEMORY_MAX_BATCH = 1024  # the memory step's server runs --max-batch-size 1024, warmed up at 1 and 1024 rows
QUICK_ARENAS = ("same-as-requested, 256 MiB cap",)  # both options, one process
EXPECTED_PROVIDER = {"cuda": CUDA, "cpu": CPU}
T = TypeVar("T")


def served_model(work: Path) -> tuple[Path, str]:
    """The check's exported model directory (exported here when no step has yet), and where its weights came from."""
    from training.export import export

    model_dir = work / "models" / "vae-mnist"
    checkpoint = work / "train" / "best.pt"
    source = "the training step's best.pt"
    if not checkpoint.is_file():  # the training step failed or ran out of time: serve a quick CPU-trained model
        from training.train import TrainConfig, train

        checkpoint = work / "fallback" / "best.pt"
        source = "fallback: 1 CPU epoch on 256 mnist-5k images (the training step left no best.pt)"
        if not checkpoint.is_file():
            out = str(checkpoint.parent)
            train(
                TrainConfig(
                    dataset="mnist-5k", out=out, epochs=1, limit=256, device="cpu", eval_iwae_samples=0, plots=False
                )
            )
    if not (model_dir / "1" / "model.json").is_file():
        export(checkpoint, work / "models", "vae-mnist", version=1)
    return model_dir, source


def parity_inputs(model_dir: Path, rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """`rows` latents from a fixed seed, and the digits the CPU provider decodes them into (realistic encoder
    inputs without loading a dataset)."""
    version = load_version(model_dir)
    latents = np.random.default_rng(0).standard_normal((rows, version.latent_dim), dtype=np.float32)
    (images,) = load_sessions(version, RuntimeSettings(provider="cpu", intra_op_threads=1)).decoder.run(latents)
    return latents, images


def serve_once(model_dir: Path, provider: str, latents: np.ndarray, images: np.ndarray) -> dict[str, Any]:
    """Start the server on `provider`, read what it says it runs on, Encode and Decode the inputs, stop it."""
    started = time.perf_counter()
    flags = [f"--model-dir={model_dir}", f"--provider={provider}", "--intra-op-threads=1"]
    with ServerProcess.vae_server(*flags) as server:
        startup_s = time.perf_counter() - started
        logged = [e.get("provider") for e in server.events() if e.get("event") == "model_loaded"]
        gpu_memory = server.gpu_memory_bytes()
        with VaeClient(server.target, timeout_s=60.0) as client:
            info = client.model_info()
            posterior = client.encode(images)
            mu, log_var = posterior.mu, posterior.log_var
            decoded = client.decode(latents).images
    return {
        "startup_to_serving_s": round(startup_s, 2),
        "logged_provider": logged[0] if logged else None,
        "model_info_provider": info.provider,
        "gpu_memory_bytes_after_warm_up": gpu_memory,
        "exit_code": server.exit_code,
        "outputs": {"decode_images": decoded, "encode_mu": mu, "encode_log_var": log_var},
    }


def serving(record: StepRecord, provider: str, work: Path) -> None:
    started = time.perf_counter()
    model_dir, source = served_model(work)
    record["model"] = {"source": source, "export_and_train_seconds": round(time.perf_counter() - started, 2)}
    latents, images = parity_inputs(model_dir)
    # the reference is a second server process even in the dry run (--provider cpu): the same code both ways
    runs = {"tested": serve_once(model_dir, provider, latents, images)}
    runs["cpu_reference"] = serve_once(model_dir, "cpu", latents, images)
    outputs = {name: run.pop("outputs") for name, run in runs.items()}
    record["servers"] = runs
    diffs = {
        key: float(np.abs(value - outputs["cpu_reference"][key]).max()) for key, value in outputs["tested"].items()
    }
    record["max_abs_diff_vs_cpu"] = diffs
    record["tolerance"] = TOLERANCE
    expected = EXPECTED_PROVIDER[provider]
    ours = runs["tested"]
    problems = [
        *([] if ours["logged_provider"] == expected else [f"log says {ours['logged_provider']}, not {expected}"]),
        *([] if ours["model_info_provider"] == expected else [f"ModelInfo says {ours['model_info_provider']}"]),
        *[f"{key} differs by {diff:.2g} > {TOLERANCE}" for key, diff in diffs.items() if diff > TOLERANCE],
        *[f"{name} server exited with {run['exit_code']}" for name, run in runs.items() if run["exit_code"] != 0],
    ]
    record["headline"] = [
        f"server on {ours['model_info_provider']} (log: {ours['logged_provider']}), start-up "
        f"{ours['startup_to_serving_s']} s; max abs diff vs CPU provider: "
        + ", ".join(f"{key} {diff:.2g}" for key, diff in diffs.items())
    ]
    record["status"] = "failed: " + "; ".join(problems) if problems else "ok"


class CudaGraphRunner:
    """One graph and batch size run through a captured CUDA graph: inputs and outputs at fixed device addresses,
    the host input copied in place and the outputs copied out on every run (what a server would have to do)."""

    def __init__(self, spec: GraphSpec, rows: int) -> None:
        self.session = graph_session(spec, "cuda", {"enable_cuda_graph": "1"})
        shape = (rows, *(int(d) for d in spec.inputs[0].shape[1:]))
        self.input = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), "cuda", 0)
        self.outputs = [
            ort.OrtValue.ortvalue_from_shape_and_type((rows, *(int(d) for d in o.shape[1:])), np.float32, "cuda", 0)
            for o in spec.outputs
        ]
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(spec.inputs[0].name, self.input)
        for output, value in zip(spec.outputs, self.outputs, strict=True):
            self.binding.bind_ortvalue_output(output.name, value)

    def run(self, rows: np.ndarray) -> list[np.ndarray]:
        self.input.update_inplace(rows)
        self.session.run_with_iobinding(self.binding)  # the first run captures the graph, later ones replay it
        return [value.numpy() for value in self.outputs]


def cuda_graph_rates(model_dir: Path, provider: str, block_seconds: float, repeats: int) -> list[dict[str, Any]]:
    """rows/s through CUDA graphs per graph and batch size, and their outputs against session.run's."""
    if provider != "cuda":
        return [{"status": "unsupported: CUDA graphs need the CUDA provider (this run: CPUExecutionProvider)"}]
    version = load_version(model_dir)
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    for graph, spec in (("decode", version.decoder), ("encode", version.encoder)):
        for rows in BATCH_SIZES:
            shape = (rows, *(int(d) for d in spec.inputs[0].shape[1:]))
            batch = rng.random(shape, dtype=np.float32)
            try:
                runner = CudaGraphRunner(spec, rows)
                captured = runner.run(batch)
                plain = graph_session(spec, "cuda").run(None, {spec.inputs[0].name: batch})
                diff = max(float(np.abs(a - b).max()) for a, b in zip(captured, plain, strict=True))
                rate = rows_per_second(runner, batch, block_seconds, repeats)
            except Exception as exc:  # onnxruntime refuses to capture (a node off the GPU, a CPU-side shape op)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                results.append({"graph": graph, "batch": rows, "status": f"unsupported: {reason}"})
                continue
            results.append(
                {"graph": graph, "batch": rows, "rows_per_s": round(rate, 1), "max_abs_diff": diff, "status": "ok"}
            )
    return results


def limit(record: StepRecord, provider: Provider, quick: bool, work: Path) -> None:
    model_dir, record["model_source"] = served_model(work)
    block, repeats = (0.01, 2) if quick else (0.2, 3)
    rows: list[dict[str, Any]] = []
    for io_binding in IO_BINDINGS:
        rows += measure_limit(model_dir, 1, BATCH_SIZES, block, repeats, provider, io_binding)
        record["limit"] = rows
    graphs = cuda_graph_rates(model_dir, provider, block, repeats)
    record["cuda_graphs"] = graphs

    def rate(graph: str, batch: int, io_binding: str) -> float:
        key = (graph, batch, io_binding)
        return float(next(r["rows_per_s"] for r in rows if (r["graph"], r["batch"], r["io_binding"]) == key))

    record["headline"] = [
        f"{graph} batch {batch}: "
        + ", ".join(f"io-binding {mode} {rate(graph, batch, mode):,.0f}" for mode in IO_BINDINGS)
        + " rows/s"
        for graph in ("decode", "encode")
        for batch in BATCH_SIZES
    ] + [
        f"CUDA graphs {g['graph']} batch {g['batch']}: {g.get('rows_per_s', '')} rows/s" if g["status"] == "ok"
        else f"CUDA graphs: {g['status']}"
        for g in graphs
    ]  # fmt: skip
    record["status"] = "ok"


def serving_sweep(record: StepRecord, provider: str, quick: bool, work: Path) -> None:
    model_dir, record["model_source"] = served_model(work)
    modes = {"batching": MODES["batching"]}  # the server as it serves; IOBinding is the limit step's, in-process
    concurrencies, duration = ([2], 0.2) if quick else ([1, 32], 3.0)
    pin_to_cpus(LOAD_CPUS)  # the load generator; the servers run on SERVER_CPUS (bench/serving.py)
    points, process = sweep(
        model_dir, concurrencies, duration, 2.0, provider, modes=modes, baselines=("minimal",), rpcs=("decode",)
    )
    record["points"] = points
    record["process"] = process
    record["duration_s_per_point"] = duration
    many = max(concurrencies)
    record["cpu_per_request"] = cpu_per_request(points, many)
    record["cpu_table"] = cpu_table(points)

    def point(mode: str, rows: int, callers: int) -> dict[str, Any]:
        return find(points, mode, "decode", rows, callers)

    record["headline"] = [
        f"{mode}: 1 x 64 {point(mode, 64, 1)['rows_per_s']:,.0f} rows/s "
        f"({point(mode, 64, 1)['server_cpu_ms_per_request']:.3f} CPU ms/req), {many} x 1 "
        f"{point(mode, 1, many)['requests_per_s']:,.0f} req/s ({point(mode, 1, many)['server_cpu_ms_per_request']:.3f}"
        f" CPU ms/req, p99 {point(mode, 1, many)['p99_ms']} ms)"
        for mode in (*modes, "minimal")
    ]
    errors = [p for p in points if p["errors"] or not p["requests"]]
    record["status"] = f"failed: {len(errors)} load(s) had errors or no requests" if errors else "ok"


def memory_figures(pid: int, after: str) -> dict[str, int | None]:
    """The GPU memory process `pid` holds, the whole GPU's, and its RSS, named `..._after_<after>`."""
    return {
        f"gpu_memory_bytes_after_{after}": gpu_memory_bytes(pid),
        f"gpu_used_total_bytes_after_{after}": gpu_used_total_bytes(),
        f"rss_bytes_after_{after}": rss_bytes(pid),
    }


def arena_memory(
    model_dir: Path,
    provider: Literal["cuda", "cpu"],
    cuda_options: Mapping[str, str],
    batch_sizes: tuple[int, ...],
    repeats: int,
) -> dict[str, Any]:
    """What `memory` measures of the server, measured of this process with both graphs' sessions on
    `cuda_options`: warmed up as the server is (1 and MEMORY_MAX_BATCH rows), then `repeats` Decode and Encode
    runs per batch size."""
    version = load_version(model_dir)
    encoder, decoder = (graph_session(spec, provider, cuda_options) for spec in (version.encoder, version.decoder))
    latents = np.random.default_rng(0).standard_normal((MEMORY_MAX_BATCH, version.latent_dim), dtype=np.float32)

    def decode_and_encode(rows: int) -> None:
        (images,) = decoder.run(None, {version.decoder.inputs[0].name: latents[:rows]})
        encoder.run(None, {version.encoder.inputs[0].name: images})

    for rows in (1, MEMORY_MAX_BATCH):
        decode_and_encode(rows)
    figures: dict[str, Any] = {"provider": decoder.get_providers()[0], **memory_figures(os.getpid(), "warm_up")}
    for rows in batch_sizes:
        for _ in range(repeats):
            decode_and_encode(rows)
    return {**figures, **memory_figures(os.getpid(), "loads")}


def in_fresh_process(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a new interpreter (spawned, not forked): the memory it measures is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def memory(record: StepRecord, provider: Literal["cuda", "cpu"], quick: bool, work: Path) -> None:
    model_dir, record["model_source"] = served_model(work)
    batch_sizes = BATCH_SIZES[:-1] if quick else BATCH_SIZES
    repeats = 1 if quick else 3
    latents, images = parity_inputs(model_dir, rows=max(batch_sizes))
    record["gpu_used_total_bytes_before"] = gpu_used_total_bytes()
    server_flags = [f"--model-dir={model_dir}", f"--provider={provider}", "--intra-op-threads=1"]
    with ServerProcess.vae_server(*server_flags, f"--max-batch-size={MEMORY_MAX_BATCH}") as server:
        served = memory_figures(server.process.pid, "warm_up")
        with VaeClient(server.target, timeout_s=60.0) as client:
            for rows in batch_sizes:
                for _ in range(repeats):
                    client.decode(latents[:rows])
                    client.encode(images[:rows])
        served.update(memory_figures(server.process.pid, "loads"))
    record["server"] = served
    arenas: dict[str, Any] = {}
    for name in QUICK_ARENAS if quick else ARENAS:  # in-process: the server takes no arena options
        arenas[name] = in_fresh_process(arena_memory, model_dir, provider, ARENAS[name], batch_sizes, repeats)
        record["arenas"] = arenas
    if provider != "cuda":
        record["gpu_memory"] = "not measured: CPU provider (the RSS figures are host memory)"

    def shown(value: int | None) -> str:
        return "n/a" if value is None else f"{value / MIB:,.0f} MiB"

    record["headline"] = [
        f"{name}: GPU {shown(f['gpu_memory_bytes_after_warm_up'])} -> {shown(f['gpu_memory_bytes_after_loads'])} "
        f"(whole GPU {shown(f['gpu_used_total_bytes_after_warm_up'])} -> "
        f"{shown(f['gpu_used_total_bytes_after_loads'])}), "
        f"RSS {shown(f['rss_bytes_after_warm_up'])} -> {shown(f['rss_bytes_after_loads'])}"
        for name, f in {"server": served, **{f"in-process, {arena} arena": f for arena, f in arenas.items()}}.items()
    ]
    record["status"] = "ok"


def main() -> int:
    args = step_arguments(__doc__.split("\n\n")[0], ("serving", "limit", "sweep", "memory"))
    record = StepRecord(args.result)
    provider: Literal["cuda", "cpu"] = "cuda" if args.provider == "cuda" else "cpu"
    if args.step == "serving":
        serving(record, provider, args.work)
    elif args.step == "limit":
        limit(record, provider, args.quick, args.work)
    elif args.step == "sweep":
        serving_sweep(record, provider, args.quick, args.work)
    else:
        memory(record, provider, args.quick, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
