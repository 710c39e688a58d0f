"""Slides held for review, a data steward's decisions, per-dataset policies and the erasure of
the identified original: `DeidStage` over in-memory fakes (documents, objects, bus, access)
with the real engine on generated slides (tests/fixtures/wsigen.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest

from services.deid.core import DeidStage
from services.deid.engine import (
    DeidNeedsReview,
    DeidPolicy,
    DeidRejected,
    deidentify,
    deidentify_and_verify,
    ventana,
)
from services.deid.engine.model import Tally
from services.metadata.core import Catalogue
from services.metadata.mapping import slide_to_proto
from services.shared.access import StaticAccessChecker
from services.shared.adapters.memory import InMemoryBus, InMemoryDocumentStore, InMemoryObjectStore
from services.shared.auth import Principal
from services.shared.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.shared.events import (
    TOPIC_QUARANTINE_ERASED,
    TOPIC_SLIDE_DEIDENTIFIED,
    TOPIC_SLIDE_HELD,
    TOPIC_SLIDE_REJECTED,
    TOPIC_SLIDE_REVIEWED,
    EventEmitter,
    new_envelope,
)
from services.shared.outbox import Outbox
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import tiff
from services.shared.wsi.safexml import parse_xml
from services.shared.wsi.sniff import SlideFormat
from services.shared.wsi.tiff import OutTag
from tessera.access.v1.access_pb2 import Action
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2
from tests.fixtures import wsigen
from tests.unit.test_deid_engine import SLIDES, rewrite

T0 = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)
DS = "ds-review"
QUARANTINE = "quarantine"
STEWARD = Principal("stella")
READER = Principal("rita")
# an unknown field as a scanner might write it; its value is the vendor's, not a person's
UNKNOWN_FIELD = ("Scanner Mode", "HighRes-7Q4Z")
P = Pseudonymizer(b"k" * 32, "site-test")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    stage: DeidStage
    docs: InMemoryDocumentStore
    objects: InMemoryObjectStore
    bus: InMemoryBus
    access: StaticAccessChecker
    clock: Clock
    tmp: Path
    n: int = 0

    def events(self, topic: str, slide_id: str = "") -> list[events_pb2.EventEnvelope]:
        out = [events_pb2.EventEnvelope.FromString(m.value) for m in self.bus.messages(topic)]
        return [e for e in out if not slide_id or e.slide_id == slide_id]

    async def job(self, slide_id: str) -> dict[str, Any]:
        doc = await self.docs.collection("deid_jobs").get(slide_id)
        assert doc is not None
        return doc

    async def raw_exists(self, slide_id: str) -> bool:
        return await self.objects.stat(QUARANTINE, f"raw/{slide_id}") is not None

    async def output(self, slide_id: str) -> Path:
        job = await self.job(slide_id)
        path = self.tmp / f"out-{slide_id}.{job['key'].rsplit('.', 1)[-1]}"
        await self.objects.download_file(job["bucket"], job["key"], path)
        return path

    async def receive(self, path: Path, fmt: int = common_pb2.SLIDE_FORMAT_APERIO_SVS) -> str:
        """Put a raw upload in quarantine and hand de-identification its "received" event."""
        self.n += 1
        slide_id = f"slide-{self.n:03d}"
        await self.objects.put_file(QUARANTINE, f"raw/{slide_id}", path)
        env = events_pb2.EventEnvelope(event_id=f"ev-{slide_id}", slide_id=slide_id, dataset_id=DS)
        env.slide_received.CopyFrom(
            events_pb2.SlideReceived(
                format=fmt,  # type: ignore[arg-type]
                quarantine_bucket=QUARANTINE,
                quarantine_key=f"raw/{slide_id}",
                size_bytes=path.stat().st_size,
            )
        )
        await self.stage.handle_received(env)
        return slide_id


@pytest.fixture
async def w(tmp_path: Path) -> World:
    docs = InMemoryDocumentStore()
    objects = InMemoryObjectStore()
    await objects.ensure_bucket(QUARANTINE)
    bus = InMemoryBus(auto_create_topics=True)
    access = StaticAccessChecker(
        {
            (STEWARD.subject, DS): {
                Action.ACTION_READ_RECORD,
                Action.ACTION_REVIEW,
                Action.ACTION_MANAGE,
            },
            (READER.subject, DS): {Action.ACTION_READ_RECORD, Action.ACTION_READ_PIXELS},
        },
        {DS},
    )
    clock = Clock()
    publisher = bus.publisher()
    await publisher.start()
    stage = DeidStage(
        objects=objects,
        jobs=docs.collection("deid_jobs"),
        outbox=Outbox(docs.collection("deid_outbox"), EventEmitter("deid", publisher)),
        pseudonymizer=P,
        policy=DeidPolicy(),
        work_dir=tmp_path / "work",
        output_bucket="deidentified",
        access=access,
        datasets=docs.collection("deid_datasets"),
        rules=docs.collection("deid_rules"),
        clock=clock,
    )
    (tmp_path / "work").mkdir()
    await stage.ensure_ready()
    return World(stage, docs, objects, bus, access, clock, tmp_path)


def svs(tmp: Path, name: str, extra: tuple[tuple[str, str], ...] = (UNKNOWN_FIELD,)) -> Path:
    fx = wsigen.aperio_svs(
        tmp, np.random.default_rng(len(name)), name=name, extra_fields=list(extra)
    )
    return fx.path


# --- the engine ------------------------------------------------------------------------------


def test_engine_lists_every_unknown_item_once_and_writes_nothing(tmp_path: Path) -> None:
    src = svs(tmp_path, "two", (UNKNOWN_FIELD, ("Stage Insert", "12")))
    dst = tmp_path / "o.svs"
    with pytest.raises(DeidNeedsReview) as e:
        deidentify(src, dst, SlideFormat.APERIO_SVS, P)
    assert [i.key for i in e.value.items] == ["svs:Scanner Mode", "svs:Stage Insert"]
    assert all(i.reason == "UNKNOWN_SVS_FIELD" for i in e.value.items)
    assert UNKNOWN_FIELD[1] not in str(e.value) and "12" not in e.value.detail.split("keys")[1]
    assert not dst.exists()


def test_hostile_unknown_name_is_rejected_not_held(tmp_path: Path) -> None:
    """A field name that is no vendor identifier (control characters) is hostile input."""
    src = svs(tmp_path, "hostile", (("Bad\x07Key", "x"),))
    with pytest.raises(Exception) as e:
        deidentify(src, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    assert type(e.value).__name__ == "DeidRejected"
    assert e.value.reason == "UNKNOWN_SVS_FIELD"  # type: ignore[attr-defined]


def test_engine_applies_keep_and_remove_rules(tmp_path: Path) -> None:
    src = svs(tmp_path, "rules", (UNKNOWN_FIELD, ("Stage Insert", "12")))
    keep = DeidPolicy(approved_rules=(("svs:Scanner Mode", "keep"), ("svs:Stage Insert", "remove")))
    dst = tmp_path / "o.svs"
    report = deidentify(src, dst, SlideFormat.APERIO_SVS, P, keep)
    from services.deid.engine import verify

    verify(dst, SlideFormat.APERIO_SVS, report.identifying_values, keep)
    desc = tiff.read_tiff(dst).ifds[0].description or ""
    assert "Scanner Mode = HighRes-7Q4Z" in desc and "Stage Insert" not in desc
    assert report.removed["svs_field.Stage Insert"] >= 1
    # without the keep rule the verifier refuses the kept field
    with pytest.raises(Exception, match="VERIFICATION_FAILED"):
        verify(dst, SlideFormat.APERIO_SVS, [], DeidPolicy())


def test_unknown_tiff_tag_rule(tmp_path: Path) -> None:
    _fx, pages = wsigen.generic_tiff(tmp_path, np.random.default_rng(3), name="gt")
    pages[0].tags.append(wsigen.t_ints(40001, tiff.SHORT, 7))
    src = tmp_path / "unk.tiff"
    src.write_bytes(wsigen.build_tiff(pages).data)
    with pytest.raises(DeidNeedsReview) as e:
        deidentify(src, tmp_path / "o.tiff", SlideFormat.GENERIC_TIFF, P)
    assert [i.key for i in e.value.items] == ["tiff:40001"]
    policy = DeidPolicy(approved_rules=(("tiff:40001", "keep"),))
    deidentify_and_verify(src, tmp_path / "o.tiff", SlideFormat.GENERIC_TIFF, P, policy)
    assert 40001 in tiff.read_tiff(tmp_path / "o.tiff").ifds[0].tags


def test_unknown_ndpi_property_is_held_then_kept_by_rule(tmp_path: Path) -> None:
    src = SLIDES / "hamamatsu" / "test3-DAPI-2-(387).ndpi"
    if not src.is_file():
        pytest.fail(f"sample slide missing: {src}")
    crafted = tmp_path / "prop.ndpi"
    props = tiff.read_tiff(src).ifds[0].tags[65449].text()

    def edit(_i: int, tags: dict[int, OutTag]) -> None:
        tags[65449] = OutTag.ascii(65449, "scanner.mode=fast\r\n" + props)

    rewrite(src, crafted, edit)
    with pytest.raises(DeidNeedsReview) as e:
        deidentify(crafted, tmp_path / "o.ndpi", SlideFormat.HAMAMATSU_NDPI, P)
    assert [i.key for i in e.value.items] == ["ndpi:scanner.mode"]
    assert e.value.reason == "UNKNOWN_NDPI_PROPERTY" and "fast" not in str(e.value)
    dst = tmp_path / "o.ndpi"
    keep = DeidPolicy(approved_rules=(("ndpi:scanner.mode", "keep"),))
    deidentify_and_verify(crafted, dst, SlideFormat.HAMAMATSU_NDPI, P, keep)
    assert "scanner.mode=fast" in tiff.read_tiff(dst).ifds[0].tags[65449].text()
    remove = DeidPolicy(approved_rules=(("ndpi:scanner.mode", "remove"),))
    deidentify_and_verify(crafted, dst, SlideFormat.HAMAMATSU_NDPI, P, remove)
    assert "scanner.mode" not in tiff.read_tiff(dst).ifds[0].tags[65449].text()


def test_unknown_philips_attribute_is_held_then_ruled(tmp_path: Path) -> None:
    extra = wsigen._attr("PIM_DP_SCANNER_MODE", "FAST-7Q4Z")
    src = wsigen.make_philips(tmp_path / "p.tiff", extra_attr=extra)
    dst = tmp_path / "o.tiff"
    with pytest.raises(DeidNeedsReview) as e:
        deidentify(src, dst, SlideFormat.PHILIPS_TIFF, P)
    assert [i.key for i in e.value.items] == ["philips:PIM_DP_SCANNER_MODE"]
    assert "FAST-7Q4Z" not in str(e.value) and not dst.exists()
    keep = DeidPolicy(approved_rules=(("philips:PIM_DP_SCANNER_MODE", "keep"),))
    deidentify_and_verify(src, dst, SlideFormat.PHILIPS_TIFF, P, keep)
    assert b"FAST-7Q4Z" in dst.read_bytes()
    remove = DeidPolicy(approved_rules=(("philips:PIM_DP_SCANNER_MODE", "remove"),))
    report = deidentify_and_verify(src, dst, SlideFormat.PHILIPS_TIFF, P, remove)
    assert b"PIM_DP_SCANNER_MODE" not in dst.read_bytes()
    assert report.removed["philips.PIM_DP_SCANNER_MODE"] == 1
    # a nested unknown attribute may be removed, never kept
    nested = wsigen._attr("PIM_DP_VENDOR_BLOCK", "<Array></Array>")
    src2 = wsigen.make_philips(tmp_path / "p2.tiff", extra_attr=nested)
    with pytest.raises(DeidRejected, match="has structure"):
        deidentify(
            src2,
            dst,
            SlideFormat.PHILIPS_TIFF,
            P,
            DeidPolicy(approved_rules=(("philips:PIM_DP_VENDOR_BLOCK", "keep"),)),
        )


def test_unknown_bif_iscan_attribute_is_held_then_ruled(tmp_path: Path) -> None:
    src = wsigen.make_bif(tmp_path / "v.bif", iscan_extra='StageDrift="Q7-AUTO"')
    dst = tmp_path / "o.bif"
    with pytest.raises(DeidNeedsReview) as e:
        deidentify(src, dst, SlideFormat.VENTANA_BIF, P)
    assert [i.key for i in e.value.items] == ["bif:StageDrift"]
    assert "Q7-AUTO" not in str(e.value) and not dst.exists()
    keep = DeidPolicy(approved_rules=(("bif:StageDrift", "keep"),))
    deidentify_and_verify(src, dst, SlideFormat.VENTANA_BIF, P, keep)
    assert b'StageDrift="Q7-AUTO"' in dst.read_bytes()
    remove = DeidPolicy(approved_rules=(("bif:StageDrift", "remove"),))
    deidentify_and_verify(src, dst, SlideFormat.VENTANA_BIF, P, remove)
    assert b"StageDrift" not in dst.read_bytes()


def test_unknown_bif_xmp_element_is_held_then_removed_by_rule(tmp_path: Path) -> None:
    # an element inside iScan that no rule knows (ShowLabel closes the attribute list)
    src = wsigen.make_bif(
        tmp_path / "v.bif", iscan_extra='ShowLabel="1"><VendorNote Who="Dr Q. Plantperson"/'
    )
    dst = tmp_path / "o.bif"
    with pytest.raises(DeidNeedsReview) as e:
        deidentify(src, dst, SlideFormat.VENTANA_BIF, P)
    assert [i.key for i in e.value.items] == ["bif:iScan/VendorNote"]
    assert "Plantperson" not in str(e.value) and not dst.exists()
    remove = DeidPolicy(approved_rules=(("bif:iScan/VendorNote", "remove"),))
    report = deidentify_and_verify(src, dst, SlideFormat.VENTANA_BIF, P, remove)
    assert b"VendorNote" not in dst.read_bytes() and b"Plantperson" not in dst.read_bytes()
    assert report.removed["bif.unknown_element"] == 1
    keep = DeidPolicy(approved_rules=(("bif:iScan/VendorNote", "keep"),))
    with pytest.raises(DeidRejected, match="only remove"):
        deidentify(src, dst, SlideFormat.VENTANA_BIF, P, keep)
    # directly under Metadata, and a namespaced one (rejected: no key can name it)
    tally = Tally(4)
    root = parse_xml('<Metadata><ScanLog Note="operator Plantperson"/></Metadata>')
    assert ventana._clean_node(root, tally).children == []
    assert [i.key for i in tally.review_items] == ["bif:Metadata/ScanLog"]
    with pytest.raises(DeidRejected):
        ventana._clean_node(parse_xml('<Metadata><v:X xmlns:v="urn:v"/></Metadata>'), Tally(4))


# --- review -> approve / reject --------------------------------------------------------------


async def test_unknown_field_holds_slide_and_keeps_raw_copy(w: World) -> None:
    sid = await w.receive(svs(w.tmp, "held"))
    job = await w.job(sid)
    assert job["outcome"] == "NEEDS_REVIEW" and job["reason"] == "UNKNOWN_SVS_FIELD"
    assert "svs:Scanner Mode" in job["detail"] and UNKNOWN_FIELD[1] not in str(job)
    assert await w.raw_exists(sid)
    assert "erase_after" not in job and "quarantine_erased_at" not in job
    (held,) = w.events(TOPIC_SLIDE_HELD, sid)
    assert list(held.slide_held_for_review.keys) == ["svs:Scanner Mode"]
    assert held.slide_held_for_review.round == 1
    assert UNKNOWN_FIELD[1].encode() not in held.SerializeToString()
    assert not w.events(TOPIC_SLIDE_DEIDENTIFIED, sid) and not w.events(TOPIC_SLIDE_REJECTED, sid)
    # listed for the steward
    (r,) = await w.stage.list_reviews(STEWARD, DS)
    assert r.slide_id == sid and [i.key for i in r.items] == ["svs:Scanner Mode"]
    assert [x.slide_id for x in await w.stage.list_reviews(STEWARD)] == [sid]
    view = await w.stage.report(READER, sid)
    assert view.outcome == "NEEDS_REVIEW" and view.review_items[0].key == "svs:Scanner Mode"
    assert view.quarantine_erased_at is None and view.quarantine_erase_after is None
    # a redelivered "received" event does not redo the work (the hold is re-announced with
    # the same event id, which the outbox already delivered)
    w.clock.now = T0 + timedelta(minutes=5)
    env = events_pb2.EventEnvelope(event_id="again", slide_id=sid, dataset_id=DS)
    await w.stage.handle_received(env)
    assert (await w.job(sid))["held_at"] == T0
    assert [e.event_id for e in w.events(TOPIC_SLIDE_HELD, sid)] == [held.event_id]


async def test_approve_remove_deidentifies_erases_raw_and_stores_rule(w: World) -> None:
    sid = await w.receive(svs(w.tmp, "approve"))
    view = await w.stage.approve(STEWARD, sid, [("svs:Scanner Mode", "REMOVE")])
    assert view.outcome == "DEIDENTIFIED"
    job = await w.job(sid)
    assert job["outcome"] == "DEIDENTIFIED" and job["reason"] == ""
    assert not await w.raw_exists(sid)
    assert job["quarantine_erasure_reason"] == "VERIFIED_COPY_STORED"
    assert job["quarantine_erased_at"] == T0
    out = (await w.output(sid)).read_bytes()
    assert b"Scanner Mode" not in out and UNKNOWN_FIELD[1].encode() not in out
    (decision,) = job["decisions"]
    assert decision["decision"] == "APPROVED" and decision["by"] == STEWARD.subject
    assert decision["rules"] == [{"key": "svs:Scanner Mode", "action": "REMOVE"}]
    # audited by access control: who, what, which slide
    assert (STEWARD.subject, Action.ACTION_REVIEW, DS, f"slide/{sid}/deid-review/approve") in (
        w.access.calls
    )
    (rev,) = w.events(TOPIC_SLIDE_REVIEWED, sid)
    assert rev.slide_reviewed.decision == events_pb2.REVIEW_DECISION_APPROVED
    assert list(rev.slide_reviewed.removed_keys) == ["svs:Scanner Mode"]
    assert rev.slide_reviewed.reviewer == STEWARD.subject
    assert len(w.events(TOPIC_SLIDE_DEIDENTIFIED, sid)) == 1
    (erased,) = w.events(TOPIC_QUARANTINE_ERASED, sid)
    assert erased.quarantine_erased.reason == "VERIFIED_COPY_STORED"
    # the rule stays with the dataset: the next slide with the same field goes straight through
    policy = await w.stage.get_policy(READER, DS)
    assert [(r.key, r.action, r.slide_id) for r in policy.rules] == [
        ("svs:Scanner Mode", "REMOVE", sid)
    ]
    sid2 = await w.receive(svs(w.tmp, "later"))
    assert (await w.job(sid2))["outcome"] == "DEIDENTIFIED"
    assert not w.events(TOPIC_SLIDE_HELD, sid2)


async def test_approve_keep_keeps_the_field(w: World) -> None:
    sid = await w.receive(svs(w.tmp, "keep"))
    view = await w.stage.approve(STEWARD, sid, [("svs:Scanner Mode", "KEEP")])
    assert view.outcome == "DEIDENTIFIED"
    path = await w.output(sid)
    assert "Scanner Mode = HighRes-7Q4Z" in (tiff.read_tiff(path).ifds[0].description or "")
    assert (await w.job(sid))["applied_policy"]["rule_keys"] == ["svs:Scanner Mode"]


async def test_approval_must_cover_every_held_key(w: World) -> None:
    sid = await w.receive(svs(w.tmp, "two-keys", (UNKNOWN_FIELD, ("Stage Insert", "3"))))
    with pytest.raises(InvalidArgument) as e:
        await w.stage.approve(STEWARD, sid, [("svs:Scanner Mode", "REMOVE")])
    assert e.value.reason == "RULES_INCOMPLETE" and "svs:Stage Insert" in str(e.value)
    with pytest.raises(InvalidArgument):
        await w.stage.approve(STEWARD, sid, [("not a key", "REMOVE")])
    with pytest.raises(InvalidArgument):
        await w.stage.approve(
            STEWARD, sid, [("svs:Scanner Mode", "KEEP"), ("svs:Scanner Mode", "REMOVE")]
        )
    assert (await w.job(sid))["outcome"] == "NEEDS_REVIEW"  # nothing happened
    assert await w.raw_exists(sid)


async def test_review_reject_erases_raw_copy(w: World) -> None:
    sid = await w.receive(svs(w.tmp, "reject"))
    view = await w.stage.reject_review(STEWARD, sid)
    assert view.outcome == "REJECTED" and view.reason == "REVIEW_REJECTED"
    assert view.quarantine_erased_at == T0
    assert not await w.raw_exists(sid)
    job = await w.job(sid)
    assert job["quarantine_erasure_reason"] == "REVIEW_REJECTED"
    assert job["decisions"][0]["decision"] == "REJECTED"
    (rej,) = w.events(TOPIC_SLIDE_REJECTED, sid)
    assert rej.slide_rejected.reason == "REVIEW_REJECTED"
    (rev,) = w.events(TOPIC_SLIDE_REVIEWED, sid)
    assert rev.slide_reviewed.decision == events_pb2.REVIEW_DECISION_REJECTED
    (erased,) = w.events(TOPIC_QUARANTINE_ERASED, sid)
    assert erased.quarantine_erased.reason == "REVIEW_REJECTED"
    assert not await w.stage.list_reviews(STEWARD, DS)
    # decided: a second decision is refused
    with pytest.raises(FailedPrecondition):
        await w.stage.approve(STEWARD, sid, [("svs:Scanner Mode", "REMOVE")])


async def test_who_may_decide(w: World) -> None:
    sid = await w.receive(svs(w.tmp, "who"))
    with pytest.raises(PermissionDenied):
        await w.stage.approve(READER, sid, [("svs:Scanner Mode", "REMOVE")])
    with pytest.raises(PermissionDenied):
        await w.stage.reject_review(READER, sid)
    with pytest.raises(PermissionDenied):
        await w.stage.list_reviews(READER, DS)
    assert await w.stage.list_reviews(READER) == []  # no dataset they steward
    with pytest.raises(PermissionDenied):
        await w.stage.set_policy(READER, DS, retention_hours=5)
    with pytest.raises(NotFound):
        await w.stage.approve(STEWARD, "no-such-slide", [("svs:Scanner Mode", "REMOVE")])
    plain = await w.receive(svs(w.tmp, "plain", ()))
    assert (await w.job(plain))["outcome"] == "DEIDENTIFIED"
    with pytest.raises(FailedPrecondition) as e:
        await w.stage.approve(STEWARD, plain, [("svs:Scanner Mode", "REMOVE")])
    assert e.value.reason == "NOT_IN_REVIEW"
    with pytest.raises(FailedPrecondition):
        await w.stage.reject_review(STEWARD, plain)
    assert (await w.job(sid))["outcome"] == "NEEDS_REVIEW"


async def test_held_again_for_a_key_the_rules_do_not_cover(w: World) -> None:
    """Approval covers what the slide was held for; rules only the steward can add later
    (e.g. a rule removed meanwhile) can make a re-run hold the slide again, as round 2."""
    sid = await w.receive(svs(w.tmp, "again"))
    rules = w.docs.collection("deid_rules")
    real_update = rules.update

    async def forget(*args: object, **kwargs: object) -> bool:  # the rule store drops it
        return True

    rules.update = forget  # type: ignore[method-assign]
    view = await w.stage.approve(STEWARD, sid, [("svs:Scanner Mode", "REMOVE")])
    rules.update = real_update  # type: ignore[method-assign]
    assert view.outcome == "NEEDS_REVIEW" and view.review_items[0].key == "svs:Scanner Mode"
    assert [e.slide_held_for_review.round for e in w.events(TOPIC_SLIDE_HELD, sid)] == [1, 2]
    assert await w.raw_exists(sid)
    assert (await w.stage.approve(STEWARD, sid, [("svs:Scanner Mode", "REMOVE")])).outcome == (
        "DEIDENTIFIED"
    )


async def test_sweep_resumes_an_approval_whose_rerun_died(w: World) -> None:
    sid = await w.receive(svs(w.tmp, "resume"))
    real = w.objects.download_file

    async def down(*args: object, **kwargs: object) -> object:
        raise ConnectionError("object store down")

    w.objects.download_file = down  # type: ignore[method-assign, assignment]
    with pytest.raises(ConnectionError):
        await w.stage.approve(STEWARD, sid, [("svs:Scanner Mode", "REMOVE")])
    w.objects.download_file = real  # type: ignore[method-assign]
    job = await w.job(sid)
    assert job["outcome"] == "PENDING" and job["decisions"][0]["decision"] == "APPROVED"
    assert await w.stage.sweep() == 0 and (await w.job(sid))["outcome"] == "PENDING"
    w.clock.now = T0 + timedelta(minutes=16)  # the re-run's lease has run out
    await w.stage.sweep()
    assert (await w.job(sid))["outcome"] == "DEIDENTIFIED" and not await w.raw_exists(sid)


# --- retention -------------------------------------------------------------------------------


async def test_retention_keeps_raw_copy_until_the_sweep(w: World) -> None:
    await w.stage.set_policy(STEWARD, DS, retention_hours=2)
    sid = await w.receive(svs(w.tmp, "kept", ()))
    job = await w.job(sid)
    assert job["outcome"] == "DEIDENTIFIED" and await w.raw_exists(sid)
    assert job["erase_after"] == T0 + timedelta(hours=2)
    assert (await w.stage.report(READER, sid)).quarantine_erase_after == T0 + timedelta(hours=2)
    assert await w.stage.sweep() == 0
    w.clock.now = T0 + timedelta(hours=1, minutes=59)
    assert await w.stage.sweep() == 0 and await w.raw_exists(sid)
    w.clock.now = T0 + timedelta(hours=2)
    assert await w.stage.sweep() == 1
    assert not await w.raw_exists(sid)
    job = await w.job(sid)
    assert job["quarantine_erasure_reason"] == "RETENTION_EXPIRED"
    assert job["quarantine_erased_at"] == T0 + timedelta(hours=2)
    (erased,) = w.events(TOPIC_QUARANTINE_ERASED, sid)
    assert erased.quarantine_erased.reason == "RETENTION_EXPIRED"
    assert await w.stage.sweep() == 0  # once


async def test_rejected_slide_raw_copy_goes_after_retention_too(w: World, tmp_path: Path) -> None:
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + b"\xff" * 64)
    sid = await w.receive(broken)
    job = await w.job(sid)
    assert job["outcome"] == "REJECTED" and not await w.raw_exists(sid)
    assert job["quarantine_erasure_reason"] == "REJECTED"
    await w.stage.set_policy(STEWARD, DS, retention_hours=1)
    sid2 = await w.receive(broken)
    assert (await w.job(sid2))["outcome"] == "REJECTED" and await w.raw_exists(sid2)
    w.clock.now = T0 + timedelta(hours=1)
    assert await w.stage.sweep() == 1 and not await w.raw_exists(sid2)
    assert (await w.job(sid2))["quarantine_erasure_reason"] == "RETENTION_EXPIRED"


async def test_held_slide_is_not_swept_and_decision_starts_retention(w: World) -> None:
    await w.stage.set_policy(STEWARD, DS, retention_hours=3)
    sid = await w.receive(svs(w.tmp, "held-ret"))
    w.clock.now = T0 + timedelta(days=10)
    assert await w.stage.sweep() == 0 and await w.raw_exists(sid)
    await w.stage.approve(STEWARD, sid, [("svs:Scanner Mode", "REMOVE")])
    assert await w.raw_exists(sid)  # retention runs from the outcome
    assert (await w.job(sid))["erase_after"] == w.clock.now + timedelta(hours=3)
    w.clock.now += timedelta(hours=3)
    assert await w.stage.sweep() == 1 and not await w.raw_exists(sid)


async def test_sweep_finishes_an_erasure_a_crash_left(w: World) -> None:
    """The object store fails while erasing: the outcome stands, the sweep erases later."""
    real_delete = w.objects.delete

    async def down(bucket: str, key: str) -> None:
        raise ConnectionError("object store down")

    w.objects.delete = down  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await w.receive(svs(w.tmp, "crash", ()))
    w.objects.delete = real_delete  # type: ignore[method-assign]
    sid = f"slide-{w.n:03d}"
    assert (await w.job(sid))["outcome"] == "DEIDENTIFIED" and await w.raw_exists(sid)
    assert await w.stage.sweep() == 1 and not await w.raw_exists(sid)
    assert (await w.job(sid))["quarantine_erasure_reason"] == "VERIFIED_COPY_STORED"


# --- per-dataset policy ----------------------------------------------------------------------


async def test_policy_defaults_and_validation(w: World) -> None:
    p = await w.stage.get_policy(READER, DS)
    assert (p.macro, p.dates, p.retention_hours, p.rules) == ("REMOVE", "REMOVE", 0, ())
    with pytest.raises(InvalidArgument):
        await w.stage.set_policy(STEWARD, DS, retention_hours=721)
    with pytest.raises(InvalidArgument):
        await w.stage.set_policy(STEWARD, DS, macro="KEEP")
    with pytest.raises(NotFound):
        await w.stage.set_policy(STEWARD, "no-such-dataset", dates="YEAR_ONLY")
    p = await w.stage.set_policy(STEWARD, DS, dates="YEAR_ONLY")
    assert (p.macro, p.dates, p.updated_by) == ("REMOVE", "YEAR_ONLY", STEWARD.subject)
    p = await w.stage.set_policy(STEWARD, DS, macro="KEEP_LABEL_BLANKED")
    assert (p.macro, p.dates) == ("KEEP_LABEL_BLANKED", "YEAR_ONLY")


async def test_year_only_dates_policy_is_applied(w: World) -> None:
    fx, _pages = wsigen.generic_tiff(w.tmp, np.random.default_rng(5), name="dates")
    planted = fx.planted["DateTime (306)"].decode()
    sid = await w.receive(fx.path, common_pb2.SLIDE_FORMAT_GENERIC_TIFF)
    out = await w.output(sid)
    assert 306 not in tiff.read_tiff(out).ifds[0].tags  # default: removed
    await w.stage.set_policy(STEWARD, DS, dates="YEAR_ONLY")
    sid2 = await w.receive(fx.path, common_pb2.SLIDE_FORMAT_GENERIC_TIFF)
    out2 = await w.output(sid2)
    assert tiff.read_tiff(out2).ifds[0].tags[306].text() == f"{planted[:4]}:01:01 00:00:00"
    assert planted.encode() not in out2.read_bytes()
    assert (await w.job(sid2))["applied_policy"]["dates"] == "YEAR_ONLY"


async def test_macro_kept_with_label_blanked_policy_is_applied(w: World) -> None:
    fx = wsigen.aperio_svs(w.tmp, np.random.default_rng(9), name="macro")
    sid = await w.receive(fx.path)
    with openslide.OpenSlide(await w.output(sid)) as s:
        assert "macro" not in s.associated_images  # default: removed
    await w.stage.set_policy(STEWARD, DS, macro="KEEP_LABEL_BLANKED")
    sid2 = await w.receive(fx.path)
    out = await w.output(sid2)
    with openslide.OpenSlide(out) as s:
        assert "label" not in s.associated_images
        img = np.asarray(s.associated_images["macro"].convert("RGB"))
    band = img[:, : img.shape[1] // 3]
    assert band.max() <= 8  # the label end is black
    assert img[:, img.shape[1] // 2 :].std() > 5  # the rest still shows the glass
    assert fx.associated["macro"] not in out.read_bytes()  # re-encoded, not copied
    job = await w.job(sid2)
    assert job["applied_policy"]["macro"] == "KEEP_LABEL_BLANKED"
    assert job["summary"]["removed"]


# --- the catalogue ---------------------------------------------------------------------------


def _env(field: str, payload: Any, at: datetime, eid: str) -> events_pb2.EventEnvelope:
    env = new_envelope(
        payload_field=field, payload=payload, slide_id="s-1", dataset_id=DS, event_id=eid
    )
    env.occurred_at.FromDatetime(at)
    return env


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (1, 0, 3, 2), (3, 2, 1, 0), (1, 3, 0, 2)])
async def test_catalogue_shows_needs_review_between_received_and_deidentified(
    order: tuple[int, ...],
) -> None:
    docs = InMemoryDocumentStore()
    cat = Catalogue(
        slides=docs.collection("slides"),
        datasets=docs.collection("datasets"),
        access=StaticAccessChecker({(READER.subject, DS): {Action.ACTION_READ_RECORD}}, {DS}),
    )
    held = events_pb2.SlideHeldForReview(
        stage="deidentification",
        reason="UNKNOWN_SVS_FIELD",
        detail="held for review: svs:Scanner Mode",
        keys=["svs:Scanner Mode"],
        round=1,
    )
    events = [
        _env("slide_received", events_pb2.SlideReceived(), T0, "e-rec"),
        _env("slide_held_for_review", held, T0 + timedelta(seconds=1), "e-held"),
        _env("slide_deidentified", events_pb2.SlideDeidentified(), T0 + timedelta(hours=1), "e-d"),
        _env("slide_tiled", events_pb2.SlideTiled(), T0 + timedelta(hours=2), "e-t"),
    ]
    for n, i in enumerate(order):
        await cat.on_event(events[i])
        if set(order[: n + 1]) == {0, 1}:  # received and held, nothing later yet
            doc = await cat.get(READER, "s-1")
            assert doc["status"] == "NEEDS_REVIEW"
            assert doc["review_reason"] == "UNKNOWN_SVS_FIELD"
    await cat.on_event(events[1])  # a redelivered hold changes nothing
    doc = await cat.get(READER, "s-1")
    assert doc["status"] == "TILED"
    s = slide_to_proto(doc)
    timeline = [(t.status, t.reason) for t in s.timeline]
    assert (common_pb2.SLIDE_STATUS_NEEDS_REVIEW, "UNKNOWN_SVS_FIELD") in timeline
    assert len(timeline) == 4
