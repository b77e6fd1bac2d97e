"""Shared fixtures: a tiny trained VAE checkpoint, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import train_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE (latent_dim 20) trained briefly on real digits, saved as a checkpoint."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "best.pt", latent_dim=20)


@pytest.fixture(scope="session")
def exported_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_checkpoint` exported as version 1 of vae-mnist; returns `<repository>/vae-mnist`."""
    from training.export import export

    repository = tmp_path_factory.mktemp("models")
    export(tiny_checkpoint, repository, "vae-mnist")
    return repository / "vae-mnist"
