"""The Grafana dashboard (`deploy/grafana/tessera.json`) shows only what the services export:
every metric its PromQL expressions use is on the `/metrics` endpoint of at least one of the
six running services (ports 9461-9466). A missing metric fails the test by name, with the
panels that use it. After the pipeline ran (the `world` fixture), the core series also carry
samples, not just their HELP/TYPE lines."""

from __future__ import annotations

import json
import re
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from services.cli.client import TesseraClient
from tessera.tiling.v1 import tiling_pb2
from tests.e2e.conftest import World

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "tessera.json"
METRICS_PORTS = range(9461, 9467)
METRIC_NAME = re.compile(r"\b((?:tessera|process|python)_[a-z0-9_]+)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _exports() -> tuple[set[str], dict[str, str]]:
    """(sample names with at least one sample, declared family names -> type), over all six."""
    samples: set[str] = set()
    declared: dict[str, str] = {}
    for port in METRICS_PORTS:
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError as exc:
            pytest.fail(f"{url} unreachable ({exc}); start the stack with `make up`")
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                declared[name] = kind
            elif line and not line.startswith("#"):
                samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return samples, declared


def _exported(name: str, samples: set[str], declared: dict[str, str]) -> bool:
    if name in samples or name in declared:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and declared.get(base) in ("histogram", "summary"):
            return True
    return False


def _dashboard_metrics() -> dict[str, list[str]]:
    """metric name -> titles of the panels whose expressions use it."""
    dash = json.loads(DASHBOARD.read_text())
    used: dict[str, list[str]] = defaultdict(list)
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for name in METRIC_NAME.findall(target["expr"]):
                used[name].append(panel["title"])
    return used


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(p.get("targets") for p in dash["panels"]), "every panel has a query"
    wanted = {
        "tessera_rpc_requests_total",
        "tessera_rpc_duration_seconds_bucket",
        "tessera_events_consumed_total",
        "tessera_consumer_lag",
        "tessera_deid_outcomes_total",
        "tessera_dead_letters_total",
        "tessera_tiling_tile_cache_lookups_total",
    }
    missing = wanted - set(_dashboard_metrics())
    assert not missing, f"the dashboard does not show {sorted(missing)}"


def test_every_dashboard_metric_is_exported(world: World) -> None:
    samples, declared = _exports()
    missing = {
        name: sorted(set(panels))
        for name, panels in _dashboard_metrics().items()
        if not _exported(name, samples, declared)
    }
    assert not missing, "metrics the dashboard uses but no service exports: " + "; ".join(
        f"{name} (panels: {', '.join(panels)})" for name, panels in sorted(missing.items())
    )


async def test_core_series_have_samples_after_the_pipeline_ran(world: World) -> None:
    # one tile read, so the tile cache has looked something up
    async with TesseraClient(world.admin_token) as c:
        desc = await c.tiling.GetDeepZoomDescriptor(
            tiling_pb2.GetDeepZoomDescriptorRequest(slide_id=world.slides["svs"])
        )
        for _ in range(2):  # a miss, then a hit
            await c.tiling.GetTile(
                tiling_pb2.GetTileRequest(
                    slide_id=world.slides["svs"], level=desc.level_count - 1, col=0, row=0
                )
            )
    samples, _ = _exports()
    core = [
        "tessera_rpc_requests_total",
        "tessera_rpc_duration_seconds_bucket",
        "tessera_events_consumed_total",
        "tessera_events_published_total",
        "tessera_event_handler_duration_seconds_bucket",
        "tessera_consumer_lag",
        "tessera_deid_outcomes_total",
        "tessera_service_ready",
        "tessera_tiling_tile_cache_lookups_total",
    ]
    empty = [name for name in core if name not in samples]
    assert not empty, f"no samples yet for {empty}"
