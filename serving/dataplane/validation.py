"""Request checks as plain functions: numpy and numbers in, a clean float32 array or value out.

Each failure raises `InvalidRequest` with a message that says what was wrong and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from serving.errors import InvalidRequest

MAX_TEMPERATURE = 10.0
# Latents are draws near N(0, I); far beyond it the decoder's activations overflow float32 and it returns NaN
# images (found by tests/integration/test_fuzz.py with latents of 3e38). 1e4 standard deviations is far past any use.
MAX_ABS_LATENT = 1e4


def check_count(count: int, maximum: int, field: str) -> int:
    """1 <= count <= maximum."""
    if count < 1:
        raise InvalidRequest(f"{field} must be at least 1, got {count}")
    if count > maximum:
        raise InvalidRequest(f"{field} is {count}, more than this server's limit of {maximum} per request")
    return count


def _check_finite(array: np.ndarray, field: str) -> None:
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InvalidRequest(f"{field} contains {bad} NaN or infinite values; all values must be finite")


def check_images(images: np.ndarray, image_shape: tuple[int, ...], max_items: int, field: str = "images") -> np.ndarray:
    """[N, *image_shape] float32 in [0, 1] or uint8 → float32 in [0, 1]."""
    if images.ndim != 1 + len(image_shape) or tuple(images.shape[1:]) != tuple(image_shape):
        expected = ", ".join(map(str, image_shape))
        raise InvalidRequest(f"{field} has shape {list(images.shape)}; expected [N, {expected}]")
    check_count(images.shape[0], max_items, f"{field}: the number of images")
    if images.dtype == np.uint8:  # one pass, one new array (not astype, then a scaled copy of it)
        return np.multiply(images, np.float32(1.0 / 255.0), dtype=np.float32)
    if images.dtype != np.float32:
        raise InvalidRequest(f"{field} has dtype {images.dtype}; expected FLOAT32 or UINT8")
    # min and max carry NaN and infinities through, so they check finiteness too; the exact count of bad
    # values is worked out only for the message.
    low, high = float(images.min()), float(images.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        _check_finite(images, field)
    if low < 0.0 or high > 1.0:
        raise InvalidRequest(
            f"{field} has values in [{low:g}, {high:g}]; FLOAT32 images must lie in [0, 1] (or send UINT8 0..255)"
        )
    return images


def check_latents(latents: np.ndarray, latent_dim: int, max_items: int, field: str = "latents") -> np.ndarray:
    """[N, latent_dim] finite float32, each value within ±MAX_ABS_LATENT."""
    if latents.ndim != 2 or latents.shape[1] != latent_dim:
        raise InvalidRequest(
            f"{field} has shape {list(latents.shape)}; expected [N, {latent_dim}] (latent_dim {latent_dim})"
        )
    check_count(latents.shape[0], max_items, f"{field}: the number of latents")
    if latents.dtype != np.float32:
        raise InvalidRequest(f"{field} has dtype {latents.dtype}; latents must be FLOAT32")
    largest = float(np.abs(latents).max())  # NaN and infinities carry through: one pass checks both
    if not math.isfinite(largest):
        _check_finite(latents, field)
    if largest > MAX_ABS_LATENT:
        raise InvalidRequest(
            f"{field} has a value of magnitude {largest:g}; latents must lie in "
            f"[-{MAX_ABS_LATENT:g}, {MAX_ABS_LATENT:g}] (the prior is N(0, 1))"
        )
    return latents


def check_temperature(temperature: float | None) -> float:
    """Unset → 1.0; otherwise finite and in (0, MAX_TEMPERATURE]."""
    if temperature is None:
        return 1.0
    if not (math.isfinite(temperature) and 0.0 < temperature <= MAX_TEMPERATURE):
        raise InvalidRequest(f"temperature is {temperature}; it must be in (0, {MAX_TEMPERATURE:g}] (default 1.0)")
    return float(temperature)


def check_endpoints(
    start: np.ndarray, end: np.ndarray, image_shape: tuple[int, ...], latent_dim: int, max_items: int
) -> str:
    """Interpolate's start and end: both images or both latents, the same shape. Returns "images" or "latents"."""
    if start.shape != end.shape:
        raise InvalidRequest(f"start has shape {list(start.shape)} but end has {list(end.shape)}; they must match")
    if start.dtype != end.dtype:
        raise InvalidRequest(f"start has dtype {start.dtype} but end has {end.dtype}; they must match")
    if start.ndim == 1 + len(image_shape):
        return "images"
    if start.ndim == 2:
        return "latents"
    expected = ", ".join(map(str, image_shape))
    raise InvalidRequest(
        f"start has shape {list(start.shape)}; expected images [P, {expected}] or latents [P, {latent_dim}]"
    )


def check_steps(steps: int, paths: int, max_steps: int, max_items: int, rows: str = "pairs") -> int:
    """2 <= steps <= max_steps, and paths * steps <= max_items (the images returned); `rows` names the paths."""
    if not 2 <= steps <= max_steps:
        raise InvalidRequest(f"steps is {steps}; it must be in [2, {max_steps}] (both ends included)")
    if paths * steps > max_items:
        raise InvalidRequest(
            f"{paths} {rows} x {steps} steps = {paths * steps} images, "
            f"more than this server's limit of {max_items} per request"
        )
    return steps


def check_importance_samples(samples: int, images: int, max_samples: int, max_items: int) -> int:
    """0 (no importance-weighted bound) or 1 .. max_samples, with images * samples <= max_items decoded rows."""
    if samples > max_samples:
        raise InvalidRequest(
            f"importance_samples is {samples}, more than this server's limit of {max_samples} per image"
        )
    if images * samples > max_items:
        raise InvalidRequest(
            f"{images} images x {samples} importance_samples = {images * samples} decoded rows, more than this "
            f"server's limit of {max_items} per request; send fewer images per request"
        )
    return samples


def check_origin(origin: np.ndarray, image_shape: tuple[int, ...], latent_dim: int) -> str:
    """Traverse's origin: one image [1, *image_shape] or one latent [1, latent_dim]; returns "images" or "latents"."""
    expected = ", ".join(map(str, image_shape))
    if origin.ndim in (2, 1 + len(image_shape)) and origin.shape[0] == 1:
        return "latents" if origin.ndim == 2 else "images"
    raise InvalidRequest(
        f"origin has shape {list(origin.shape)}; expected one image [1, {expected}] or one latent [1, {latent_dim}]"
    )


def check_dimensions(dimensions: Sequence[int], latent_dim: int) -> list[int]:
    """Latent dimensions, each in [0, latent_dim), no repeats; empty means all of them."""
    if not dimensions:
        return list(range(latent_dim))
    bad = [d for d in dimensions if not 0 <= d < latent_dim]
    if bad:
        raise InvalidRequest(f"dimensions {bad} are out of range; each must be in [0, {latent_dim}) (latent_dim)")
    if len(set(dimensions)) != len(dimensions):
        repeated = sorted({d for d in dimensions if list(dimensions).count(d) > 1})
        raise InvalidRequest(f"dimensions {repeated} are repeated; name each dimension once")
    return list(dimensions)


def check_range(low: float, high: float) -> tuple[float, float]:
    """A sweep's ends: finite, within ±MAX_ABS_LATENT, low < high."""
    for name, value in (("low", low), ("high", high)):
        if not (math.isfinite(value) and abs(value) <= MAX_ABS_LATENT):
            raise InvalidRequest(f"{name} is {value}; it must be finite and within ±{MAX_ABS_LATENT:g}")
    if not low < high:
        raise InvalidRequest(f"low ({low:g}) must be below high ({high:g})")
    return low, high
