"""Request translation and validation as plain functions: every rule, its message, no server needed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serving.api import pb
from serving.api.tensors import WireFormatError, array_from_wire, tensor_from_proto, tensor_to_proto
from serving.dataplane.validation import (
    check_count,
    check_endpoints,
    check_images,
    check_latents,
    check_steps,
    check_temperature,
)
from serving.errors import InvalidRequest
from serving.grpc.converters import method_from_proto, output_dtype_from_proto

IMAGE = (1, 28, 28)


def test_tensor_round_trip_keeps_shape_dtype_and_values() -> None:
    for array in (np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32), np.arange(12, dtype=np.uint8)):
        back = tensor_from_proto(tensor_to_proto(array), "x")
        assert back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back, array)


@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.uint8]).map(np.dtype),
        shape=hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=6),
    )
)
def test_any_float32_or_uint8_array_survives_the_wire(array: np.ndarray) -> None:
    back = tensor_from_proto(tensor_to_proto(array), "x")
    assert back.shape == array.shape and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)  # NaN == NaN here: bytes are copied, not converted


def test_wire_bytes_are_little_endian_c_order() -> None:
    tensor = tensor_to_proto(np.array([[1.0, 2.0]], dtype=np.float32))
    assert tensor.data == np.array([1.0, 2.0], dtype="<f4").tobytes()
    assert list(tensor.shape) == [1, 2] and tensor.dtype == pb.DTYPE_FLOAT32


@pytest.mark.parametrize(
    ("shape", "dtype", "data", "message"),
    [
        ([2, 2], pb.DTYPE_FLOAT32, b"\0" * 12, "images.data has 12 bytes but shape [2, 2] of float32 needs 16"),
        ([3], pb.DTYPE_UINT8, b"\0" * 4, "images.data has 4 bytes but shape [3] of uint8 needs 3"),
        ([2], pb.DTYPE_UNSPECIFIED, b"\0" * 8, "images.dtype DTYPE_UNSPECIFIED is not supported"),
        ([2], 7, b"\0" * 8, "images.dtype 7 is not supported: use DTYPE_FLOAT32 or DTYPE_UINT8"),
        ([], pb.DTYPE_FLOAT32, b"", "images has an empty shape"),
        ([-1, 4], pb.DTYPE_FLOAT32, b"", "negative dimension"),
    ],
)
def test_malformed_tensors_are_invalid(shape: list[int], dtype: int, data: bytes, message: str) -> None:
    with pytest.raises(WireFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        array_from_wire(shape, dtype, data, "images")


def test_enums_map_unspecified_to_defaults_and_refuse_unknown_values() -> None:
    assert output_dtype_from_proto(pb.DTYPE_UNSPECIFIED) == "float32"
    assert output_dtype_from_proto(pb.DTYPE_UINT8) == "uint8"
    assert method_from_proto(pb.INTERPOLATION_METHOD_UNSPECIFIED) == "linear"
    assert method_from_proto(pb.SLERP) == "slerp"
    with pytest.raises(InvalidRequest, match="output_dtype 9 is not a known DType"):
        output_dtype_from_proto(9)
    with pytest.raises(InvalidRequest, match="method 5 is not a known InterpolationMethod"):
        method_from_proto(5)


def test_uint8_images_are_scaled_to_unit_range() -> None:
    images = np.array([0, 255, 51] + [0] * 781, dtype=np.uint8).reshape(1, 1, 28, 28)
    scaled = check_images(images, IMAGE, 10)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled.reshape(-1)[:3], [0.0, 1.0, 0.2], atol=1e-7)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 28, 28), np.float32), r"images has shape \[2, 28, 28\]; expected \[N, 1, 28, 28\]"),
        (np.zeros((0, 1, 28, 28), np.float32), "the number of images must be at least 1, got 0"),
        (np.zeros((11, 1, 28, 28), np.float32), "the number of images is 11, more than this server's limit of 10"),
        (np.full((1, 1, 28, 28), 1.5, np.float32), r"values in \[1.5, 1.5\]; FLOAT32 images must lie in \[0, 1\]"),
        (np.full((1, 1, 28, 28), np.nan, np.float32), "contains 784 NaN or infinite values"),
        (np.zeros((1, 1, 28, 28), np.float64), "images has dtype float64; expected FLOAT32 or UINT8"),
    ],
)
def test_bad_images_are_invalid(images: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_images(images, IMAGE, 10)


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (np.zeros((2, 5), np.float32), r"latents has shape \[2, 5\]; expected \[N, 20\] \(latent_dim 20\)"),
        (np.zeros((20,), np.float32), r"expected \[N, 20\]"),
        (np.array([[np.inf] * 20], np.float32), "contains 20 NaN or infinite values; all values must be finite"),
        (np.zeros((1, 20), np.uint8), "latents has dtype uint8; latents must be FLOAT32"),
        (np.zeros((4, 20), np.float32), "the number of latents is 4, more than this server's limit of 3"),
    ],
)
def test_bad_latents_are_invalid(latents: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_latents(latents, 20, 3)


def test_counts_temperatures_and_steps_have_ranges() -> None:
    assert check_count(5, 5, "num_samples") == 5
    with pytest.raises(InvalidRequest, match="num_samples must be at least 1, got 0"):
        check_count(0, 5, "num_samples")
    assert check_temperature(None) == 1.0
    assert check_temperature(0.5) == 0.5
    for bad in (0.0, -1.0, 11.0, float("nan"), float("inf")):
        with pytest.raises(InvalidRequest, match=r"temperature is .*; it must be in \(0, 10\]"):
            check_temperature(bad)
    assert check_steps(10, 2, 100, 20) == 10
    with pytest.raises(InvalidRequest, match=r"steps is 1; it must be in \[2, 100\]"):
        check_steps(1, 2, 100, 1000)
    with pytest.raises(InvalidRequest, match="3 pairs x 10 steps = 30 images, more than this server's limit of 20"):
        check_steps(10, 3, 100, 20)


def test_endpoints_must_be_the_same_kind_and_shape() -> None:
    z = np.zeros((2, 20), np.float32)
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert check_endpoints(z, z, IMAGE, 20, 10) == "latents"
    assert check_endpoints(x, x, IMAGE, 20, 10) == "images"
    with pytest.raises(InvalidRequest, match=r"start has shape \[2, 20\] but end has \[2, 1, 28, 28\]"):
        check_endpoints(z, x, IMAGE, 20, 10)
    with pytest.raises(InvalidRequest, match="start has dtype float32 but end has uint8"):
        check_endpoints(z, z.astype(np.uint8), IMAGE, 20, 10)
    with pytest.raises(InvalidRequest, match=r"expected images \[P, 1, 28, 28\] or latents \[P, 20\]"):
        check_endpoints(z[0], z[0], IMAGE, 20, 10)
