"""Shared fixtures: a tiny trained VAE checkpoint, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import train_tiny_checkpoint

if TYPE_CHECKING:
    from serving.client import VaeClient
    from tests.serving_helpers import ServerThread


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


@pytest.fixture(scope="session")
def vae_server(exported_repository: Path) -> Iterator[ServerThread]:
    """A real grpc.aio server for `exported_repository` on a free 127.0.0.1 port (in-process, own event loop)."""
    from tests.serving_helpers import ServerThread, server_config

    server = ServerThread(server_config(exported_repository))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vae_client(vae_server: ServerThread) -> Iterator[VaeClient]:
    """The public client, connected to `vae_server`."""
    from serving.client import VaeClient

    with VaeClient(vae_server.target, timeout_s=30.0) as client:
        yield client
