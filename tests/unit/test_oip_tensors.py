"""The protocol's tensors: raw bytes and typed values to arrays and back, and what is refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from serving.errors import InvalidRequest
from serving.oip import tensors


def test_raw_bytes_are_little_endian_and_row_major_whatever_the_array_s_layout() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = struct.pack("<6f", 0, 1, 2, 3, 4, 5)
    assert tensors.to_raw(values) == expected
    assert tensors.to_raw(np.asfortranarray(values)) == expected  # column-major in memory: row-major bytes
    assert tensors.to_raw(values.astype(">f4")) == expected  # a big-endian array: little-endian bytes
    assert tensors.to_raw(np.repeat(values, 2, axis=1)[:, ::2]) == expected  # a strided view


def test_raw_bytes_read_back_as_the_array_they_came_from() -> None:
    values = np.random.default_rng(0).standard_normal((4, 20)).astype(np.float32)
    array = tensors.from_raw("z", "FP32", [4, 20], tensors.to_raw(values), ("FP32",))
    assert array.shape == (4, 20) and np.array_equal(array, values)


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("FP32", [1, 20], b"\0" * 79, "has 79 bytes of data; shape [1, 20] of FP32 needs 80"),
        ("FP16", [1, 20], b"\0" * 40, "has datatype 'FP16'; this model takes FP32"),
        ("FP32", [1, -20], b"", "dimensions must be >= 0"),
        ("FP32", [1] * 9, b"\0" * 4, "at most 8 are accepted"),
    ],
)
def test_raw_bytes_that_do_not_fit_are_refused_saying_why(
    datatype: str, shape: list[int], data: bytes, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        tensors.from_raw("z", datatype, shape, data, ("FP32",))


def test_typed_values_flat_or_nested_fill_the_shape() -> None:
    flat = tensors.from_values("x", "UINT8", [2, 2], [0, 1, 2, 255], ("UINT8",))
    nested = tensors.from_values("x", "UINT8", [2, 2], [[0, 1], [2, 255]], ("UINT8",))
    assert flat.dtype == np.uint8 and np.array_equal(flat, nested)
    with pytest.raises(InvalidRequest, match=r"has 3 values; shape \[2, 2\] needs 4"):
        tensors.from_values("x", "UINT8", [2, 2], [0, 1, 2], ("UINT8",))
    with pytest.raises(InvalidRequest, match="not UINT8"):
        tensors.from_values("x", "UINT8", [2, 2], [[0, 1], [2]], ("UINT8",))
