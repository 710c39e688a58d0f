"""The worst moment to crash: a consumer has done an event's side effects (objects written,
records stored, events published) but not committed its offset. Each consuming service of a
second stack is made to die exactly there once (failpoint `events.before_commit`, see
services/shared/failpoints.py); a supervisor restarts it, the event is delivered again — and
the redone work must not be visible: one de-identified object, one pyramid, one inference
result, one catalogue record per slide, no orphans, nothing parked."""

from __future__ import annotations

import shutil

import pytest

from services.shared.failpoints import DIR_ENV, POINTS_ENV
from tests.faults.harness import Campaign, generated
from tests.faults.world import FaultWorld

pytestmark = pytest.mark.faults

CONSUMERS = {"deid", "tiling", "metadata", "serving"}


async def test_crash_after_side_effects_before_commit_is_invisible() -> None:
    world = FaultWorld()
    markers = world.root / "failpoints"
    shutil.rmtree(markers, ignore_errors=True)
    markers.mkdir(parents=True)
    world.extra_env = {POINTS_ENV: "events.before_commit", DIR_ENV: str(markers)}
    items = generated(4, seed=11)
    try:
        await world.up(fresh=True)
        report = await Campaign(world, items, outage_s=0, seed=11, spread_s=5, chaos=False).run()
    finally:
        await world.down()
    print(report.table())
    # each marker is written the instant before its process ends itself
    fired = {p.name.split(".", 1)[0] for p in markers.iterdir()}
    assert fired >= CONSUMERS, f"failpoint did not fire in {CONSUMERS - fired}"
    assert report.faults, "the supervisor restarted nothing"
    assert report.problems == []
    assert report.accepted == report.completed == len(items)
    assert report.duplicated == 0 and report.lost == 0
