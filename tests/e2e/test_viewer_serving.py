"""What the viewer's tile traffic costs and records on the running stack: one access decision
(and one audit record) per reader, slide and window, every denial asked and audited, the tile
cache answering repeated reads, its counters on the tiling service's /metrics."""

from __future__ import annotations

import re
import uuid

import aiohttp
import pytest

from services.cli.client import TesseraClient
from tessera.access.v1 import access_pb2

from .conftest import World, role, token

pytestmark = pytest.mark.e2e
BASE = "http://127.0.0.1:8180"
METRICS = "http://127.0.0.1:9464/metrics"
READ_PIXELS = int(access_pb2.Action.ACTION_READ_PIXELS)


async def _metric(http: aiohttp.ClientSession, name: str, labels: str = "") -> float:
    async with http.get(METRICS) as r:
        text = await r.text()
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(r"(?m)^" + pattern + "$", text)
    assert m is not None, f"{name}{{{labels}}} not on /metrics"
    return float(m.group(1))


async def _audit(adm: TesseraClient, subject: str) -> list[access_pb2.AuditRecord]:
    r = await adm.access.ListAuditRecords(
        access_pb2.ListAuditRecordsRequest(subject=subject, page_size=1000)
    )
    return list(r.records)


async def test_one_decision_per_reader_slide_and_window_denials_always(world: World) -> None:
    slide = world.slides["svs"]
    reader = f"e2e-tiles-{uuid.uuid4().hex[:6]}"
    stranger = f"e2e-stranger-{uuid.uuid4().hex[:6]}"
    async with TesseraClient(world.admin_token) as adm:
        await adm.grant(world.dataset, reader, role("researcher"), days=1)
        auth = {"Authorization": f"Bearer {token(reader)}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{BASE}/slides/{slide}.dzi", headers=auth) as r:
                assert r.status == 200
            for col in range(4):
                for row in range(4):
                    url = f"{BASE}/slides/{slide}_files/11/{col}_{row}.jpeg"
                    async with http.get(url, headers=auth) as r:
                        assert r.status == 200
            async with http.get(
                f"{BASE}/iiif/3/{slide}/full/256,/0/default.jpg", headers=auth
            ) as r:
                assert r.status == 200
            bad = {"Authorization": f"Bearer {token(stranger)}"}
            for col in range(3):
                url = f"{BASE}/slides/{slide}_files/11/{col}_0.jpeg"
                async with http.get(url, headers=bad) as r:
                    assert r.status == 403
        pixels = [a for a in await _audit(adm, reader) if a.action == READ_PIXELS]
        # 18 reads of the slide within the window: one decision, naming the slide's view
        assert len(pixels) == 1, pixels
        assert pixels[0].allowed and pixels[0].resource == f"slide/{slide}/view"
        denied = [a for a in await _audit(adm, stranger) if a.action == READ_PIXELS]
        assert len(denied) == 3 and not any(a.allowed for a in denied)
        assert {a.reason for a in denied} == {"NO_GRANT"}


async def test_tile_cache_answers_repeats_and_is_on_metrics(world: World) -> None:
    slide = world.slides["ndpi"]
    auth = {"Authorization": f"Bearer {world.admin_token}"}
    async with aiohttp.ClientSession() as http:
        url = f"{BASE}/slides/{slide}_files/8/0_0.jpeg"
        async with http.get(url, headers=auth) as r:
            assert r.status == 200
            first = await r.read()
        hits = await _metric(http, "tessera_tiling_tile_cache_lookups_total", 'outcome="hit"')
        for _ in range(5):
            async with http.get(url, headers=auth) as r:
                assert r.status == 200 and await r.read() == first
        after = await _metric(http, "tessera_tiling_tile_cache_lookups_total", 'outcome="hit"')
        assert after >= hits + 5
        assert await _metric(http, "tessera_tiling_tile_cache_bytes") > 0
        assert await _metric(http, "tessera_tiling_tile_cache_max_bytes") > 0
        assert await _metric(http, "tessera_tiling_access_cache_lookups_total", 'outcome="hit"') > 0
