"""Whole evaluations, thousands of importance samples each: against closed forms, and bounds on a trained model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import mnist_5k_images
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import Dataset, Split
from training.evaluate import evaluate, iwae_nll
from training.model import VAE, VAEConfig


def constant_vae(latent_dim: int, mu: float, log_var: float, logit: float) -> VAE:
    """A VAE whose encoder outputs (mu, log_var) for every image and whose decoder outputs `logit` for every
    pixel whatever z is: p(x|z) = p(x), the true posterior is the prior, and every figure has a closed form."""
    model = VAE(VAEConfig(latent_dim=latent_dim))
    with torch.no_grad():
        layers: list[tuple[Any, float]] = [(model.fc_mu, mu), (model.fc_log_var, log_var)]
        for layer, bias in [*layers, (model.decoder[-1], logit)]:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.constant_(layer.bias, bias)
    return model.eval()


def hand_dataset(images: torch.Tensor, labels: torch.Tensor) -> Dataset:
    split = Split(images, labels)
    return Dataset("hand", train=split, validation=split, test=split, test_is_validation=True)


def test_evaluator_matches_closed_form_for_a_constant_decoder() -> None:
    mu, log_var, logit, latent_dim = 0.3, -0.4, 0.7, 2
    images = (torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    ones = images.flatten(1).sum(1).numpy()
    # -log p(x) = -Σ_pixels [x log σ(c) + (1 - x) log(1 - σ(c))], by hand
    log_sigmoid, log_one_minus = math.log(1 / (1 + math.exp(-logit))), math.log(1 - 1 / (1 + math.exp(-logit)))
    nll = float(np.mean(-(ones * log_sigmoid + (784 - ones) * log_one_minus)))
    kl_per_dim = -0.5 * (1 + log_var - mu**2 - math.exp(log_var))

    result = evaluate(
        constant_vae(latent_dim, mu, log_var, logit),
        hand_dataset(images, torch.arange(6) % 2),
        iwae_samples=4000,
        iwae_images=6,
        knn_k=1,
    )

    assert result["reconstruction"] == pytest.approx(nll, rel=1e-5)
    assert result["kl_per_dim"] == pytest.approx([kl_per_dim] * latent_dim, abs=1e-4)
    assert result["neg_elbo"] == pytest.approx(nll + latent_dim * kl_per_dim, rel=1e-5)
    # log w = log p(x) + log p(z)/q(z|x); the mean over z ~ q of p(z)/q(z|x) is 1, so IWAE → -log p(x) exactly
    assert result["iwae_nll"] == pytest.approx(nll, abs=0.02)
    assert result["iwae_neg_elbo"] == pytest.approx(nll + latent_dim * kl_per_dim, abs=0.05)
    assert result["active_units"] == 0  # the means never vary with x


def test_iwae_is_at_most_the_negative_elbo_on_a_trained_model(tiny_checkpoint: Path) -> None:
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    images = mnist_5k_images(10)
    nll, neg_elbo = iwae_nll(model, images, samples=300)
    assert nll < neg_elbo  # Jensen: log mean w >= mean log w, strictly unless the weights are all equal
    result = evaluate(model, hand_dataset(images, torch.arange(10)), iwae_samples=300, iwae_images=10)
    assert result["iwae_nll"] == nll
    assert nll < float(result["neg_elbo"])  # type: ignore[arg-type]
