"""Deep Zoom pyramid generation from a local slide file.

:class:`DeepZoomBuilder` renders tiles one at a time straight from the best OpenSlide level, so
memory stays bounded (one tile plus OpenSlide's cache) whatever the slide size. It is plain
synchronous CPU work; an asyncio caller pulls batches off the event loop, e.g.::

    with DeepZoomBuilder(path) as builder:
        batches = builder.iter_batches(64)
        while (batch := await loop.run_in_executor(pool, next, batches, None)) is not None:
            await asyncio.gather(*(upload(tile) for tile in batch))

A builder must be advanced by one thread at a time (sequential calls from different threads
are fine). For a process pool, pass the path and parameters (see :func:`build_dzi_to_directory`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

import openslide
from PIL import Image

from .geometry import DziGeometry, tile_relative_path
from .slide import (
    RGB,
    PathLike,
    SlideReadError,
    background_colour,
    encode_jpeg,
    encode_png,
    open_slide,
    read_scaled,
)

PLACEHOLDER_COLOUR: Final = (224, 224, 224)
# OpenSlide level downsamples are often slightly above powers of two (rounded level sizes):
# accept a level up to 1% coarser than asked rather than falling back to a 2x larger one.
_DOWNSAMPLE_TOLERANCE: Final = 0.01
# Deep Zoom levels up to this many pixels are rendered whole once and cut into tiles
# (at most ~4/3 of this, as RGB, is held in memory per builder: ~16 MB).
SMALL_LEVEL_PIXELS: Final = 4 * 1024 * 1024
MIN_CACHE_BYTES: Final = 32 * 1024 * 1024
MAX_CACHE_BYTES: Final = 192 * 1024 * 1024


class Tile(NamedTuple):
    level: int
    col: int
    row: int
    data: bytes


class TilePosition(NamedTuple):
    level: int
    col: int
    row: int


class DeepZoomBuilder:
    """Deep Zoom pyramid of one slide file (any format OpenSlide opens).

    Tiles that cannot be read (corrupt source data) are replaced by a flat grey placeholder of
    the right size and recorded in :meth:`failed_tiles`; the slide handle is reopened so later
    tiles are unaffected.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        tile_size: int = 254,
        overlap: int = 1,
        fmt: str = "jpeg",
        jpeg_quality: int = 90,
        cache_bytes: int | None = None,
    ) -> None:
        """``cache_bytes``: size of the OpenSlide decoded-tile cache for this builder. Default:
        enough for one row of Deep Zoom tiles at full resolution (so overlapping tiles do not
        decode source tiles twice), within 32..192 MiB."""
        if not 1 <= jpeg_quality <= 95:
            raise ValueError("jpeg_quality must be within 1..95")
        self._path = os.fspath(path)
        self._slide = open_slide(self._path)
        self._lock = threading.RLock()
        try:
            width, height = self._slide.dimensions
            self.geometry = DziGeometry(width, height, tile_size, overlap, fmt)
            if cache_bytes is None:
                cache_bytes = _default_cache_bytes(self._slide, tile_size, overlap)
            self._cache = openslide.OpenSlideCache(cache_bytes)
            self._slide.set_cache(self._cache)
        except Exception:
            self._slide.close()
            raise
        self._quality = jpeg_quality
        self._background: RGB = background_colour(self._slide)
        self._failed: list[TilePosition] = []
        self._placeholders: dict[tuple[int, int], bytes] = {}
        self._level_cache: dict[int, Image.Image] = {}
        self._uncacheable: set[int] = set()
        self._closed = False

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._level_cache.clear()
                self._slide.close()

    def __enter__(self) -> DeepZoomBuilder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- geometry
    @property
    def level_count(self) -> int:
        return self.geometry.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.geometry.level_dimensions

    @property
    def tile_count(self) -> int:
        return self.geometry.tile_count

    @property
    def format(self) -> str:
        return self.geometry.format

    @property
    def content_type(self) -> str:
        return self.geometry.content_type

    def tile_grid(self, level: int) -> tuple[int, int]:
        return self.geometry.tile_grid(level)

    def descriptor(self) -> str:
        """The ``.dzi`` XML descriptor text."""
        return self.geometry.to_descriptor()

    def failed_tiles(self) -> list[TilePosition]:
        """Tiles rendered as placeholders because the source could not be read (so far)."""
        return list(self._failed)

    # ---------------------------------------------------------------- tiles
    def iter_tiles(self, levels: Iterable[int] | None = None) -> Iterator[Tile]:
        """Yield every tile of the given levels (default: all, smallest level first), row by
        row. Only the tile being yielded is held in memory."""
        selected = range(self.level_count) if levels is None else list(levels)
        for level in selected:
            cols, rows = self.geometry.tile_grid(level)
            for row in range(rows):
                for col in range(cols):
                    yield Tile(level, col, row, self.render_tile(level, col, row))

    def iter_batches(
        self, batch_size: int = 64, levels: Iterable[int] | None = None
    ) -> Iterator[list[Tile]]:
        """Like :meth:`iter_tiles`, grouped into lists of at most ``batch_size`` tiles."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        batch: list[Tile] = []
        for tile in self.iter_tiles(levels):
            batch.append(tile)
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def render_tile(self, level: int, col: int, row: int) -> bytes:
        """Encoded bytes of one tile (raises :class:`TileOutOfRangeError` if it does not exist)."""
        x, y, w, h = self.geometry.tile_bounds(level, col, row)
        whole = self._small_level_image(level)
        if whole is not None:
            return self._encode(whole.crop((x, y, x + w, y + h)))
        try:
            image = self._read(level, (x, y, w, h))
        except openslide.OpenSlideError:
            self._record_failure(TilePosition(level, col, row))
            return self._placeholder(w, h)
        return self._encode(image)

    # ------------------------------------------------------------- internals
    def _read(self, level: int, rect: tuple[int, int, int, int]) -> Image.Image:
        """Read a rectangle of Deep Zoom level ``level`` from the best OpenSlide level."""
        x, y, w, h = rect
        downsample = float(self.geometry.level_downsample(level))
        slide = self._slide
        source_level = _best_level(slide.level_downsamples, downsample)
        relative = downsample / slide.level_downsamples[source_level]
        src = (x * relative, y * relative, w * relative, h * relative)
        return read_scaled(slide, source_level, src, (w, h), self._background)

    def _small_level_image(self, level: int) -> Image.Image | None:
        """Whole image of a small Deep Zoom level (<= SMALL_LEVEL_PIXELS), cached.

        The largest small level is read from the slide once; each smaller one is a 2x box
        reduction of the level above, so the low levels cost one read instead of one read of
        the whole slide per level. None when the level is large or its read failed (the caller
        then reads tile by tile, so a corrupt source region only spoils its own tiles)."""
        with self._lock:
            cached = self._level_cache.get(level)
            if cached is not None or level in self._uncacheable:
                return cached
            w, h = self.geometry.level_size(level)
            if w * h > SMALL_LEVEL_PIXELS:
                return None
            parent = None
            if level < self.geometry.max_level:
                parent = self._small_level_image(level + 1)
            if parent is not None:
                image = parent.reduce(2)
                if image.size != (w, h):  # ceil halving always matches; stay safe anyway
                    image = parent.resize((w, h), Image.Resampling.BOX)
            else:
                try:
                    image = self._read(level, (0, 0, w, h))
                except openslide.OpenSlideError:
                    self._uncacheable.add(level)
                    self._reopen()
                    return None
            self._level_cache[level] = image
            return image

    def _record_failure(self, position: TilePosition) -> None:
        self._failed.append(position)
        self._reopen()

    def _reopen(self) -> None:
        # An OpenSlide handle stays in an error state after a failed read: reopen it.
        with self._lock:
            if self._closed:
                return
            old = self._slide
            try:
                self._slide = open_slide(self._path)
                self._slide.set_cache(self._cache)
            except ValueError as exc:
                raise SlideReadError(f"slide cannot be reopened after an error: {exc}") from None
            finally:
                old.close()

    def _encode(self, image: Image.Image) -> bytes:
        if self.geometry.format == "png":
            return encode_png(image)
        return encode_jpeg(image, self._quality)

    def _placeholder(self, w: int, h: int) -> bytes:
        cached = self._placeholders.get((w, h))
        if cached is None:
            cached = self._encode(Image.new("RGB", (w, h), PLACEHOLDER_COLOUR))
            if len(self._placeholders) < 64:
                self._placeholders[(w, h)] = cached
        return cached


def _default_cache_bytes(slide: openslide.OpenSlide, tile_size: int, overlap: int) -> int:
    width = slide.dimensions[0]
    try:
        source_tile_h = int(slide.properties.get("openslide.level[0].tile-height", "256"))
    except ValueError:
        source_tile_h = 256
    source_tile_h = min(max(source_tile_h, 1), 8192)
    band = (-(-(tile_size + 2 * overlap) // source_tile_h) + 1) * source_tile_h
    return int(min(max(4 * width * band * 1.25, MIN_CACHE_BYTES), MAX_CACHE_BYTES))


def _best_level(downsamples: tuple[float, ...], target: float) -> int:
    """Index of the most reduced level that is still at least as detailed as ``target``."""
    best = 0
    for index, value in enumerate(downsamples):
        if value <= target * (1 + _DOWNSAMPLE_TOLERANCE) and value >= downsamples[best]:
            best = index
    return best


@dataclass(frozen=True)
class DziBuildSummary:
    descriptor: str
    level_count: int
    tile_count: int
    failed_tiles: list[TilePosition] = field(default_factory=list)
    seconds: float = 0.0


def build_dzi_to_directory(
    path: PathLike,
    out_dir: PathLike,
    *,
    tile_size: int = 254,
    overlap: int = 1,
    fmt: str = "jpeg",
    jpeg_quality: int = 90,
) -> DziBuildSummary:
    """Write ``slide.dzi`` and ``slide_files/{level}/{col}_{row}.{fmt}`` under ``out_dir``.
    Picklable arguments and result, so it can run in a process pool."""
    started = time.perf_counter()
    root = Path(out_dir)
    with DeepZoomBuilder(
        path, tile_size=tile_size, overlap=overlap, fmt=fmt, jpeg_quality=jpeg_quality
    ) as builder:
        tiles_dir = root / "slide_files"
        tiles_dir.mkdir(parents=True, exist_ok=True)
        for level in range(builder.level_count):
            (tiles_dir / str(level)).mkdir(exist_ok=True)
        count = 0
        for tile in builder.iter_tiles():
            target = tiles_dir / tile_relative_path(tile.level, tile.col, tile.row, fmt)
            target.write_bytes(tile.data)
            count += 1
        descriptor = builder.descriptor()
        (root / "slide.dzi").write_text(descriptor, encoding="utf-8")
        return DziBuildSummary(
            descriptor=descriptor,
            level_count=builder.level_count,
            tile_count=count,
            failed_tiles=builder.failed_tiles(),
            seconds=time.perf_counter() - started,
        )
