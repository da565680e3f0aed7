"""service.imaging: real image files of every format in, the model's pixels out; PNGs and grids back."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.imaging import (
    ImageError,
    Preprocessing,
    crop_box,
    grid,
    load_image,
    open_image,
    pad_size,
    parse_color,
    parse_size,
    png_bytes,
    to_pixels,
    to_uint8,
)

ROOT = Path(__file__).resolve().parent.parent
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
WHITE, BLACK = Preprocessing(size=(2, 2)), Preprocessing(size=(2, 2), background=(0, 0, 0))


def halves(w: int = 16, h: int = 16, left=RED, right=BLUE) -> Image.Image:
    """An RGB image, left half one colour, right half another: geometry shows in the pixels."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2 :] = left, right
    return Image.fromarray(a)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def rgb(pixels: np.ndarray, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in pixels[:, y, x])


# --- formats, by content -----------------------------------------------------------------------

LOSSLESS = {"PNG": {}, "GIF": {}, "WEBP": {"lossless": True}, "BMP": {}, "TIFF": {}}


@pytest.mark.parametrize("fmt", [*LOSSLESS, "JPEG"])
def test_every_format_is_read_by_content_whatever_the_name(tmp_path, fmt):
    """The same picture through each format, under names whose extension lies, is upper case, is
    missing, or has spaces and non-ASCII."""
    image = halves()
    data = encoded(image, fmt, **LOSSLESS.get(fmt, {"quality": 95, "subsampling": 0}))  # 4:4:4: sharp colour edge
    prep = Preprocessing(size=(16, 16))
    tolerance = 0 if fmt in LOSSLESS else 8
    wrong = "picture.jpg" if fmt != "JPEG" else "picture.png"
    for name in (wrong, "UPPER.PNG", "no_extension", "with space é ü.img"):
        path = tmp_path / name
        path.write_bytes(data)
        pixels = load_image(path, prep)
        assert pixels.shape == (3, 16, 16) and pixels.dtype == np.uint8
        assert np.abs(pixels.astype(int) - np.asarray(image).transpose(2, 0, 1)).max() <= tolerance, name
    assert np.array_equal(load_image(data, prep), load_image(path, prep))  # bytes and path agree


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (GREEN, RED, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    pixels = load_image(path, Preprocessing(size=(8, 8)))
    assert rgb(pixels, 0, 0) == GREEN and rgb(pixels, 7, 7) == GREEN


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_orientation_is_applied(orientation, top, bottom):
    """An 8x4 picture stored sideways (EXIF 6: rotate 90 clockwise; 8: anticlockwise) stands 4x8."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(halves(8, 4), "JPEG", exif=exif, quality=95)
    assert open_image(data).size == (4, 8)
    pixels = load_image(data, Preprocessing(size=(8, 4)))
    assert np.abs(np.subtract(rgb(pixels, 1, 2), top)).max() <= 8
    assert np.abs(np.subtract(rgb(pixels, 6, 2), bottom)).max() <= 8


# --- transparency -----------------------------------------------------------------------------


def rgba_png() -> bytes:
    """Pixel (0, 0): red under alpha 0; (0, 1): opaque green; (1, 0): blue at alpha 128."""
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0], a[0, 1], a[1, 0], a[1, 1] = (*RED, 0), (*GREEN, 255), (*BLUE, 128), (*GREEN, 255)
    return encoded(Image.fromarray(a), "PNG")


def test_rgba_is_composited_on_the_background_not_left_as_the_hidden_colour():
    on_white, on_black = load_image(rgba_png(), WHITE), load_image(rgba_png(), BLACK)
    assert rgb(on_white, 0, 0) == (255, 255, 255) and rgb(on_black, 0, 0) == (0, 0, 0)
    assert rgb(on_white, 0, 1) == GREEN == rgb(on_black, 0, 1)
    assert rgb(on_white, 1, 0) == (127, 127, 255) and rgb(on_black, 1, 0) == (0, 0, 128)
    other = load_image(rgba_png(), Preprocessing(size=(2, 2), background=(10, 20, 30)))
    assert rgb(other, 0, 0) == (10, 20, 30)


def test_grey_with_alpha_is_composited():
    la = Image.fromarray(np.array([[[10, 0], [200, 255]]], np.uint8))
    assert la.mode == "LA"
    data = encoded(la, "PNG")
    assert load_image(data, Preprocessing(channels=1, size=(1, 2)))[0, 0].tolist() == [255, 200]
    assert load_image(data, Preprocessing(channels=1, size=(1, 2), background=(0, 0, 0)))[0, 0].tolist() == [0, 200]


def test_a_transparent_palette_index_is_composited(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([*RED, *GREEN])
    p.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        data = encoded(p, fmt, transparency=1)
        assert Image.open(io.BytesIO(data)).info["transparency"] == 1
        pixels = load_image(data, Preprocessing(size=(1, 2), background=(0, 0, 255)))
        assert rgb(pixels, 0, 0) == RED and rgb(pixels, 0, 1) == BLUE, fmt


def test_a_transparent_key_colour_is_composited():
    image = halves(2, 1, left=RED, right=GREEN)
    data = encoded(image, "PNG", transparency=GREEN)
    pixels = load_image(data, Preprocessing(size=(1, 2)))
    assert rgb(pixels, 0, 0) == RED and rgb(pixels, 0, 1) == (255, 255, 255)


# --- bit depths and colour spaces ---------------------------------------------------------------

SIXTEEN = np.array([[65535, 32896, 0, 257, 1000]], np.uint16)
EIGHT = [255, 128, 0, 1, 4]  # rint(v / 257): scaled, not clipped at 255


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(fmt):
    data = encoded(Image.fromarray(SIXTEEN), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert load_image(data, Preprocessing(channels=1, size=(1, 5)))[0, 0].tolist() == EIGHT
    assert load_image(data, Preprocessing(channels=3, size=(1, 5)))[:, 0].tolist() == [EIGHT] * 3


def test_32_bit_int_and_16_bit_key_transparency():
    prep = Preprocessing(channels=1, size=(1, 5))
    assert to_pixels(Image.fromarray(SIXTEEN.astype(np.int32)), prep)[0, 0].tolist() == EIGHT
    keyed = Image.fromarray(SIXTEEN)
    keyed.info["transparency"] = 0
    assert to_pixels(keyed, Preprocessing(channels=1, size=(1, 5), background=(50, 50, 50)))[0, 0].tolist() == [
        255, 128, 50, 1, 4]  # fmt: skip


def test_float_images_in_unit_range_and_in_0_255():
    prep = Preprocessing(channels=1, size=(1, 3))
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert unit.mode == "F"
    assert to_pixels(unit, prep)[0, 0].tolist() == [0, 128, 255]
    bytes_scale = Image.fromarray(np.array([[-3.0, 127.6, 300.0]], np.float32))
    assert to_pixels(bytes_scale, prep)[0, 0].tolist() == [0, 128, 255]
    data = encoded(unit, "TIFF")
    assert load_image(data, prep)[0, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt):
    data = encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.abs(np.subtract(rgb(load_image(data, Preprocessing(size=(4, 4))), 1, 1), RED)).max() <= 2


def test_one_bit_images():
    one = Image.fromarray(np.array([[True, False]]))
    assert one.mode == "1"
    assert load_image(encoded(one, "PNG"), Preprocessing(channels=1, size=(1, 2)))[0, 0].tolist() == [255, 0]


def test_grey_from_rgb_is_itu_601_luma():
    image = Image.fromarray(np.array([[RED, GREEN, BLUE]], np.uint8))
    pixels = to_pixels(image, Preprocessing(channels=1, size=(1, 3)))
    assert pixels.shape == (1, 1, 3) and pixels[0, 0].tolist() == [76, 150, 29]


def test_a_mode_without_a_conversion_is_an_image_error():
    with pytest.raises(ImageError, match="unsupported: La"):
        to_pixels(Image.new("La", (2, 2)), WHITE)


# --- geometry -------------------------------------------------------------------------------------


def test_crop_takes_the_centre_and_pad_fits_the_whole_on_the_background():
    """A 20x10 image, red left and blue right, into 10x10."""
    image = halves(20, 10)
    crop = to_pixels(image, Preprocessing(size=(10, 10), fit="crop"))
    expected = np.zeros((3, 10, 10), np.uint8)
    expected[0, :, :5], expected[2, :, 5:] = 255, 255
    assert np.array_equal(crop, expected)  # the middle 10 columns, no resampling
    pad = to_pixels(image, Preprocessing(size=(10, 10), fit="pad", background=(0, 255, 0)))
    assert all(rgb(pad, y, x) == GREEN for y in (0, 1, 7, 8, 9) for x in range(10))  # 10x5 centred: rows 2..6
    assert rgb(pad, 4, 0) == RED and rgb(pad, 4, 9) == BLUE
    odd = to_pixels(halves(21, 10), Preprocessing(size=(10, 10), fit="crop"))  # 10 red, 11 blue: columns 5..14
    assert np.array_equal(odd, expected)  # a whole-pixel crop, not a half-pixel resample


def test_resizing_downscales_with_antialiasing():
    """A fine checkerboard averages to grey, where sampling without a filter would keep 0 or 255."""
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    pixels = to_pixels(Image.fromarray(board), Preprocessing(channels=1, size=(8, 8)))
    assert np.abs(pixels.astype(int) - 128).max() <= 2


def test_crop_of_a_taller_image_scales_then_crops():
    a = np.zeros((40, 20, 3), np.uint8)
    a[:10], a[10:30], a[30:] = RED, GREEN, BLUE  # a band at top and bottom, green in the middle
    pixels = to_pixels(Image.fromarray(a), Preprocessing(size=(10, 10)))  # scaled to 10x20, middle 10 rows
    assert (pixels[1] >= 240).all() and (pixels[[0, 2]] <= 15).all()  # only Lanczos' faint ringing at the edges
    assert all(rgb(pixels, y, x) == GREEN for y in range(3, 7) for x in range(10))


def test_an_image_at_the_target_size_comes_back_identical():
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    for fit in ("crop", "pad"):
        colour_png, grey_png = encoded(Image.fromarray(colour), "PNG"), encoded(Image.fromarray(grey), "PNG")
        assert np.array_equal(load_image(colour_png, Preprocessing(size=(24, 32), fit=fit)), colour.transpose(2, 0, 1))
        assert np.array_equal(load_image(grey_png, Preprocessing(channels=1, size=(24, 32), fit=fit)), grey[None])


SOURCE = st.integers(1, 5000)  # a side of a file's image, 1 pixel to a large photo
TARGET = st.integers(1, 512)  # a side of a model's images


@settings(max_examples=2000, deadline=None)
@given(w=SOURCE, h=SOURCE, width=TARGET, height=TARGET)
def test_the_crop_box_lies_inside_the_image_centred_with_the_targets_shape(w, h, width, height):
    left, top, right, bottom = crop_box(w, h, width, height)
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    assert right - left == w or bottom - top == h  # as large as fits: one side whole
    assert (right - left) * height == pytest.approx((bottom - top) * width, rel=1e-9)
    assert left + right == pytest.approx(w, abs=1e-9) and top + bottom == pytest.approx(h, abs=1e-9)


@settings(max_examples=2000, deadline=None)
@given(w=SOURCE, h=SOURCE, width=TARGET, height=TARGET)
def test_the_padded_size_fits_the_target_and_keeps_the_aspect(w, h, width, height):
    sw, sh = pad_size(w, h, width, height)
    assert 1 <= sw <= width and 1 <= sh <= height
    assert sw == width or sh == height
    assert abs(sw * h - sh * w) <= max(w, h)  # within half a pixel of the aspect, on either side


def uniform(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), (200, 30, 90))


@settings(max_examples=150, deadline=None)
@given(w=st.integers(1, 3000), h=st.integers(1, 3000), width=st.integers(1, 96), height=st.integers(1, 96),
       fit=st.sampled_from(["crop", "pad"]))  # fmt: skip
def test_any_image_size_becomes_the_models_size(w, h, width, height, fit):
    """Whole images through Pillow: every source size, square and non-square targets, both fits."""
    prep = Preprocessing(size=(height, width), fit=fit, background=(0, 255, 0))
    pixels = to_pixels(uniform(w, h), prep)
    assert pixels.shape == (3, height, width)
    inside = np.abs(pixels.astype(int) - np.array([200, 30, 90])[:, None, None]).max(axis=0) <= 2
    if fit == "crop":
        assert inside.all()
    else:
        sw, sh = pad_size(w, h, width, height)
        x0, y0 = (width - sw) // 2, (height - sh) // 2
        assert inside[y0 : y0 + sh, x0 : x0 + sw].all()
        assert inside.sum() == sw * sh  # the rest is background


@pytest.mark.parametrize("w, h", [(57, 49), (49, 52), (58, 49), (129, 98), (49, 49), (1, 1000), (4000, 1)])
def test_the_sizes_that_once_crashed_the_crop(w, h):
    for size in [(32, 32), (16, 16), (64, 48)]:
        assert to_pixels(uniform(w, h), Preprocessing(size=size)).shape == (3, *size)


# --- bad files ------------------------------------------------------------------------------------


def test_bad_files_raise_image_errors_that_say_why(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    noise = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)), "PNG")
    for source, kind in [(b"", "empty file"), (empty, "empty file"), (noise[: len(noise) // 2], "truncated"),
                         (b"hello, not a picture\n", "not an image"),
                         (encoded(halves(), "JPEG")[:-300], "truncated")]:  # fmt: skip
        with pytest.raises(ImageError, match=f"^{kind}"):
            open_image(source)
    assert issubclass(ImageError, ValueError)
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.png")


def test_decompression_bombs_are_refused_at_pillows_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="^too large"), pytest.warns(Image.DecompressionBombWarning):
        open_image(encoded(Image.new("L", (12, 12)), "PNG"))  # 144: Pillow itself only warns
    with pytest.raises(ImageError, match="^too large"):
        open_image(encoded(Image.new("L", (20, 20)), "PNG"))  # 400: Pillow raises
    assert open_image(encoded(Image.new("L", (10, 10)), "PNG")).size == (10, 10)


# --- settings ---------------------------------------------------------------------------------------


def test_preprocessing_validates_and_round_trips_through_json():
    prep = Preprocessing(channels=1, size=[48, 64], fit="pad", background=[0, 0, 0])
    assert prep.size == (48, 64) and prep.background == (0, 0, 0)
    assert prep.to_json() == {"channels": 1, "size": [48, 64], "fit": "pad", "background": "#000000"}
    assert Preprocessing.from_json(prep.to_json()) == prep
    numpy_ints = Preprocessing(channels=np.int64(1), size=tuple(np.array([48, 64])), background=tuple(np.zeros(3, int)))
    assert json.loads(json.dumps(numpy_ints.to_json())) == prep.to_json() | {"fit": "crop"}
    assert Preprocessing().to_json() == {"channels": 3, "size": [32, 32], "fit": "crop", "background": "#ffffff"}
    assert Preprocessing.from_json({"channels": 1}) == Preprocessing(channels=1)
    with pytest.raises(ValueError, match="unknown settings"):
        Preprocessing.from_json({"channels": 1, "colour": "red"})
    for bad, match in [({"channels": 2}, "channels"), ({"channels": True}, "channels"), ({"size": (0, 4)}, "size"),
                       ({"size": (4,)}, "size"), ({"size": 32}, "size"), ({"fit": "stretch"}, "fit"),
                       ({"background": (0, 0, 256)}, "background"),
                       ({"background": "#fff"}, "background")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Preprocessing(**bad)


def test_parse_color_and_size():
    assert parse_color("white") == (255, 255, 255) and parse_color(" Black ") == (0, 0, 0)
    assert parse_color("#FF8000") == (255, 128, 0) and parse_color("#f80") == (255, 136, 0)
    assert parse_color("10, 20,30") == (10, 20, 30)
    for bad in ("red", "#12345", "#ggg", "1,2", "1,2,300", ""):
        with pytest.raises(ValueError, match="not a colour"):
            parse_color(bad)
    assert parse_size("32") == (32, 32) and parse_size("48x64") == (48, 64) and parse_size("48X64") == (48, 64)
    for bad in ("0", "x", "4x", "4x5x6", "-3", "big"):
        with pytest.raises(ValueError, match="not an image size"):
            parse_size(bad)


# --- output ---------------------------------------------------------------------------------------------


def test_to_uint8_rounds_and_clips_and_passes_uint8_through():
    assert to_uint8(np.array([-0.5, 0.0, 0.2, 0.5, 1.0, 1.5])).tolist() == [0, 0, 51, 128, 255, 255]
    u = np.array([1, 2, 3], np.uint8)
    assert to_uint8(u) is u


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_png_bytes_round_trip(channels, mode):
    pixels = np.random.default_rng(channels).integers(0, 256, (channels, 5, 7), dtype=np.uint8)
    for image in (pixels, pixels / 255.0):
        decoded = Image.open(io.BytesIO(png_bytes(image)))
        assert decoded.mode == mode
        a = np.asarray(decoded)
        assert np.array_equal(a[None] if a.ndim == 2 else a.transpose(2, 0, 1), pixels)
    with pytest.raises(ValueError, match="C = 1, 3 or 4"):
        png_bytes(np.zeros((2, 5, 7), np.uint8))


def test_grid_lays_out_cells_with_white_padding_and_scales_small_images():
    images = np.stack([np.full((1, 4, 3), v, np.uint8) for v in (0, 10, 20, 30, 40)])
    out = grid(images)  # cols = ceil(sqrt(5)) = 3, 2 rows; 13x11 before scaling by 28 // 4 = 7
    assert out.mode == "L" and out.size == (13 * 7, 11 * 7)
    small = np.asarray(out)[::7, ::7]
    assert (small[0] == 255).all() and (small[:, 0] == 255).all() and (small[5] == 255).all()
    assert small[6:10, 5:8].tolist() == [[40] * 3] * 4  # image 4: row 1, column 1
    assert (small[6:10, 9:12] == 255).all()  # the empty sixth cell
    assert np.array_equal(np.asarray(out)[:7, :7], np.full((7, 7), 255))  # nearest-neighbour blocks
    assert grid(np.zeros((1, 1, 8, 8))).size == (30, 30)  # 10x10 scaled by 28 // 8 = 3, as the drawers it replaces

    colour = np.random.default_rng(0).random((3, 3, 30, 20))
    out = grid(colour, cols=2, pad=2)
    assert out.mode == "RGB" and out.size == (2 * 22 + 2, 2 * 32 + 2)  # 30 >= 28: no scaling
    a = np.asarray(out).transpose(2, 0, 1)
    assert np.array_equal(a[:, 2:32, 24:44], to_uint8(colour[1]))
    assert np.array_equal(a[:, 34:64, 2:22], to_uint8(colour[2]))
    assert (a[:, 34:64, 24:44] == 255).all() and (a[:, :2] == 255).all() and (a[:, 32:34] == 255).all()


def test_imaging_imports_neither_torch_nor_grpc():
    code = "import sys, service.imaging; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
