"""onnxruntime sessions for a verified model version: provider choice, session options, warm-up.

`GraphSession.run(array)` is the synchronous numpy-in, numpy-out call the batcher runs in a thread. Sessions
are built from the verified bytes in the `ModelVersion`, never by re-reading files, so replacing a model
directory while serving cannot change what runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import io
import logging
import sys
import threading
import weakref
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
IoBinding = Literal["off", "on", "pinned"]
ArenaExtendStrategy = Literal["next-power-of-two", "same-as-requested"]
_ARENA_EXTEND_STRATEGIES = {"next-power-of-two": "kNextPowerOfTwo", "same-as-requested": "kSameAsRequested"}


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
    io_binding: IoBinding = setting(
        "off",
        "how a graph run gets its outputs: off (session.run), on (onnxruntime IOBinding: outputs allocated on the "
        "provider's device, then copied to the host), pinned (IOBinding into reused host buffers, page-locked "
        "under CUDA so the device-to-host copy is one DMA; each run's outputs are copied out of them)",
    )
    cuda_mem_limit_bytes: int = setting(
        0, "CUDA provider: cap of onnxruntime's GPU memory arena (gpu_mem_limit); 0: no cap", minimum=0, metavar="BYTES"
    )
    cuda_arena_extend_strategy: ArenaExtendStrategy = setting(
        "next-power-of-two",
        "CUDA provider: how the GPU memory arena grows (same-as-requested grows by what a run needs, not by doubling)",
    )

    def __post_init__(self) -> None:
        check_settings(self)

    def cuda_provider_options(self) -> dict[str, str]:
        """The CUDA execution provider's options these settings ask for."""
        options = {"arena_extend_strategy": _ARENA_EXTEND_STRATEGIES[self.cuda_arena_extend_strategy]}
        if self.cuda_mem_limit_bytes:
            options["gpu_mem_limit"] = str(self.cuda_mem_limit_bytes)
        return options


class GraphSession:
    """One onnxruntime session; input and output names come from the graph's spec (the manifest)."""

    def __init__(self, spec: GraphSpec, session: ort.InferenceSession, io_binding: IoBinding = "off") -> None:
        self.session = session
        self.input_name = spec.inputs[0].name
        self.output_names = [output.name for output in spec.outputs]
        self.output_shapes = [tuple(int(d) for d in output.shape[1:]) for output in spec.outputs]  # after the batch
        self.provider = session.get_providers()[0]
        self.io_binding = io_binding
        self._device = "cuda" if self.provider == CUDA else "cpu"
        self._host_buffers: dict[int, list[np.ndarray]] = {}  # "pinned": output buffers by row count, reused
        self._host_buffers_lock = threading.Lock()

    def run(self, rows: np.ndarray) -> Sequence[np.ndarray]:
        """The graph's outputs for one batch of rows (float32, C-contiguous)."""
        if self.io_binding == "off":
            return self.session.run(self.output_names, {self.input_name: rows})
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, rows)
        if self.io_binding == "on":
            for name in self.output_names:
                binding.bind_output(name, self._device)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        with self._host_buffers_lock:  # the buffers of one row count are shared: one run at a time
            buffers = self._host_buffers.get(len(rows))
            if buffers is None:
                buffers = self._host_buffers[len(rows)] = [
                    self._host_array((len(rows), *shape)) for shape in self.output_shapes
                ]
            for name, buffer in zip(self.output_names, buffers, strict=True):
                binding.bind_output(name, "cpu", 0, np.float32, buffer.shape, buffer.ctypes.data)
            self.session.run_with_iobinding(binding)
            # The next run overwrites the buffers while this one's rows may still be on their way into replies.
            return [buffer.copy() for buffer in buffers]

    def _host_array(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 host buffer: page-locked (cudaHostAlloc) under CUDA, ordinary memory on the CPU provider."""
        return _pinned_array(shape) if self._device == "cuda" else np.empty(shape, np.float32)


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
        _preload_cuda_libraries()

    # Where CUDA cannot load, onnxruntime's default logger prints multi-line errors on each session. With
    # `auto` that fallback is expected and reported once below; with `cuda` its reason is worth seeing.
    ort.set_default_logger_severity(4 if options.provider == "auto" else 3)
    with_options = [(CUDA, options.cuda_provider_options()) if name == CUDA else name for name in providers]
    try:
        encoder, decoder = (
            GraphSession(
                spec,
                ort.InferenceSession(spec.model_bytes, session_options(options), providers=with_options),
                options.io_binding,
            )
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

    onnxruntime frees a session's buffers with free(), and glibc keeps freed chunks in its arenas: without
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


def _pinned_array(shape: tuple[int, ...]) -> np.ndarray:
    """A page-locked float32 host array from the CUDA runtime the CUDA provider loaded; freed with the array."""
    from onnxruntime.capi.build_and_package_info import cuda_version

    cudart = _cuda_runtime(f"libcudart.so.{cuda_version.split('.')[0]}")
    count = int(np.prod(shape))
    pointer = ctypes.c_void_p()
    status = cudart.cudaHostAlloc(ctypes.byref(pointer), ctypes.c_size_t(max(count, 1) * 4), 0)
    if status != 0 or not pointer.value:
        raise ProviderUnavailable(f"cudaHostAlloc of {count * 4} bytes failed with CUDA error {status}")
    array = np.ctypeslib.as_array((ctypes.c_float * count).from_address(pointer.value)).reshape(shape)
    weakref.finalize(array, cudart.cudaFreeHost, ctypes.c_void_p(pointer.value))
    return array


@functools.cache
def _cuda_runtime(name: str) -> ctypes.CDLL:
    """The CUDA runtime library: the one the CUDA provider loaded, else the nvidia-* wheel's (the `gpu` extra)."""
    try:
        return ctypes.CDLL(name)
    except OSError:
        for root in map(Path, sys.path):
            for candidate in root.glob(f"nvidia/*/lib/{name}"):
                return ctypes.CDLL(str(candidate))
        raise ProviderUnavailable(f"pinned buffers need {name}, which is neither loaded nor installed") from None


def _nvidia_driver_present() -> bool:
    """Whether an NVIDIA kernel driver is visible (host or container with the NVIDIA runtime)."""
    return any(Path(path).exists() for path in ("/proc/driver/nvidia/version", "/dev/nvidiactl"))


def _preload_cuda_libraries() -> None:
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
