"""Federation on the real stack: two catalogues in this process stand for two sites. Site A's
READY slide goes through A's outbox onto A's federation topic on the real Kafka; site B's
consumer keeps it in B's `federated_slides` on the real FerretDB; a search on B with
`include_federated` finds it, with access decided by the real access service. Topics, consumer
group and databases are unique per run, so nothing meets the running services' data."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from services.cli.client import TesseraClient, endpoint
from services.metadata.core import Catalogue, SearchQuery
from services.metadata.federation import Federation, FederationConfig
from services.metadata.mapping import to_proto
from services.shared.access import GrpcAccessChecker
from services.shared.adapters.kafka import KafkaBus
from services.shared.adapters.mongo import MongoDocumentStore
from services.shared.auth import Principal
from services.shared.events import EventEmitter, EventRunner
from services.shared.outbox import Outbox
from services.shared.ports.bus import Publisher
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2
from tests.e2e.conftest import KAFKA, role, token
from tests.unit.test_catalogue import pipeline

MONGO = "mongodb://127.0.0.1:27017/"
pytestmark = pytest.mark.e2e


@dataclass
class Node:
    catalogue: Catalogue
    federation: Federation
    store: MongoDocumentStore
    publisher: Publisher
    access: GrpcAccessChecker


@dataclass
class Pair:
    run: str
    topic_a: str
    dataset_a: str
    dataset_b: str
    reader: str
    bus: KafkaBus
    a: Node
    b: Node
    runner: EventRunner


async def _node(bus: KafkaBus, database: str, site: str, publish: str, peer: str) -> Node:
    store = MongoDocumentStore(MONGO, database, server_selection_timeout_ms=5_000)
    await store.ping()
    publisher = bus.publisher()
    await publisher.start()
    service_token = token("metadata", ("service",))
    access = GrpcAccessChecker(endpoint("access"), lambda: service_token)
    fed = Federation(
        FederationConfig(site, publish, (peer,)),
        records=store.collection("federated_slides"),
        outbox=Outbox(store.collection("metadata_outbox"), EventEmitter("metadata", publisher)),
    )
    cat = Catalogue(
        slides=store.collection("catalogue_slides"),
        datasets=store.collection("catalogue_datasets"),
        access=access,
        site=site,
        federation=fed,
    )
    await cat.ensure_indexes()
    return Node(cat, fed, store, publisher, access)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    run = uuid.uuid4().hex[:10]
    prefix = f"e2efed{run}."
    topic_a = f"{prefix}tessera.federation.catalogue.site-a.v1"
    topic_b = f"{prefix}tessera.federation.catalogue.site-b.v1"
    bus = KafkaBus(KAFKA, client_id=f"e2e-federation-{run}")
    await bus.ensure_topics([topic_a, topic_b])
    dbs = (f"e2e_fed_{run}_a", f"e2e_fed_{run}_b")
    dataset_a, dataset_b, reader = f"e2e-fed-a-{run}", f"e2e-fed-b-{run}", f"e2e-fed-reader-{run}"
    async with TesseraClient(token("e2e-steward", ("admin",))) as c:
        await c.create_dataset(dataset_a, "fed a", "federation test, site A")
        await c.create_dataset(dataset_b, "fed b", "federation test, site B")
        # the reader is admitted to site B's catalogue (one local dataset), not to A's dataset
        await c.grant(dataset_b, reader, role("researcher"), days=1)
    a = await _node(bus, dbs[0], "site-a", topic_a, topic_b)
    b = await _node(bus, dbs[1], "site-b", topic_b, topic_a)
    runner = EventRunner(
        service="metadata",
        bus=bus,
        group=f"e2e-federation-{run}",
        handlers=b.federation.handlers(),
        publisher=b.publisher,
    )
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(runner.ready.wait(), 60)
        yield Pair(run, topic_a, dataset_a, dataset_b, reader, bus, a, b, runner)
    finally:
        runner.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        task.cancel()
        for node in (a, b):
            await node.publisher.stop()
            await node.access.close()
            await node.store.close()
        raw: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            MONGO, serverSelectionTimeoutMS=5_000
        )
        try:
            for db in dbs:
                await raw.drop_database(db)
        finally:
            await raw.close()
        admin = bus.admin_client()
        try:
            await admin.start()
            await admin.delete_topics([topic_a, topic_b])
        finally:
            await admin.close()


async def _topic_values(bus: KafkaBus, topic: str, group: str, want: int) -> list[bytes]:
    sub = bus.subscription(group, [topic])
    await sub.start()
    out: list[bytes] = []
    deadline = asyncio.get_running_loop().time() + 120
    try:
        while len(out) < want and asyncio.get_running_loop().time() < deadline:
            out += [m.value for m in await sub.fetch(timeout_s=0.5)]
        # one more poll: a duplicate would show up here
        out += [m.value for m in await sub.fetch(timeout_s=1.0)]
    finally:
        await sub.stop()
    return out


async def test_ready_slide_on_site_a_is_found_by_a_search_on_site_b(pair: Pair) -> None:
    slide = f"fed-{pair.run}"
    reader = Principal(pair.reader)
    events = pipeline(slide)
    for env in events:
        env.dataset_id = pair.dataset_a
        await pair.a.catalogue.on_event(env)
    await pair.a.catalogue.on_event(events[-1])  # a redelivery publishes nothing new

    query = SearchQuery(stain="HE", include_federated=True)
    found: list[dict[str, Any]] = []
    for _ in range(120):
        found = (await pair.b.catalogue.search(reader, query)).slides
        if found:
            break
        await asyncio.sleep(0.5)
    assert [(d["site"], d["slide_id"]) for d in found] == [("site-a", slide)]
    s = to_proto(found[0])
    assert s.site == "site-a" and s.dataset_id == pair.dataset_a
    assert s.status == common_pb2.SLIDE_STATUS_READY
    assert (s.clinical.stain, s.clinical.organ, s.clinical.species) == ("he", "lung", "human")
    assert not s.clinical.case_id and not s.pyramid.bucket and not s.pyramid.descriptor_key
    assert s.pyramid.level_count == 13
    assert s.geometry.width == 4000

    # without include_federated B shows only its own catalogue (empty here)
    assert (await pair.b.catalogue.search(reader, SearchQuery(stain="HE"))).slides == []
    # other filters apply to the peer's records too
    assert (
        await pair.b.catalogue.search(reader, SearchQuery(organ="liver", include_federated=True))
    ).slides == []
    # a caller B does not admit to its catalogue sees no peer records
    stranger = Principal(f"e2e-fed-stranger-{pair.run}")
    assert (await pair.b.catalogue.search(stranger, query)).slides == []

    # exactly one record on A's topic, with nothing identifying in it
    values = await _topic_values(pair.bus, pair.topic_a, f"e2e-federation-probe-{pair.run}", 1)
    assert len(values) == 1
    env = events_pb2.EventEnvelope()
    env.ParseFromString(values[0])
    assert env.federated_slide.slide_id == slide
    for secret in (b"unit-cas-aaaa", b"slides/", b"masks/", b".dzi", b"thumb"):
        assert secret not in values[0]
