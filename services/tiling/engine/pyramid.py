"""Parallel, bounded-memory Deep Zoom pyramid of a tiled-JPEG TIFF, copying source tiles.

Plan. Every Deep Zoom level ``L`` (downsample ``d = 2**(max_level - L)``) is either

* **copy** from a source level of the same size (within one pixel: Aperio rounds level sizes
  down, Deep Zoom up): when the Deep Zoom tile size equals the source tile size and there is
  no overlap, every tile that lies wholly inside the level *is* a source tile, so its
  compressed bytes are reused (tables spliced in, see :mod:`.jpeg`). Edge tiles (partial) are
  decoded, cropped and re-encoded;
* **render** from the finest source level at or above its resolution, reduced by the power
  of two ``f`` between them: source tiles are decoded already reduced by ``min(f, 8)`` in the
  DCT domain (libjpeg scaled IDCT) and box-reduced for the rest.

Work is cut into units of a few output tiles (one row, a run of columns); units run on a
thread pool (Pillow releases the GIL while decoding, resizing and encoding) or a process pool,
with a bounded number in flight, so memory is a few source tiles per worker whatever the slide
size. A copy level followed by a level rendered from the same source at ``f = 2`` is done in
one unit per 2x2 block: the decode needed for the smaller level also proves each copied tile
decodes. Other copied tiles are proven by a 1/8-scale decode.

A source tile that cannot be decoded (or whose stream is malformed) is painted
:data:`PLACEHOLDER_COLOUR` in every tile that uses it; those tiles are listed by
:meth:`TiffPyramidBuilder.failed_tiles`.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
from PIL import Image

from . import jpeg
from .deepzoom import Tile, TilePosition
from .geometry import DziGeometry, GeometryView
from .slide import UNREADABLE_COLOUR, PathLike
from .tiffsource import TiffJpegSource, open_tiff_jpeg

PLACEHOLDER_COLOUR: Final = UNREADABLE_COLOUR
# A source level may be up to this far (relative) from an exact power-of-two downsample.
_LEVEL_TOLERANCE: Final = 0.02
UNIT_TILES: Final = 8  # output tiles (columns) per work unit
UNIT_ROWS: Final = 2  # ... and rows: neighbours share source tiles when there is overlap
# Deep Zoom levels up to this many pixels are rendered whole, once (the largest of them from
# the source, each smaller one as a 2x box reduction of the one above) and cut into tiles.
SMALL_LEVEL_PIXELS: Final = 4 * 1024 * 1024
Mode = Literal["copy", "render"]
PoolKind = Literal["thread", "process"]


@dataclass(frozen=True)
class LevelPlan:
    level: int
    mode: Mode
    source: int
    factor: int  # power of two; 1 for copy
    coupled: bool = False  # copy level proven by the render of level - 1 in the same unit


@dataclass(frozen=True)
class Job:
    """Everything a worker needs (picklable, for process pools)."""

    path: str
    geometry: DziGeometry
    plans: tuple[LevelPlan, ...]
    quality: int


@dataclass
class UnitResult:
    tiles: list[Tile] = field(default_factory=list)
    failed: list[TilePosition] = field(default_factory=list)
    copied: int = 0


def plan_levels(source: TiffJpegSource, geometry: DziGeometry) -> tuple[LevelPlan, ...]:
    """One :class:`LevelPlan` per Deep Zoom level (index = level)."""
    tw, th = source.tile_size
    copy_geometry = geometry.overlap == 0 and geometry.tile_size == tw == th
    plans: list[LevelPlan] = []
    for level in range(geometry.level_count):
        d = geometry.level_downsample(level)
        lw, lh = geometry.level_size(level)
        plan: LevelPlan | None = None
        for index, lv in enumerate(source.levels):
            if abs(lv.width - lw) <= 1 and abs(lv.height - lh) <= 1:
                mode: Mode = "copy" if copy_geometry else "render"
                plan = LevelPlan(level, mode, index, 1)
                break
        if plan is None:
            best = 0
            for index, lv in enumerate(source.levels):
                ds = source.width / lv.width
                if ds <= d * (1 + _LEVEL_TOLERANCE):
                    best = index
            ds = source.width / source.levels[best].width
            factor = max(1, round(d / ds))
            factor = 1 << (factor.bit_length() - 1)  # power of two, never above d / ds
            plan = LevelPlan(level, "render", best, factor)
        plans.append(plan)
    for level in range(1, len(plans)):
        upper, lower = plans[level], plans[level - 1]
        if (
            upper.mode == "copy"
            and lower.mode == "render"
            and lower.source == upper.source
            and lower.factor == 2
        ):
            plans[level] = LevelPlan(level, "copy", upper.source, 1, coupled=True)
    return tuple(plans)


# ------------------------------------------------------------------------------- workers
_SOURCES: dict[str, TiffJpegSource] = {}
_SOURCES_LOCK = threading.Lock()


def _source(path: str) -> TiffJpegSource:
    with _SOURCES_LOCK:
        src = _SOURCES.get(path)
        if src is None:
            src = open_tiff_jpeg(path)
            if src is None:
                raise RuntimeError("source is no longer a tiled-JPEG TIFF")
            _SOURCES[path] = src
        return src


def _forget_source(path: str) -> None:
    with _SOURCES_LOCK:
        src = _SOURCES.pop(path, None)
    if src is not None:
        src.close()


class _Unit:
    """Renders one unit; decoded source tiles are memoised for the unit only."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.src = _source(job.path)
        self.decoded: dict[tuple[int, int, int, int], Image.Image | None] = {}
        self.placeholders: dict[tuple[int, int], bytes] = {}
        self.out = UnitResult()

    def decoded_tile(self, level: int, col: int, row: int, scale: int) -> Image.Image | None:
        key = (level, col, row, scale)
        if key in self.decoded:
            return self.decoded[key]
        lv = self.src.levels[level]
        image: Image.Image | None
        try:
            data = self.src.jfif_tile(level, col, row)
            jpeg.check_structure(data)
            image = jpeg.decode(data, scale)
            expected = (lv.tile_w // scale, lv.tile_h // scale)
            if image.size != expected:  # a writer that stored a short edge tile: use it
                image = image.crop((0, 0, *expected))
        except (OSError, ValueError, SyntaxError, jpeg.JpegStructureError):
            image = None
        self.decoded[key] = image
        return image

    def placeholder(self, w: int, h: int) -> bytes:
        data = self.placeholders.get((w, h))
        if data is None:
            data = jpeg.encode(Image.new("RGB", (w, h), PLACEHOLDER_COLOUR), self.job.quality)
            self.placeholders[(w, h)] = data
        return data

    def render(self, plan: LevelPlan, col: int, row: int) -> tuple[Image.Image, bool]:
        """Pixels of Deep Zoom tile (plan.level, col, row) and whether any source tile in it
        was unreadable."""
        image, bad = self.render_rect(plan, self.job.geometry.tile_bounds(plan.level, col, row))
        return image, bool(bad)

    def render_rect(
        self, plan: LevelPlan, rect: tuple[int, int, int, int], memo: bool = True
    ) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
        """Pixels of ``rect = (x, y, w, h)`` of Deep Zoom level ``plan.level`` and the
        rectangles (in that level's pixels) whose source tiles were unreadable."""
        x, y, w, h = rect
        lv = self.src.levels[plan.source]
        f = plan.factor
        s = min(f, 8)
        sx0, sy0 = x * f, y * f
        sx1, sy1 = min((x + w) * f, lv.width), min((y + h) * f, lv.height)
        bad: list[tuple[int, int, int, int]] = []
        canvas: Image.Image | None = None
        if sx0 < sx1 and sy0 < sy1:  # else the source level is a pixel short
            cw, ch = -(-sx1 // s) - sx0 // s, -(-sy1 // s) - sy0 // s
            canvas = Image.new("RGB", (cw, ch), self.src.background)
            tw, th = lv.tile_w // s, lv.tile_h // s
            for j in range(sy0 // lv.tile_h, -(-sy1 // lv.tile_h)):
                for i in range(sx0 // lv.tile_w, -(-sx1 // lv.tile_w)):
                    px = (i * lv.tile_w - sx0) // s
                    py = (j * lv.tile_h - sy0) // s
                    if memo:
                        tile = self.decoded_tile(plan.source, i, j, s)
                    else:
                        tile = self.decoded.pop((plan.source, i, j, s), None) or (
                            self.decoded_tile(plan.source, i, j, s)
                        )
                        self.decoded.pop((plan.source, i, j, s), None)
                    if tile is None:
                        canvas.paste(PLACEHOLDER_COLOUR, (px, py, px + tw, py + th))
                        r = f // s
                        bx0, by0 = max(0, px // r), max(0, py // r)
                        bx1, by1 = -(-(px + tw) // r), -(-(py + th) // r)
                        bad.append((x + bx0, y + by0, bx1 - bx0, by1 - by0))
                    else:
                        canvas.paste(tile, (px, py))
            if f > s:
                canvas = canvas.reduce(f // s)
        if canvas is None or canvas.size != (w, h):
            canvas = _fit(canvas, (w, h), self.src.background)
        return canvas, bad

    def emit_rendered(self, plan: LevelPlan, col: int, row: int) -> None:
        image, bad = self.render(plan, col, row)
        self.out.tiles.append(Tile(plan.level, col, row, jpeg.encode(image, self.job.quality)))
        if bad:
            self.out.failed.append(TilePosition(plan.level, col, row))

    def emit_copy(self, plan: LevelPlan, col: int, row: int, proof_scale: int) -> None:
        """Copy a source tile (or render it when it is an edge tile or not baseline)."""
        g = self.job.geometry
        lv = self.src.levels[plan.source]
        lw, lh = g.level_size(plan.level)
        t = g.tile_size
        inside = (col + 1) * t <= min(lw, lv.width) and (row + 1) * t <= min(lh, lv.height)
        if inside:
            try:
                data = self.src.jfif_tile(plan.source, col, row)
                info = jpeg.check_structure(data)
                fits = (
                    info.baseline
                    and info.precision == 8
                    and info.components == 3
                    and (info.width, info.height) == (t, t)
                )
            except (ValueError, jpeg.JpegStructureError):
                fits, data = False, b""
            if fits:
                if self.decoded_tile(plan.source, col, row, proof_scale) is None:
                    self.out.tiles.append(Tile(plan.level, col, row, self.placeholder(t, t)))
                    self.out.failed.append(TilePosition(plan.level, col, row))
                else:
                    self.out.tiles.append(Tile(plan.level, col, row, data))
                    self.out.copied += 1
                return
        self.emit_rendered(LevelPlan(plan.level, "render", plan.source, 1), col, row)


def _fit(
    image: Image.Image | None, size: tuple[int, int], background: tuple[int, int, int]
) -> Image.Image:
    """Crop or extend ``image`` to ``size``, repeating its last row/column (a level rounded
    down by the scanner lacks the last pixel of the Deep Zoom level, which rounds up)."""
    w, h = size
    if image is None:
        return Image.new("RGB", size, background)
    arr = np.asarray(image)[:h, :w]
    pad_h, pad_w = h - arr.shape[0], w - arr.shape[1]
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


Unit = tuple[int, int, int, int, int]  # (level, first row, end row, first col, end col)


def small_top(job: Job) -> int:
    """The largest level rendered whole with every level below it (-1: none)."""
    for level in reversed(range(len(job.plans))):
        w, h = job.geometry.level_size(level)
        if w * h <= SMALL_LEVEL_PIXELS and job.plans[level].mode == "render":
            return level
    return -1


def _run_small(work: _Unit, top: int) -> UnitResult:
    g = work.job.geometry
    w, h = g.level_size(top)
    image, bad = work.render_rect(work.job.plans[top], (0, 0, w, h), memo=False)
    for level in reversed(range(top + 1)):
        if level < top:
            image = image.reduce(2)
            if image.size != g.level_size(level):
                image = _fit(image, g.level_size(level), work.src.background)
            bad = [_halve(rect) for rect in bad]
        plan = work.job.plans[level]
        cols, rows = g.tile_grid(level)
        for row in range(rows):
            for col in range(cols):
                if plan.mode == "copy" and level != top:
                    work.emit_copy(plan, col, row, 8)
                    continue
                x, y, tw, th = g.tile_bounds(level, col, row)
                data = jpeg.encode(image.crop((x, y, x + tw, y + th)), work.job.quality)
                work.out.tiles.append(Tile(level, col, row, data))
                if any(_intersects((x, y, tw, th), rect) for rect in bad):
                    work.out.failed.append(TilePosition(level, col, row))
    return work.out


def _intersects(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _halve(rect: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x, y, w, h = rect
    x0, y0 = x // 2, y // 2
    return x0, y0, -(-(x + w) // 2) - x0, -(-(y + h) // 2) - y0


def run_unit(job: Job, unit: Unit) -> UnitResult:
    """Work of one unit (module-level: runs in a thread or a worker process). A first row
    of -1: the whole small level ``level`` and every level below it."""
    level, r0, r1, c0, c1 = unit
    work = _Unit(job)
    if r0 < 0:
        return _run_small(work, level)
    plan = job.plans[level]
    if plan.mode == "copy":
        for row in range(r0, r1):
            for col in range(c0, c1):
                work.emit_copy(plan, col, row, 8)
        return work.out
    for row in range(r0, r1):
        for col in range(c0, c1):
            work.emit_rendered(plan, col, row)
    upper_level = level + 1
    if upper_level < len(job.plans) and job.plans[upper_level].coupled:
        upper = job.plans[upper_level]
        cols, rows = job.geometry.tile_grid(upper_level)
        for r in range(2 * r0, min(2 * r1, rows)):
            for c in range(2 * c0, min(2 * c1, cols)):
                work.emit_copy(upper, c, r, 2)
    return work.out


def _units(job: Job) -> Iterator[Unit]:
    """Every unit, biggest levels first (coupled copy levels ride on the level below)."""
    top = small_top(job)
    for level in reversed(range(top + 1, len(job.plans))):
        if job.plans[level].coupled and level - 1 > top:
            continue
        cols, rows = job.geometry.tile_grid(level)
        for r0 in range(0, rows, UNIT_ROWS):
            for c0 in range(0, cols, UNIT_TILES):
                yield level, r0, min(rows, r0 + UNIT_ROWS), c0, min(cols, c0 + UNIT_TILES)
    if top >= 0:
        yield top, -1, 0, 0, 0


def _process_init() -> None:  # pragma: no cover - runs in workers
    _SOURCES.clear()


class TiffPyramidBuilder(GeometryView):
    """Deep Zoom pyramid of a tiled-JPEG TIFF (see module docstring). Same interface as
    :class:`DeepZoomBuilder` for the parts the tiling stage uses."""

    def __init__(
        self,
        source: TiffJpegSource,
        *,
        tile_size: int,
        overlap: int,
        jpeg_quality: int = 90,
        workers: int | None = None,
        pool: PoolKind = "thread",
    ) -> None:
        self.geometry = DziGeometry(source.width, source.height, tile_size, overlap, "jpeg")
        self.path = source.path
        self.plans = plan_levels(source, self.geometry)
        source.close()
        self._job = Job(self.path, self.geometry, self.plans, jpeg_quality)
        self._workers = max(1, workers or os.cpu_count() or 1)
        self._pool_kind = pool
        self._failed: list[TilePosition] = []
        self.copied = 0
        self._executor: Executor | None = None

    # -- DeepZoomBuilder-compatible surface ----------------------------------------------
    def failed_tiles(self) -> list[TilePosition]:
        return sorted(self._failed)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        _forget_source(self.path)

    def __enter__(self) -> TiffPyramidBuilder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _make_executor(self) -> Executor:
        if self._pool_kind == "process":
            import multiprocessing

            ctx = multiprocessing.get_context("forkserver")
            return ProcessPoolExecutor(self._workers, mp_context=ctx, initializer=_process_init)
        return ThreadPoolExecutor(self._workers, thread_name_prefix="dzi")

    def iter_tiles(self, levels: Iterable[int] | None = None) -> Iterator[Tile]:
        """Every tile, in no particular order; at most ``2 * workers`` units in flight."""
        if levels is not None:
            raise ValueError("TiffPyramidBuilder builds whole pyramids only")
        if self._executor is None:
            self._executor = self._make_executor()
        executor = self._executor
        window = 2 * self._workers
        pending: deque[Future[UnitResult]] = deque()
        units = _units(self._job)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                unit = next(units, None)
                if unit is None:
                    exhausted = True
                    break
                pending.append(executor.submit(run_unit, self._job, unit))
            if not pending:
                return
            result = pending.popleft().result()
            self._failed.extend(result.failed)
            self.copied += result.copied
            yield from result.tiles

    def iter_batches(self, batch_size: int = 64) -> Iterator[list[Tile]]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        batch: list[Tile] = []
        for tile in self.iter_tiles():
            batch.append(tile)
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def open_tiff_pyramid(
    path: PathLike,
    *,
    tile_size: int | None,
    overlap: int,
    jpeg_quality: int = 90,
    workers: int | None = None,
    pool: PoolKind = "thread",
) -> TiffPyramidBuilder | None:
    """A :class:`TiffPyramidBuilder` for ``path`` if it is a tiled-JPEG TIFF, else None.
    ``tile_size=None`` takes the source tile size with no overlap, so that full tiles are
    copied losslessly."""
    source = open_tiff_jpeg(path)
    if source is None:
        return None
    tw, th = source.tile_size
    if tile_size is None:
        if tw != th:
            source.close()
            return None
        tile_size, overlap = tw, 0
    return TiffPyramidBuilder(
        source,
        tile_size=tile_size,
        overlap=overlap,
        jpeg_quality=jpeg_quality,
        workers=workers,
        pool=pool,
    )
