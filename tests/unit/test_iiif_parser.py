"""IIIF Image API 3.0 parameters: syntax (400), unsupported features (501), resolution against
an image, level choice and composition from Deep Zoom tiles."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.tiling.engine import DziGeometry
from services.tiling.iiif import (
    IiifError,
    Resolved,
    compose,
    info,
    parse,
    plan,
    resolve,
)

W, H = 5000, 3000


def _resolve(region: str, size: str, qf: str = "default.jpg", rotation: str = "0") -> Resolved:
    return resolve(parse(region, size, rotation, qf), W, H)


def _status(region: str, size: str, rotation: str = "0", qf: str = "default.jpg") -> int:
    with pytest.raises(IiifError) as err:
        resolve(parse(region, size, rotation, qf), W, H)
    return err.value.status


@pytest.mark.parametrize(
    ("region", "box"),
    [
        ("full", (0, 0, W, H)),
        ("square", (1000, 0, 3000, 3000)),
        ("0,0,254,254", (0, 0, 254, 254)),
        ("4900,2900,500,500", (4900, 2900, 100, 100)),  # cropped at the image border
        ("pct:10,10,50,50", (500, 300, 2500, 1500)),
        ("pct:0,0,100,100", (0, 0, W, H)),
    ],
)
def test_regions(region: str, box: tuple[int, int, int, int]) -> None:
    r = _resolve(region, "max")
    assert (r.x, r.y, r.w, r.h) == box


@pytest.mark.parametrize(
    ("region", "size", "out"),
    [
        ("0,0,1000,500", "max", (1000, 500)),
        ("0,0,1000,500", "500,", (500, 250)),
        ("0,0,1000,500", ",100", (200, 100)),
        ("0,0,1000,500", "pct:50", (500, 250)),
        ("0,0,1000,500", "200,200", (200, 200)),  # distorting w,h is allowed
        ("0,0,1000,500", "!200,200", (200, 100)),
        ("0,0,1000,500", "^2000,", (2000, 1000)),
        ("0,0,1000,500", "^pct:150", (1500, 750)),
        ("full", "max", (2643, 1586)),  # bounded by maxArea, aspect kept
        ("full", "!512,512", (512, 307)),
        ("0,0,100,50", "!400,400", (100, 50)),  # !w,h never enlarges without ^
        ("0,0,100,50", "^!400,400", (400, 200)),
        ("0,0,100,50", "^max", (2896, 1448)),
    ],
)
def test_sizes(region: str, size: str, out: tuple[int, int]) -> None:
    r = _resolve(region, size)
    assert (r.out_w, r.out_h) == out
    assert r.out_w * r.out_h <= 2048 * 2048


@pytest.mark.parametrize(
    ("region", "size", "rotation", "qf"),
    [
        ("nope", "max", "0", "default.jpg"),
        ("0,0,0,10", "max", "0", "default.jpg"),  # empty region
        ("-1,0,10,10", "max", "0", "default.jpg"),
        ("1.5,0,10,10", "max", "0", "default.jpg"),
        ("5000,0,10,10", "max", "0", "default.jpg"),  # outside the image
        ("pct:100,0,10,10", "max", "0", "default.jpg"),
        ("pct:0,0,0,10", "max", "0", "default.jpg"),
        ("full", "0,", "0", "default.jpg"),
        ("full", ",0", "0", "default.jpg"),
        ("full", "pct:0", "0", "default.jpg"),
        ("full", "pct:101", "0", "default.jpg"),  # above 100 needs ^
        ("0,0,100,100", "200,", "0", "default.jpg"),  # upscaling needs ^
        ("0,0,100,100", "200,200", "0", "default.jpg"),
        ("full", "5000,", "0", "default.jpg"),  # beyond maxWidth
        ("full", "^4096,4096", "0", "default.jpg"),  # beyond maxArea
        ("full", "big", "0", "default.jpg"),
        ("full", "max", "abc", "default.jpg"),
        ("full", "max", "361", "default.jpg"),
        ("full", "max", "-90", "default.jpg"),
        ("full", "max", "0", "default"),
        ("full", "max", "0", "best.jpg"),
        ("full", "max", "0", "default.bmp"),
        ("full", "max", "0", "default.JPG"),
    ],
)
def test_malformed_is_400(region: str, size: str, rotation: str, qf: str) -> None:
    assert _status(region, size, rotation, qf) == 400


@pytest.mark.parametrize(
    ("rotation", "qf"),
    [
        ("90", "default.jpg"),
        ("22.5", "default.jpg"),
        ("!0", "default.jpg"),  # mirroring
        ("0", "bitonal.jpg"),
        ("0", "default.webp"),
        ("0", "default.tif"),
        ("0", "default.gif"),
        ("0", "default.jp2"),
        ("0", "default.pdf"),
    ],
)
def test_unsupported_is_501(rotation: str, qf: str) -> None:
    assert _status("full", "max", rotation, qf) == 501


def test_rotation_zero_forms_and_qualities() -> None:
    for rotation in ("0", "0.0", "360"):
        assert _resolve("full", "max", rotation=rotation).out_w == 2643
    assert parse("full", "max", "0", "default.jpg").quality == "color"
    assert parse("full", "max", "0", "color.png").format == "png"
    assert parse("full", "max", "0", "gray.jpg").quality == "gray"


def test_info_document() -> None:
    g = DziGeometry(W, H, 254, 1, "jpeg")
    doc = info(g, "http://h/iiif/3/s-1")
    assert doc["@context"] == "http://iiif.io/api/image/3/context.json"
    assert doc["type"] == "ImageService3" and doc["protocol"] == "http://iiif.io/api/image"
    assert doc["profile"] == "level1"
    assert (doc["width"], doc["height"]) == (W, H)
    tiles = doc["tiles"][0]
    assert tiles["width"] == 254
    assert tiles["scaleFactors"][0] == 1
    # the last scale factor makes the whole image one tile
    last = tiles["scaleFactors"][-1]
    assert -(-W // last) <= 254 and -(-H // last) <= 254
    assert all(s["width"] <= doc["maxWidth"] for s in doc["sizes"])


def test_plan_picks_the_nearest_level_at_or_above_the_resolution() -> None:
    g = DziGeometry(W, H, 254, 1, "jpeg")
    top = g.max_level
    # an IIIF tile at scale factor 4 is exactly one Deep Zoom tile two levels down
    r = _resolve("1016,1016,1016,1016", "254,")
    p = plan(g, r)
    assert p.level == top - 2
    assert p.tiles == ((1, 1),)
    # 3x downsampling: level of factor 2 (never below the requested resolution)
    r = _resolve("0,0,3000,3000", "1000,")
    assert plan(g, r).level == top - 1
    # upscaling reads the full-resolution level
    r = _resolve("0,0,100,100", "^400,")
    p = plan(g, r)
    assert p.level == top and p.tiles == ((0, 0),)


def _tile_bytes(g: DziGeometry, level: int, col: int, row: int, image: np.ndarray) -> bytes:
    """A PNG tile of `image` (the level's pixels) cut like the Deep Zoom builder does."""
    x, y, w, h = g.tile_bounds(level, col, row)
    buf = io.BytesIO()
    Image.fromarray(image[y : y + h, x : x + w]).save(buf, "PNG")
    return buf.getvalue()


def test_compose_equals_the_region_of_the_level() -> None:
    g = DziGeometry(700, 500, 254, 1, "png")
    rng = np.random.default_rng(7)
    full = rng.integers(0, 255, (500, 700, 3), dtype=np.uint8)
    r = resolve(parse("200,100,400,300", "max", "0", "default.png"), 700, 500)
    p = plan(g, r)
    assert p.level == g.max_level and len(p.tiles) == 6
    tiles = {(c, w): _tile_bytes(g, p.level, c, w, full) for c, w in p.tiles}
    out = np.asarray(Image.open(io.BytesIO(compose(g, p, r, tiles))))
    assert out.shape == (300, 400, 3)
    assert np.array_equal(out, full[100:400, 200:600])
    # gray and a resampled size, from a lower level
    r = resolve(parse("200,100,400,300", "!100,100", "0", "gray.png"), 700, 500)
    p = plan(g, r)
    assert p.level == g.max_level - 2
    level = np.asarray(Image.fromarray(full).resize(g.level_size(p.level)))
    tiles = {(c, w): _tile_bytes(g, p.level, c, w, level) for c, w in p.tiles}
    with Image.open(io.BytesIO(compose(g, p, r, tiles))) as im:
        assert im.mode == "L" and im.size == (100, 75)
