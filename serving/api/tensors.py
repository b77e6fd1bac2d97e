"""The wire format of `Tensor` (raw little-endian, C-order bytes) ↔ numpy: shared by server and client.

Arrays are built with `np.frombuffer` (no copy) and written with `tobytes()`. Replies are filled in place
(`fill_tensor(response.images, images)`): passing a built `Tensor` to a response's constructor copies its
bytes once more. A Tensor that does not describe an array raises `WireFormatError` naming the field: the
server answers INVALID_ARGUMENT, the client reports a malformed reply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from serving.api import pb

WIRE_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_UINT8: np.dtype("u1"),
}
_DTYPE_ENUMS: dict[np.dtype, pb.DType] = {np.dtype("float32"): pb.DTYPE_FLOAT32, np.dtype("uint8"): pb.DTYPE_UINT8}
_WIRE_ORDER: dict[np.dtype, np.dtype] = {dtype: dtype.newbyteorder("<") for dtype in _DTYPE_ENUMS}


class WireFormatError(ValueError):
    """A Tensor's shape, dtype and bytes do not describe an array; the message names the field."""


def array_from_wire(shape: Sequence[int], dtype: int, data: bytes, field: str) -> np.ndarray:
    """The array a `Tensor` describes (read-only view of `data`), after checking dtype, shape and byte length."""
    if not shape and not data and dtype == pb.DTYPE_UNSPECIFIED:
        raise WireFormatError(f"{field} is missing: set its shape, dtype and data")
    wire_dtype = WIRE_DTYPES.get(dtype)
    if wire_dtype is None:
        name = pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)
        raise WireFormatError(f"{field}.dtype {name} is not supported: use DTYPE_FLOAT32 or DTYPE_UINT8")
    dims = tuple(int(d) for d in shape)
    if not dims:
        raise WireFormatError(f"{field} has an empty shape; expected one dimension or more")
    if any(d < 0 for d in dims):
        raise WireFormatError(f"{field}.shape {list(dims)} has a negative dimension")
    expected_bytes = math.prod(dims) * wire_dtype.itemsize
    if len(data) != expected_bytes:
        raise WireFormatError(
            f"{field}.data has {len(data)} bytes but shape {list(dims)} of {wire_dtype.name} needs {expected_bytes}"
        )
    return np.frombuffer(data, dtype=wire_dtype).reshape(dims)


def tensor_from_proto(tensor: pb.Tensor, field: str) -> np.ndarray:
    """`array_from_wire` for a protobuf Tensor."""
    return array_from_wire(tensor.shape, tensor.dtype, tensor.data, field)


def fill_tensor(tensor: pb.Tensor, array: np.ndarray) -> None:
    """Write `array` (float32 or uint8) into `tensor` (a field of a message) as little-endian C-order bytes."""
    tensor.shape[:] = array.shape
    tensor.dtype = _DTYPE_ENUMS[array.dtype]  # the model layer only produces these two
    tensor.data = np.ascontiguousarray(array, _WIRE_ORDER[array.dtype]).tobytes()


def tensor_to_proto(array: np.ndarray) -> pb.Tensor:
    """A protobuf Tensor holding `array` (float32 or uint8) as little-endian C-order bytes."""
    tensor = pb.Tensor()
    fill_tensor(tensor, array)
    return tensor
