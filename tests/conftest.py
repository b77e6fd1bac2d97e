"""Shared fixtures: a tiny trained VAE checkpoint, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import train_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE (latent_dim 20) trained briefly on real digits, saved as a checkpoint."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "best.pt", latent_dim=20)
