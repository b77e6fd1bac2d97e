"""onnxruntime sessions: provider choice, and graphs run from the verified bytes, not from the files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from contract.repository import load_version
from serving.dataplane.runtime import (
    CPU,
    CUDA,
    GraphOptimization,
    IoBinding,
    ProviderUnavailable,
    RuntimeSettings,
    load_sessions,
)


def test_cpu_provider_runs_both_graphs(exported_repository: Path) -> None:
    runtime = load_sessions(load_version(exported_repository), RuntimeSettings(provider="cpu", intra_op_threads=1))
    assert runtime.provider == CPU
    mu, log_var = runtime.encoder.run(np.zeros((3, 1, 28, 28), np.float32))
    (images,) = runtime.decoder.run(mu)
    assert mu.shape == log_var.shape == (3, 20) and images.shape == (3, 1, 28, 28)


def test_auto_uses_cuda_only_where_the_session_really_gets_it(exported_repository: Path) -> None:
    version = load_version(exported_repository)
    try:
        cuda = load_sessions(version, RuntimeSettings(provider="cuda", intra_op_threads=1))
    except ProviderUnavailable as error:  # this machine: no usable GPU
        assert str(error).startswith("provider cuda requested but")
        assert load_sessions(version, RuntimeSettings(provider="auto", intra_op_threads=1)).provider == CPU
    else:
        assert cuda.provider == CUDA
        assert load_sessions(version, RuntimeSettings(provider="auto", intra_op_threads=1)).provider == CUDA


def test_sessions_come_from_the_verified_bytes(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "vae-mnist"
    shutil.copytree(exported_repository, model_dir)
    runtime = load_sessions(load_version(model_dir), RuntimeSettings(provider="cpu", intra_op_threads=1))
    latents = np.random.default_rng(0).standard_normal((2, 20)).astype(np.float32)
    (before,) = runtime.decoder.run(latents)
    shutil.rmtree(model_dir)  # the directory goes away (or is replaced) while serving
    (after,) = runtime.decoder.run(latents)
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("level", ["all", "disable"])
def test_graph_optimization_levels_give_the_same_images(exported_repository: Path, level: GraphOptimization) -> None:
    version = load_version(exported_repository)
    reference = load_sessions(version, RuntimeSettings(provider="cpu", intra_op_threads=1))
    runtime = load_sessions(version, RuntimeSettings(provider="cpu", intra_op_threads=1, graph_optimization=level))
    latents = np.random.default_rng(1).standard_normal((4, 20)).astype(np.float32)
    np.testing.assert_allclose(runtime.decoder.run(latents)[0], reference.decoder.run(latents)[0], atol=1e-5)


@pytest.mark.parametrize("io_binding", ["on", "pinned"])
def test_io_binding_gives_the_images_of_session_run(exported_repository: Path, io_binding: IoBinding) -> None:
    version = load_version(exported_repository)
    reference = load_sessions(version, RuntimeSettings(provider="cpu", intra_op_threads=1))
    bound = load_sessions(version, RuntimeSettings(provider="cpu", intra_op_threads=1, io_binding=io_binding))
    latents = np.random.default_rng(2).standard_normal((5, 20)).astype(np.float32)
    (images,) = bound.decoder.run(latents)
    np.testing.assert_array_equal(images, reference.decoder.run(latents)[0])
    bound.decoder.run(-latents)  # the same row count again: "pinned" reuses its output buffers
    np.testing.assert_array_equal(images, reference.decoder.run(latents)[0])  # a returned result stays put
    for ours, theirs in zip(bound.encoder.run(images), reference.encoder.run(images), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_cuda_arena_settings_become_cuda_provider_options() -> None:
    assert RuntimeSettings().cuda_provider_options() == {"arena_extend_strategy": "kNextPowerOfTwo"}
    capped = RuntimeSettings(cuda_mem_limit_bytes=1 << 28, cuda_arena_extend_strategy="same-as-requested")
    assert capped.cuda_provider_options() == {"arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": "268435456"}
