"""OpenSlide-path pyramids on every core: several :class:`DeepZoomBuilder` (one OpenSlide
handle each) render disjoint blocks of rows in a thread pool. OpenSlide reads (ctypes) and
Pillow's resize/encode release the GIL, so the builders run in parallel.

Small levels (rendered whole and cached by a builder) all go to the first builder, so they are
read once. Memory: each builder holds its OpenSlide tile cache (sized for one row of tiles,
32..192 MiB) and at most ~16 MB of small levels; ``2 * workers`` row blocks are in flight.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

from .deepzoom import SMALL_LEVEL_PIXELS, DeepZoomBuilder, Tile, TilePosition
from .geometry import DziGeometry, GeometryView
from .slide import PathLike

ROWS_PER_BLOCK: Final = 2


class ParallelDeepZoomBuilder(GeometryView):
    """Same surface as :class:`DeepZoomBuilder` for the parts the tiling stage uses."""

    def __init__(
        self,
        path: PathLike,
        *,
        tile_size: int = 254,
        overlap: int = 1,
        jpeg_quality: int = 90,
        workers: int | None = None,
    ) -> None:
        count = max(1, workers or os.cpu_count() or 1)
        self._builders: list[DeepZoomBuilder] = []
        try:
            for _ in range(count):
                self._builders.append(
                    DeepZoomBuilder(
                        path, tile_size=tile_size, overlap=overlap, jpeg_quality=jpeg_quality
                    )
                )
        except Exception:
            self.close()
            raise
        self.geometry: DziGeometry = self._builders[0].geometry
        self._executor: ThreadPoolExecutor | None = None

    def failed_tiles(self) -> list[TilePosition]:
        return sorted({p for b in self._builders for p in b.failed_tiles()})

    def close(self) -> None:
        if getattr(self, "_executor", None) is not None:
            assert self._executor is not None
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for builder in self._builders:
            builder.close()

    def __enter__(self) -> ParallelDeepZoomBuilder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _blocks(self) -> Iterator[tuple[int, int, int, int]]:
        """(builder index, level, first row, end row), biggest levels first; small levels
        (one cached read each) on builder 0, after the others."""
        small: list[tuple[int, int, int, int]] = []
        n = len(self._builders)
        block = 0
        for level in reversed(range(self.level_count)):
            w, h = self.geometry.level_size(level)
            _, rows = self.geometry.tile_grid(level)
            if w * h <= SMALL_LEVEL_PIXELS:
                small.append((0, level, 0, rows))
                continue
            for r0 in range(0, rows, ROWS_PER_BLOCK):
                yield block % n, level, r0, min(rows, r0 + ROWS_PER_BLOCK)
                block += 1
        yield from small

    def _render(self, index: int, level: int, r0: int, r1: int) -> list[Tile]:
        builder = self._builders[index]
        cols, _ = self.geometry.tile_grid(level)
        return [
            Tile(level, col, row, builder.render_tile(level, col, row))
            for row in range(r0, r1)
            for col in range(cols)
        ]

    def iter_tiles(self) -> Iterator[Tile]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(len(self._builders), thread_name_prefix="dzo")
        window = 2 * len(self._builders)
        pending: deque[Future[list[Tile]]] = deque()
        blocks = self._blocks()
        while True:
            while len(pending) < window:
                nxt = next(blocks, None)
                if nxt is None:
                    break
                pending.append(self._executor.submit(self._render, *nxt))
            if not pending:
                return
            yield from pending.popleft().result()

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
