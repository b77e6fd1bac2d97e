"""The protocol's tensor datatypes and raw bytes, shared by its gRPC and REST transports.

A tensor travels as a datatype name ("FP32"), a shape, and either typed values or raw little-endian bytes in
row-major order (gRPC's `raw_input_contents`, REST's binary extension). These functions check that the three
agree and turn them into a numpy array, or an array back into them, with messages that say what was wrong.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np

from serving.errors import InvalidRequest

# The datatypes this server reads or writes, and their numpy dtypes (little-endian, as the protocol's raw
# bytes are). A request may send only those its model's inputs accept (`models.TensorSpec.datatypes`).
DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "UINT8": np.dtype("u1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
DATATYPES: dict[np.dtype, str] = {np.dtype(dtype.newbyteorder("=")): name for name, dtype in DTYPES.items()}
_LITTLE_ENDIAN = sys.byteorder == "little"
MAX_DIMENSIONS = 8  # more than any model here takes: a shape beyond it is refused before its product is formed


def datatype_of(array: np.ndarray) -> str:
    """The protocol's name for an output array's dtype."""
    try:
        return DATATYPES[array.dtype]
    except KeyError:  # pragma: no cover - every output of models.py has one of DTYPES
        raise TypeError(f"no protocol datatype for {array.dtype}") from None


def element_count(name: str, shape: Sequence[int]) -> int:
    """The number of elements of a tensor's declared shape, checked: non-negative dimensions, not too many."""
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidRequest(f"input {name!r} has {len(shape)} dimensions; at most {MAX_DIMENSIONS} are accepted")
    if min(shape, default=0) < 0:
        raise InvalidRequest(f"input {name!r} has shape {list(shape)}: dimensions must be >= 0")
    return math.prod(shape)


def check_datatype(name: str, datatype: str, accepted: Sequence[str]) -> np.dtype:
    """The numpy dtype of an input's datatype, which must be one its model accepts."""
    if datatype not in accepted:
        raise InvalidRequest(f"input {name!r} has datatype {datatype!r}; this model takes {' or '.join(accepted)}")
    return DTYPES[datatype]


def from_raw(name: str, datatype: str, shape: Sequence[int], data: bytes, accepted: Sequence[str]) -> np.ndarray:
    """An input's raw little-endian bytes as an array of its shape (a read-only view of `data`, no copy)."""
    dtype = check_datatype(name, datatype, accepted)
    count = element_count(name, shape)
    if len(data) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input {name!r} has {len(data)} bytes of data; shape {list(shape)} of {datatype} needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def from_values(name: str, datatype: str, shape: Sequence[int], values: object, accepted: Sequence[str]) -> np.ndarray:
    """An input's typed values, flat (row-major) or nested as its shape, as an array of its shape."""
    dtype = check_datatype(name, datatype, accepted)
    count = element_count(name, shape)
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(
            f"input {name!r} has values that are not {datatype} (or nested lists of uneven length)"
        ) from None
    if array.size != count:
        raise InvalidRequest(f"input {name!r} has {array.size} values; shape {list(shape)} needs {count}")
    return array.reshape(shape)


def to_raw(array: np.ndarray) -> bytes:
    """An output array as the protocol's raw bytes (little-endian, row-major)."""
    if array.dtype.isnative and _LITTLE_ENDIAN:  # every output here, on every machine it runs on
        return array.tobytes()  # row-major whatever the array's layout
    return array.astype(array.dtype.newbyteorder("<")).tobytes()
