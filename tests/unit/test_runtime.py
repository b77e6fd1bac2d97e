"""onnxruntime sessions: provider choice, and graphs run from the verified bytes, not from the files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from contract.repository import load_version
from serving.dataplane.runtime import CPU, CUDA, GraphOptimization, ProviderUnavailable, RuntimeSettings, load_sessions


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
