"""Paths between latent vectors: linear and spherical (slerp) interpolation, as plain numpy.

The one implementation: the server's Interpolate and training's interpolation pictures both call it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Method = Literal["linear", "slerp"]

# Below this value of sin(omega), omega the angle between two latents, slerp's division by sin(omega) is
# ill-conditioned: for nearly parallel vectors the arc is indistinguishable from the chord, and for
# opposite vectors (omega = pi) no great circle is singled out. Such pairs are interpolated linearly.
SLERP_MIN_SIN = 1e-4


def interpolate(start: np.ndarray, end: np.ndarray, steps: int, method: str = "linear") -> np.ndarray:
    """Points from `start` [P,D] to `end` [P,D] at a = linspace(0, 1, steps): [P, steps, D] float32.

    linear: (1 - a)·z0 + a·z1.  slerp: sin((1-a)ω)/sin ω·z0 + sin(aω)/sin ω·z1 with ω the angle between z0
    and z1; linear where sin ω < SLERP_MIN_SIN (parallel or opposite vectors) or either vector is zero.
    """
    if method not in ("linear", "slerp"):
        raise ValueError(f"unknown interpolation method {method!r}: use 'linear' or 'slerp'")
    z0 = np.asarray(start, dtype=np.float64)[:, None, :]
    z1 = np.asarray(end, dtype=np.float64)[:, None, :]
    a = np.linspace(0.0, 1.0, steps)[None, :, None]
    linear = (1.0 - a) * z0 + a * z1
    if method == "linear":
        return linear.astype(np.float32)
    norms = np.linalg.norm(z0, axis=-1, keepdims=True) * np.linalg.norm(z1, axis=-1, keepdims=True)
    cosine = np.sum(z0 * z1, axis=-1, keepdims=True) / np.where(norms > 0, norms, 1.0)
    omega = np.arccos(np.clip(cosine, -1.0, 1.0))  # [P,1,1]
    sin_omega = np.sin(omega)
    use_slerp = (norms > 0) & (sin_omega >= SLERP_MIN_SIN)
    sin_omega = np.where(use_slerp, sin_omega, 1.0)
    spherical = (np.sin((1.0 - a) * omega) * z0 + np.sin(a * omega) * z1) / sin_omega
    return np.where(use_slerp, spherical, linear).astype(np.float32)
