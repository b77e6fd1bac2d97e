"""The VAE's shapes, loss terms and reparameterization."""

from __future__ import annotations

import pytest
import torch

from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from training.model import VAE, VAEConfig, kl_divergence, reparameterize, vae_loss


@pytest.mark.parametrize("latent_dim", [2, 20, 32])
def test_shapes_follow_latent_dim(latent_dim: int) -> None:
    model = VAE(VAEConfig(latent_dim=latent_dim))
    x = torch.rand(5, 1, 28, 28)
    logits, mu, log_var = model(x)
    assert logits.shape == x.shape
    assert mu.shape == log_var.shape == (5, latent_dim)
    images = model.decode(torch.randn(3, latent_dim))
    assert images.shape == (3, 1, 28, 28)
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_architecture_is_the_tutorials() -> None:
    model = VAE()
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [(1, 32, (2, 2)), (32, 64, (2, 2))]
    dense = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(3136, 256)]
    assert model.fc_mu.out_features == model.fc_log_var.out_features == 20


def test_kl_of_standard_normal_is_zero() -> None:
    mu, log_var = torch.zeros(4, 20), torch.zeros(4, 20)
    assert torch.equal(kl_divergence(mu, log_var), torch.zeros(4, 20))


def test_analytic_kl_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    mu, log_var = torch.randn(1, 3), torch.randn(1, 3) * 0.5
    z = reparameterize(mu.expand(200_000, 3), log_var.expand(200_000, 3))
    q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(0.0, 1.0)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(monte_carlo, kl_divergence(mu, log_var)[0], atol=0.02, rtol=0.02)


def test_reparameterization_passes_gradients_to_mu_and_log_var() -> None:
    mu = torch.zeros(2, 4, requires_grad=True)
    log_var = torch.zeros(2, 4, requires_grad=True)
    eps = torch.full((2, 4), 0.5)
    reparameterize(mu, log_var, eps).sum().backward()
    assert mu.grad is not None and torch.equal(mu.grad, torch.ones(2, 4))
    # d/dlog_var of exp(log_var/2) * eps at log_var = 0 is eps / 2
    assert log_var.grad is not None and torch.allclose(log_var.grad, torch.full((2, 4), 0.25))


def test_loss_is_bce_sum_plus_beta_kl_per_image() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    logits, mu, log_var = torch.randn(4, 1, 28, 28), torch.randn(4, 20), torch.randn(4, 20)
    terms = vae_loss(logits, x, mu, log_var, beta=4.0)
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum") / 4
    kl = (-0.5 * (1 + log_var - mu**2 - log_var.exp())).sum() / 4
    torch.testing.assert_close(terms.reconstruction, bce, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms.kl, kl)
    torch.testing.assert_close(terms.total, bce + 4.0 * kl, rtol=1e-4, atol=1e-3)


def test_log_var_is_clamped_before_exp() -> None:
    model = VAE()
    with torch.no_grad():
        model.fc_log_var.bias.fill_(1e4)
    _, log_var = model.encode(torch.rand(2, 1, 28, 28))
    assert torch.isfinite(log_var.exp()).all()


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path) -> None:
    model = VAE(VAEConfig(latent_dim=7)).eval()
    save_checkpoint(tmp_path / "c.pt", model, dataset="mnist-5k", epoch=3)
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    rebuilt = model_from_checkpoint(checkpoint)
    z = torch.randn(3, 7)
    assert rebuilt.config == model.config and checkpoint["epoch"] == 3
    torch.testing.assert_close(rebuilt.decode(z), model.decode(z), rtol=0, atol=0)


def test_corrupt_checkpoint_is_refused_with_a_clear_error(tmp_path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
