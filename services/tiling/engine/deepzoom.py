"""Deep Zoom pyramid generation from a local slide file.

:class:`DeepZoomBuilder` renders the large levels tile by tile straight from the best OpenSlide
level and the small levels (<= 4 Mpx) from one cached read, so memory stays bounded (one tile,
~16 MB of small levels and OpenSlide's tile cache) whatever the slide size. It is plain
synchronous CPU work; an asyncio caller pulls batches off the event loop, e.g.::

    with DeepZoomBuilder(path) as builder:
        batches = builder.iter_batches(64)
        while (batch := await loop.run_in_executor(pool, next, batches, None)) is not None:
            await asyncio.gather(*(upload(tile) for tile in batch))

Rendering is serialised by an internal lock, so a builder may be shared between threads
(concurrency comes from running several builders). For a process pool, pass the path and
parameters (see :func:`build_dzi_to_directory`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

import openslide
from PIL import Image

from .geometry import DziGeometry, GeometryView, tile_relative_path
from .slide import (
    RGB,
    UNREADABLE_COLOUR,
    PathLike,
    Rect,
    SlideHandle,
    background_colour,
    encode_jpeg,
    encode_png,
    read_scaled,
    read_scaled_tolerant,
)

PLACEHOLDER_COLOUR: Final = UNREADABLE_COLOUR
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


class DeepZoomBuilder(GeometryView):
    """Deep Zoom pyramid of one slide file (any format OpenSlide opens).

    A tile whose source pixels cannot be decoded (corrupt source tile) is still emitted, with
    the unreadable part (or, at the large levels, the whole tile) in flat grey, and recorded in
    :meth:`failed_tiles`. The slide is reopened after each failure, so later tiles are
    unaffected.
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
        self._handle = SlideHandle(path)
        self._lock = threading.RLock()
        try:
            slide = self._handle.slide
            width, height = slide.dimensions
            self.geometry = DziGeometry(width, height, tile_size, overlap, fmt)
            if cache_bytes is None:
                cache_bytes = _default_cache_bytes(slide, tile_size, overlap)
            self._handle.set_cache(openslide.OpenSlideCache(cache_bytes))
            self._background: RGB = background_colour(slide)
        except Exception:
            self._handle.close()
            raise
        self._quality = jpeg_quality
        self._failed: list[TilePosition] = []
        self._placeholders: dict[tuple[int, int], bytes] = {}
        # level -> (whole level image, unreadable rectangles in level pixels)
        self._level_cache: dict[int, tuple[Image.Image, list[Rect]]] = {}
        self._closed = False

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._level_cache.clear()
                self._handle.close()

    def __enter__(self) -> DeepZoomBuilder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- geometry
    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.geometry.level_dimensions

    def tile_grid(self, level: int) -> tuple[int, int]:
        return self.geometry.tile_grid(level)

    def failed_tiles(self) -> list[TilePosition]:
        """Tiles (so far) that contain placeholder pixels because the source was unreadable."""
        return list(self._failed)

    # ---------------------------------------------------------------- tiles
    def iter_tiles(self, levels: Iterable[int] | None = None) -> Iterator[Tile]:
        """Yield every tile of the given levels (default: all, smallest level first), row by
        row. Only the tile being yielded (plus the small-level cache) is held in memory."""
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
        with self._lock:
            if self._closed:
                raise ValueError("builder is closed")
            cached = self._small_level(level)
            if cached is not None:
                whole, bad = cached
                if any(_intersects((x, y, w, h), rect) for rect in bad):
                    self._failed.append(TilePosition(level, col, row))
                return self._encode(whole.crop((x, y, x + w, y + h)))
            try:
                image = self._read(level, (x, y, w, h))
            except openslide.OpenSlideError:
                self._failed.append(TilePosition(level, col, row))
                self._handle.reopen()
                return self._placeholder(w, h)
        return self._encode(image)

    # ------------------------------------------------------------- internals
    def _source(self, level: int, rect: Rect) -> tuple[int, tuple[float, float, float, float]]:
        """Best OpenSlide level for Deep Zoom ``level`` and ``rect`` in its pixel space."""
        x, y, w, h = rect
        downsample = float(self.geometry.level_downsample(level))
        downsamples = self._handle.slide.level_downsamples
        source_level = _best_level(downsamples, downsample)
        relative = downsample / downsamples[source_level]
        return source_level, (x * relative, y * relative, w * relative, h * relative)

    def _read(self, level: int, rect: Rect) -> Image.Image:
        source_level, src = self._source(level, rect)
        return read_scaled(
            self._handle.slide, source_level, src, (rect[2], rect[3]), self._background
        )

    def _small_level(self, level: int) -> tuple[Image.Image, list[Rect]] | None:
        """Whole image of a small Deep Zoom level (<= SMALL_LEVEL_PIXELS) and its unreadable
        rectangles, cached. The largest small level is read from the slide once (piece by piece
        if it holds corrupt data); each smaller one is a 2x box reduction of the level above.
        So the low levels cost one read in total, and a corrupt source tile only greys its own
        area. None for large levels (rendered tile by tile)."""
        cached = self._level_cache.get(level)
        if cached is not None:
            return cached
        w, h = self.geometry.level_size(level)
        if w * h > SMALL_LEVEL_PIXELS:
            return None
        parent = self._small_level(level + 1) if level < self.geometry.max_level else None
        if parent is not None:
            parent_image, parent_bad = parent
            image = parent_image.reduce(2)
            if image.size != (w, h):  # ceil halving always matches; stay safe anyway
                image = parent_image.resize((w, h), Image.Resampling.BOX)
            bad = [_halve(rect) for rect in parent_bad]
        else:
            source_level, src = self._source(level, (0, 0, w, h))
            image, bad = read_scaled_tolerant(
                self._handle, source_level, src, (w, h), self._background, piece=128
            )
        self._level_cache[level] = (image, bad)
        return image, bad

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


def _intersects(a: Rect, b: Rect) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _halve(rect: Rect) -> Rect:
    x, y, w, h = rect
    x0, y0 = x // 2, y // 2
    return x0, y0, -(-(x + w) // 2) - x0, -(-(y + h) // 2) - y0


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
