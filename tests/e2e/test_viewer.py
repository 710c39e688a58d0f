"""The viewer page in a real browser (Debian's chromium, headless, driven by Playwright) against
the running tiling service: tiles are requested with the reader's token and drawn, pan and zoom
fetch more tiles, the catalogue record is shown beside the slide, and a reader without a grant
sees an access error instead of tiles. Screenshots are written under .tessera/screenshots/."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.async_api import Browser, Page, Response, async_playwright

from services.cli.client import TesseraClient

from .conftest import HOME, World, role, token

pytestmark = pytest.mark.e2e
BASE = "http://127.0.0.1:8180"
SHOTS = HOME / "screenshots"
BACKGROUND = np.array([0x20, 0x20, 0x20])  # #stage in viewer.css
_TILE_URL = re.compile(r"/slides/[^/]+_files/(\d+)/(\d+)_(\d+)\.jpeg$")


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run `make browser` (Debian package chromium)")
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=_chromium(),
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            yield b
        finally:
            await b.close()


async def _reader(world: World, subject: str) -> str:
    async with TesseraClient(world.admin_token) as adm:
        await adm.grant(world.dataset, subject, role("researcher"), days=1)
    return token(subject)


def _watch_tiles(page: Page) -> list[tuple[int, int]]:
    """(status, level) of every tile response the page receives."""
    seen: list[tuple[int, int]] = []

    def on_response(r: Response) -> None:
        m = _TILE_URL.search(r.url.split("?", 1)[0])
        if m is not None:
            seen.append((r.status, int(m.group(1))))

    page.on("response", on_response)
    return seen


def _drawn_fraction(png: bytes) -> tuple[float, float]:
    """Share of the viewer's pixels that are not the empty background, and their spread."""
    with Image.open(io.BytesIO(png)) as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    drawn = np.abs(px - BACKGROUND).sum(axis=1) > 30
    spread = float(px[drawn].std()) if drawn.any() else 0.0
    return float(drawn.mean()), spread


async def _until(page: Page, expression: str, limit_s: float = 60) -> None:
    """Poll `expression` in the page until it is truthy. (Playwright's wait_for_function
    evaluates strings with eval, which the page's Content-Security-Policy rightly forbids.)"""
    for _ in range(int(limit_s * 10)):
        if await page.evaluate(expression):
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"the page never reached: {expression}")


def _tell(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print past pytest's capture, so the screenshot paths show in any run."""
    with capsys.disabled():
        print(f"\n{line}")


def _shot(name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS / name


async def test_viewer_draws_tiles_pans_zooms_and_shows_the_record(
    world: World, browser: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    slide_id = world.slides["svs"]
    subject = f"e2e-viewer-{uuid.uuid4().hex[:6]}"
    tok = await _reader(world, subject)
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    tiles = _watch_tiles(page)
    await page.goto(f"{BASE}/viewer/{slide_id}#token={tok}")
    await _until(page, "window.tesseraViewer && window.tesseraViewer.fullyLoaded")
    assert await page.evaluate("document.body.dataset.state") == "ready"
    # the token left the address bar at once; the tiles were fetched with it
    assert "token" not in page.url
    assert tiles and all(status == 200 for status, _ in tiles), tiles
    assert await page.evaluate("window.tesseraViewer.tilesFailed") == 0
    # the canvas shows the slide: mostly drawn, with the variation of stained tissue
    drawn, spread = _drawn_fraction(await page.locator("#osd").screenshot())
    assert drawn > 0.3, drawn
    assert spread > 8, spread
    # the catalogue record beside it, read with the reader's token
    await _until(page, "document.querySelectorAll('#record-fields dd').length > 0")
    record = await page.locator("#record-fields").inner_text()
    assert slide_id in record and world.dataset in record
    assert "h&e" in record.lower() and "READY" in record
    shot = _shot(f"viewer-{slide_id}.png")
    await page.screenshot(path=str(shot))
    _tell(capsys, f"viewer screenshot: {shot}")

    # zoom in: tiles of a deeper level are requested and drawn
    before = max(level for _, level in tiles)
    loaded = await page.evaluate("window.tesseraViewer.tilesLoaded")
    await page.evaluate(
        "(() => { const v = window.tesseraViewer.viewer;"
        " v.viewport.zoomBy(8); v.viewport.applyConstraints(); })()"
    )
    await _until(page, f"window.tesseraViewer.tilesLoaded > {loaded}")
    await _until(page, "window.tesseraViewer.viewer.world.getItemAt(0).getFullyLoaded()")
    assert max(level for _, level in tiles) > before
    # pan: more tiles of the new place. A quarter of the image width is several tiles at the
    # deepest level whatever the tile size (240 px copied or 254 px rendered); a small pan
    # could stay inside tiles already loaded and ask for nothing new.
    loaded = await page.evaluate("window.tesseraViewer.tilesLoaded")
    await page.evaluate(
        "(() => { const v = window.tesseraViewer.viewer;"
        " v.viewport.panBy(new OpenSeadragon.Point(0.25, 0.25));"
        " v.viewport.applyConstraints(); })()"
    )
    await _until(page, f"window.tesseraViewer.tilesLoaded > {loaded}")
    assert all(status == 200 for status, _ in tiles)
    drawn, _ = _drawn_fraction(await page.locator("#osd").screenshot())
    assert drawn > 0.5, drawn
    shot = _shot(f"viewer-{slide_id}-zoomed.png")
    await page.screenshot(path=str(shot))
    _tell(capsys, f"viewer screenshot (zoomed): {shot}")


async def test_reader_without_grant_sees_an_access_error_instead_of_tiles(
    world: World, browser: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    slide_id = world.slides["svs"]
    stranger = token(f"e2e-stranger-{uuid.uuid4().hex[:6]}")
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    tiles = _watch_tiles(page)
    # no token in the URL: the page asks for one
    await page.goto(f"{BASE}/viewer/{slide_id}")
    assert await page.evaluate("document.body.dataset.state") == "login"
    await page.fill("#token", stranger)
    await page.click("#login button")
    await _until(page, "document.body.dataset.state === 'denied'")
    error = page.locator("#error")
    assert await error.is_visible()
    assert "Access denied" in await error.inner_text()
    await _until(
        page, "!document.getElementById('record-status').textContent.startsWith('loading')"
    )
    assert "Access denied" in await page.locator("#record-status").inner_text()
    assert not any(status == 200 for status, _ in tiles)
    assert await page.evaluate("window.tesseraViewer.tilesLoaded") == 0
    shot = _shot(f"viewer-{slide_id}-denied.png")
    await page.screenshot(path=str(shot))
    _tell(capsys, f"viewer screenshot (denied): {shot}")


async def test_viewer_page_is_a_static_shell_with_a_strict_policy(world: World) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{BASE}/viewer/{world.slides['svs']}") as r:
            assert r.status == 200
            policy = r.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert world.slides["svs"] not in await r.text()  # no data in the shell
        async with http.get(f"{BASE}/viewer/static/vendor/openseadragon/openseadragon.min.js") as r:
            assert r.status == 200
            assert "OpenSeadragon" in (await r.text())[:5000]
        async with http.get(f"{BASE}/viewer/static/..%2F..%2Fhttp.py") as r:
            assert r.status == 404
        async with http.get(f"{BASE}/api/slides/{world.slides['svs']}") as r:
            assert r.status == 401
