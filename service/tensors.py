"""vae.v1's tensors and images on the wire: proto <-> numpy. Pixels to PNG and uint8 are
`service.imaging`'s, the one image module training shares; what a model takes is checked by the
data plane. Each check raises BadRequest with a message naming the field and what is wrong.
"""

from __future__ import annotations

import numpy as np

from service.api.vae.v1 import vae_pb2 as pb
from service.errors import BadRequest
from service.imaging import check_png, png_bytes, to_uint8
from service.shapes import tensor_size

DTYPES = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_UINT8: np.dtype("u1")}
FORMATS = frozenset(pb.ImageFormat.values())


def to_array(t: pb.Tensor, field: str, allow_uint8: bool = False) -> np.ndarray:
    """The Tensor's data as an array of its shape and dtype (uint8 only where allowed), read-only and
    uncopied; the data plane checks the shape against the model's."""
    if not t.shape:
        raise BadRequest(f"{field}: missing (no shape given)")
    if t.dtype not in DTYPES or (t.dtype == pb.DTYPE_UINT8 and not allow_uint8):
        allowed = "float32 or uint8" if allow_uint8 else "float32"
        raise BadRequest(f"{field}: dtype must be {allowed}, got {pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype}")
    shape = tuple(t.shape)
    dtype = DTYPES[t.dtype]
    want = tensor_size(shape, field) * dtype.itemsize
    if len(t.data) != want:
        raise BadRequest(f"{field}: shape {list(shape)} of {dtype.name} needs {want} bytes, got {len(t.data)}")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


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
