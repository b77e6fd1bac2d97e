"""Shared fixtures (a tiny trained model, its export, a running server and a client), the tiers, hypothesis.

Every test is marked with its tier by its folder: tests/unit, tests/integration, tests/system
(`pytest -m unit` and so on). `make test` and `make test-fast` run the tests on two pytest-xdist workers
(the Makefile says how they are spread), and the model the tests share is built once and kept until what
makes it changes (`exported_repository`). Hypothesis
runs the `ci` profile (what `make test` runs) unless `--hypothesis-profile dev` asks for fewer examples (what
`make test-fast` runs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import ROOT, file_lock, train_tiny_checkpoint

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
def tiny_checkpoint(exported_repository: Path) -> Path:
    """A VAE (latent_dim 20) trained briefly on real digits, saved as a checkpoint (the one exported below)."""
    return exported_repository.parent.parent / "best.pt"


@pytest.fixture(scope="session")
def exported_repository() -> Path:
    """A tiny VAE trained and exported as version 1 of vae-mnist; returns `<repository>/vae-mnist`.

    Read-only: tests that change a model directory take `model_dir`, a copy. Built once and kept in
    build/test-cache/ under a digest of everything that makes it (training/, contract/, the tests' helpers
    and conftest, pyproject.toml's pins), so the edit loop trains and exports it again only when one of those
    changes (about 12 s); xdist's workers take turns on a lock, the first builds. Before it is used, the
    version is verified as the server would (checksums, signatures), so a damaged copy is built again.
    """
    from contract.repository import ModelRepositoryError, load_version
    from training.export import export

    folder = ROOT / "build" / "test-cache" / f"tiny-{_digest_of_what_builds_it()}"
    repository = folder / "models" / "vae-mnist"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f"{folder.name}.lock"):
        try:
            load_version(repository, 1)
            return repository
        except ModelRepositoryError:
            shutil.rmtree(folder, ignore_errors=True)
        building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        export(train_tiny_checkpoint(building / "best.pt", 20), building / "models", "vae-mnist")
        os.rename(building, folder)  # whole or not at all: a run killed meanwhile leaves only a hidden folder
    return repository


def _digest_of_what_builds_it() -> str:
    """sha256 (first 16 hex digits) of the sources that make the tiny model and its export."""
    sources = [*sorted((ROOT / "training").glob("*.py")), *sorted((ROOT / "contract").glob("*.py"))]
    sources += [ROOT / "tests" / "helpers.py", ROOT / "tests" / "conftest.py", ROOT / "pyproject.toml"]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


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
