"""Image files in, model pixels out, and PNGs and grids back: one implementation for training
(folder datasets) and the server (image files sent by clients), so the two cannot disagree.

numpy and Pillow only: the serving image carries no torch, and folder decoding runs in worker
processes that should start cheaply.

Choices a caller may need to know:
- Files are recognised by content (whatever Pillow reads), never by extension; only the first
  frame of an animation is used; EXIF orientation is applied; ICC profiles are not.
- Transparency is composited onto `Preprocessing.background` before resizing, so the colour
  hidden under alpha 0 never leaks into the result.
- 16-bit images ('I;16*', and 'I', which is how Pillow may hold 16-bit PNG/TIFF) are scaled to
  8 bits by rint(v / 257); values outside 0..65535 are clipped. 'F' (float) images are read as
  [0, 1] when their maximum is at most 1, and as 0..255 otherwise (clipped to that range; NaN is 0):
  float files come from both conventions, and an image whose values all sit in [0, 1] on the
  0..255 scale would be black anyway.
- Resizing uses Lanczos: Pillow widens its kernel with the reduction, so downscaling is properly
  antialiased, and it is the sharpest of Pillow's filters. At model sizes the cost is negligible,
  so no `reducing_gap` shortcut trades accuracy away. An image already at the target size, or one
  that needs only a crop, is not resampled at all.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadRequest

FITS = ("crop", "pad")
PNG_CHANNELS = (1, 3, 4)
WIRE_PNG = {"compress_level": 1}  # PNGs that go straight onto the wire: the fastest compression
NAMED_COLORS = {"white": (255, 255, 255), "black": (0, 0, 0)}
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads
RESAMPLE = Image.Resampling.LANCZOS


class ImageError(ValueError):
    """A file that is not a readable image; the message says why (empty, truncated, not an image ...).

    The message starts with its kind ("empty file", "truncated", "not an image", "corrupt",
    "too large", "unsupported"), then ": " and the detail, so callers can count reasons by kind."""


@dataclass(frozen=True)
class Preprocessing:
    """How any image file becomes the model's [C, H, W] pixels; travels in model.json."""

    channels: int = 3  # 1 (grey, 'L') or 3 (RGB)
    size: tuple[int, int] = (32, 32)  # (H, W) of the model's images
    fit: str = "crop"  # "crop": shorter side fits, centre crop; "pad": longer side fits, centred on background
    background: tuple[int, int, int] = (255, 255, 255)  # RGB under transparency, and the padding colour

    def __post_init__(self) -> None:
        if _not_int(self.channels) or self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        size = tuple(self.size) if isinstance(self.size, (list, tuple)) else self.size
        if not isinstance(size, tuple) or len(size) != 2 or any(_not_int(v) or v < 1 for v in size):
            raise ValueError(f"size must be two positive integers (H, W), got {self.size!r}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        bg = tuple(self.background) if isinstance(self.background, (list, tuple)) else self.background
        if not isinstance(bg, tuple) or len(bg) != 3 or any(_not_int(v) or not 0 <= v <= 255 for v in bg):
            raise ValueError(f"background must be three integers in 0..255 (R, G, B), got {self.background!r}")
        object.__setattr__(self, "channels", int(self.channels))  # numpy integers become ints, for JSON
        object.__setattr__(self, "size", tuple(int(v) for v in size))
        object.__setattr__(self, "background", tuple(int(v) for v in bg))

    def to_json(self) -> dict[str, Any]:
        background = "#" + "".join(f"{v:02x}" for v in self.background)
        return {"channels": self.channels, "size": list(self.size), "fit": self.fit, "background": background}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Preprocessing:
        """The inverse of to_json. A missing key takes its default (files written before a setting
        existed still load); an unknown key is an error (a newer file must not be half understood)."""
        unknown = set(d) - {"channels", "size", "fit", "background"}
        if unknown:
            raise ValueError(f"preprocessing: unknown settings {sorted(unknown)}")
        kwargs = dict(d)
        if isinstance(kwargs.get("background"), str):
            kwargs["background"] = parse_color(kwargs["background"])
        return cls(**kwargs)


def _not_int(v: Any) -> bool:
    return isinstance(v, bool) or not isinstance(v, (int, np.integer))


def on_black(image_shape: tuple[int, ...]) -> Preprocessing | None:
    """The preprocessing of images that came from no file: the bundled sets (white ink on black)
    and versions exported before model.json carried one. The model's channels and size, the whole
    image kept (padded), black under transparency; None for channel counts no file has (not 1 or 3)."""
    c, h, w = (int(v) for v in image_shape)
    return Preprocessing(channels=c, size=(h, w), fit="pad", background=(0, 0, 0)) if c in (1, 3) else None


def parse_color(text: str) -> tuple[int, int, int]:
    """'white', 'black', '#RRGGBB', '#RGB' or 'R,G,B' -> (R, G, B)."""
    t = text.strip().lower()
    if t in NAMED_COLORS:
        return NAMED_COLORS[t]
    try:
        if t.startswith("#") and len(t) in (4, 7):
            digits = t[1:] if len(t) == 7 else "".join(c * 2 for c in t[1:])
            return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
        parts = [int(p) for p in t.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 3 and all(0 <= p <= 255 for p in parts):
        return tuple(parts)  # type: ignore[return-value]
    raise ValueError(f"not a colour: {text!r} (use white, black, #RRGGBB, #RGB or R,G,B)")


def parse_size(text: str) -> tuple[int, int]:
    """'32' -> (32, 32); '48x64' -> (48, 64), height first."""
    parts = text.strip().lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) in (1, 2) and all(v >= 1 for v in values):
        return (values[0], values[-1])
    raise ValueError(f"not an image size: {text!r} (use N for NxN, or HxW such as 48x64)")


def open_image(source: bytes | str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """The first frame of an image file (path or bytes), fully decoded and upright (EXIF orientation).

    Decoding everything here means a truncated file fails here, with an ImageError, not later.
    A path that cannot be read raises OSError as usual. Images of more than `max_pixels` (default:
    Pillow's limit) are refused before their pixels are decoded."""
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else _read(source)
    if not data:
        raise ImageError("empty file")
    try:
        image = Image.open(io.BytesIO(data))  # in memory: nothing to close
        _check_pixels(image, max_pixels)
        image.load()
        if image.getexif().get(ORIENTATION, 1) != 1:  # most files have no tag: no copy for them
            image = ImageOps.exif_transpose(image)
        return image
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image: no image format recognised ({len(data)} bytes)") from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error ...
        kind = "truncated" if "truncated" in str(e).lower() or isinstance(e, EOFError) else "corrupt"
        raise ImageError(f"{kind}: {e}") from None


def _read(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _check_pixels(image: Image.Image, max_pixels: int | None = None) -> None:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; a bomb is refused at the limit
    itself, or at `max_pixels` (checked from the header, before any pixel is decoded)."""
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise ImageError(f"too large: {image.width}x{image.height} pixels is more than the limit of {limit}")


def to_pixels(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Any PIL image -> uint8 [C, H, W] as `prep` says: 8 bits, transparency composited, grey or RGB,
    resized with crop or pad."""
    try:
        image = _flatten(_to_8bit(image), prep.background).convert("L" if prep.channels == 1 else "RGB")
    except MemoryError:
        raise
    except Exception as e:  # a mode convert() has no route for (LAB, HSV ...), whatever Pillow raises for it
        if not _raised_by_pillow(e):
            raise  # the project's own conversion code: a bug, never the file's
        raise ImageError(f"unsupported: {image.mode} images cannot be converted ({type(e).__name__}: {e})") from None
    image = _fit(image, prep)  # the project's own geometry: an exception here is a bug, never the file's
    a = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))


def _raised_by_pillow(err: BaseException) -> bool:
    """Whether `err` came from inside a library (Pillow, reading or converting the file) rather
    than from this module's own lines: its traceback's innermost frame is not this module's."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__") != __name__


def _to_8bit(image: Image.Image) -> Image.Image:
    """An image in 'L', 'LA', 'RGB' or 'RGBA' (or 'P'/'PA'/'1'/'CMYK'..., which convert() handles
    exactly); high-bit-depth modes are scaled here because Pillow's convert() clips them."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        a = np.clip(np.asarray(image), 0, 65535)
        return _with_key_alpha(np.rint(a / 257.0).astype(np.uint8), a, image.info.get("transparency"))
    if image.mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        scaled = a * 255.0 if a.size and a.max() <= 1.0 else a
        return Image.fromarray(np.rint(np.clip(scaled, 0, 255)).astype(np.uint8))
    return image


def _with_key_alpha(grey: np.ndarray, raw: np.ndarray, key: Any) -> Image.Image:
    """A 16-bit grey image with a transparent key value (PNG tRNS) as 'LA'; without one, 'L'."""
    if not isinstance(key, int):
        return Image.fromarray(grey)
    alpha = np.where(raw == key, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey, alpha], axis=-1))


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite any transparency (alpha band, or a transparent palette index / key colour in
    info['transparency']) onto the background; an opaque image comes back unchanged."""
    if image.mode not in ALPHA_MODES and "transparency" not in image.info:
        return image
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, background)
    flat.paste(rgba, mask=rgba.getchannel("A"))  # over an opaque background: alpha compositing, in one pass
    return flat


def _fit(image: Image.Image, prep: Preprocessing) -> Image.Image:
    height, width = prep.size
    w, h = image.size
    if (w, h) == (width, height):
        return image
    if prep.fit == "crop":
        return _crop(image, width, height)
    return _pad(image, width, height, prep.background)


def _crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers the target, then take the centre: one resample over the source
    box that maps onto the target, or a plain crop when no scaling is needed."""
    w, h = image.size
    box = crop_box(w, h, width, height)
    if (box[2] - box[0], box[3] - box[1]) == (width, height):
        left, top = (w - width) // 2, (h - height) // 2
        return image.crop((left, top, left + width, top + height))
    return image.resize((width, height), RESAMPLE, box=box)


def crop_box(w: int, h: int, width: int, height: int) -> tuple[float, float, float, float]:
    """The centred box of a w x h source with the target's aspect ratio, as large as fits. Which
    side is kept whole is decided on integer products, never on rounded scales, so the box never
    leaves the source (32 / (32 / 49) is not 49 in floating point)."""
    if width * h >= height * w:  # width / w >= height / h: the whole width is kept
        bw, bh = float(w), height * w / width
    else:
        bw, bh = width * h / height, float(h)
    return ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)


def _pad(image: Image.Image, width: int, height: int, background: tuple[int, int, int]) -> Image.Image:
    """Scale so the image fits inside the target, then centre it on the background colour."""
    w, h = image.size
    size = pad_size(w, h, width, height)
    inner = image if size == (w, h) else image.resize(size, RESAMPLE)
    fill = Image.new("RGB", (1, 1), background).convert(image.mode).getpixel((0, 0))
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(inner, ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def pad_size(w: int, h: int, width: int, height: int) -> tuple[int, int]:
    """The (width, height) a w x h source is scaled to inside the target: the binding side fills
    it exactly, the other keeps the aspect ratio, rounded, at least one pixel."""
    if width * h <= height * w:  # width / w <= height / h: the width fills the target
        return width, min(height, max(1, round(h * width / w)))
    return min(width, max(1, round(w * height / h))), height


def load_image(source: bytes | str | os.PathLike, prep: Preprocessing, max_pixels: int | None = None) -> np.ndarray:
    """An image file (path or bytes) -> the model's uint8 [C, H, W] pixels; `max_pixels` caps the
    image's size below Pillow's own limit (the server's, for files it is sent)."""
    return to_pixels(open_image(source, max_pixels), prep)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (any shape) -> uint8 0..255 (rounded, out-of-range clipped); uint8 passes through."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """uint8 [C, H, W], C = 1, 3 or 4 -> an 'L', 'RGB' or 'RGBA' image."""
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image must be [C, H, W] with C = 1, 3 or 4, got shape {list(pixels.shape)}")
    return Image.fromarray(np.ascontiguousarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)))


def encoded(image: np.ndarray, fmt: str = "PNG", **options: Any) -> bytes:
    """One [C, H, W] image (float in [0, 1] or uint8; C = 1 grey, 3 RGB, 4 RGBA) as a file of
    Pillow's format `fmt`, with that format's save options."""
    return _file(_to_pil(to_uint8(image)), fmt, **options)


def _file(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def check_png(channels: int, field: str = "format") -> None:
    """BadRequest unless a model's images (of `channels`) can be PNGs: grey, RGB or RGBA. Checked
    before any compute, so a request that cannot be answered costs nothing."""
    if channels not in PNG_CHANNELS:
        raise BadRequest(f"{field}: PNG needs 1, 3 or 4 channels, the model has {channels}")


def png_bytes(image: np.ndarray) -> bytes:
    """One image as PNG at the fastest compression level, since these go straight onto the wire."""
    return encoded(image, "PNG", **WIRE_PNG)


def grid_png(images: np.ndarray, cols: int | None = None) -> bytes:
    """`grid` of [N, C, H, W] images as one PNG, compressed as `png_bytes` for the wire."""
    return _file(grid(images, cols), "PNG", **WIRE_PNG)


def grid(images: np.ndarray, cols: int | None = None, pad: int = 1, min_cell: int = 28) -> Image.Image:
    """[N, C, H, W] (float in [0, 1] or uint8) -> one image: rows of `cols` (default ceil(sqrt(N))),
    `pad` white pixels around every cell. Small images are scaled up by the integer factor
    max(1, min_cell // H) with nearest neighbours, so pixels stay sharp for viewing."""
    pixels = to_uint8(images)
    if pixels.ndim != 4 or len(pixels) == 0:
        raise ValueError(f"grid needs [N, C, H, W] with N >= 1, got shape {list(pixels.shape)}")
    n, c, h, w = pixels.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = -(-n // cols)
    canvas = np.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, top : top + h, left : left + w] = image
    out = _to_pil(canvas)
    scale = max(1, min_cell // h)
    return out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST) if scale > 1 else out
