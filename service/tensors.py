"""Tensors on every wire, decoded once into the arrays the data plane takes, and encoded back:
vae.v1's protobuf Tensor, the Open Inference Protocol's typed tensors (gRPC contents, REST JSON
`data`, raw bytes from gRPC's raw contents or REST's binary extension), vae.v1's JSON. Each is
checked before anything is allocated or reshaped, and each check raises BadRequest naming the field
and what is wrong. Pixels to PNG and uint8 are `service.imaging`'s; what a model takes (shapes,
ranges) is checked by the data plane.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.api.vae.v1 import vae_pb2 as pb
from service.errors import BadRequest
from service.imaging import check_png, png_bytes, to_uint8

MAX_DIMS = 8  # no tensor here has more
MAX_ELEMENTS = 1 << 31  # more than any request a limit lets through; keeps shape arithmetic sane
DTYPES = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_UINT8: np.dtype("u1")}
FORMATS = frozenset(pb.ImageFormat.values())
# The Open Inference Protocol's datatypes this server takes.
DATATYPES = {
    "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "INT64": np.dtype("<i8"), "UINT64": np.dtype("<u8"),
    "INT32": np.dtype("<i4"), "UINT8": np.dtype("u1"),
}  # fmt: skip


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
    contents); BadRequest for a shape no limit lets through, values that are no numbers of `dtype`,
    or too few or too many."""
    tensor_size(shape, field)
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as err:
        raise BadRequest(f"{field}: {what} is not an array of {dtype.name}: {err}") from None
    if array.size != math.prod(shape):
        raise BadRequest(f"{field}: shape {list(shape)} needs {math.prod(shape)} values in {what}, got {array.size}")
    return array.reshape(shape)


def from_bytes(data: bytes | memoryview, dtype: np.dtype, shape: Sequence[int], field: str) -> np.ndarray:
    """An array of `shape` over raw little-endian bytes, uncopied and read-only; BadRequest unless
    the bytes are exactly what the shape needs."""
    want = tensor_size(shape, field) * dtype.itemsize
    if len(data) != want:
        raise BadRequest(f"{field}: shape {list(shape)} of {dtype.name} needs {want} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(tuple(shape))


def oip_tensor(name: str, datatype: str, shape: list[int], raw: bytes | memoryview | None = None, values: Any = None,
               what: str = "data") -> np.ndarray:  # fmt: skip
    """One of the Open Inference Protocol's input tensors: `raw` bytes, or `values` (JSON `data`,
    gRPC's typed contents, named `what`)."""
    field = f"input {name!r}"
    if datatype == "BYTES":
        return byte_strings(field, shape, raw, values)
    if datatype not in DATATYPES:
        raise BadRequest(f"{field}: datatype {datatype!r} is not one this server takes ({', '.join(DATATYPES)}, BYTES)")
    if raw is not None:
        return from_bytes(raw, DATATYPES[datatype], shape, field)
    return from_values(values, DATATYPES[datatype], shape, field, what)


def byte_strings(field: str, shape: list[int], raw: bytes | memoryview | None, values: Any) -> np.ndarray:
    """A BYTES tensor (class names) as an object array of bytes: raw, each element's length as 4
    bytes little-endian then its bytes (the protocol's serialization); else JSON strings or gRPC's
    bytes_contents."""
    size = tensor_size(shape, field)
    items: list[bytes] = []
    if raw is not None:
        data, at = bytes(raw), 0
        while at < len(data):
            if at + 4 > len(data):
                raise BadRequest(f"{field}: BYTES data ends inside an element's 4-byte length")
            length = int.from_bytes(data[at : at + 4], "little")
            if at + 4 + length > len(data):
                raise BadRequest(f"{field}: a BYTES element of {length} bytes runs past the data")
            items.append(data[at + 4 : at + 4 + length])
            at += 4 + length
    else:
        flat = np.asarray(values if values is not None else [], dtype=object).ravel().tolist()
        for v in flat:
            if not isinstance(v, (str, bytes)):
                raise BadRequest(f"{field}: BYTES data must be strings, got {type(v).__name__}")
            items.append(v.encode() if isinstance(v, str) else v)
    if len(items) != size:
        raise BadRequest(f"{field}: shape {list(shape)} needs {size} elements, got {len(items)}")
    array = np.empty(size, dtype=object)
    array[:] = items
    return array.reshape(shape)


def to_array(t: pb.Tensor, field: str, allow_uint8: bool = False) -> np.ndarray:
    """The Tensor's data as an array of its shape and dtype (uint8 only where allowed), read-only and
    uncopied; the data plane checks the shape against the model's."""
    if not t.shape:
        raise BadRequest(f"{field}: missing (no shape given)")
    if t.dtype not in DTYPES or (t.dtype == pb.DTYPE_UINT8 and not allow_uint8):
        allowed = "float32 or uint8" if allow_uint8 else "float32"
        raise BadRequest(f"{field}: dtype must be {allowed}, got {pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype}")
    return from_bytes(t.data, DTYPES[t.dtype], t.shape, field)


def from_array(a: np.ndarray, into: pb.Tensor | None = None) -> pb.Tensor:
    """A Tensor holding `a` (uint8 stays uint8, all else float32), filled in place if `into` is given:
    a message passed to a constructor is copied, one filled where it lies is not."""
    t = pb.Tensor() if into is None else into
    t.dtype = pb.DTYPE_UINT8 if a.dtype == np.uint8 else pb.DTYPE_FLOAT32
    t.shape[:] = a.shape
    t.data = np.ascontiguousarray(a, dtype=DTYPES[t.dtype]).tobytes()
    return t


def check_format(fmt: int, channels: int) -> int:
    if fmt not in FORMATS:
        raise BadRequest(f"format: unknown image format {fmt}")
    if fmt == pb.IMAGE_FORMAT_PNG:
        check_png(channels)
    return fmt or pb.IMAGE_FORMAT_FLOAT32


def fill_images(out: pb.Images, images: np.ndarray, fmt: int) -> None:
    """[N, C, H, W] float32 in [0, 1] into `out` (a response's field), in the format asked for
    (check_format first)."""
    out.format = fmt = fmt or pb.IMAGE_FORMAT_FLOAT32
    if fmt == pb.IMAGE_FORMAT_PNG:
        out.png.extend(png_bytes(im) for im in images)
    elif fmt == pb.IMAGE_FORMAT_UINT8:
        from_array(to_uint8(images), into=out.tensor)
    else:
        from_array(images, into=out.tensor)  # float32 whatever comes in


def tensor_to_numpy(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype=DTYPES[t.dtype]).reshape(tuple(t.shape)).copy()
