"""The score arithmetic and the addressable draws, against independent references (torch, training.evaluate)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from contract import scores
from serving.dataplane.draws import normal_rows
from tests.helpers import bce_nats
from training.evaluate import iwae_bound


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**40), st.integers(1, 40), st.integers(1, 33))
def test_a_row_is_the_same_whatever_the_request_it_is_drawn_in(seed: int, offset: int, rows: int, dim: int) -> None:
    block = normal_rows(seed, offset, rows, dim)
    assert block.shape == (rows, dim) and block.dtype == np.float32
    for k in {0, rows // 2, rows - 1}:
        np.testing.assert_array_equal(normal_rows(seed, offset + k, 1, dim)[0], block[k])
    split = rows // 3
    np.testing.assert_array_equal(
        np.concatenate([normal_rows(seed, offset, split, dim), normal_rows(seed, offset + split, rows - split, dim)]),
        block,
    )


def test_draws_are_standard_normal_and_independent_across_rows_and_seeds() -> None:
    draws = normal_rows(0, 0, 20_000, 20).astype(np.float64)
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01
    assert abs(np.mean(draws**4) - 3) < 0.1  # normal kurtosis, not uniform's 1.8
    assert abs(np.corrcoef(draws[:-1, 0], draws[1:, 0])[0, 1]) < 0.03  # neighbouring rows unrelated
    assert not np.array_equal(normal_rows(1, 0, 4, 20), normal_rows(2, 0, 4, 20))


def test_reconstruction_equals_torch_binary_cross_entropy_including_its_clamp() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 28, 28)).astype(np.float32)
    decoded = rng.random((4, 1, 28, 28)).astype(np.float32)
    decoded[0, 0, 0, :3] = [0.0, 1.0, 0.5]  # certain pixels: torch clamps each log at -100
    np.testing.assert_allclose(scores.reconstruction_nats(images, decoded), bce_nats(images, decoded), rtol=1e-5)


def test_kl_is_zero_at_the_prior_and_matches_the_closed_form() -> None:
    assert scores.kl_nats(np.zeros((1, 5)), np.zeros((1, 5)))[0] == 0
    mu, log_var = np.array([[1.0, -2.0]]), np.array([[0.5, -1.0]])
    expected = sum(0.5 * (m * m + math.exp(v) - 1 - v) for m, v in zip(mu[0], log_var[0], strict=True))
    assert scores.kl_nats(mu, log_var)[0] == pytest.approx(expected)


def test_complexity_is_the_deflated_length_of_the_png_rows_in_nats() -> None:
    image = np.zeros((1, 1, 28, 28), np.float32)
    image[0, 0, 10:18, 12:16] = 1.0
    rows = b"".join(b"\0" + bytes(row) for row in np.rint(image[0, 0] * 255).astype(np.uint8))
    assert scores.complexity_nats(image)[0] == pytest.approx(8 * len(zlib.compress(rows, 9)) * math.log(2))


def _posterior_case(seed: int, draws: int, n: int = 3, d: int = 4) -> dict[str, np.ndarray]:
    """A small posterior and a decoder (sigmoid of a fixed linear map) evaluated at its draws and at its mean."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 1, 2, 2)) > 0.5).astype(np.float32)
    mu, log_var = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 0.3 - 1.0
    weights = rng.normal(size=(d, 4))
    eps = rng.normal(size=(draws, n, d))

    def decode(z: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-(z @ weights)))).reshape(*z.shape[:-1], 1, 2, 2)

    z = mu + np.exp(0.5 * log_var) * eps
    return {"images": images, "mu": mu, "log_var": log_var, "eps": eps, "at_draws": decode(z), "at_mean": decode(mu)}


def _score(case: dict[str, np.ndarray], with_iwae: bool = True) -> scores.ImageScores:
    return scores.score(
        case["images"], case["mu"], case["log_var"], case["eps"], case["at_draws"], case["at_mean"], with_iwae
    )


def test_iwae_and_the_negative_elbo_match_the_training_code_on_the_same_log_weights() -> None:
    case = _posterior_case(1, draws=7)
    z = case["mu"] + np.exp(0.5 * case["log_var"]) * case["eps"]
    log_px = -scores.reconstruction_nats(case["images"], case["at_draws"])
    log_pz = -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)
    log_q = -0.5 * (case["eps"] ** 2 + math.log(2 * math.pi) + case["log_var"]).sum(-1)
    weights = torch.tensor((log_px + log_pz - log_q).T)  # [N, K] as training.evaluate holds them
    result = _score(case)
    assert result.iwae is not None
    np.testing.assert_allclose(result.iwae, -iwae_bound(weights).numpy(), rtol=1e-10)
    np.testing.assert_allclose(result.negative_elbo, -weights.mean(1).numpy(), rtol=1e-10)  # iwae_neg_elbo's
    np.testing.assert_allclose(result.reconstruction, -log_px.mean(0), rtol=1e-10)


@given(st.integers(0, 2**32 - 1), st.integers(1, 64))
def test_iwae_is_never_above_the_negative_elbo_of_the_same_draws(seed: int, draws: int) -> None:
    result = _score(_posterior_case(seed, draws))
    assert result.iwae is not None
    assert (result.iwae <= result.negative_elbo + 1e-9).all()
    if draws == 1:  # one draw: the bound and the estimate are the same number
        np.testing.assert_allclose(result.iwae, result.negative_elbo, rtol=1e-12)


def test_the_negative_elbo_estimates_reconstruction_plus_the_exact_kl() -> None:
    """Its KL part comes from the draws; over many draws it is the closed form, so the estimate is unbiased."""
    result = _score(_posterior_case(2, draws=200_000), with_iwae=False)
    np.testing.assert_allclose(result.negative_elbo, result.reconstruction + result.kl, atol=0.02)
    assert result.iwae is None


def test_the_plugin_takes_the_reconstruction_at_the_mean_and_is_below_the_negative_elbo() -> None:
    case = _posterior_case(3, draws=4096)
    result = _score(case)
    expected = scores.reconstruction_nats(case["images"], case["at_mean"]) + scores.kl_nats(case["mu"], case["log_var"])
    np.testing.assert_allclose(result.plugin_negative_elbo, expected)
    np.testing.assert_allclose(
        scores.plugin_negative_elbo_nats(case["images"], case["mu"], case["log_var"], case["at_mean"]), expected
    )
    # This decoder's -log p(x|z) is convex in z (a logistic loss of a linear map): Jensen puts the plug-in below
    # the negative ELBO it is mistaken for.
    assert (result.plugin_negative_elbo < result.negative_elbo).all()
    np.testing.assert_allclose(result.corrected, result.negative_elbo - result.complexity)


@pytest.mark.parametrize("draws", [1, 3, 300])
def test_a_request_scored_in_parts_gets_the_numbers_of_one_piece(draws: int) -> None:
    """`score` works through large requests a few images at a time; the parts must join into the same figures."""
    case = _posterior_case(4, draws=draws, n=scores.SCORE_ROWS_AT_ONCE + 7)
    whole = _score(case)
    one_piece = scores._score(
        case["images"], case["mu"], case["log_var"], case["eps"], case["at_draws"], case["at_mean"], True
    )
    for name in ("negative_elbo", "reconstruction", "kl", "complexity", "latent_norm", "plugin_negative_elbo", "iwae"):
        np.testing.assert_allclose(getattr(whole, name), getattr(one_piece, name), rtol=1e-12, err_msg=name)
