"""The catalogue: an idempotent, order-independent projection of slide events, and search
with permission filtering and pagination."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.metadata.core import Catalogue, SearchQuery
from services.metadata.mapping import slide_to_proto
from services.shared.access import Action, StaticAccessChecker
from services.shared.adapters.memory import InMemoryDocumentStore
from services.shared.auth import Principal
from services.shared.errors import InvalidArgument, NotFound, PermissionDenied
from services.shared.events import event_id_for, new_envelope
from services.shared.ports.documents import Collection, Document, Filter
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2

T0 = datetime(2030, 5, 1, 8, 0, tzinfo=UTC)
ALICE = Principal("alice")  # reads ds-1 and ds-3
BOB = Principal("bob")  # reads nothing


def ts(at: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


def envelope(
    field: str, payload: Any, slide_id: str, at: datetime, dataset_id: str = "ds-1"
) -> events_pb2.EventEnvelope:
    env = new_envelope(
        payload_field=field,
        payload=payload,
        slide_id=slide_id,
        dataset_id=dataset_id,
        event_id=event_id_for(slide_id, field),
    )
    env.occurred_at.CopyFrom(ts(at))
    return env


def received(
    slide_id: str,
    at: datetime = T0,
    dataset_id: str = "ds-1",
    stain: str = "he",
    case_id: str = "unit-cas-aaaa",
) -> events_pb2.EventEnvelope:
    return envelope(
        "slide_received",
        events_pb2.SlideReceived(
            format=common_pb2.SLIDE_FORMAT_APERIO_SVS,
            quarantine_bucket="q",
            quarantine_key=f"slides/{slide_id}",
            size_bytes=2651,
            metadata=common_pb2.ClinicalMetadata(
                stain=stain, organ="lung", species="human", case_id=case_id
            ),
            extension="svs",
        ),
        slide_id,
        at,
        dataset_id,
    )


def deidentified(slide_id: str, at: datetime, dataset_id: str = "ds-1") -> events_pb2.EventEnvelope:
    return envelope(
        "slide_deidentified",
        events_pb2.SlideDeidentified(
            format=common_pb2.SLIDE_FORMAT_APERIO_SVS,
            bucket="deid",
            key=f"slides/{slide_id}/slide.svs",
            size_bytes=2000,
            sha256="b" * 64,
            geometry=common_pb2.SlideGeometry(
                width=4000,
                height=3000,
                levels=[
                    common_pb2.LevelDimensions(width=4000, height=3000, downsample=1.0),
                    common_pb2.LevelDimensions(width=1000, height=750, downsample=4.0),
                ],
                mpp_x=0.25,
                mpp_y=0.25,
                objective_power=40.0,
            ),
            summary=common_pb2.DeidSummary(
                removed={"label_image": 1, "svs_property": 6},
                pseudonymized={"case_id": 1},
                levels_kept=2,
                verified=True,
            ),
        ),
        slide_id,
        at,
        dataset_id,
    )


def tiled(slide_id: str, at: datetime, dataset_id: str = "ds-1") -> events_pb2.EventEnvelope:
    return envelope(
        "slide_tiled",
        events_pb2.SlideTiled(
            pyramid=common_pb2.Pyramid(
                bucket="tiles",
                descriptor_key=f"slides/{slide_id}.dzi",
                tile_size=254,
                overlap=1,
                tile_format="jpeg",
                level_count=13,
                thumbnail_key=f"slides/{slide_id}/thumb.jpg",
                tile_count=321,
            )
        ),
        slide_id,
        at,
        dataset_id,
    )


def inferred(slide_id: str, at: datetime, dataset_id: str = "ds-1") -> events_pb2.EventEnvelope:
    return envelope(
        "inference_completed",
        events_pb2.InferenceCompleted(
            result=common_pb2.InferenceResult(
                model_name="tissue",
                model_version="3",
                tissue_fraction=0.42,
                mask_bucket="results",
                mask_key=f"masks/{slide_id}.png",
                completed_at=ts(at),
            )
        ),
        slide_id,
        at,
        dataset_id,
    )


def rejected(slide_id: str, at: datetime, dataset_id: str = "ds-1") -> events_pb2.EventEnvelope:
    return envelope(
        "slide_rejected",
        events_pb2.SlideRejected(
            stage="deidentification", reason="UNKNOWN_METADATA", detail="tag 65449"
        ),
        slide_id,
        at,
        dataset_id,
    )


def pipeline(slide_id: str, start: datetime = T0) -> list[events_pb2.EventEnvelope]:
    m = timedelta(minutes=1)
    return [
        received(slide_id, start),
        deidentified(slide_id, start + m),
        tiled(slide_id, start + 2 * m),
        inferred(slide_id, start + 3 * m),
    ]


def new_catalogue(
    checker: StaticAccessChecker | None = None, slides: Collection | None = None
) -> tuple[Catalogue, Collection]:
    docs = InMemoryDocumentStore()
    col = slides or docs.collection("slides")
    checker = checker or StaticAccessChecker(
        {("alice", "ds-1"): {Action.ACTION_READ_RECORD}, ("alice", "ds-3"): {1}},
        {"ds-1", "ds-2", "ds-3"},
    )
    return Catalogue(slides=col, datasets=docs.collection("datasets"), access=checker), col


def comparable(doc: Document) -> Document:
    """The projected document with its order-of-arrival artefacts normalised."""
    out = dict(doc)
    out["applied"] = sorted(out["applied"])
    out["timeline"] = sorted(out["timeline"], key=lambda e: (e["at"], e["status"]))
    return out


# -- projection ---------------------------------------------------------------------------


async def test_events_in_order_build_the_slide() -> None:
    cat, col = new_catalogue()
    for env in pipeline("s1"):
        await cat.on_event(env)
    doc = await col.get("s1")
    assert doc is not None
    assert doc["status"] == "READY"
    assert doc["dataset_id"] == "ds-1"
    assert [e["status"] for e in doc["timeline"]] == ["RECEIVED", "DEIDENTIFIED", "TILED", "READY"]
    assert [e["stage"] for e in doc["timeline"]] == [
        "ingestion",
        "deidentification",
        "tiling",
        "serving",
    ]
    assert doc["clinical"]["stain"] == "he" and doc["clinical"]["case_id"] == "unit-cas-aaaa"
    assert doc["size_bytes"] == 2651
    assert doc["geometry"]["width"] == 4000 and doc["geometry"]["mpp_x"] == 0.25
    assert doc["deid"]["verified"] is True
    assert doc["pyramid"]["tile_size"] == 254
    assert [r["model_name"] for r in doc["inference"]] == ["tissue"]
    assert doc["created_at"] == T0
    assert doc["updated_at"] == T0 + timedelta(minutes=3)


@pytest.mark.parametrize("seed", range(8))
async def test_scrambled_and_redelivered_events_give_the_same_slide(seed: int) -> None:
    events = pipeline("s1")
    reference, ref_col = new_catalogue()
    for env in events:
        await reference.on_event(env)
    expected = comparable(await ref_col.get("s1") or {})

    cat, col = new_catalogue()
    shuffled = events * 2
    random.Random(seed).shuffle(shuffled)
    for env in shuffled:
        await cat.on_event(env)
    doc = await col.get("s1")
    assert doc is not None
    assert doc["status"] == "READY"
    assert len(doc["timeline"]) == 4  # one entry per event, redeliveries ignored
    assert len(doc["inference"]) == 1
    assert comparable(doc) == expected


async def test_ready_waits_for_the_pyramid_when_the_result_comes_first() -> None:
    """Serving may announce its result before the catalogue has consumed the tiled event (two
    topics, no order between them): READY is shown only with the pyramid in place."""
    received_, deidentified_, tiled_, inferred_ = pipeline("s1")
    cat, col = new_catalogue()
    for env in (received_, deidentified_, inferred_):
        await cat.on_event(env)
    doc = await col.get("s1")
    assert doc is not None and doc["status"] == "DEIDENTIFIED"
    await cat.on_event(tiled_)
    doc = await col.get("s1")
    assert doc is not None and doc["status"] == "READY"
    assert int(doc["pyramid"]["tile_count"]) == 321 and len(doc["inference"]) == 1
    assert sorted(e["status"] for e in doc["timeline"]) == sorted(
        ["RECEIVED", "DEIDENTIFIED", "TILED", "READY"]
    )


async def test_nothing_is_shown_ready_before_the_received_event_is_applied() -> None:
    received_, deidentified_, tiled_, inferred_ = pipeline("s1")
    cat, col = new_catalogue()
    for env in (inferred_, tiled_, deidentified_):
        await cat.on_event(env)
    doc = await col.get("s1")
    assert doc is not None and doc["status"] not in ("READY", "TILED", "DEIDENTIFIED")
    await cat.on_event(received_)
    doc = await col.get("s1")
    assert doc is not None and doc["status"] == "READY"


@pytest.mark.parametrize("seed", range(6))
async def test_rejection_wins_whatever_the_order(seed: int) -> None:
    m = timedelta(minutes=1)
    events = [received("s1", T0), rejected("s1", T0 + m), deidentified("s1", T0 + 2 * m)]
    events = events * 2
    random.Random(seed).shuffle(events)
    cat, col = new_catalogue()
    for env in events:
        await cat.on_event(env)
    doc = await col.get("s1")
    assert doc is not None
    assert doc["status"] == "REJECTED"
    assert doc["rejection_reason"] == "UNKNOWN_METADATA"
    assert doc["rejection_detail"] == "tag 65449"
    assert sorted(e["status"] for e in doc["timeline"]) == [
        "DEIDENTIFIED",
        "RECEIVED",
        "REJECTED",
    ]
    [rej] = [e for e in doc["timeline"] if e["status"] == "REJECTED"]
    assert (rej["stage"], rej["reason"]) == ("deidentification", "UNKNOWN_METADATA")
    assert doc["created_at"] == T0


class CrashingCollection(Collection):
    """Delegates to an in-memory collection; `crash` decides which update raises."""

    def __init__(self, inner: Collection) -> None:
        self.inner = inner
        self.name = inner.name
        self.crash: Callable[[Filter, Mapping[str, Any] | None], bool] = lambda f, s: False

    async def insert(self, doc: Document) -> None:
        await self.inner.insert(doc)

    async def get(self, doc_id: str) -> Document | None:
        return await self.inner.get(doc_id)

    async def find_one(self, flt: Filter) -> Document | None:
        return await self.inner.find_one(flt)

    async def find(
        self,
        flt: Filter,
        *,
        sort: Sequence[tuple[str, int]] = (),
        skip: int = 0,
        limit: int = 0,
    ) -> list[Document]:
        return await self.inner.find(flt, sort=sort, skip=skip, limit=limit)

    async def count(self, flt: Filter) -> int:
        return await self.inner.count(flt)

    async def update(self, flt: Filter, **kwargs: Any) -> bool:
        if self.crash(flt, kwargs.get("set_fields")):
            raise ConnectionError("store went away")
        return await self.inner.update(flt, **kwargs)

    async def delete(self, flt: Filter) -> int:
        return await self.inner.delete(flt)

    async def ensure_index(
        self, fields: Sequence[tuple[str, int]], *, unique: bool = False
    ) -> None:
        await self.inner.ensure_index(fields, unique=unique)


async def test_crash_after_applying_before_status_is_repaired_by_redelivery() -> None:
    col = CrashingCollection(InMemoryDocumentStore().collection("slides"))
    cat, _ = new_catalogue(slides=col)
    events = pipeline("s1")
    for env in events[:2]:
        await cat.on_event(env)

    # the process dies between recording the tiled event and moving the status forward
    col.crash = lambda flt, set_fields: bool(set_fields and set_fields.get("status") == "TILED")
    with pytest.raises(ConnectionError):
        await cat.on_event(events[2])
    col.crash = lambda flt, set_fields: False
    await cat.on_event(events[2])  # uncommitted, so redelivered

    doc = await col.get("s1")
    assert doc is not None
    assert doc["status"] == "TILED"
    assert [e["status"] for e in doc["timeline"]].count("TILED") == 1


async def test_dataset_created_is_recorded_once() -> None:
    docs = InMemoryDocumentStore()
    cat = Catalogue(
        slides=docs.collection("slides"),
        datasets=docs.collection("datasets"),
        access=StaticAccessChecker({}, set()),
    )
    env = new_envelope(
        payload_field="dataset_created",
        payload=events_pb2.DatasetCreated(name="Lung study", description="d"),
        dataset_id="ds-1",
        event_id=event_id_for("ds-1", "dataset-created"),
    )
    await cat.on_dataset(env)
    await cat.on_dataset(env)
    rows = await docs.collection("datasets").find({})
    assert [(r["_id"], r["name"], r["description"]) for r in rows] == [("ds-1", "Lung study", "d")]


# -- get ----------------------------------------------------------------------------------


async def test_get_needs_read_record() -> None:
    checker = StaticAccessChecker(
        {("alice", "ds-1"): {Action.ACTION_READ_RECORD}, ("carol", "ds-1"): {2}}, {"ds-1"}
    )
    cat, _ = new_catalogue(checker)
    await cat.on_event(received("s1"))

    assert (await cat.get(ALICE, "s1"))["_id"] == "s1"
    assert checker.calls[-1] == ("alice", Action.ACTION_READ_RECORD, "ds-1", "slide/s1")
    for caller in (BOB, Principal("carol")):  # no grant; a grant without READ_RECORD
        with pytest.raises(PermissionDenied):
            await cat.get(caller, "s1")
    with pytest.raises(NotFound):
        await cat.get(ALICE, "s-unknown")
    for bad in ("", "x" * 129):
        with pytest.raises(InvalidArgument):
            await cat.get(ALICE, bad)


# -- search -------------------------------------------------------------------------------


async def seeded() -> Catalogue:
    """Five slides in ds-1 (alice), two in ds-2 (nobody), one in ds-3 (alice)."""
    cat, _ = new_catalogue()
    m = timedelta(minutes=1)
    for i in range(5):
        sid = f"a{i}"
        await cat.on_event(received(sid, T0 + i * m, stain="he" if i % 2 == 0 else "ihc"))
        if i < 3:
            for env in pipeline(sid, T0 + i * m)[1:]:
                await cat.on_event(env)
    for i in range(2):
        await cat.on_event(received(f"b{i}", T0 + i * m, dataset_id="ds-2"))
    await cat.on_event(
        received("c0", T0 + 10 * m, dataset_id="ds-3", stain="pas", case_id="unit-cas-zzzz")
    )
    return cat


def ids(result: Any) -> list[str]:
    return [d["_id"] for d in result.slides]


async def test_search_only_shows_readable_datasets() -> None:
    cat = await seeded()
    r = await cat.search(ALICE, SearchQuery())
    assert ids(r) == ["a0", "a1", "a2", "a3", "a4", "c0"]
    assert r.total_count == 6
    assert r.next_page_token == ""
    r = await cat.search(BOB, SearchQuery())
    assert (ids(r), r.total_count) == ([], 0)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (SearchQuery(stain="HE"), ["a0", "a2", "a4"]),
        (SearchQuery(stain=" ihc "), ["a1", "a3"]),
        (SearchQuery(status="READY"), ["a0", "a1", "a2"]),
        (SearchQuery(status="RECEIVED"), ["a3", "a4", "c0"]),
        (SearchQuery(dataset_id="ds-3"), ["c0"]),
        (SearchQuery(dataset_id="ds-1", stain="he", status="RECEIVED"), ["a4"]),
        (SearchQuery(case_id="unit-cas-zzzz"), ["c0"]),
        (SearchQuery(organ="Lung", species="human", dataset_id="ds-3"), ["c0"]),
        (SearchQuery(format=common_pb2.SLIDE_FORMAT_DICOM_WSI), []),
    ],
)
async def test_search_filters(query: SearchQuery, expected: list[str]) -> None:
    cat = await seeded()
    r = await cat.search(ALICE, query)
    assert ids(r) == expected
    assert r.total_count == len(expected)


async def test_search_pagination() -> None:
    cat = await seeded()
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        r = await cat.search(ALICE, SearchQuery(dataset_id="ds-1", page_size=2, page_token=token))
        assert r.total_count == 5
        assert len(r.slides) <= 2
        seen += ids(r)
        pages += 1
        token = r.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == ["a0", "a1", "a2", "a3", "a4"]


@pytest.mark.parametrize(
    "token",
    [
        "not base64!!",
        base64.urlsafe_b64encode(b"o:-1").decode(),
        base64.urlsafe_b64encode(b"o:abc").decode(),
        base64.urlsafe_b64encode(b"x:5").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
async def test_malformed_page_token_is_invalid_argument(token: str) -> None:
    cat = await seeded()
    with pytest.raises(InvalidArgument) as err:
        await cat.search(ALICE, SearchQuery(page_token=token))
    assert err.value.reason == "BAD_PAGE_TOKEN"


@pytest.mark.parametrize("size", [201, -1])
async def test_bad_page_size_is_invalid_argument(size: int) -> None:
    cat = await seeded()
    with pytest.raises(InvalidArgument) as err:
        await cat.search(ALICE, SearchQuery(page_size=size))
    assert err.value.reason == "BAD_PAGE_SIZE"


async def test_search_of_a_dataset_without_grant_is_denied() -> None:
    cat = await seeded()
    with pytest.raises(PermissionDenied) as err:
        await cat.search(ALICE, SearchQuery(dataset_id="ds-2"))
    assert err.value.reason == "NO_GRANT"
    with pytest.raises(PermissionDenied):
        await cat.search(BOB, SearchQuery(dataset_id="ds-1", stain="he"))


# -- mapping ------------------------------------------------------------------------------


async def test_slide_to_proto_round_trips_the_projected_doc() -> None:
    cat, _ = new_catalogue()
    for env in reversed(pipeline("s1")):
        await cat.on_event(env)
    s = slide_to_proto(await cat.get(ALICE, "s1"))

    assert (s.slide_id, s.dataset_id) == ("s1", "ds-1")
    assert s.format == common_pb2.SLIDE_FORMAT_APERIO_SVS
    assert s.status == common_pb2.SLIDE_STATUS_READY
    assert s.size_bytes == 2651
    assert s.clinical == common_pb2.ClinicalMetadata(
        stain="he", organ="lung", species="human", case_id="unit-cas-aaaa"
    )
    assert s.geometry == deidentified("s1", T0).slide_deidentified.geometry
    assert s.deid == deidentified("s1", T0).slide_deidentified.summary
    assert s.pyramid == tiled("s1", T0).slide_tiled.pyramid
    assert list(s.inference) == [
        inferred("s1", T0 + timedelta(minutes=3)).inference_completed.result
    ]
    assert [c.status for c in s.timeline] == [
        common_pb2.SLIDE_STATUS_RECEIVED,
        common_pb2.SLIDE_STATUS_DEIDENTIFIED,
        common_pb2.SLIDE_STATUS_TILED,
        common_pb2.SLIDE_STATUS_READY,
    ]
    assert [c.at.ToDatetime(tzinfo=UTC) for c in s.timeline] == [
        T0 + timedelta(minutes=i) for i in range(4)
    ]
    assert s.created_at.ToDatetime(tzinfo=UTC) == T0
    assert s.updated_at.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=3)
    assert s.rejection_reason == ""


async def test_slide_to_proto_of_a_rejected_slide() -> None:
    cat, _ = new_catalogue()
    await cat.on_event(rejected("s1", T0 + timedelta(minutes=1)))
    await cat.on_event(received("s1", T0))
    s = slide_to_proto(await cat.get(ALICE, "s1"))
    assert s.status == common_pb2.SLIDE_STATUS_REJECTED
    assert (s.rejection_reason, s.rejection_detail) == ("UNKNOWN_METADATA", "tag 65449")
    assert s.timeline[-1].stage == "deidentification"
    assert s.timeline[-1].reason == "UNKNOWN_METADATA"
