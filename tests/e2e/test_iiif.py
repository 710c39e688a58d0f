"""IIIF Image API 3.0 on the running tiling service, over real HTTP: info.json, regions, sizes,
qualities and formats composed from the Deep Zoom tiles, errors (400/501), access control and
HTTP caching."""

from __future__ import annotations

import io
import json
import uuid

import aiohttp
import numpy as np
import pytest
from multidict import CIMultiDict
from PIL import Image

from services.tiling.engine import DziGeometry

from .conftest import World, token

pytestmark = pytest.mark.e2e
BASE = "http://127.0.0.1:8180"


def _auth(world: World) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.admin_token}"}


async def _get(
    http: aiohttp.ClientSession, path: str, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.get(f"{BASE}{path}", headers=headers or {}, allow_redirects=False) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


def _image(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


async def test_info_json_describes_the_slide(world: World) -> None:
    slide = world.slides["svs"]
    async with aiohttp.ClientSession() as http:
        status, headers, body = await _get(http, f"/iiif/3/{slide}/info.json", _auth(world))
        assert status == 200
        assert headers["Content-Type"].startswith("application/json")
        assert headers["Cache-Control"].startswith("private")
        doc = json.loads(body)
        assert doc["@context"] == "http://iiif.io/api/image/3/context.json"
        assert doc["id"] == f"{BASE}/iiif/3/{slide}"
        assert doc["type"] == "ImageService3" and doc["profile"] == "level1"
        assert (doc["width"], doc["height"]) == (2220, 2967)
        _, _, dzi = await _get(http, f"/slides/{slide}.dzi", _auth(world))
        assert doc["tiles"][0]["width"] == DziGeometry.from_descriptor(dzi).tile_size
        assert "png" in doc["extraFormats"]
        # JSON-LD when asked for it
        status, headers, _ = await _get(
            http,
            f"/iiif/3/{slide}/info.json",
            {**_auth(world), "Accept": "application/ld+json"},
        )
        assert status == 200 and headers["Content-Type"].startswith("application/ld+json")
        # the base URI redirects to info.json
        status, headers, _ = await _get(http, f"/iiif/3/{slide}", _auth(world))
        assert status == 303 and headers["Location"].endswith(f"/iiif/3/{slide}/info.json")


async def test_regions_and_sizes_are_composed_from_the_pyramid(world: World) -> None:
    slide = world.slides["svs"]
    auth = _auth(world)
    async with aiohttp.ClientSession() as http:
        _, _, dzi = await _get(http, f"/slides/{slide}.dzi", auth)
        geom = DziGeometry.from_descriptor(dzi)
        top, ts, ov = geom.max_level, geom.tile_size, geom.overlap
        # one IIIF tile at full resolution is the Deep Zoom tile without its overlap
        status, headers, png = await _get(
            http, f"/iiif/3/{slide}/{ts},{ts},{ts},{ts}/max/0/default.png", auth
        )
        assert status == 200 and headers["Content-Type"] == "image/png"
        _, _, jpeg = await _get(http, f"/slides/{slide}_files/{top}/1_1.jpeg", auth)
        dz = np.asarray(_image(jpeg).convert("RGB"))[ov : ov + ts, ov : ov + ts]
        assert np.array_equal(np.asarray(_image(png).convert("RGB")), dz)
        # sizes
        for path, size in (
            ("full/256,/0/default.jpg", (256, 342)),
            ("full/,300/0/color.jpg", (224, 300)),
            ("full/!200,200/0/default.jpg", (150, 200)),
            ("full/pct:10/0/default.jpg", (222, 297)),
            ("0,0,1000,500/500,250/0/default.jpg", (500, 250)),
            ("0,0,100,100/^300,/0/default.png", (300, 300)),
            ("square/128,128/0/default.jpg", (128, 128)),
            ("pct:50,50,50,50/max/0/default.jpg", (1110, 1483)),  # cut at the border
            ("2000,2900,500,500/max/0/default.jpg", (220, 67)),  # cut at the border
        ):
            status, headers, data = await _get(http, f"/iiif/3/{slide}/{path}", auth)
            assert status == 200, (path, data[:200])
            with _image(data) as im:
                assert im.size == size, path
                assert im.format == ("PNG" if path.endswith("png") else "JPEG")
        # gray
        status, _, data = await _get(http, f"/iiif/3/{slide}/full/128,/0/gray.png", auth)
        assert status == 200 and _image(data).mode == "L"
        # a downscaled image matches the pyramid level it came from
        level = top - 2
        _, _, jpeg = await _get(http, f"/slides/{slide}_files/{level}/0_0.jpeg", auth)
        status, _, png = await _get(
            http, f"/iiif/3/{slide}/0,0,{4 * ts},{4 * ts}/{ts},/0/default.png", auth
        )
        assert status == 200
        dz = np.asarray(_image(jpeg).convert("RGB"))[:ts, :ts]
        assert np.array_equal(np.asarray(_image(png).convert("RGB")), dz)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("full/max/0/default.bmp", 400),
        ("nonsense/max/0/default.jpg", 400),
        ("0,0,0,10/max/0/default.jpg", 400),
        ("9000,0,10,10/max/0/default.jpg", 400),  # outside the image
        ("0,0,100,100/200,/0/default.jpg", 400),  # upscaling without ^
        ("full/5000,/0/default.jpg", 400),  # beyond maxWidth
        ("full/max/abc/default.jpg", 400),
        ("full/max/0/best.jpg", 400),
        ("full/max/90/default.jpg", 501),
        ("full/max/!0/default.jpg", 501),
        ("full/max/0/bitonal.jpg", 501),
        ("full/max/0/default.webp", 501),
    ],
)
async def test_invalid_is_400_and_unsupported_is_501(world: World, path: str, status: int) -> None:
    async with aiohttp.ClientSession() as http:
        got, headers, body = await _get(http, f"/iiif/3/{world.slides['svs']}/{path}", _auth(world))
        assert got == status, body
        assert headers["Content-Type"].startswith("application/json")


async def test_iiif_is_access_controlled_and_cacheable(world: World) -> None:
    slide = world.slides["svs"]
    path = f"/iiif/3/{slide}/0,0,512,512/256,/0/default.jpg"
    stranger = {"Authorization": f"Bearer {token(f'e2e-stranger-{uuid.uuid4().hex[:6]}')}"}
    async with aiohttp.ClientSession() as http:
        for p in (path, f"/iiif/3/{slide}/info.json"):
            assert (await _get(http, p))[0] == 401
            assert (await _get(http, p, stranger))[0] == 403
            assert (await _get(http, p, {"Authorization": "Bearer not-a-token"}))[0] == 401
        # unknown slide
        assert (await _get(http, "/iiif/3/no-such-slide/info.json", _auth(world)))[0] == 404
        # the token may also come as a query parameter (viewers that cannot set headers)
        status, _, _ = await _get(http, f"{path}?access_token={world.admin_token}")
        assert status == 200
        status, headers, _ = await _get(http, path, _auth(world))
        assert status == 200
        etag = headers["ETag"]
        assert headers["Cache-Control"].startswith("private")
        assert "Authorization" in headers["Vary"]
        status, _, body = await _get(http, path, {**_auth(world), "If-None-Match": etag})
        assert status == 304 and body == b""
        status, _, _ = await _get(
            http, path, {**_auth(world), "If-None-Match": f'"other", W/{etag}'}
        )
        assert status == 304
        # a stranger holding the ETag learns nothing: 403, not 304
        status, _, _ = await _get(http, path, {**stranger, "If-None-Match": etag})
        assert status == 403
