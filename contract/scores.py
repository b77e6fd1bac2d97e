"""How well the model explains an image, in nats, from the graphs' outputs: numpy in, numpy out.

With S posterior draws z_s = mu + exp(log_var / 2)·eps_s per image and log weights
log w_s = log p(x|z_s) + log p(z_s) − log q(z_s|x):

- reconstruction: E_q[−log p(x|z)], the decoder's Bernoulli pixels (binary cross-entropy summed over pixels,
  each log clamped at −100 as PyTorch's BCE does), averaged over the draws.
- kl: KL(N(mu, exp(log_var)) || N(0, I)), in closed form.
- negative ELBO: −(1/S) Σ_s log w_s, the standard S-sample estimate of E_q[−log p(x|z)] + KL. Its KL part is
  estimated from the same draws (its expectation is `kl`), so that it and iwae come from one set of log
  weights and iwae ≤ negative ELBO holds for every image (Jensen), not only on average.
- iwae: −log (1/S) Σ_s w_s, the importance-weighted bound (Burda et al.): tighter, approaching −log p(x).
- plug-in: −log p(x | z = mu) + kl, the reconstruction at the posterior mean instead of averaged. Neither a
  bound nor the negative ELBO (on a trained model usually below both), but deterministic and one decoder
  pass: what the drift telemetry and the manifest's baseline quantiles use, so that a shift they show is the
  inputs', not Monte Carlo noise (export and the server both call `plugin_negative_elbo_nats`).
- complexity: L(x), the image as 8-bit pixels compressed with DEFLATE (zlib level 9, PNG's coder, one filter
  byte per row as in a PNG without its fixed-size headers), in nats. Serrà et al. (ICLR 2020) subtract it:
  corrected = negative ELBO − L(x), because raw likelihood ranks simple images as the most likely whatever
  the training data was.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields

import numpy as np

LOG_CLAMP = -100.0  # PyTorch's binary_cross_entropy clamps each log at -100
# The quantiles of the plug-in score a manifest's baseline holds (export writes them, /metrics exports them),
# keyed by quantile_key(q) in model.json and in the gauge's `quantile` label.
BASELINE_QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)
# `score` works through a request this many decoded rows at a time: float64 temporaries of ~6 KB a row.
SCORE_ROWS_AT_ONCE = 256
_LOG_2PI = math.log(2.0 * math.pi)
_NATS_PER_BIT = math.log(2.0)


@dataclass(frozen=True)
class ImageScores:
    """Per-image figures, each [N] float64 (iwae None unless importance samples were asked for)."""

    negative_elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    complexity: np.ndarray
    latent_norm: np.ndarray
    plugin_negative_elbo: np.ndarray
    iwae: np.ndarray | None = None

    @property
    def corrected(self) -> np.ndarray:
        return self.negative_elbo - self.complexity


def quantile_key(quantile: float) -> str:
    """0.99 → "0.99": how a baseline quantile is named in model.json and in /metrics."""
    return f"{quantile:g}"


def reconstruction_nats(images: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """−log p(x|z) per image: images [N, ...] in [0, 1] and Bernoulli means decoded [..., N, ...] → [..., N]."""
    x = images.astype(np.float64).reshape(images.shape[0], -1)
    p = decoded.astype(np.float64).reshape(*decoded.shape[: decoded.ndim - images.ndim + 1], -1)
    with np.errstate(divide="ignore"):
        log_p = np.maximum(np.log(p), LOG_CLAMP)
        log_not_p = np.maximum(np.log1p(-p), LOG_CLAMP)
    return -(x * log_p + (1.0 - x) * log_not_p).sum(axis=-1)


def kl_nats(mu: np.ndarray, log_var: np.ndarray) -> np.ndarray:
    """KL(q(z|x) || N(0, I)) per row, [N]."""
    mu, log_var = mu.astype(np.float64), log_var.astype(np.float64)
    return 0.5 * (mu * mu + np.exp(log_var) - 1.0 - log_var).sum(axis=-1)


def plugin_negative_elbo_nats(
    images: np.ndarray, mu: np.ndarray, log_var: np.ndarray, decoded_mean: np.ndarray
) -> np.ndarray:
    """The plug-in score, [N]: −log p(x | z = mu) + KL (decoded_mean: the decoder's output at mu)."""
    return reconstruction_nats(images, decoded_mean) + kl_nats(mu, log_var)


def complexity_nats(images: np.ndarray) -> np.ndarray:
    """L(x) per image: DEFLATE-compressed length of its 8-bit rows (a PNG's image data, filter 0), in nats."""
    pixels = np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(images.shape[0], -1, images.shape[-1])
    rows = np.concatenate([np.zeros((*pixels.shape[:2], 1), np.uint8), pixels], axis=2)  # PNG's filter byte
    return np.array([8 * len(zlib.compress(image.tobytes(), 9)) * _NATS_PER_BIT for image in rows])


def log_weights(reconstruction: np.ndarray, mu: np.ndarray, log_var: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """log p(x|z_s) + log p(z_s) − log q(z_s|x), [S, N], for z_s = mu + exp(log_var / 2)·eps_s.

    reconstruction [S, N]: −log p(x|z_s) (`reconstruction_nats` of the decoder's output at each z_s); eps [S, N, D].
    """
    mu64, log_var64, eps64 = mu.astype(np.float64), log_var.astype(np.float64), eps.astype(np.float64)
    z = mu64 + np.exp(0.5 * log_var64) * eps64
    log_pz = -0.5 * (z * z + _LOG_2PI).sum(axis=-1)
    log_qz_x = -0.5 * (eps64 * eps64 + _LOG_2PI + log_var64).sum(axis=-1)
    return -reconstruction + log_pz - log_qz_x


def negative_elbo_nats(weights: np.ndarray) -> np.ndarray:
    """−(1/S) Σ_s log w_s per image from log weights [S, N]: the S-sample negative ELBO, [N]."""
    return -weights.mean(axis=0)


def iwae_nats(weights: np.ndarray) -> np.ndarray:
    """−log (1/S) Σ_s w_s per image from log weights [S, N]: the importance-weighted bound, [N]."""
    top = weights.max(axis=0)
    return -(top + np.log(np.exp(weights - top).mean(axis=0)))


def score(
    images: np.ndarray,
    mu: np.ndarray,
    log_var: np.ndarray,
    eps: np.ndarray,
    decoded_draws: np.ndarray,
    decoded_mean: np.ndarray,
    with_iwae: bool,
) -> ImageScores:
    """Every figure for images [N, ...] from their posterior (mu, log_var), the S draws eps [S, N, D], the
    decoder's outputs at those draws [S, N, ...] and at the mean [N, ...]; iwae only `with_iwae`.

    Computed a few images at a time (about SCORE_ROWS_AT_ONCE draws), so the float64 temporaries of a large
    request stay a few MB whatever N and S are.
    """
    step = max(1, SCORE_ROWS_AT_ONCE // eps.shape[0])
    parts = [
        _score(
            images[i : i + step],
            mu[i : i + step],
            log_var[i : i + step],
            eps[:, i : i + step],
            decoded_draws[:, i : i + step],
            decoded_mean[i : i + step],
            with_iwae,
        )
        for i in range(0, images.shape[0], step)
    ]
    if len(parts) == 1:
        return parts[0]

    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(part, name) for part in parts])

    columns = {column.name: joined(column.name) for column in fields(ImageScores) if column.name != "iwae"}
    return ImageScores(**columns, iwae=joined("iwae") if with_iwae else None)


def _score(
    images: np.ndarray,
    mu: np.ndarray,
    log_var: np.ndarray,
    eps: np.ndarray,
    decoded_draws: np.ndarray,
    decoded_mean: np.ndarray,
    with_iwae: bool,
) -> ImageScores:
    reconstruction = reconstruction_nats(images, decoded_draws)  # [S, N]
    weights = log_weights(reconstruction, mu, log_var, eps)
    kl = kl_nats(mu, log_var)
    return ImageScores(
        negative_elbo=negative_elbo_nats(weights),
        reconstruction=reconstruction.mean(axis=0),
        kl=kl,
        complexity=complexity_nats(images),
        latent_norm=np.linalg.norm(mu.astype(np.float64), axis=-1),
        plugin_negative_elbo=reconstruction_nats(images, decoded_mean) + kl,
        iwae=iwae_nats(weights) if with_iwae else None,
    )
