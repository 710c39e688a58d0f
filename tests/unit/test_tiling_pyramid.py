"""The tiled-JPEG pyramid builder: lossless tile copies, edge tiles, rendered levels, corrupt
source tiles, thread and process pools."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from services.tiling.engine import (
    DeepZoomBuilder,
    DziGeometry,
    ParallelDeepZoomBuilder,
    TiffPyramidBuilder,
    open_builder,
    open_tiff_pyramid,
)
from services.tiling.engine import jpeg as jpegmod
from services.tiling.engine.pyramid import PLACEHOLDER_COLOUR

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"
CMU = SLIDES / "aperio" / "CMU-1-Small-Region.svs"
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"sample slide missing: {path}")
    return path


def _tiles_of(
    builder: TiffPyramidBuilder | DeepZoomBuilder | ParallelDeepZoomBuilder,
) -> dict[tuple[int, int, int], bytes]:
    out: dict[tuple[int, int, int], bytes] = {}
    for batch in builder.iter_batches(32):
        for level, col, row, data in batch:
            assert (level, col, row) not in out, "tile emitted twice"
            out[(level, col, row)] = data
    return out


def _source_tiles(path: Path, page_index: int = 0) -> tuple[list[bytes], bytes, int, int]:
    """Raw tile bytes, JPEGTables, tiles across and the TIFF photometric, read by tifffile
    (independently of the engine's own TIFF parser)."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[page_index]
        assert isinstance(page, tifffile.TiffPage)
        fh = tf.filehandle
        raw = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(off)
            raw.append(fh.read(cnt))
        across = -(-page.imagewidth // page.tilewidth)
        return raw, page.jpegtables or b"", across, int(page.photometric)


def _rgb(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert("RGB"))


def _write_svs(path: Path, width: int, height: int, seed: int = 3) -> None:
    """An Aperio-like SVS from real CMU-1 tiles: levels at downsample 1 and 4, sizes rounded
    down as Aperio does."""
    raw, tables, _, _ = _source_tiles(_need(CMU))
    rng = np.random.default_rng(seed)
    header = "Aperio Image Library v12.0.5 \r\n"
    with tifffile.TiffWriter(path) as tw:
        for ds in (1, 4):
            w, h = width // ds, height // ds
            n = -(-w // 240) * -(-h // 240)
            picks = rng.integers(0, len(raw), size=n).tolist()
            desc = f"{header}{width}x{height} [0,0 {width}x{height}] (240x240)"
            if ds > 1:
                desc += f" -> {w}x{h}"
            tw.write(
                (raw[i] for i in picks),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(240, 240),
                compression="jpeg",
                photometric="rgb",
                subsampling=(1, 1),
                compressionargs={"outcolorspace": "RGB"},  # RGB-coded JPEG, as Aperio
                jpegtables=tables,
                description=desc + " JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990",
                metadata=None,
            )


@pytest.fixture(scope="module")
def cmu_pyramid() -> tuple[TiffPyramidBuilder, dict[tuple[int, int, int], bytes]]:
    builder = open_tiff_pyramid(_need(CMU), tile_size=None, overlap=0)
    assert builder is not None
    with builder:
        tiles = _tiles_of(builder)
    return builder, tiles


def test_copied_tiles_are_the_source_bytes_with_tables_spliced(cmu_pyramid) -> None:
    builder, tiles = cmu_pyramid
    raw, tables, across, photometric = _source_tiles(CMU)
    assert photometric == 2  # Aperio: RGB-coded JPEG, no colour transform
    g = builder.geometry
    assert (g.tile_size, g.overlap) == (240, 0)
    top = g.max_level
    cols, rows = g.tile_grid(top)
    full = [(c, r) for r in range(rows) for c in range(cols) if (c + 1) * 240 <= g.width]
    full = [(c, r) for c, r in full if (r + 1) * 240 <= g.height]
    assert len(full) == (2220 // 240) * (2967 // 240) == builder.copied
    for col, row in full:
        source = raw[row * across + col]
        expected = b"\xff\xd8" + ADOBE_RGB + tables[2:-2] + source[2:]
        assert tiles[(top, col, row)] == expected
        assert tiles[(top, col, row)].endswith(source[2:])  # entropy-coded data untouched


def test_copied_tiles_decode_to_openslide_pixels(cmu_pyramid) -> None:
    builder, tiles = cmu_pyramid
    top = builder.geometry.max_level
    with openslide.OpenSlide(str(CMU)) as slide:
        for col, row in [(0, 0), (3, 4), (8, 11), (5, 2)]:
            region = slide.read_region((col * 240, row * 240), 0, (240, 240)).convert("RGB")
            assert np.array_equal(_rgb(tiles[(top, col, row)]), np.asarray(region))


def test_edge_tiles_have_the_right_size_and_openslide_pixels(cmu_pyramid) -> None:
    builder, tiles = cmu_pyramid
    g = builder.geometry
    assert len(tiles) == g.tile_count
    for (level, col, row), data in tiles.items():
        assert _rgb(data).shape[1::-1] == g.tile_size_at(level, col, row)
    top = g.max_level
    cols, rows = g.tile_grid(top)
    corner = _rgb(tiles[(top, cols - 1, rows - 1)])
    assert corner.shape[:2] == (2967 - 240 * (rows - 1), 2220 - 240 * (cols - 1))
    with openslide.OpenSlide(str(CMU)) as slide:
        x, y = 240 * (cols - 1), 240 * (rows - 1)
        region = np.asarray(slide.read_region((x, y), 0, (2220 - x, 2967 - y)).convert("RGB"))
    # re-encoded at quality 90: close to the source, not byte-identical
    assert np.abs(corner.astype(int) - region).mean() < 3


def test_rendered_level_is_close_to_a_box_reduction(cmu_pyramid) -> None:
    builder, tiles = cmu_pyramid
    level = builder.geometry.max_level - 1
    with openslide.OpenSlide(str(CMU)) as slide:
        region = slide.read_region((480, 480), 0, (480, 480)).convert("RGB").reduce(2)
    diff = np.abs(_rgb(tiles[(level, 1, 1)]).astype(int) - np.asarray(region))
    assert diff.mean() < 3


def test_levels_of_the_source_are_copied_and_the_others_rendered(tmp_path: Path) -> None:
    path = tmp_path / "two-level.svs"
    _write_svs(path, 2500, 1930)  # level 1: 625 x 482 (Aperio rounds 482.5 down)
    builder = open_tiff_pyramid(path, tile_size=None, overlap=0)
    assert builder is not None
    with builder:
        plans = builder.plans
        top = builder.geometry.max_level
        assert (plans[top].mode, plans[top].source, plans[top].coupled) == ("copy", 0, True)
        assert (plans[top - 1].mode, plans[top - 1].factor) == ("render", 2)
        assert (plans[top - 2].mode, plans[top - 2].source) == ("copy", 1)
        assert (plans[top - 3].mode, plans[top - 3].source) == ("render", 1)
        tiles = _tiles_of(builder)
        assert builder.failed_tiles() == []
        assert builder.copied == (2500 // 240) * (1930 // 240) + (625 // 240) * (482 // 240)
    raw1, tables, across1, _ = _source_tiles(path, 1)
    assert tiles[(top - 2, 1, 1)] == b"\xff\xd8" + ADOBE_RGB + tables[2:-2] + raw1[across1 + 1][2:]
    g = DziGeometry(2500, 1930, 240, 0)
    for (level, col, row), data in tiles.items():
        assert _rgb(data).shape[1::-1] == g.tile_size_at(level, col, row)
    # the bottom row of level top-2 lacks one source row: repeated, not left black
    bottom = _rgb(tiles[(top - 2, 0, 2)])
    assert bottom.shape[0] == 483 - 480 and np.array_equal(bottom[-1], bottom[-2])


def test_ycbcr_tiles_are_copied_without_a_colour_marker(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:512, 0:768]
    base = np.dstack([(xx // 3) % 256, (yy // 2) % 256, ((xx + yy) // 5) % 256])
    image = (base + rng.integers(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    path = tmp_path / "ycbcr.tiff"
    tifffile.imwrite(
        path, image, tile=(256, 256), compression="jpeg", photometric="ycbcr", metadata=None
    )
    builder = open_tiff_pyramid(path, tile_size=None, overlap=0)
    assert builder is not None
    with builder:
        tiles = _tiles_of(builder)
    raw, tables, across, photometric = _source_tiles(path)
    assert photometric == 6
    top = builder.geometry.max_level
    assert tiles[(top, 1, 1)] == b"\xff\xd8" + tables[2:-2] + raw[across + 1][2:]
    with openslide.OpenSlide(str(path)) as slide:
        region = np.asarray(slide.read_region((256, 256), 0, (256, 256)).convert("RGB"))
    decoded = _rgb(tiles[(top, 1, 1)])
    assert np.abs(decoded.astype(int) - region).max() <= 2  # upsampling may round apart


def _corrupt_copy(tmp_path: Path) -> Path:
    path = tmp_path / "partly-corrupt.svs"
    shutil.copyfile(_need(CMU), path)
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        across = -(-page.imagewidth // page.tilewidth)
        offset = page.dataoffsets[5 * across + 4]  # x 960..1199, y 1200..1439
    with path.open("r+b") as handle:
        handle.seek(offset + 200)
        handle.write(b"\xff\xd9" * 50)
    return path


@pytest.mark.parametrize(("tile_size", "overlap"), [(None, 0), (254, 1)])
def test_corrupt_source_tile_gets_a_placeholder_and_is_listed(
    tmp_path: Path, tile_size: int | None, overlap: int
) -> None:
    path = _corrupt_copy(tmp_path)
    builder = open_tiff_pyramid(path, tile_size=tile_size, overlap=overlap)
    assert builder is not None
    with builder:
        tiles = _tiles_of(builder)
        failed = set(builder.failed_tiles())
        g = builder.geometry
    assert len(tiles) == g.tile_count
    for (level, col, row), data in tiles.items():
        assert _rgb(data).shape[1::-1] == g.tile_size_at(level, col, row)
    top = g.max_level
    if tile_size is None:
        assert {p for p in failed if p.level == top} == {(top, 4, 5)}
        assert {p for p in failed if p.level == top - 1} == {(top - 1, 2, 2)}
        placeholder = _rgb(tiles[(top, 4, 5)])
        assert (np.abs(placeholder.astype(int) - PLACEHOLDER_COLOUR) <= 2).all()
        # the corrupt bytes were not copied into the pyramid
        raw, _, across, _ = _source_tiles(path)
        assert raw[5 * across + 4][2:] not in tiles[(top, 4, 5)]
    else:
        assert {p for p in failed if p.level == top} == {
            (top, 3, 4),
            (top, 4, 4),
            (top, 3, 5),
            (top, 4, 5),
        }
    # every level has its failed tile, down to the 1x1 one
    assert {p.level for p in failed} == set(range(g.level_count))
    assert len(failed) < len(tiles) // 4


def test_structure_check_rejects_truncated_and_spliced_streams() -> None:
    raw, tables, _, _ = _source_tiles(_need(CMU))
    good = jpegmod.standalone(raw[0], jpegmod.tables_payload(tables), 2)
    info = jpegmod.check_structure(good)
    assert (info.width, info.height, info.components, info.baseline) == (240, 240, 3, True)
    assert info.has_adobe
    for bad in (
        good[:-2],  # no EOI
        good[: len(good) // 2],  # truncated
        good[:300] + b"\xff\xd9" + good[300:],  # early EOI
        good + b"junk",  # data after EOI
        good[:300] + b"\xff\xc8\x00\x04" + good[300:],  # stray marker in entropy data
        b"\x00" + good,
    ):
        with pytest.raises(jpegmod.JpegStructureError):
            jpegmod.check_structure(bad)


def test_thread_and_process_pools_give_the_same_pyramid(cmu_pyramid) -> None:
    _, threaded = cmu_pyramid
    builder = open_tiff_pyramid(CMU, tile_size=None, overlap=0, workers=2, pool="process")
    assert builder is not None
    with builder:
        assert _tiles_of(builder) == threaded


def test_open_builder_falls_back_to_parallel_openslide_for_other_formats() -> None:
    ndpi = _need(SLIDES / "hamamatsu" / "test3-DAPI-2-(387).ndpi")
    with open_builder(ndpi, tile_size=254, overlap=1, workers=2) as builder:
        assert isinstance(builder, ParallelDeepZoomBuilder)
        assert (builder.geometry.tile_size, builder.geometry.overlap) == (254, 1)
        parallel = _tiles_of(builder)
    with DeepZoomBuilder(ndpi, tile_size=254, overlap=1) as serial:
        assert parallel == _tiles_of(serial)  # same bytes, whatever the order
    with open_builder(CMU, tile_size=254, overlap=1, lossless=False) as builder:
        assert isinstance(builder, TiffPyramidBuilder)
        assert (builder.geometry.tile_size, builder.geometry.overlap) == (254, 1)
    with open_builder(CMU, tile_size=254, overlap=1) as builder:
        assert (builder.geometry.tile_size, builder.geometry.overlap) == (240, 0)


def test_standalone_adds_the_rgb_marker_once_and_never_for_ycbcr() -> None:
    raw, tables, _, _ = _source_tiles(_need(CMU))
    segments = jpegmod.tables_payload(tables)
    rgb = jpegmod.standalone(raw[0], segments, jpegmod.PHOTOMETRIC_RGB)
    assert rgb.count(ADOBE_RGB) == 1
    # a tile that already says how it is coded is left as it is
    again = jpegmod.standalone(rgb, b"", jpegmod.PHOTOMETRIC_RGB)
    assert again == rgb
    ycc = jpegmod.standalone(raw[0], segments, jpegmod.PHOTOMETRIC_YCBCR)
    assert b"Adobe" not in ycc and ycc.endswith(raw[0][2:])
    with pytest.raises(jpegmod.JpegStructureError):
        jpegmod.standalone(b"\x00\x01" + raw[0], segments, jpegmod.PHOTOMETRIC_RGB)
