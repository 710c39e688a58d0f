"""Choosing the pyramid builder for a slide file.

Tiled-JPEG TIFFs (Aperio SVS, generic tiled TIFF) go through
:class:`~.pyramid.TiffPyramidBuilder` (copies source tiles when ``lossless``); every other
format OpenSlide opens goes through :class:`~.parallel.ParallelDeepZoomBuilder` (one
:class:`~.deepzoom.DeepZoomBuilder` per worker). Both use every core by default.
"""

from __future__ import annotations

from .parallel import ParallelDeepZoomBuilder
from .pyramid import PoolKind, TiffPyramidBuilder, open_tiff_pyramid
from .slide import PathLike


def open_builder(
    path: PathLike,
    *,
    tile_size: int = 254,
    overlap: int = 1,
    lossless: bool = True,
    jpeg_quality: int = 90,
    workers: int | None = None,
    pool: PoolKind = "thread",
) -> TiffPyramidBuilder | ParallelDeepZoomBuilder:
    """The builder for ``path``. With ``lossless`` a tiled-JPEG TIFF gets the source's tile
    size and no overlap (so full-resolution tiles are the scanner's bytes); ``tile_size`` and
    ``overlap`` apply otherwise. Raises :class:`SlideOpenError` when OpenSlide cannot open it."""
    fast = open_tiff_pyramid(
        path,
        tile_size=None if lossless else tile_size,
        overlap=overlap,
        jpeg_quality=jpeg_quality,
        workers=workers,
        pool=pool,
    )
    if fast is not None:
        return fast
    return ParallelDeepZoomBuilder(
        path, tile_size=tile_size, overlap=overlap, jpeg_quality=jpeg_quality, workers=workers
    )
