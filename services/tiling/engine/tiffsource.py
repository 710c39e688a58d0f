"""Direct access to the JPEG tiles of a pyramidal TIFF (Aperio SVS, generic tiled TIFF).

Only files whose pixel pyramid OpenSlide reads straight from tiled JPEG IFDs qualify (vendor
``aperio`` or ``generic-tiff``, 8-bit RGB/YCbCr, chunky, JPEG compression 7, one tile size);
anything else returns ``None`` from :func:`open_tiff_jpeg` and is tiled through OpenSlide.
Levels are matched to OpenSlide's level list, so both paths see the same pyramid.

Tile bytes are read with ``os.pread`` on one descriptor (thread-safe, releases the GIL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

import numpy as np
import openslide

from services.shared.wsi.tiff import (
    BITS_PER_SAMPLE,
    JPEG_TABLES,
    PHOTOMETRIC,
    PLANAR_CONFIGURATION,
    SAMPLES_PER_PIXEL,
    TiffError,
    TiffIfd,
    read_tiff,
)

from . import jpeg
from .slide import PathLike, SlideOpenError, background_colour, open_slide

JPEG_COMPRESSION: Final = 7
ELIGIBLE_VENDORS: Final = frozenset({"aperio", "generic-tiff"})
MAX_TILE_SIDE: Final = 2048
MAX_TILE_BYTES: Final = 64 << 20


@dataclass(frozen=True)
class TiffLevel:
    index: int  # OpenSlide level index
    width: int
    height: int
    tile_w: int
    tile_h: int
    photometric: int
    tables: bytes  # JPEGTables segments without SOI/EOI (b"" when absent)
    offsets: np.ndarray
    counts: np.ndarray

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_h)


class TiffJpegSource:
    """Tiled-JPEG pyramid of one TIFF file."""

    def __init__(self, path: PathLike, levels: list[TiffLevel], background: tuple[int, int, int]):
        self.path = os.fspath(path)
        self.levels = levels
        self.background = background
        self._fd = os.open(self.path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size

    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def tile_size(self) -> tuple[int, int]:
        return self.levels[0].tile_w, self.levels[0].tile_h

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TiffJpegSource:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def raw_tile(self, level: int, col: int, row: int) -> bytes:
        """The tile's bytes as stored (no tables). Raises ``ValueError`` when the tile's
        offsets are impossible or it cannot be read in full."""
        lv = self.levels[level]
        if not (0 <= col < lv.cols and 0 <= row < lv.rows):
            raise ValueError("tile outside the level")
        index = row * lv.cols + col
        if index >= len(lv.offsets):
            raise ValueError("tile missing from the file")
        offset, count = int(lv.offsets[index]), int(lv.counts[index])
        if count <= 0 or count > MAX_TILE_BYTES or offset < 0 or offset + count > self._size:
            raise ValueError("tile lies outside the file")
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise ValueError("short read")
        return data

    def jfif_tile(self, level: int, col: int, row: int) -> bytes:
        """The tile as a standalone JPEG stream (tables spliced in, colour marker added)."""
        lv = self.levels[level]
        return jpeg.standalone(self.raw_tile(level, col, row), lv.tables, lv.photometric)


def _eligible_ifd(ifd: TiffIfd) -> bool:
    try:
        if not ifd.is_tiled or ifd.compression != JPEG_COMPRESSION:
            return False
        if (ifd.int_value(SAMPLES_PER_PIXEL, 1) or 1) != 3:
            return False
        if (ifd.int_value(PLANAR_CONFIGURATION, 1) or 1) != 1:
            return False
        bits = ifd.get(BITS_PER_SAMPLE)
        if bits is None or any(b != 8 for b in bits.ints()):
            return False
        if ifd.int_value(PHOTOMETRIC, 0) not in (jpeg.PHOTOMETRIC_RGB, jpeg.PHOTOMETRIC_YCBCR):
            return False
        size = ifd.tile_size
        return size is not None and all(8 <= s <= MAX_TILE_SIDE and s % 8 == 0 for s in size)
    except TiffError:
        return False


def open_tiff_jpeg(path: PathLike) -> TiffJpegSource | None:
    """The tiled-JPEG source of ``path`` when OpenSlide's pyramid is exactly a set of
    eligible TIFF IFDs with one tile size, else ``None`` (use OpenSlide)."""
    try:
        with open_slide(path) as slide:
            vendor = slide.properties.get("openslide.vendor")
            dims = [tuple(int(v) for v in d) for d in slide.level_dimensions]
            background = background_colour(slide)
    except (SlideOpenError, openslide.OpenSlideError, OSError, ValueError):
        return None  # the OpenSlide path reports the problem
    if vendor not in ELIGIBLE_VENDORS:
        return None
    try:
        structure = read_tiff(path)
    except (TiffError, OSError):
        return None
    candidates = [ifd for ifd in structure.ifds if ifd.is_tiled]
    levels: list[TiffLevel] = []
    pos = 0
    for index, (w, h) in enumerate(dims):
        match = None
        while pos < len(candidates):
            ifd = candidates[pos]
            pos += 1
            if (ifd.width, ifd.height) == (w, h):
                match = ifd
                break
        if match is None or not _eligible_ifd(match):
            return None
        size = match.tile_size
        assert size is not None
        try:
            offsets, counts = match.segment_arrays()
            tables_tag = match.get(JPEG_TABLES)
            tables = jpeg.tables_payload(tables_tag.data if tables_tag is not None else None)
        except (TiffError, jpeg.JpegStructureError):
            return None
        level = TiffLevel(
            index=index,
            width=w,
            height=h,
            tile_w=size[0],
            tile_h=size[1],
            photometric=match.int_value(PHOTOMETRIC, 0) or 0,
            tables=tables,
            offsets=offsets,
            counts=counts,
        )
        if len(offsets) < level.cols * level.rows:
            return None
        levels.append(level)
    if not levels or len({(lv.tile_w, lv.tile_h) for lv in levels}) != 1:
        return None
    return TiffJpegSource(path, levels, background)
