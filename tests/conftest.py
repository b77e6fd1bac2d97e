"""Shared fixtures (a tiny trained model, its export, a running server and a client), the tiers, hypothesis.

Every test is marked with its tier by its folder: tests/unit, tests/integration, tests/system
(`pytest -m unit` and so on). Hypothesis runs the `ci` profile (what `make test` runs) unless
`--hypothesis-profile dev` asks for fewer examples (what `make test-fast` runs).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import train_tiny_checkpoint

if TYPE_CHECKING:
    from serving.client import VaeClient
    from tests.helpers import ServerThread

TIERS = ("unit", "integration", "system")

# No per-example deadline (the machine may be slow); the same examples on every run.
_BASE = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("ci", _BASE, max_examples=60)
settings.register_profile("dev", _BASE, max_examples=12)
settings.load_profile("ci")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = next((part for part in Path(str(item.path)).parts if part in TIERS), None)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/unit, tests/integration or tests/system")
        item.add_marker(getattr(pytest.mark, tier))


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


@pytest.fixture
def model_dir(exported_repository: Path, tmp_path: Path) -> Path:
    """A model directory of the test's own holding version 1 (a copy of `exported_repository`), to change."""
    return Path(shutil.copytree(exported_repository, tmp_path / "models" / "vae-mnist"))


@pytest.fixture(scope="session")
def vae_server(exported_repository: Path) -> Iterator[ServerThread]:
    """A real grpc.aio server for `exported_repository` on a free 127.0.0.1 port (in-process, own event loop)."""
    from tests.helpers import ServerThread, server_config

    server = ServerThread(server_config(exported_repository))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vae_client(vae_server: ServerThread) -> Iterator[VaeClient]:
    """The public client, connected to `vae_server`."""
    from serving.client import VaeClient

    with VaeClient(vae_server.target, timeout_s=30.0) as client:
        yield client
