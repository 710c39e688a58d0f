"""Unit tests of the transport-free tiling core on the real sample slides."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from services.tiling.engine import (
    DZI_NAMESPACE,
    DeepZoomBuilder,
    DescriptorError,
    DziGeometry,
    InvalidTileAddressError,
    SlideOpenError,
    SlideReadError,
    TileOutOfRangeError,
    build_dzi_to_directory,
    dzi_object_keys,
    make_thumbnail,
    parse_tile_path,
    read_low_res_rgb,
    slide_properties,
    thumbnail_key,
    tile_key,
)

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"

SAMPLES = [
    "aperio/CMU-1-Small-Region.svs",
    "hamamatsu/test3-DAPI-2-(387).ndpi",
    "generic-tiff/boxes.tiff",
    "dicom/camelyon-jpeg/multi_frame_jpeg_camelyon_challenge_image.dcm",
]
TILE_SIZE = 254
OVERLAP = 1


def slide_path(rel: str) -> Path:
    if not SLIDES.is_dir():
        pytest.fail(f"sample slides folder missing: {SLIDES}")
    path = SLIDES / rel
    if not path.is_file():
        pytest.fail(f"sample slide missing: {path}")
    return path


@dataclass
class Pyramid:
    width: int
    height: int
    descriptor: str
    level_count: int
    tile_count: int
    tiles: dict[tuple[int, int, int], bytes]
    failed: list[tuple[int, int, int]]


_built: dict[str, Pyramid] = {}


def build(rel: str) -> Pyramid:
    if rel not in _built:
        path = slide_path(rel)
        with openslide.OpenSlide(str(path)) as slide:
            width, height = slide.dimensions
        with DeepZoomBuilder(path, tile_size=TILE_SIZE, overlap=OVERLAP, fmt="jpeg") as builder:
            tiles: dict[tuple[int, int, int], bytes] = {}
            for batch in builder.iter_batches(50):
                assert 1 <= len(batch) <= 50
                for level, col, row, data in batch:
                    assert (level, col, row) not in tiles, "tile emitted twice"
                    tiles[(level, col, row)] = data
            _built[rel] = Pyramid(
                width=width,
                height=height,
                descriptor=builder.descriptor(),
                level_count=builder.level_count,
                tile_count=builder.tile_count,
                tiles=tiles,
                failed=[tuple(p) for p in builder.failed_tiles()],
            )
    return _built[rel]


def expected_level_size(width: int, height: int, level: int, level_count: int) -> tuple[int, int]:
    scale = 2 ** (level_count - 1 - level)
    return math.ceil(width / scale), math.ceil(height / scale)


def expected_tile_size(level_w: int, level_h: int, col: int, row: int) -> tuple[int, int]:
    def extent(index: int, total: int) -> int:
        start = index * TILE_SIZE - (OVERLAP if index > 0 else 0)
        end = min(total, (index + 1) * TILE_SIZE + OVERLAP)
        return end - start

    return extent(col, level_w), extent(row, level_h)


@pytest.mark.parametrize("rel", SAMPLES)
def test_descriptor_parses_and_matches_slide(rel: str) -> None:
    pyramid = build(rel)
    assert f'xmlns="{DZI_NAMESPACE}"' in pyramid.descriptor
    geometry = DziGeometry.from_descriptor(pyramid.descriptor)
    assert (geometry.width, geometry.height) == (pyramid.width, pyramid.height)
    assert geometry.tile_size == TILE_SIZE
    assert geometry.overlap == OVERLAP
    assert geometry.format == "jpeg"
    assert geometry.level_count == pyramid.level_count


@pytest.mark.parametrize("rel", SAMPLES)
def test_level_count_is_log2_of_longest_side(rel: str) -> None:
    pyramid = build(rel)
    assert pyramid.level_count == math.ceil(math.log2(max(pyramid.width, pyramid.height))) + 1


@pytest.mark.parametrize("rel", SAMPLES)
def test_every_tile_present_decodes_and_has_the_right_size(rel: str) -> None:
    pyramid = build(rel)
    assert pyramid.failed == []
    expected_keys = set()
    for level in range(pyramid.level_count):
        level_w, level_h = expected_level_size(
            pyramid.width, pyramid.height, level, pyramid.level_count
        )
        for row in range(math.ceil(level_h / TILE_SIZE)):
            for col in range(math.ceil(level_w / TILE_SIZE)):
                expected_keys.add((level, col, row))
                image = Image.open(io.BytesIO(pyramid.tiles[(level, col, row)]))
                image.load()
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                assert "icc_profile" not in image.info
                assert "exif" not in image.info
                assert image.size == expected_tile_size(level_w, level_h, col, row)
    assert set(pyramid.tiles) == expected_keys
    assert pyramid.tile_count == len(expected_keys)


@pytest.mark.parametrize("rel", SAMPLES)
def test_top_level_tiles_cover_the_full_image(rel: str) -> None:
    pyramid = build(rel)
    top = pyramid.level_count - 1
    covered = np.zeros((pyramid.height, pyramid.width), dtype=bool)
    right = bottom = 0
    for (level, col, row), data in pyramid.tiles.items():
        if level != top:
            continue
        w, h = Image.open(io.BytesIO(data)).size
        x = col * TILE_SIZE - (OVERLAP if col else 0)
        y = row * TILE_SIZE - (OVERLAP if row else 0)
        covered[y : y + h, x : x + w] = True
        right, bottom = max(right, x + w), max(bottom, y + h)
    assert (right, bottom) == (pyramid.width, pyramid.height)
    assert covered.all()


@pytest.mark.parametrize("rel", SAMPLES)
def test_level_zero_is_a_single_pixel(rel: str) -> None:
    pyramid = build(rel)
    level_zero = [key for key in pyramid.tiles if key[0] == 0]
    assert level_zero == [(0, 0, 0)]
    assert Image.open(io.BytesIO(pyramid.tiles[(0, 0, 0)])).size == (1, 1)


@pytest.mark.parametrize("rel", SAMPLES)
def test_thumbnail_decodes_within_bounds(rel: str) -> None:
    pyramid = build(rel)
    data = make_thumbnail(slide_path(rel), max_size=1024)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "JPEG"
    assert max(image.size) <= 1024
    assert max(image.size) == min(1024, max(pyramid.width, pyramid.height))
    assert image.width / image.height == pytest.approx(pyramid.width / pyramid.height, rel=0.02)


def test_top_level_png_tiles_are_pixel_exact() -> None:
    path = slide_path("aperio/CMU-1-Small-Region.svs")
    with DeepZoomBuilder(path, fmt="png") as builder:
        top = builder.level_count - 1
        with openslide.OpenSlide(str(path)) as slide:
            for level, col, row, data in builder.iter_tiles([top]):
                x, y, w, h = builder.geometry.tile_bounds(level, col, row)
                png = Image.open(io.BytesIO(data))
                assert "icc_profile" not in png.info
                tile = np.asarray(png.convert("RGB"))
                ref = np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB"))
                assert np.array_equal(tile, ref), (col, row)
        assert builder.content_type == "image/png"


def test_corrupt_source_gives_placeholders_not_a_crash(tmp_path: Path) -> None:
    path = slide_path("broken/unreadable.svs")
    with DeepZoomBuilder(path) as builder:
        tiles = list(builder.iter_tiles())
        assert len(tiles) == builder.tile_count
        failed = set(builder.failed_tiles())
        assert failed == {(t.level, t.col, t.row) for t in tiles}
        for tile in tiles:
            image = Image.open(io.BytesIO(tile.data))
            assert image.size == builder.geometry.tile_size_at(tile.level, tile.col, tile.row)
    summary = build_dzi_to_directory(path, tmp_path / "out")
    assert len(summary.failed_tiles) == summary.tile_count
    assert (tmp_path / "out" / "slide.dzi").is_file()


def test_one_corrupt_source_tile_only_spoils_its_area(tmp_path: Path) -> None:
    import shutil

    import tifffile

    path = tmp_path / "partly-corrupt.svs"
    shutil.copyfile(slide_path("aperio/CMU-1-Small-Region.svs"), path)
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        assert page.tilewidth == 240
        across = -(-page.imagewidth // page.tilewidth)
        index = 5 * across + 4  # source tile covering x 960..1199, y 1200..1439
        offset = page.dataoffsets[index]
    with path.open("r+b") as handle:
        handle.seek(offset + 200)
        handle.write(b"\xff\xd9" * 50)

    with DeepZoomBuilder(path) as builder:
        top = builder.level_count - 1
        tiles = list(builder.iter_tiles())
        failed = set(builder.failed_tiles())
        for tile in tiles:
            image = Image.open(io.BytesIO(tile.data))
            image.load()
            assert image.size == builder.geometry.tile_size_at(tile.level, tile.col, tile.row)
    assert {p for p in failed if p.level == top} == {
        (top, 3, 4),
        (top, 4, 4),
        (top, 3, 5),
        (top, 4, 5),
    }
    assert len(failed) < len(tiles) // 4
    thumbnail = Image.open(io.BytesIO(make_thumbnail(path)))
    assert max(thumbnail.size) == 1024
    rgb = read_low_res_rgb(path, 1024)
    assert max(rgb.shape[:2]) == 1024
    assert (rgb == 224).all(axis=2).any()  # the unreadable area is grey


def test_build_to_directory_writes_the_dzi_layout(tmp_path: Path) -> None:
    summary = build_dzi_to_directory(slide_path("generic-tiff/boxes.tiff"), tmp_path)
    geometry = DziGeometry.from_descriptor((tmp_path / "slide.dzi").read_text())
    files = sorted(p.relative_to(tmp_path / "slide_files") for p in tmp_path.rglob("*.jpeg"))
    assert len(files) == geometry.tile_count == summary.tile_count
    assert (tmp_path / "slide_files" / str(geometry.max_level) / "1_0.jpeg").is_file()
    assert summary.failed_tiles == []


def test_unopenable_files_raise_slide_open_error() -> None:
    for rel in ("broken/unopenable.tiff", "ome-tiff/4D-series.ome.tiff"):
        with pytest.raises(SlideOpenError) as info:
            DeepZoomBuilder(slide_path(rel))
        assert str(SLIDES) not in str(info.value)
    with pytest.raises(SlideReadError):
        read_low_res_rgb(slide_path("broken/unreadable.svs"))


def test_slide_properties_are_geometry_only() -> None:
    props = slide_properties(slide_path("aperio/CMU-1-Small-Region.svs"))
    assert props == {
        "width": 2220,
        "height": 2967,
        "level_count": 1,
        "level_dimensions": [[2220, 2967]],
        "mpp_x": pytest.approx(0.499),
        "mpp_y": pytest.approx(0.499),
        "objective_power": 20.0,
        "vendor": "aperio",
    }
    ndpi = slide_properties(slide_path("hamamatsu/test3-DAPI-2-(387).ndpi"))
    assert ndpi["level_count"] == 7
    assert ndpi["vendor"] == "hamamatsu"
    assert ndpi["level_dimensions"][-1] == [62, 76]


def test_low_res_rgb_is_bounded_uint8() -> None:
    rgb = read_low_res_rgb(slide_path("hamamatsu/test3-DAPI-2-(387).ndpi"), max_side=2048)
    assert rgb.dtype == np.uint8
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    assert max(rgb.shape[:2]) == 2048
    small = read_low_res_rgb(slide_path("generic-tiff/boxes.tiff"), max_side=4096)
    assert small.shape == (250, 300, 3)  # never upscaled
    assert (small[0, 0] == 255).all()  # white background


# ------------------------------------------------------------- geometry / keys
def test_geometry_contains_and_check() -> None:
    geometry = DziGeometry(1000, 600, 254, 1, "jpeg")
    assert geometry.level_count == 11
    assert geometry.level_size(10) == (1000, 600)
    assert geometry.level_size(0) == (1, 1)
    assert geometry.tile_grid(10) == (4, 3)
    assert geometry.contains(10, 3, 2)
    assert not geometry.contains(10, 4, 0)
    assert not geometry.contains(11, 0, 0)
    assert not geometry.contains(-1, 0, 0)
    assert not geometry.contains(10, -1, 0)
    assert not geometry.contains(10, 10**12, 0)
    with pytest.raises(TileOutOfRangeError):
        geometry.check(10, 0, 3)
    with pytest.raises(TileOutOfRangeError):
        geometry.level_size(99)
    assert geometry.tile_bounds(10, 1, 1) == (253, 253, 256, 256)
    assert geometry.tile_bounds(10, 3, 2) == (761, 507, 239, 93)


def test_descriptor_roundtrip_and_rejections() -> None:
    geometry = DziGeometry(4443, 3567, 510, 2, "png")
    assert DziGeometry.from_descriptor(geometry.to_descriptor()) == geometry
    bad = [
        "",
        "<Image/>",
        '<Image xmlns="urn:other" Format="jpeg" Overlap="1" TileSize="254">'
        '<Size Width="1" Height="1"/></Image>',
        f'<Image xmlns="{DZI_NAMESPACE}" Format="gif" Overlap="1" TileSize="254">'
        '<Size Width="1" Height="1"/></Image>',
        f'<Image xmlns="{DZI_NAMESPACE}" Format="jpeg" Overlap="1" TileSize="254">'
        '<Size Width="-5" Height="1"/></Image>',
        f'<Image xmlns="{DZI_NAMESPACE}" Format="jpeg" Overlap="1" TileSize="254">'
        '<Size Width="99999999999" Height="1"/></Image>',
        f'<Image xmlns="{DZI_NAMESPACE}" Format="jpeg" Overlap="1" TileSize="254"></Image>',
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
        f'<Image xmlns="{DZI_NAMESPACE}" Format="jpeg" Overlap="1" TileSize="&lol2;">'
        '<Size Width="1" Height="1"/></Image>',
        '<!DOCTYPE x SYSTEM "file:///etc/passwd">'
        f'<Image xmlns="{DZI_NAMESPACE}" Format="jpeg" Overlap="1" TileSize="254">'
        '<Size Width="1" Height="1"/></Image>',
        "<" * 70000,
    ]
    for text in bad:
        with pytest.raises(DescriptorError):
            DziGeometry.from_descriptor(text)


def test_object_keys_and_tile_paths() -> None:
    descriptor_key, prefix = dzi_object_keys("s-0123abcd")
    assert descriptor_key == "slides/s-0123abcd/dzi/slide.dzi"
    assert prefix == "slides/s-0123abcd/dzi/slide_files/"
    assert tile_key("s-0123abcd", 12, 3, 4, "jpeg") == (
        "slides/s-0123abcd/dzi/slide_files/12/3_4.jpeg"
    )
    assert thumbnail_key("s-0123abcd") == "slides/s-0123abcd/thumbnail.jpeg"
    for bad_id in ("", "../etc", "a/b", "a..b", "-x", "x" * 200, "a b"):
        with pytest.raises(ValueError):
            dzi_object_keys(bad_id)
    with pytest.raises(ValueError):
        tile_key("abc", -1, 0, 0, "jpeg")
    with pytest.raises(ValueError):
        tile_key("abc", 1, 0, 0, "gif")

    assert tuple(parse_tile_path("12/3_4.jpeg")) == (12, 3, 4, "jpeg")
    for bad_path in ("12/3_4.gif", "../3_4.jpeg", "12/3-4.jpeg", "1/1_1.jpeg/", "999/1_1.png"):
        with pytest.raises(InvalidTileAddressError):
            parse_tile_path(bad_path)
    geometry = DziGeometry(1000, 600)
    assert geometry.parse_tile_path("10/3_2.jpeg") == (10, 3, 2, "jpeg")
    with pytest.raises(TileOutOfRangeError):
        geometry.parse_tile_path("10/4_0.jpeg")
    with pytest.raises(TileOutOfRangeError):
        geometry.parse_tile_path("10/0_0.png")
    with pytest.raises(TileOutOfRangeError):
        geometry.parse_tile_path("50/0_0.jpeg")


def test_chunked_reads_match_single_reads() -> None:
    from services.tiling.engine.slide import read_scaled

    path = slide_path("aperio/CMU-1-Small-Region.svs")
    with openslide.OpenSlide(str(path)) as slide:
        src = (100.0, 200.0, 1600.0, 1200.0)
        whole = np.asarray(read_scaled(slide, 0, src, (400, 300)), dtype=np.int16)
        chunked = np.asarray(read_scaled(slide, 0, src, (400, 300), budget=40_000), dtype=np.int16)
    assert whole.shape == chunked.shape == (300, 400, 3)
    assert float(np.abs(whole - chunked).mean()) < 3.0
