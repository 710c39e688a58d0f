"""Slide access over OpenSlide: opening, geometry properties, scaled region reads,
low-resolution RGB and thumbnails.

Everything here is synchronous CPU/disk work meant to run in a thread or process pool.
Transparent pixels (outside scanned regions) are composited on a background colour, and
large reads are split into chunks so memory stays bounded whatever the slide size.
"""

from __future__ import annotations

import io
import math
import os
import re
from typing import Any, Final

import numpy as np
import openslide
from PIL import Image

WHITE: Final = (255, 255, 255)
# Largest region (in source pixels) read from OpenSlide in one call: 16 Mpx = 64 MB RGBA.
READ_BUDGET_PIXELS: Final = 16 * 1024 * 1024
_MAX_OUTPUT_SIDE: Final = 16384
UNREADABLE_COLOUR: Final = (224, 224, 224)
_TOLERANT_PIECE: Final = 64  # output pixels per side of a piece in the corrupt-slide fallback
_HEX_COLOUR_RE: Final = re.compile(r"[0-9A-Fa-f]{6}")
_VENDOR_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

PathLike = str | os.PathLike[str]
RGB = tuple[int, int, int]


class SlideOpenError(ValueError):
    """OpenSlide cannot open the file (unsupported format or corrupt header)."""


class SlideReadError(RuntimeError):
    """Reading pixels from an opened slide failed (corrupt tile data)."""


def _scrub(message: str, path: PathLike) -> str:
    # OpenSlide messages embed the file path; keep paths out of errors and logs.
    text = message.replace(os.fspath(path), "<slide>")
    return re.sub(r"Reading [^:]*: ", "", text)


def open_slide(path: PathLike) -> openslide.OpenSlide:
    """Open a slide with OpenSlide, turning its errors into :class:`SlideOpenError`."""
    try:
        return openslide.OpenSlide(os.fspath(path))
    except openslide.OpenSlideError as exc:
        raise SlideOpenError(f"cannot open slide: {_scrub(str(exc), path)}") from None
    except OSError as exc:
        raise SlideOpenError(f"cannot open slide: {exc.strerror or type(exc).__name__}") from None


def background_colour(slide: openslide.OpenSlide) -> RGB:
    """The slide's declared background colour (``openslide.background-color``), else white."""
    value = slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR)
    if value is None or _HEX_COLOUR_RE.fullmatch(value) is None:
        return WHITE
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def _positive_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number) or number <= 0:
        return None
    return number


def properties_of(slide: openslide.OpenSlide) -> dict[str, Any]:
    """Non-identifying geometry of an open slide (see :func:`slide_properties`)."""
    props = slide.properties
    width, height = slide.dimensions
    vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
    if vendor is not None and _VENDOR_RE.fullmatch(vendor) is None:
        vendor = None
    return {
        "width": int(width),
        "height": int(height),
        "level_count": int(slide.level_count),
        "level_dimensions": [[int(w), int(h)] for w, h in slide.level_dimensions],
        "mpp_x": _positive_float(props.get(openslide.PROPERTY_NAME_MPP_X)),
        "mpp_y": _positive_float(props.get(openslide.PROPERTY_NAME_MPP_Y)),
        "objective_power": _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
        "vendor": vendor,
    }


def slide_properties(path: PathLike) -> dict[str, Any]:
    """Geometry only, from OpenSlide's standard properties: ``width``, ``height``,
    ``level_count``, ``level_dimensions`` (list of ``[w, h]``), ``mpp_x``, ``mpp_y``,
    ``objective_power`` (floats or None) and ``vendor`` (e.g. ``"aperio"`` or None).
    No vendor-specific property (which may carry identifiers) is ever copied."""
    with open_slide(path) as slide:
        return properties_of(slide)


# ------------------------------------------------------------------- pixel reads
def flatten(image: Image.Image, background: RGB = WHITE) -> Image.Image:
    """RGBA (non-premultiplied, as OpenSlide returns it) -> RGB composited on ``background``."""
    if image.mode == "RGB":
        return image
    if image.mode != "RGBA":
        return image.convert("RGB")
    alpha = image.getchannel("A")
    low, _high = alpha.getextrema()
    if low == 255:
        return image.convert("RGB")
    canvas = Image.new("RGB", image.size, background)
    canvas.paste(image.convert("RGB"), (0, 0), alpha)
    return canvas


def read_scaled(
    slide: openslide.OpenSlide,
    level: int,
    src: tuple[float, float, float, float],
    out_size: tuple[int, int],
    background: RGB = WHITE,
    budget: int = READ_BUDGET_PIXELS,
) -> Image.Image:
    """Read the rectangle ``src = (x, y, w, h)`` given in the pixel space of OpenSlide level
    ``level`` and return it resized to ``out_size`` as RGB. Reads bigger than ``budget``
    source pixels are split into a grid of chunks, each resized to its share of the output.
    Raises :class:`openslide.OpenSlideError` when the slide data cannot be decoded."""
    out_w, out_h = out_size
    if out_w < 1 or out_h < 1:
        raise ValueError("output size must be positive")
    sx, sy, sw, sh = src
    if sw <= 0 or sh <= 0:
        raise ValueError("source rectangle must be non-empty")
    if math.ceil(sw + 1) * math.ceil(sh + 1) <= budget:
        return _read_once(slide, level, src, out_size, background)

    canvas = Image.new("RGB", out_size, background)
    ratio_x, ratio_y = sw / out_w, sh / out_h
    side = max(1, math.isqrt(budget))
    step_x = max(1, math.floor(side / ratio_x) - 1)
    step_y = max(1, math.floor(side / ratio_y) - 1)
    for oy in range(0, out_h, step_y):
        oh = min(step_y, out_h - oy)
        for ox in range(0, out_w, step_x):
            ow = min(step_x, out_w - ox)
            piece = (sx + ox * ratio_x, sy + oy * ratio_y, ow * ratio_x, oh * ratio_y)
            canvas.paste(_read_once(slide, level, piece, (ow, oh), background), (ox, oy))
    return canvas


def _read_once(
    slide: openslide.OpenSlide,
    level: int,
    src: tuple[float, float, float, float],
    out_size: tuple[int, int],
    background: RGB,
) -> Image.Image:
    level_w, level_h = slide.level_dimensions[level]
    sx, sy, sw, sh = src
    ix = min(max(0, math.floor(sx)), level_w - 1)
    iy = min(max(0, math.floor(sy)), level_h - 1)
    iw = max(1, min(level_w - ix, math.ceil(sx + sw - 1e-9) - ix))
    ih = max(1, min(level_h - iy, math.ceil(sy + sh - 1e-9) - iy))
    downsample = slide.level_downsamples[level]
    location = (round(ix * downsample), round(iy * downsample))
    region = flatten(slide.read_region(location, level, (iw, ih)), background)
    if region.size == out_size:
        return region
    return region.resize(out_size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def low_res_level(slide: openslide.OpenSlide, max_side: int) -> int:
    """Smallest level whose longer side is at least ``max_side`` (level 0 if none is)."""
    candidates = [i for i, (w, h) in enumerate(slide.level_dimensions) if max(w, h) >= max_side]
    return max(candidates) if candidates else 0


def _low_res_plan(slide: openslide.OpenSlide, max_side: int) -> tuple[int, int, int]:
    if not isinstance(max_side, int) or not 1 <= max_side <= _MAX_OUTPUT_SIDE:
        raise ValueError(f"max_side must be within 1..{_MAX_OUTPUT_SIDE}")
    level = low_res_level(slide, max_side)
    level_w, level_h = slide.level_dimensions[level]
    scale = min(1.0, max_side / max(level_w, level_h))
    out_w = max(1, min(max_side, round(level_w * scale)))
    out_h = max(1, min(max_side, round(level_h * scale)))
    return level, out_w, out_h


def read_low_res(
    slide: openslide.OpenSlide, max_side: int = 2048, background: RGB = WHITE
) -> Image.Image:
    """Whole slide as RGB with its longer side at most ``max_side`` (never upscaled), read
    from the smallest level at or above that size and composited on ``background``.
    Raises :class:`openslide.OpenSlideError` if any part cannot be decoded."""
    level, out_w, out_h = _low_res_plan(slide, max_side)
    level_w, level_h = slide.level_dimensions[level]
    return read_scaled(
        slide, level, (0.0, 0.0, float(level_w), float(level_h)), (out_w, out_h), background
    )


class SlideHandle:
    """An OpenSlide handle that can be reopened: OpenSlide leaves a handle in a permanent
    error state after a failed read, so tolerant readers reopen it and carry on."""

    def __init__(self, path: PathLike, cache: openslide.OpenSlideCache | None = None) -> None:
        self.path = os.fspath(path)
        self._cache = cache
        self.slide = open_slide(self.path)
        if cache is not None:
            self.slide.set_cache(cache)

    def set_cache(self, cache: openslide.OpenSlideCache) -> None:
        self._cache = cache
        self.slide.set_cache(cache)

    def reopen(self) -> None:
        old = self.slide
        try:
            self.slide = open_slide(self.path)
            if self._cache is not None:
                self.slide.set_cache(self._cache)
        except SlideOpenError as exc:
            raise SlideReadError(f"slide cannot be reopened after a read error: {exc}") from None
        finally:
            old.close()

    def close(self) -> None:
        self.slide.close()

    def __enter__(self) -> SlideHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


Rect = tuple[int, int, int, int]


def read_scaled_tolerant(
    handle: SlideHandle,
    level: int,
    src: tuple[float, float, float, float],
    out_size: tuple[int, int],
    background: RGB = WHITE,
    piece: int = 64,
) -> tuple[Image.Image, list[Rect]]:
    """:func:`read_scaled`, but if the region holds corrupt source data, read it again in
    ``piece`` x ``piece`` output pieces (reopening the slide after each failure) and leave the
    unreadable pieces :data:`UNREADABLE_COLOUR`. Returns the image and the unreadable
    rectangles ``(x, y, w, h)`` in output pixels (empty when everything was read)."""
    try:
        return read_scaled(handle.slide, level, src, out_size, background), []
    except openslide.OpenSlideError:
        handle.reopen()
    out_w, out_h = out_size
    sx, sy, sw, sh = src
    ratio_x, ratio_y = sw / out_w, sh / out_h
    canvas = Image.new("RGB", out_size, UNREADABLE_COLOUR)
    bad: list[Rect] = []
    for oy in range(0, out_h, piece):
        oh = min(piece, out_h - oy)
        for ox in range(0, out_w, piece):
            ow = min(piece, out_w - ox)
            part = (sx + ox * ratio_x, sy + oy * ratio_y, ow * ratio_x, oh * ratio_y)
            try:
                image = read_scaled(handle.slide, level, part, (ow, oh), background)
            except openslide.OpenSlideError:
                bad.append((ox, oy, ow, oh))
                handle.reopen()
                continue
            canvas.paste(image, (ox, oy))
    return canvas, bad


def _read_low_res_tolerant(path: PathLike, max_side: int, background: RGB) -> Image.Image:
    with SlideHandle(path) as handle:
        level, out_w, out_h = _low_res_plan(handle.slide, max_side)
        level_w, level_h = handle.slide.level_dimensions[level]
        image, bad = read_scaled_tolerant(
            handle, level, (0.0, 0.0, float(level_w), float(level_h)), (out_w, out_h), background
        )
    if sum(w * h for _, _, w, h in bad) >= out_w * out_h:
        raise SlideReadError("cannot read slide pixels: every region is corrupt")
    return image


def read_low_res_rgb(path: PathLike, max_side: int = 2048) -> np.ndarray:
    """uint8 array H x W x 3 of the whole slide, longer side <= ``max_side``, transparent
    regions composited on white. This is the tissue model's input. Corrupt regions come out
    grey; :class:`SlideReadError` if no region is readable."""
    return np.array(_read_low_res_tolerant(path, max_side, WHITE), dtype=np.uint8)


# Encoded images carry pixels only: no ICC profile (OpenSlide attaches the slide's profile to
# every region; 3 KB per tile, and JPEG and PNG would otherwise differ), no EXIF, no text.
def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, icc_profile=None)
    return buffer.getvalue()


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6, icc_profile=None)
    return buffer.getvalue()


def make_thumbnail(path: PathLike, max_size: int = 1024, quality: int = 90) -> bytes:
    """JPEG thumbnail of the whole slide, longer side <= ``max_size``. Corrupt regions come
    out grey; :class:`SlideReadError` if no region is readable."""
    with open_slide(path) as slide:
        background = background_colour(slide)
    return encode_jpeg(_read_low_res_tolerant(path, max_size, background), quality)
