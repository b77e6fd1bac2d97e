"""The client's results: each is frozen and names the version that answered its own call (and a sample its seed
and rows), so calls from many threads on one client cannot mix their answers up."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.api import SERVICE_METHODS
from serving.client import Samples, VaeClient
from serving.dataplane.draws import normal_rows
from tests.helpers import ServerThread, publish_copy, running_server

LATENT_DIM = 20


def every_call(client: VaeClient) -> dict[str, Any]:
    """The result of one call of each VaeService method, by the method's name."""
    images = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    latents = np.random.default_rng(1).standard_normal((2, LATENT_DIM)).astype(np.float32)
    (streamed,) = client.sample_stream(2, seed=1)  # two rows: one chunk
    return {
        "Encode": client.encode(images),
        "Decode": client.decode(latents),
        "Sample": client.sample(2, seed=1),
        "SampleStream": streamed,
        "Interpolate": client.interpolate(latents[:1], latents[1:], steps=3),
        "Score": client.score(images),
        "Reconstruct": client.reconstruct(images),
        "Traverse": client.traverse(latents[:1], dimensions=[0], steps=2),
        "GetModelInfo": client.model_info(),
    }


@pytest.fixture(scope="module")
def two_versions(exported_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server of versions 1 and 2 (the same graphs); its default route is version 2, the latest."""
    model_dir = Path(shutil.copytree(exported_repository, tmp_path_factory.mktemp("two-versions") / "vae-mnist"))
    publish_copy(model_dir, 2)
    with running_server(model_dir, version_policy="latest:2") as server:
        yield server


def test_every_result_names_the_version_that_answered(two_versions: ServerThread) -> None:
    methods = set(SERVICE_METHODS) - {"CompareVersions"}  # it reports on a candidate (tests/integration/test_canary.py)
    with VaeClient(two_versions.target) as client:
        for view, expected in ((client, 2), (client.using(model_version=1), 1), (client.using(model_version=2), 2)):
            results = every_call(view)
            assert set(results) == methods  # a new RPC gets its line in every_call
            assert {name: result.model_version for name, result in results.items()} == dict.fromkeys(methods, expected)
            assert results["Reconstruct"].scores.model_version == expected


def test_results_are_frozen(vae_client: VaeClient) -> None:
    results = every_call(vae_client)
    for name, result in [*results.items(), ("Reconstruct.scores", results["Reconstruct"].scores)]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.model_version = 7
        assert result.model_version == 1, name


def test_scores_have_one_plugin_negative_elbo_per_image(vae_client: VaeClient) -> None:
    images = np.random.default_rng(2).random((3, 1, 28, 28), dtype=np.float32)
    for scores in (vae_client.score(images), vae_client.reconstruct(images).scores):
        assert scores.plugin_negative_elbo.shape == (3,) and scores.plugin_negative_elbo.dtype == np.float64


def test_a_sample_names_its_seed_and_first_row(vae_client: VaeClient) -> None:
    drawn = vae_client.sample(3, seed=12, offset=5)
    assert (drawn.seed, drawn.offset, drawn.model_version) == (12, 5, 1)
    np.testing.assert_array_equal(drawn.latents, normal_rows(12, 5, 3, LATENT_DIM))


def assert_consecutive_rows_of_one_seed(chunks: list[Samples], offset: int, rows: int) -> None:
    """The chunks are rows offset .. offset + rows - 1 of one seed's sequence, in order, each naming its first."""
    assert len(chunks) > 1 and sum(len(chunk.latents) for chunk in chunks) == rows
    assert len({chunk.seed for chunk in chunks}) == 1
    first_rows = offset + np.cumsum([0] + [len(chunk.latents) for chunk in chunks[:-1]])
    assert [chunk.offset for chunk in chunks] == first_rows.tolist()
    for chunk in chunks:
        expected = normal_rows(chunk.seed, chunk.offset, len(chunk.latents), LATENT_DIM)
        np.testing.assert_array_equal(chunk.latents, expected)


def test_sample_stream_chunks_carry_consecutive_offsets_of_one_seed(vae_client: VaeClient) -> None:
    seeded = list(vae_client.sample_stream(150, seed=3, offset=7))
    assert_consecutive_rows_of_one_seed(seeded, offset=7, rows=150)
    assert seeded[0].seed == 3 and {chunk.model_version for chunk in seeded} == {1}
    assert_consecutive_rows_of_one_seed(list(vae_client.sample_stream(150)), offset=0, rows=150)  # the server's seed


def test_threads_sharing_one_client_each_get_their_own_call_s_seed_and_version(two_versions: ServerThread) -> None:
    with VaeClient(two_versions.target) as client:
        views = {version: client.using(model_version=version) for version in (1, 2)}

        def call(i: int) -> tuple[int, int | None, Samples]:
            seed = i if i % 3 else None  # every third call lets the server draw the seed
            return i, seed, views[1 + i % 2].sample(2, seed=seed)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(48)))
    for i, seed, drawn in results:
        assert drawn.model_version == 1 + i % 2
        assert seed is None or drawn.seed == seed
        np.testing.assert_array_equal(drawn.latents, normal_rows(drawn.seed, 0, 2, LATENT_DIM))
    assert len({drawn.seed for _, seed, drawn in results if seed is None}) == 16  # drawn anew for each call
