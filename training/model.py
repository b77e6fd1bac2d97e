"""The convolutional VAE of the classic MNIST tutorial, and its loss.

Encoder: Conv(1→32, s2) → Conv(32→64, s2) → Linear(3136→256) → (mu, log_var) of size `latent_dim`.
Decoder: Linear(latent_dim→256) → Linear(256→3136) → ConvTranspose(64→32, s2) → ConvTranspose(32→1, s2).

The decoder returns logits: training uses `binary_cross_entropy_with_logits` (numerically stable and safe
under autocast), and `decode` applies the Sigmoid for images in [0, 1]; the exported decoder graph is `decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# log_var is clamped before exp(): exp(±30) keeps variances within float32 with room to spare, and no
# trained encoder gets near the bounds, so the clamp only guards against divergence.
LOG_VAR_MIN = -30.0
LOG_VAR_MAX = 20.0


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild the network; stored in every checkpoint as `model_args`."""

    latent_dim: int = 20  # size of z
    hidden_dim: int = 256  # width of the dense layer between the convolutions and (mu, log_var)
    image_channels: int = 1  # MNIST-style images are [1, 28, 28]
    image_size: int = 28

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.image_size % 4 != 0:
            raise ValueError(f"image_size must be divisible by 4 (two stride-2 layers), got {self.image_size}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class LossTerms:
    """Per-image averages over the batch, in nats: total = reconstruction + beta * kl."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


class VAE(nn.Module):
    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or VAEConfig()
        c = self.config
        feature_size = c.image_size // 4
        flat = 64 * feature_size * feature_size  # 3136 for 28x28
        self.encoder = nn.Sequential(
            nn.Conv2d(c.image_channels, 32, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(flat, c.hidden_dim),
            nn.ReLU(),
        )
        self.fc_mu = nn.Linear(c.hidden_dim, c.latent_dim)
        self.fc_log_var = nn.Linear(c.hidden_dim, c.latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(c.latent_dim, c.hidden_dim),
            nn.ReLU(),
            nn.Linear(c.hidden_dim, flat),
            nn.ReLU(),
            nn.Unflatten(1, (64, feature_size, feature_size)),
            nn.ConvTranspose2d(64, 32, kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, c.image_channels, kernel_size=3, stride=2, padding=1, output_padding=1),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [N, C, H, W] in [0, 1] → (mu, log_var), each [N, latent_dim]; log_var is clamped."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_log_var(h).clamp(LOG_VAR_MIN, LOG_VAR_MAX)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, latent_dim] → Bernoulli logits [N, C, H, W]."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, latent_dim] → images [N, C, H, W] in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images → (reconstruction logits, mu, log_var), sampling z by the reparameterization trick."""
        mu, log_var = self.encode(x)
        z = reparameterize(mu, log_var)
        return self.decode_logits(z), mu, log_var


def reparameterize(mu: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + exp(log_var / 2) * eps with eps ~ N(0, I): differentiable in mu and log_var."""
    if eps is None:
        eps = torch.randn_like(mu)
    return mu + torch.exp(0.5 * log_var) * eps


def kl_divergence(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, I)) per latent dimension, shape [N, latent_dim]."""
    return -0.5 * (1 + log_var - mu.pow(2) - log_var.exp())


def vae_loss(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor, beta: float = 1.0
) -> LossTerms:
    """Negative beta-ELBO per image: BCE summed over pixels + beta * KL summed over latents, batch mean."""
    batch = x.shape[0]
    reconstruction = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="sum") / batch
    kl = kl_divergence(mu.float(), log_var.float()).sum() / batch
    return LossTerms(total=reconstruction + beta * kl, reconstruction=reconstruction, kl=kl)
