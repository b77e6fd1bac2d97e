"""The interpolation maths: endpoints, linearity, slerp's constant angular speed and its linear fallback."""

from __future__ import annotations

import numpy as np
import pytest

from contract.interpolation import interpolate


def test_paths_start_and_end_at_the_endpoints() -> None:
    rng = np.random.default_rng(0)
    z0, z1 = rng.standard_normal((2, 3, 8)).astype(np.float32)
    for method in ("linear", "slerp"):
        path = interpolate(z0, z1, 7, method)
        assert path.shape == (3, 7, 8) and path.dtype == np.float32
        np.testing.assert_allclose(path[:, 0], z0, atol=1e-6)
        np.testing.assert_allclose(path[:, -1], z1, atol=1e-6)


def test_linear_is_the_convex_combination() -> None:
    z0, z1 = np.zeros((1, 2), np.float32), np.array([[4.0, -2.0]], np.float32)
    np.testing.assert_allclose(interpolate(z0, z1, 5)[0], np.array([[0, 0], [1, -0.5], [2, -1], [3, -1.5], [4, -2]]))


def test_slerp_moves_along_the_great_circle_at_constant_angle() -> None:
    z0, z1 = np.array([[2.0, 0.0]], np.float32), np.array([[0.0, 2.0]], np.float32)
    path = interpolate(z0, z1, 4, "slerp")[0]
    angles = np.degrees(np.arctan2(path[:, 1], path[:, 0]))
    np.testing.assert_allclose(angles, [0.0, 30.0, 60.0, 90.0], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), 2.0, rtol=1e-6)  # on the circle, not the chord


def test_slerp_falls_back_to_linear_for_parallel_or_zero_vectors() -> None:
    z0 = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)
    z1 = np.array([[2.0, 2.0], [3.0, 1.0]], np.float32)
    np.testing.assert_allclose(interpolate(z0, z1, 4, "slerp"), interpolate(z0, z1, 4, "linear"), atol=1e-6)


def test_slerp_between_opposite_vectors_is_the_line_through_the_origin() -> None:
    z0 = np.array([[1.0, 2.0, 3.0]], np.float32)
    path = interpolate(z0, -z0, 5, "slerp")[0]
    np.testing.assert_allclose(path, np.linspace(1, -1, 5)[:, None] * z0, atol=1e-6)


def test_slerp_close_to_opposite_still_follows_the_great_circle() -> None:
    angle = np.pi - 0.01  # sin = 0.01: well-conditioned, so the arc is kept
    z0, z1 = np.array([[1.0, 0.0]], np.float32), np.array([[np.cos(angle), np.sin(angle)]], np.float32)
    path = interpolate(z0, z1, 3, "slerp")[0]
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), 1.0, rtol=1e-5)  # on the circle, not through 0
    np.testing.assert_allclose(np.arctan2(path[1, 1], path[1, 0]), angle / 2, atol=1e-5)


def test_training_plots_use_the_same_interpolation() -> None:
    import training.plots

    assert training.plots.interpolate is interpolate
    assert not hasattr(training.plots, "slerp") and not hasattr(training.plots, "lerp")


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown interpolation method"):
        interpolate(np.zeros((1, 2)), np.ones((1, 2)), 3, "cubic")
