"""Shared fixtures (a tiny trained model, its export, a running server and a client), the tiers, hypothesis.

Every test is marked with its tier by its folder: tests/unit, tests/integration, tests/system
(`pytest -m unit` and so on). `make test` and `make test-fast` run the tests on two pytest-xdist workers
(the Makefile says how they are spread), and the model the tests share is built once per run. Hypothesis
runs the `ci` profile (what `make test` runs) unless `--hypothesis-profile dev` asks for fewer examples (what
`make test-fast` runs).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import file_lock, train_tiny_checkpoint

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
    # The tests that need no model first: one worker builds the shared model (about 12 s) while the other runs them.
    items.sort(key=lambda item: "tiny_checkpoint" in getattr(item, "fixturenames", ()))
    for item in items:
        tier = next((part for part in Path(str(item.path)).parts if part in TIERS), None)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/unit, tests/integration or tests/system")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE (latent_dim 20) trained briefly on real digits, saved as a checkpoint."""
    return _once_per_run(tmp_path_factory, "tiny", lambda folder: train_tiny_checkpoint(folder / "best.pt", 20))


@pytest.fixture(scope="session")
def exported_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_checkpoint` exported as version 1 of vae-mnist; returns `<repository>/vae-mnist` (read-only: tests
    that change a model directory take `model_dir`, a copy)."""
    from training.export import export

    return _once_per_run(tmp_path_factory, "models", lambda folder: export(tiny_checkpoint, folder, "vae-mnist").parent)


def _once_per_run(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """What `build(folder)` returns, built once per test run however many xdist workers share it.

    Each worker's temporary root is a folder of the run's (pytest-xdist's documented way to share a session
    fixture); the first worker to take the lock builds, the others wait and reuse what it built.
    """
    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    built = root / f"{name}.built"  # holds the path `build` returned, written once it succeeded
    with file_lock(root / f"{name}.lock"):
        if not built.exists():
            folder = root / name
            folder.mkdir(exist_ok=True)
            built.write_text(str(build(folder)))
    return Path(built.read_text())


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
