"""onnxruntime options the server does not take until a GPU measurement shows that they help, run in-process so
that `make gpu-check` (bench/gpu_serving.py's `limit` and `memory` steps) can measure them.

IOBinding, per graph run: `on` binds the outputs to the provider's device and copies them to the host after the
run; `pinned` binds them to reused host buffers, page-locked (cudaHostAlloc) under CUDA so that the
device-to-host copy is one DMA, and copies each run's outputs out of them. `off` is what the server does:
`session.run`.

CUDA provider options (the memory arena's growth and cap, CUDA graphs): `graph_session` builds a session with
the server's session options and the options given; the server passes none (onnxruntime's defaults).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from contract.repository import GraphSpec
from serving.dataplane.runtime import CPU, CUDA, RuntimeSettings, preload_cuda_libraries, session_options

IoBinding = Literal["off", "on", "pinned"]
IO_BINDINGS: tuple[IoBinding, ...] = ("off", "on", "pinned")
MIB = 1024 * 1024
# The CUDA memory arenas the memory step tries, as onnxruntime's CUDA provider options.
ARENAS: dict[str, dict[str, str]] = {
    "default": {},
    "same-as-requested": {"arena_extend_strategy": "kSameAsRequested"},  # grows by what a run needs, not doubling
    "same-as-requested, 256 MiB cap": {"arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": str(256 * MIB)},
}


def graph_session(
    spec: GraphSpec, provider: Literal["cuda", "cpu"], cuda_options: Mapping[str, str] | None = None, threads: int = 1
) -> ort.InferenceSession:
    """A session for one graph with the server's session options: on the CUDA provider with `cuda_options`
    (onnxruntime's defaults for what they leave out), or on the CPU provider."""
    options = session_options(RuntimeSettings(provider=provider, intra_op_threads=threads))
    if provider == "cpu":
        return ort.InferenceSession(spec.model_bytes, options, providers=[CPU])
    preload_cuda_libraries()
    return ort.InferenceSession(spec.model_bytes, options, providers=[(CUDA, dict(cuda_options or {}))])


class IoBoundGraph:
    """One graph run through onnxruntime IOBinding, numpy in and out, as a server would run it (`on` or `pinned`)."""

    def __init__(self, spec: GraphSpec, session: ort.InferenceSession, io_binding: Literal["on", "pinned"]) -> None:
        self.session = session
        self.io_binding = io_binding
        self.input_name = spec.inputs[0].name
        self.output_names = [output.name for output in spec.outputs]
        self.output_shapes = [tuple(int(d) for d in output.shape[1:]) for output in spec.outputs]  # after the batch
        self.device = "cuda" if session.get_providers()[0] == CUDA else "cpu"
        self._host_buffers: dict[int, list[np.ndarray]] = {}  # "pinned": output buffers by row count, reused
        # A server runs graphs from several threads: the lock it would need is part of what is measured.
        self._host_buffers_lock = threading.Lock()

    def run(self, rows: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for one batch of rows (float32, C-contiguous)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, rows)
        if self.io_binding == "on":
            for name in self.output_names:
                binding.bind_output(name, self.device)
            self.session.run_with_iobinding(binding)
            return list(binding.copy_outputs_to_cpu())
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
        return pinned_array(shape) if self.device == "cuda" else np.empty(shape, np.float32)


def pinned_array(shape: tuple[int, ...]) -> np.ndarray:
    """A page-locked float32 host array from the CUDA runtime the CUDA provider loaded; freed with the array."""
    from onnxruntime.capi.build_and_package_info import cuda_version

    cudart = cuda_runtime(f"libcudart.so.{cuda_version.split('.')[0]}")
    count = int(np.prod(shape))
    pointer = ctypes.c_void_p()
    status = cudart.cudaHostAlloc(ctypes.byref(pointer), ctypes.c_size_t(max(count, 1) * 4), 0)
    if status != 0 or not pointer.value:
        raise RuntimeError(f"cudaHostAlloc of {count * 4} bytes failed with CUDA error {status}")
    array = np.ctypeslib.as_array((ctypes.c_float * count).from_address(pointer.value)).reshape(shape)
    weakref.finalize(array, cudart.cudaFreeHost, ctypes.c_void_p(pointer.value))
    return array


@functools.cache
def cuda_runtime(name: str) -> ctypes.CDLL:
    """The CUDA runtime library: the one the CUDA provider loaded, else the nvidia-* wheel's (the `gpu` extra)."""
    try:
        return ctypes.CDLL(name)
    except OSError:
        for root in map(Path, sys.path):
            for candidate in root.glob(f"nvidia/*/lib/{name}"):
                return ctypes.CDLL(str(candidate))
        raise RuntimeError(f"pinned buffers need {name}, which is neither loaded nor installed") from None
