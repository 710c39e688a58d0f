"""The fault campaign in its short form (CI): a second stack of real servers and services, every
service SIGKILLed once at a random moment, Kafka restarted, S3 and FerretDB each stopped for a
while — and afterwards nothing lost, nothing duplicated, nothing orphaned, nothing leaked.
`make test-faults` runs the long form (50 slides, 30 s outages)."""

from __future__ import annotations

import os

import pytest

from tests.faults.harness import REJECTED, campaign
from tests.faults.world import SERVICE_NAMES

pytestmark = pytest.mark.faults

SLIDES = int(os.environ.get("TESSERA_FAULT_SLIDES", "14"))
OUTAGE_S = float(os.environ.get("TESSERA_FAULT_OUTAGE_S", "12"))


async def test_acknowledged_uploads_survive_crashes_and_outages_exactly_once() -> None:
    seed = int(os.environ.get("TESSERA_FAULT_SEED", "3"))
    report = await campaign(SLIDES, OUTAGE_S, seed, spread_s=120)
    print(report.table())
    kinds = {f.kind.split(" ")[0] + " " + f.kind.split(" ")[1] for f in report.faults}
    assert {f"kill {s}" for s in SERVICE_NAMES} <= kinds
    assert {"restart kafka", "stop s3", "stop ferretdb"} <= kinds
    assert report.problems == []
    assert report.accepted == SLIDES
    assert report.completed == SLIDES
    assert report.duplicated == 0 and report.lost == 0
    # the broken sample is a genuine rejection, not a loss
    assert any(u.final == REJECTED for u in report.uploads)
    # the malformed events injected are the only dead letters (each consumer group of the
    # topic parks its copy), each with its reason; `problems` lists any other one
    assert report.injected_bad == 3
    assert len(report.dead_letters) >= report.injected_bad
    assert {reason for _, reason in report.dead_letters} == {"MALFORMED_EVENT"}
    # the faults hit work in flight: uploads kept arriving while the faults went on
    fault_times = sorted(f.at for f in report.faults)
    assert sum(1 for u in report.uploads if u.acked_at > fault_times[len(fault_times) // 2]) >= 2
