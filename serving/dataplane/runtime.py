"""onnxruntime sessions for a verified model version: provider choice, session options, warm-up.

`GraphSession.run(array)` is the synchronous numpy-in, numpy-out call the batcher runs in a thread. Sessions
are built from the verified bytes in the `ModelVersion`, never by re-reading files, so replacing a model
directory while serving cannot change what runs.

The CUDA provider runs with onnxruntime's default options and graphs run with plain `session.run`: IOBinding,
pinned host buffers and memory-pool options are measured in-process by bench/runtime_options.py (`make
gpu-check`), and come here only once a GPU measurement shows that they help.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from contract.repository import GraphSpec, ModelVersion
from contract.settings import check_settings, setting

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_OPTIMIZATION_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


class ProviderUnavailable(RuntimeError):
    """The requested execution provider cannot run here (e.g. `cuda` on a machine without a usable GPU)."""


Provider = Literal["auto", "cuda", "cpu"]
GraphOptimization = Literal["all", "extended", "basic", "disable"]


@dataclass(frozen=True)
class RuntimeSettings:
    """How onnxruntime runs the graphs."""

    provider: Provider = setting(
        "auto",
        "onnxruntime execution provider: auto (CUDA when onnxruntime offers it and the session really gets it, "
        "else CPU, logged as provider_fallback), cuda (start-up fails where CUDA is not usable), cpu",
    )
    intra_op_threads: int = setting(
        0, "onnxruntime threads per graph run (0: onnxruntime's default, one per core)", minimum=0, metavar="N"
    )
    graph_optimization: GraphOptimization = setting("all", "onnxruntime graph optimization level")

    def __post_init__(self) -> None:
        check_settings(self)


class GraphSession:
    """One onnxruntime session; input and output names come from the graph's spec (the manifest)."""

    def __init__(self, spec: GraphSpec, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_name = spec.inputs[0].name
        self.output_names = [output.name for output in spec.outputs]
        self.provider = session.get_providers()[0]

    def run(self, rows: np.ndarray) -> Sequence[np.ndarray]:
        """The graph's outputs for one batch of rows (float32, C-contiguous)."""
        return self.session.run(self.output_names, {self.input_name: rows})


@dataclass(frozen=True)
class GraphSessions:
    """The encoder and decoder of one model version, ready to run."""

    version: ModelVersion
    encoder: GraphSession
    decoder: GraphSession

    @property
    def provider(self) -> str:
        return self.decoder.provider

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run both graphs once per batch size, so the first requests do not pay for allocation and tuning."""
        for rows in batch_sizes:
            images = np.zeros((rows, *self.version.image_shape), np.float32)
            self.encoder.run(images)
            self.decoder.run(np.zeros((rows, self.version.latent_dim), np.float32))


def session_options(options: RuntimeSettings) -> ort.SessionOptions:
    """The onnxruntime session options the server runs with (bench/onnx_vs_torch.py measures them)."""
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = 1  # these graphs are chains: no parallel branches to run
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle onnxruntime threads that spin for work take the cores the event loop and the other graph need
    # (measured in bench/onnx_vs_torch.py: spinning sessions fall behind on a busy 2-core machine).
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session_options.graph_optimization_level = _OPTIMIZATION_LEVELS[options.graph_optimization]
    session_options.log_severity_level = 3  # errors only: a CUDA fallback is reported by us, once
    return session_options


def load_sessions(version: ModelVersion, options: RuntimeSettings) -> GraphSessions:
    """Sessions for both graphs on the chosen provider; raises ProviderUnavailable for an unusable `cuda`."""
    wants_cuda = options.provider in ("auto", "cuda")
    offered = ort.get_available_providers()
    if options.provider == "cuda" and CUDA not in offered:
        raise ProviderUnavailable(f"provider cuda requested but this onnxruntime offers only {', '.join(offered)}")
    providers = [CUDA, CPU] if wants_cuda and CUDA in offered else [CPU]
    if options.provider == "auto" and CUDA in providers and not _nvidia_driver_present():
        # Without a driver CUDA cannot work; loading its libraries to find that out costs ~190 MB of RSS.
        providers = [CPU]
        reason = "onnxruntime offers CUDA but no NVIDIA driver is present (/proc/driver/nvidia, /dev/nvidiactl)"
        _report_fallback(reason)
    if CUDA in providers:
        preload_cuda_libraries()

    # Where CUDA cannot load, onnxruntime's default logger prints multi-line errors on each session. With
    # `auto` that fallback is expected and reported once below; with `cuda` its reason is worth seeing.
    ort.set_default_logger_severity(4 if options.provider == "auto" else 3)
    try:
        encoder, decoder = (
            GraphSession(spec, ort.InferenceSession(spec.model_bytes, session_options(options), providers=providers))
            for spec in (version.encoder, version.decoder)
        )
    finally:
        ort.set_default_logger_severity(2)
    # onnxruntime-gpu offers CUDA even without a GPU or CUDA libraries, then silently runs on the CPU:
    # what counts is the provider the sessions actually got.
    if wants_cuda and CUDA in providers and encoder.provider != CUDA:
        if options.provider == "cuda":
            raise ProviderUnavailable("provider cuda requested but no usable CUDA device or libraries were found")
        reason = "onnxruntime offers CUDA but could not create it here (no GPU, or CUDA/cuDNN libraries missing)"
        _report_fallback(reason)
    return GraphSessions(version, encoder, decoder)


def release_freed_memory() -> None:
    """Hand the heap memory of freed sessions back to the operating system (after a version is unloaded).

    onnxruntime frees a session's buffers with free(), and glibc keeps freed chunks for reuse: without
    this, the server's RSS grew by about a quarter over 50 version swaps and stayed flat with it
    (tests/system/test_version_swaps.py). The collection first makes sure no cycle still holds a session.
    Where the C library has no malloc_trim (not glibc), only the collection runs.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


@functools.cache
def _report_fallback(reason: str) -> None:
    """Log the CPU fallback of `auto` once per process and reason, not at every version loaded."""
    log.warning("provider_fallback", extra={"fields": {"requested": "auto", "provider": CPU, "reason": reason}})


def _nvidia_driver_present() -> bool:
    """Whether an NVIDIA kernel driver is visible (host or container with the NVIDIA runtime)."""
    return any(Path(path).exists() for path in ("/proc/driver/nvidia/version", "/dev/nvidiactl"))


def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels (the `cuda` extra), where installed.

    onnxruntime-gpu does not find those wheels' libraries by itself; `preload_dlls` does. It prints what it
    cannot load: that goes to the debug log, and a missing library shows up as the CPU fallback instead.
    """
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            ort.preload_dlls()
    except Exception as exc:  # a broken install must not stop a server that can still run on the CPU
        output.write(f"preload_dlls failed: {exc}")
    if output.getvalue().strip():
        log.debug("cuda_preload", extra={"fields": {"output": output.getvalue().strip()}})
