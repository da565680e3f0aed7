"""Tensors as a request gives them, checked before anything is allocated or reshaped: one check
for every wire format (vae.v1's tensors, the Open Inference Protocol's over gRPC and HTTP, vae.v1's
JSON), on numpy alone, so the client's codec can share it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.errors import BadRequest

MAX_DIMS = 8  # no tensor here has more
MAX_ELEMENTS = 1 << 31  # more than any request a limit lets through; keeps shape arithmetic sane


def tensor_size(shape: Sequence[int], field: str) -> int:
    """The number of elements of a tensor of `shape`: at most MAX_DIMS dimensions, each and their
    product within MAX_ELEMENTS; BadRequest naming `field` otherwise."""
    if len(shape) > MAX_DIMS:
        raise BadRequest(f"{field}: {len(shape)} dimensions; a tensor here has at most {MAX_DIMS}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ELEMENTS for d in shape):
        raise BadRequest(f"{field}: shape {list(shape)}; dimensions must be whole numbers from 0 to {MAX_ELEMENTS}")
    size = math.prod(shape)  # Python integers: no overflow, and cheaper than numpy's on a short list
    if size > MAX_ELEMENTS:
        raise BadRequest(f"{field}: shape {list(shape)} has {size} elements; at most {MAX_ELEMENTS}")
    return size


def from_values(values: Any, dtype: np.dtype, shape: list[int], field: str, what: str = "data") -> np.ndarray:
    """An array of `shape` from numbers, flat or nested in row-major order (JSON `data`, gRPC's typed
    contents); BadRequest for values that are no numbers of `dtype` or too few or too many."""
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as err:
        raise BadRequest(f"{field}: {what} is not an array of {dtype.name}: {err}") from None
    if array.size != math.prod(shape):
        raise BadRequest(f"{field}: shape {list(shape)} needs {math.prod(shape)} values in {what}, got {array.size}")
    return array.reshape(shape)
