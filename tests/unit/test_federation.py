"""Federation of the catalogue over in-memory fakes: a READY slide's de-identified record is
published once on the node's federation topic, a peer keeps it in `federated_slides`, and a
search with `include_federated` finds it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from services.metadata.bootstrap import MetadataSettings
from services.metadata.core import Catalogue, SearchQuery
from services.metadata.federation import STAGE, Federation, FederationConfig
from services.metadata.mapping import to_proto
from services.operator import builders
from services.operator.builders import PeerInfo
from services.shared.access import Action, StaticAccessChecker
from services.shared.adapters.memory import InMemoryBus, InMemoryDocumentStore
from services.shared.auth import ROLE_ADMIN, Principal, generate_keypair
from services.shared.events import (
    EventEmitter,
    EventRunner,
    RetryPolicy,
    dead_letter_topic,
    event_id_for,
    new_envelope,
)
from services.shared.outbox import Outbox
from services.shared.ports.documents import Collection
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2
from tests.unit.test_catalogue import T0, pipeline, received, rejected
from tests.unit.test_operator_builders import node_spec

TOPIC_A = "run1.tessera.federation.catalogue.site-a.v1"
TOPIC_B = "run1.tessera.federation.catalogue.site-b.v1"
DLQ = dead_letter_topic("metadata")
ALICE = Principal("alice")  # reads ds-1 at site A and ds-b at site B
BOB = Principal("bob")  # reads nothing
ADMIN = Principal("root", frozenset({ROLE_ADMIN}))

# Every field a federated record may carry; a new field must be argued safe and added here.
ALLOWED_FIELDS = {
    "site",
    "slide_id",
    "dataset_id",
    "format",
    "status",
    "stain",
    "organ",
    "species",
    "geometry",
    "pyramid_level_count",
    "tissue_fraction",
    "created_at",
    "ready_at",
}


@dataclass
class Site:
    catalogue: Catalogue
    federation: Federation
    slides: Collection
    records: Collection


async def make_site(bus: InMemoryBus, site: str, publish: str, subscribe: tuple[str, ...]) -> Site:
    docs = InMemoryDocumentStore()
    publisher = bus.publisher()
    await publisher.start()
    outbox = Outbox(docs.collection("outbox"), EventEmitter("metadata", publisher))
    fed = Federation(
        FederationConfig(site, publish, subscribe),
        records=docs.collection("federated_slides"),
        outbox=outbox,
    )
    checker = StaticAccessChecker(
        {("alice", "ds-1"): {Action.ACTION_READ_RECORD}, ("alice", "ds-b"): {1}},
        {"ds-1", "ds-b"},
    )
    slides = docs.collection("slides")
    cat = Catalogue(
        slides=slides,
        datasets=docs.collection("datasets"),
        access=checker,
        site=site,
        federation=fed,
    )
    return Site(cat, fed, slides, docs.collection("federated_slides"))


@pytest.fixture
async def bus() -> AsyncIterator[InMemoryBus]:
    b = InMemoryBus()
    await b.ensure_topics([TOPIC_A, TOPIC_B, DLQ])
    yield b


@pytest.fixture
async def a(bus: InMemoryBus) -> Site:
    return await make_site(bus, "site-a", TOPIC_A, (TOPIC_B,))


@pytest.fixture
async def b(bus: InMemoryBus) -> Site:
    return await make_site(bus, "site-b", TOPIC_B, (TOPIC_A,))


def published(bus: InMemoryBus, topic: str = TOPIC_A) -> list[events_pb2.EventEnvelope]:
    out = []
    for m in bus.messages(topic):
        env = events_pb2.EventEnvelope()
        env.ParseFromString(m.value)
        out.append(env)
    return out


async def deliver(bus: InMemoryBus, to: Site, topic: str = TOPIC_A) -> None:
    """Hand what the peer published to `to`'s federation handler (as its consumer would)."""
    handler = to.federation.handlers()[topic]
    for env in published(bus, topic):
        await handler(env)


# -- publishing ---------------------------------------------------------------------------


async def test_record_published_only_when_ready(bus: InMemoryBus, a: Site) -> None:
    events = pipeline("s1")
    for env in events[:3]:  # RECEIVED, DEIDENTIFIED, TILED
        await a.catalogue.on_event(env)
    assert published(bus) == []
    await a.catalogue.on_event(events[3])  # inference → READY
    [env] = published(bus)
    assert env.WhichOneof("payload") == "federated_slide"
    assert env.event_id == event_id_for("s1", STAGE)
    rec = env.federated_slide
    assert (rec.site, rec.slide_id, rec.dataset_id) == ("site-a", "s1", "ds-1")
    assert (rec.stain, rec.organ, rec.species) == ("he", "lung", "human")
    assert rec.status == common_pb2.SLIDE_STATUS_READY
    assert rec.format == common_pb2.SLIDE_FORMAT_APERIO_SVS
    assert (rec.geometry.width, rec.geometry.height, len(rec.geometry.levels)) == (4000, 3000, 2)
    assert rec.pyramid_level_count == 13
    assert rec.tissue_fraction == pytest.approx(0.42)
    assert rec.created_at.ToDatetime(tzinfo=T0.tzinfo) == T0
    assert rec.ready_at.ToDatetime(tzinfo=T0.tzinfo) == T0 + timedelta(minutes=3)


async def test_redelivery_and_reordering_publish_once(bus: InMemoryBus, a: Site) -> None:
    events = pipeline("s1")
    for env in [events[3], events[1], events[0], events[2], *events, events[3]]:
        await a.catalogue.on_event(env)
    assert len(published(bus)) == 1


async def test_rejected_or_incomplete_slides_are_not_published(bus: InMemoryBus, a: Site) -> None:
    await a.catalogue.on_event(received("s2"))
    await a.catalogue.on_event(rejected("s2", T0))
    events = pipeline("s3")
    for env in (events[0], events[1], events[3]):  # READY reached, TILED missing
        await a.catalogue.on_event(env)
    assert published(bus) == []


async def test_published_record_carries_nothing_identifying(bus: InMemoryBus, a: Site) -> None:
    for env in pipeline("s1"):
        await a.catalogue.on_event(env)
    [msg] = bus.messages(TOPIC_A)
    rec = published(bus)[0].federated_slide
    assert {f.name for f in rec.DESCRIPTOR.fields} == ALLOWED_FIELDS
    # the pseudonymised case id, bucket names and object keys of the test events
    for value in (
        b"unit-cas-aaaa",
        b"slides/s1",
        b"masks/s1.png",
        b"thumb.jpg",
        b".dzi",
        b"deid",
        b"tiles",
        b"results",
        b"b" * 64,  # the de-identified file's sha256
    ):
        assert value not in msg.value
        assert all(value not in v for _, v in msg.headers)


async def test_nothing_published_when_federation_is_off(bus: InMemoryBus) -> None:
    site = await make_site(bus, "site-a", "", (TOPIC_B,))
    for env in pipeline("s1"):
        await site.catalogue.on_event(env)
    assert published(bus) == []


def test_config_is_checked() -> None:
    docs = InMemoryDocumentStore()
    col = docs.collection("f")
    box = Outbox(docs.collection("o"), EventEmitter("metadata", InMemoryBus().publisher()))
    with pytest.raises(ValueError, match="this node's site"):
        Federation(FederationConfig("site-a", TOPIC_B), records=col, outbox=box)
    with pytest.raises(ValueError, match="not a federation topic"):
        Federation(
            FederationConfig("site-a", "", ("tessera.slide.tiled.v1",)), records=col, outbox=box
        )
    with pytest.raises(ValueError, match="outbox"):
        Federation(FederationConfig("site-a", TOPIC_A), records=col, outbox=None)


# -- consuming and searching -----------------------------------------------------------------


async def test_peer_record_lands_in_federated_slides_once(
    bus: InMemoryBus, a: Site, b: Site
) -> None:
    for env in pipeline("s1"):
        await a.catalogue.on_event(env)
    await deliver(bus, b)
    await deliver(bus, b)  # redelivery
    docs = await b.records.find({})
    assert [d["_id"] for d in docs] == ["site-a/s1"]
    doc = docs[0]
    assert (doc["site"], doc["slide_id"], doc["dataset_id"], doc["status"]) == (
        "site-a",
        "s1",
        "ds-1",
        "READY",
    )
    assert doc["clinical"] == {"stain": "he", "organ": "lung", "species": "human"}
    assert await b.slides.find({}) == []  # the local catalogue is untouched


async def test_search_includes_peer_records_only_when_asked(
    bus: InMemoryBus, a: Site, b: Site
) -> None:
    for env in pipeline("s1"):
        await a.catalogue.on_event(env)
    for env in pipeline("local-1"):  # B's own slide, in ds-1 at B (not readable by alice at B)
        env.dataset_id = "ds-b"
        await b.catalogue.on_event(env)
    await deliver(bus, b)

    plain = await b.catalogue.search(ALICE, SearchQuery(stain="HE"))
    assert [(d["_id"], d["site"]) for d in plain.slides] == [("local-1", "site-b")]

    both = await b.catalogue.search(ALICE, SearchQuery(stain="HE", include_federated=True))
    assert both.total_count == 2
    slides = [to_proto(d) for d in both.slides]
    assert [(s.slide_id, s.site) for s in slides] == [("local-1", "site-b"), ("s1", "site-a")]
    peer = slides[1]
    assert peer.status == common_pb2.SLIDE_STATUS_READY
    assert (peer.clinical.stain, peer.clinical.organ) == ("he", "lung")
    assert not peer.clinical.case_id
    assert peer.pyramid.level_count == 13 and not peer.pyramid.bucket
    assert peer.inference[0].tissue_fraction == pytest.approx(0.42)
    assert not peer.inference[0].mask_key

    # the same filters apply to the peers' records
    for q in (
        SearchQuery(stain="ihc", include_federated=True),
        SearchQuery(organ="liver", include_federated=True),
        SearchQuery(species="mouse", include_federated=True),
        SearchQuery(case_id="unit-cas-aaaa", include_federated=True),
        SearchQuery(status="REJECTED", include_federated=True),
    ):
        assert all(d.get("site") != "site-a" for d in (await b.catalogue.search(ALICE, q)).slides)
    by_dataset = await b.catalogue.search(
        ALICE, SearchQuery(dataset_id="ds-1", include_federated=True)
    )
    assert [d["_id"] for d in by_dataset.slides] == ["site-a/s1"]


async def test_peer_records_need_a_local_grant_or_admin(bus: InMemoryBus, a: Site, b: Site) -> None:
    for env in pipeline("s1"):
        await a.catalogue.on_event(env)
    await deliver(bus, b)
    nobody = await b.catalogue.search(BOB, SearchQuery(include_federated=True))
    assert (nobody.slides, nobody.total_count) == ([], 0)
    admin = await b.catalogue.search(ADMIN, SearchQuery(include_federated=True))
    assert [d["_id"] for d in admin.slides] == ["site-a/s1"]


async def test_pages_run_across_local_and_peer_records(bus: InMemoryBus, a: Site, b: Site) -> None:
    for i in range(3):
        for env in pipeline(f"p{i}", T0 + timedelta(hours=i)):
            await a.catalogue.on_event(env)
    for i in range(2):
        for env in pipeline(f"l{i}", T0 + timedelta(hours=i)):
            env.dataset_id = "ds-b"
            await b.catalogue.on_event(env)
    await deliver(bus, b)
    seen: list[str] = []
    token = ""
    while True:
        page = await b.catalogue.search(
            ALICE, SearchQuery(page_size=2, page_token=token, include_federated=True)
        )
        assert page.total_count == 5
        seen += [str(d.get("slide_id", d["_id"])) for d in page.slides]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["l0", "l1", "p0", "p1", "p2"]


# -- the peer consumer ---------------------------------------------------------------------


async def test_malformed_peer_events_are_dead_lettered(bus: InMemoryBus, a: Site, b: Site) -> None:
    for env in pipeline("s1"):
        await a.catalogue.on_event(env)
    pub = bus.publisher()
    await pub.start()
    await pub.publish(TOPIC_A, b"\xff not an envelope", key=b"x")
    spoofed = new_envelope(
        payload_field="federated_slide",
        payload=events_pb2.FederatedSlide(
            site="site-c", slide_id="s9", dataset_id="ds-9", status=common_pb2.SLIDE_STATUS_READY
        ),
        slide_id="s9",
        dataset_id="ds-9",
    )
    await pub.publish(TOPIC_A, spoofed.SerializeToString(), key=b"s9")
    runner = EventRunner(
        service="metadata",
        bus=bus,
        group="tessera-metadata-federation",
        handlers=b.federation.handlers(),
        publisher=pub,
        retry=RetryPolicy(max_attempts=2, base_delay_s=0.001),
    )
    task = asyncio.create_task(runner.run())
    try:

        async def settled() -> None:
            while len(bus.messages(DLQ)) < 2 or not await b.records.find({}):
                await asyncio.sleep(0.005)

        await asyncio.wait_for(settled(), 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    reasons = sorted(dict(m.headers)["dlq-reason"].decode() for m in bus.messages(DLQ))
    assert reasons == ["MALFORMED_EVENT", "SITE_MISMATCH"]
    assert [d["_id"] for d in await b.records.find({})] == ["site-a/s1"]


async def test_a_node_does_not_consume_its_own_topic(b: Site) -> None:
    site = await make_site(InMemoryBus(), "site-b", TOPIC_B, (TOPIC_A, TOPIC_B))
    assert list(site.federation.handlers()) == [TOPIC_A]
    assert list(b.federation.handlers()) == [TOPIC_A]


# -- settings ------------------------------------------------------------------------------


def _settings_env(tmp_path: Path) -> dict[str, str]:
    key = tmp_path / "pub.pem"
    key.write_bytes(generate_keypair()[1])
    return {
        "TESSERA_GRPC__PORT": "1",
        "TESSERA_METRICS__PORT": "0",
        "TESSERA_AUTH__PUBLIC_KEY_FILE": str(key),
        "TESSERA_KAFKA__BOOTSTRAP_SERVERS": "unused:9",
        "TESSERA_MONGO__URI": "mongodb://unused",
    }


def test_settings_read_the_operators_federation_configmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = node_spec(federation={"peers": [{"name": "beta", "namespace": "site-b"}]})
    entries = builders.federation_entries(spec, [PeerInfo("beta", "site-b", "site-b", "p.", True)])
    site = builders.service_config(
        builders.Owner("TesseraNode", "alpha", "site-a", "uid"), spec, "metadata"
    )["TESSERA_SITE"]
    for k, v in {**_settings_env(tmp_path), **entries, "TESSERA_SITE": site}.items():
        monkeypatch.setenv(k, v)
    s = MetadataSettings()  # type: ignore[call-arg]
    assert s.site == "site-a"
    assert s.federation.enabled
    assert s.federation.publish_topic == "tessera.federation.catalogue.site-a.v1"
    assert s.federation.topics() == ["p.tessera.federation.catalogue.site-b.v1"]


def test_federation_is_off_when_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in _settings_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    s = MetadataSettings()  # type: ignore[call-arg]
    assert not s.federation.enabled
    assert s.federation.topics() == []


def test_bootstrap_wires_the_peer_consumer_and_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.metadata.bootstrap import bootstrap

    env = {
        **_settings_env(tmp_path),
        "TESSERA_SITE": "site-a",
        "TESSERA_FEDERATION__ENABLED": "true",
        "TESSERA_FEDERATION__PUBLISH_TOPIC": TOPIC_A,
        "TESSERA_FEDERATION__SUBSCRIBE_TOPICS": f" {TOPIC_B} ,",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    docs, bus, access = InMemoryDocumentStore(), InMemoryBus(), StaticAccessChecker({}, set())
    host = bootstrap(MetadataSettings(), docs=docs, bus=bus, access=access)  # type: ignore[call-arg]
    names = [b.name for b in host._background]
    assert names.count("consumer") == 1
    assert "outbox" in names and "federation-consumer" in names
    monkeypatch.setenv("TESSERA_FEDERATION__ENABLED", "false")
    off = bootstrap(MetadataSettings(), docs=docs, bus=bus, access=access)  # type: ignore[call-arg]
    assert [b.name for b in off._background] == ["consumer"]
