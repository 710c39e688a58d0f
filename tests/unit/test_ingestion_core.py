"""Ingestion over in-memory fakes with real sample slides: resumable, verified uploads into
quarantine, pseudonymised metadata, and nothing left behind by a rejected upload."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.ingestion.core import (
    Ingestion,
    IngestionLimits,
    UploadHeader,
    UploadResult,
    UploadSession,
)
from services.shared.access import Action, StaticAccessChecker
from services.shared.adapters.memory import (
    InMemoryBus,
    InMemoryDocumentStore,
    InMemoryObjectStore,
)
from services.shared.auth import Principal
from services.shared.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.shared.events import TOPIC_SLIDE_RECEIVED, EventEmitter
from services.shared.outbox import Outbox
from services.shared.ports.bus import Publisher
from services.shared.ports.documents import Collection
from services.shared.pseudonym import Pseudonymizer
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"
BUCKET = "quarantine"
ALICE = Principal("alice")
MALLORY = Principal("mallory")
FILENAME = "Doe-Jane-1961-CASE-4711.svs"
CASE_ID = "CASE-4711"
PATIENT_ID = "PAT-0042-DOE"
METADATA = {
    "stain": "H&E",
    "organ": "Lung",
    "species": "human",
    "case_id": CASE_ID,
    "patient_id": PATIENT_ID,
}
CHUNK = 700


def slide_bytes(rel: str) -> bytes:
    if not SLIDES.is_dir():
        pytest.fail(f"sample slides folder missing: {SLIDES}")
    path = SLIDES / rel
    if not path.is_file():
        pytest.fail(f"sample slide missing: {path}")
    return path.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header_for(
    data: bytes,
    *,
    filename: str = FILENAME,
    dataset_id: str = "ds-1",
    metadata: dict[str, str] | None = None,
    size: int | None = None,
    digest: str | None = None,
) -> UploadHeader:
    return UploadHeader(
        dataset_id=dataset_id,
        filename=filename,
        size_bytes=len(data) if size is None else size,
        sha256=sha(data) if digest is None else digest,
        metadata=dict(METADATA if metadata is None else metadata),
    )


@dataclass
class World:
    ing: Ingestion
    spool: Path
    uploads: Collection
    objects: InMemoryObjectStore
    bus: InMemoryBus
    checker: StaticAccessChecker
    publisher: Publisher

    async def send(
        self,
        session: UploadSession,
        data: bytes,
        start: int = 0,
        stop: int | None = None,
        chunk: int = CHUNK,
    ) -> None:
        """Chunks of `data[start:stop]` at their absolute offsets, as a client streams them."""
        end = len(data) if stop is None else stop
        for off in range(start, end, chunk):
            await self.ing.write_chunk(session, off, data[off : min(off + chunk, end)])

    async def upload(
        self,
        data: bytes,
        header: UploadHeader | None = None,
        caller: Principal = ALICE,
        chunk: int = CHUNK,
    ) -> UploadResult:
        session = await self.ing.begin(caller, header or header_for(data))
        await self.send(session, data, session.received, chunk=chunk)
        return await self.ing.finish(session)

    def received_events(self) -> list[events_pb2.EventEnvelope]:
        return [
            events_pb2.EventEnvelope.FromString(m.value)
            for m in self.bus.messages(TOPIC_SLIDE_RECEIVED)
        ]

    def spool_files(self) -> list[str]:
        return sorted(p.name for p in self.spool.iterdir())

    async def assert_nothing_left(self) -> None:
        assert self.spool_files() == []
        assert await self.objects.list_keys(BUCKET) == []
        assert await self.uploads.count({}) == 0
        assert self.bus.messages(TOPIC_SLIDE_RECEIVED) == []


def make_world(tmp_path: Path, limits: IngestionLimits | None = None) -> World:
    docs = InMemoryDocumentStore()
    bus = InMemoryBus()
    objects = InMemoryObjectStore()
    checker = StaticAccessChecker(
        {("alice", "ds-1"): {Action.ACTION_UPLOAD, Action.ACTION_READ_RECORD}},
        {"ds-1", "ds-2"},
    )
    publisher = bus.publisher()
    spool = tmp_path / "spool"
    ing = Ingestion(
        spool_dir=spool,
        uploads=docs.collection("uploads"),
        objects=objects,
        quarantine_bucket=BUCKET,
        access=checker,
        outbox=Outbox(docs.collection("outbox"), EventEmitter("ingestion", publisher)),
        pseudonymizer=Pseudonymizer(b"unit-test-pseudonym-key-32-bytes!", "unit"),
        limits=limits or IngestionLimits(),
    )
    return World(ing, spool, docs.collection("uploads"), objects, bus, checker, publisher)


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    world = make_world(tmp_path)
    await world.bus.ensure_topics([TOPIC_SLIDE_RECEIVED])
    await world.publisher.start()
    await world.ing.ensure_ready()
    yield world
    await world.publisher.stop()


# -- the happy path -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "filename", "fmt"),
    [
        ("aperio/small.svs", FILENAME, common_pb2.SLIDE_FORMAT_APERIO_SVS),
        ("generic-tiff/boxes.tiff", "Doe-Jane.tiff", common_pb2.SLIDE_FORMAT_GENERIC_TIFF),
        ("dicom/boxes/boxes_0.dcm", "Doe-Jane.DCM", common_pb2.SLIDE_FORMAT_DICOM_WSI),
    ],
)
async def test_full_upload_lands_in_quarantine_under_an_opaque_key(
    w: World, rel: str, filename: str, fmt: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data = slide_bytes(rel)
    result = await w.upload(data, header_for(data, filename=filename))

    assert result.format == fmt
    assert result.size_bytes == len(data)
    assert result.duplicate is False
    key = f"slides/{result.slide_id}"
    assert await w.objects.list_keys(BUCKET) == [key]
    assert await w.objects.get_bytes(BUCKET, key) == data
    assert w.spool_files() == []  # the spool is gone once the object is stored

    doc = await w.uploads.get(result.upload_id)
    assert doc is not None
    assert doc["state"] == "COMPLETED"
    assert doc["slide_id"] == result.slide_id
    assert doc["quarantine_key"] == key
    assert doc["format"] == fmt
    assert doc["sha256"] == sha(data)

    [env] = w.received_events()
    assert env.slide_id == result.slide_id
    assert env.dataset_id == "ds-1"
    p = env.slide_received
    assert (p.quarantine_bucket, p.quarantine_key) == (BUCKET, key)
    assert p.size_bytes == len(data) and p.format == fmt
    # the digest of the identified original would link its holder to the record
    assert sha(data).encode() not in env.SerializeToString()
    assert p.extension == Path(filename).suffix.lower().lstrip(".")
    assert p.metadata.stain == "h&e" and p.metadata.organ == "lung"
    assert p.metadata.case_id.startswith("unit-cas-") and p.metadata.case_id != CASE_ID
    assert p.metadata.patient_id.startswith("unit-pat-")

    # no identifier and no file name anywhere: event bytes, headers, record, key, logs
    stem = Path(filename).stem
    for secret in (stem, CASE_ID, PATIENT_ID):
        for m in w.bus.messages(TOPIC_SLIDE_RECEIVED):
            assert secret.encode() not in m.value
            assert all(secret.encode() not in v for _, v in m.headers)
        assert secret not in repr(doc)
        assert secret not in key
        assert secret not in caplog.text


async def test_pseudonyms_are_stable_per_identifier(w: World) -> None:
    one, two = slide_bytes("aperio/small.svs"), slide_bytes("generic-tiff/boxes.tiff")
    await w.upload(one)
    await w.upload(two, header_for(two, metadata={"case_id": CASE_ID, "patient_id": "OTHER"}))
    a, b = (e.slide_received.metadata for e in w.received_events())
    assert a.case_id == b.case_id  # slides of one case link together
    assert a.patient_id != b.patient_id


async def test_status_reports_progress(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    st = await w.ing.status(ALICE, "ds-1", sha(data), len(data))
    assert (st.state, st.received_bytes, st.slide_id) == ("NOT_STARTED", 0, "")

    session = await w.ing.begin(ALICE, header_for(data))
    await w.send(session, data, 0, 1400)
    st = await w.ing.status(ALICE, "ds-1", sha(data), len(data))
    assert (st.state, st.received_bytes, st.size_bytes) == ("IN_PROGRESS", 1400, len(data))

    await w.send(session, data, 1400)
    result = await w.ing.finish(session)
    st = await w.ing.status(ALICE, "ds-1", sha(data), len(data))
    assert (st.state, st.received_bytes, st.slide_id) == ("COMPLETED", len(data), result.slide_id)


# -- resuming -----------------------------------------------------------------------------


async def test_interrupted_upload_resumes_from_status(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    half = len(data) // 2
    first = await w.ing.begin(ALICE, header_for(data))
    await w.send(first, data, 0, half)  # the connection drops here: no finish

    st = await w.ing.status(ALICE, "ds-1", sha(data), len(data))
    assert st.state == "IN_PROGRESS"
    assert st.received_bytes == half

    second = await w.ing.begin(ALICE, header_for(data))
    assert second.received == half
    assert second.slide_id == first.slide_id
    await w.send(second, data, st.received_bytes)
    result = await w.ing.finish(second)

    assert result.slide_id == first.slide_id
    keys = await w.objects.list_keys(BUCKET)
    assert keys == [f"slides/{result.slide_id}"]
    assert sha(await w.objects.get_bytes(BUCKET, keys[0])) == sha(data)
    assert len(w.received_events()) == 1


async def test_restart_from_zero_after_partial_upload_skips_the_overlap(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    first = await w.ing.begin(ALICE, header_for(data))
    await w.send(first, data, 0, 1000)

    again = await w.ing.begin(ALICE, header_for(data))
    assert again.received == 1000
    # a chunk straddling what is held: only its new part is appended
    await w.ing.write_chunk(again, 500, data[500:1500])
    assert again.received == 1500
    await w.send(again, data, 0)  # the whole file again, from offset 0
    result = await w.ing.finish(again)
    assert await w.objects.get_bytes(BUCKET, f"slides/{result.slide_id}") == data


async def test_gap_is_failed_precondition_and_keeps_what_was_received(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    session = await w.ing.begin(ALICE, header_for(data))
    await w.send(session, data, 0, 1000)
    with pytest.raises(FailedPrecondition) as err:
        await w.ing.write_chunk(session, 1200, data[1200:1800])
    assert err.value.reason == "OFFSET_GAP"
    assert "resume at 1000" in err.value.message
    st = await w.ing.status(ALICE, "ds-1", sha(data), len(data))
    assert st.received_bytes == 1000


async def test_truncated_upload_keeps_the_partial_spool_for_resume(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    session = await w.ing.begin(ALICE, header_for(data))
    await w.send(session, data, 0, 1400)
    with pytest.raises(FailedPrecondition) as err:
        await w.ing.finish(session)
    assert err.value.reason == "TRUNCATED"
    assert "resume at offset 1400" in err.value.message
    assert len(w.spool_files()) == 1
    assert await w.objects.list_keys(BUCKET) == []
    assert w.received_events() == []

    resumed = await w.ing.begin(ALICE, header_for(data))
    assert resumed.received == 1400
    await w.send(resumed, data, 1400)
    result = await w.ing.finish(resumed)
    assert await w.objects.get_bytes(BUCKET, f"slides/{result.slide_id}") == data


# -- rejected uploads leave nothing behind ------------------------------------------------


async def test_checksum_mismatch_is_data_loss_and_leaves_nothing(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    corrupted = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    session = await w.ing.begin(ALICE, header_for(data))
    await w.send(session, corrupted)
    with pytest.raises(DataLoss) as err:
        await w.ing.finish(session)
    assert err.value.reason == "CHECKSUM_MISMATCH"
    await w.assert_nothing_left()
    # and the same upload can start over cleanly
    st = await w.ing.status(ALICE, "ds-1", sha(data), len(data))
    assert (st.state, st.received_bytes) == ("NOT_STARTED", 0)
    result = await w.upload(data)
    assert not result.duplicate


async def test_declared_size_over_the_limit_is_rejected(tmp_path: Path) -> None:
    world = make_world(tmp_path, IngestionLimits(max_upload_bytes=1000))
    data = slide_bytes("aperio/small.svs")
    with pytest.raises(InvalidArgument) as err:
        await world.ing.begin(ALICE, header_for(data))
    assert err.value.reason == "TOO_LARGE"
    assert await world.uploads.count({}) == 0
    assert world.checker.calls == []  # refused before anything else


@pytest.mark.parametrize(
    "digest",
    ["", "abc", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "a" * 64 + "\n", " " + "a" * 63],
)
async def test_bad_sha256_format_is_rejected(w: World, digest: str) -> None:
    data = slide_bytes("aperio/small.svs")
    with pytest.raises(InvalidArgument) as err:
        await w.ing.begin(ALICE, header_for(data, digest=digest))
    assert err.value.reason == "BAD_SHA256"
    with pytest.raises(InvalidArgument):
        await w.ing.status(ALICE, "ds-1", digest, len(data))
    await w.assert_nothing_left()


@pytest.mark.parametrize("size", [0, -1])
async def test_non_positive_size_is_rejected(w: World, size: int) -> None:
    data = slide_bytes("aperio/small.svs")
    with pytest.raises(InvalidArgument) as err:
        await w.ing.begin(ALICE, header_for(data, size=size))
    assert err.value.reason == "BAD_SIZE"


async def test_missing_dataset_is_not_found(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    with pytest.raises(NotFound) as err:
        await w.ing.begin(ALICE, header_for(data, dataset_id="ds-gone"))
    assert err.value.reason == "DATASET_NOT_FOUND"
    with pytest.raises(NotFound):
        await w.ing.status(ALICE, "ds-gone", sha(data), len(data))
    await w.assert_nothing_left()


async def test_no_grant_is_permission_denied(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    with pytest.raises(PermissionDenied):
        await w.ing.begin(MALLORY, header_for(data))
    with pytest.raises(PermissionDenied):
        await w.ing.begin(ALICE, header_for(data, dataset_id="ds-2"))
    with pytest.raises(PermissionDenied):
        await w.ing.status(MALLORY, "ds-1", sha(data), len(data))
    await w.assert_nothing_left()
    assert (w.checker.calls[0][0], w.checker.calls[0][1]) == ("mallory", Action.ACTION_UPLOAD)


async def test_no_header_dataset_is_rejected(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    with pytest.raises(InvalidArgument) as err:
        await w.ing.begin(ALICE, header_for(data, dataset_id=""))
    assert err.value.reason == "MISSING_DATASET"


async def test_unknown_format_is_rejected_and_leaves_nothing(w: World) -> None:
    data = b"this is a spreadsheet, not a slide\n" * 200
    with pytest.raises(InvalidArgument) as err:
        await w.upload(data, header_for(data, filename="report.svs"))
    assert err.value.reason == "UNKNOWN_FORMAT"
    await w.assert_nothing_left()


@pytest.mark.parametrize(
    ("rel", "reasons"),
    [
        ("broken/unopenable.tiff", {"UNSUPPORTED_COMPRESSION"}),
        ("ome-tiff/4D-series.ome.tiff", {"UNSUPPORTED_FORMAT", "FORMAT_MISMATCH"}),
    ],
)
async def test_unsupported_slide_is_rejected_and_leaves_nothing(
    w: World, rel: str, reasons: set[str]
) -> None:
    data = slide_bytes(rel)
    with pytest.raises(InvalidArgument) as err:
        await w.upload(data, header_for(data, filename=Path(rel).name), chunk=1024 * 1024)
    assert err.value.reason in reasons
    await w.assert_nothing_left()


async def test_more_bytes_than_declared_is_rejected_and_discarded(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    session = await w.ing.begin(ALICE, header_for(data))
    await w.send(session, data, 0, 1400)
    with pytest.raises(InvalidArgument) as err:
        await w.ing.write_chunk(session, 1400, data[1400:] + b"extra")
    assert err.value.reason == "SIZE_MISMATCH"
    await w.assert_nothing_left()


async def test_oversized_chunk_is_rejected(tmp_path: Path) -> None:
    world = make_world(tmp_path, IngestionLimits(max_chunk_bytes=512))
    await world.ing.ensure_ready()
    data = slide_bytes("aperio/small.svs")
    session = await world.ing.begin(ALICE, header_for(data))
    with pytest.raises(InvalidArgument) as err:
        await world.ing.write_chunk(session, 0, data[:513])
    assert err.value.reason == "CHUNK_TOO_LARGE"
    assert session.received == 0


# -- duplicates ---------------------------------------------------------------------------


async def test_second_identical_upload_is_a_duplicate(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    first = await w.upload(data)
    again = await w.upload(data, header_for(data, filename="another-name.svs"))

    assert again.duplicate is True
    assert again.slide_id == first.slide_id
    assert again.upload_id == first.upload_id
    assert again.format == first.format
    assert await w.objects.list_keys(BUCKET) == [f"slides/{first.slide_id}"]
    assert await w.uploads.count({}) == 1
    # re-announcing is allowed (consumers dedupe on the event id); a second event is not
    assert {e.event_id for e in w.received_events()} == {w.received_events()[0].event_id}
    assert w.spool_files() == []


# -- metadata validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("stain", "H&E<script>"),
        ("stain", "HE\n"),
        ("organ", "lung;drop"),
        ("organ", "l\u00fcnge"),
        ("species", "x" * 65),
        ("stain", "tab\there"),
        ("case_id", "c" * 257),
        ("patient_id", "p" * 257),
    ],
)
async def test_metadata_with_illegal_characters_is_rejected(w: World, key: str, value: str) -> None:
    data = slide_bytes("aperio/small.svs")
    with pytest.raises(InvalidArgument) as err:
        await w.ing.begin(ALICE, header_for(data, metadata={**METADATA, key: value}))
    assert err.value.reason == "BAD_METADATA"
    await w.assert_nothing_left()


async def test_identifier_with_any_characters_is_pseudonymised(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    weird = "Müller, Hans / 1961-02-03"
    await w.upload(data, header_for(data, metadata={"case_id": weird}))
    [env] = w.received_events()
    assert env.slide_received.metadata.case_id.startswith("unit-cas-")
    assert weird.encode() not in env.SerializeToString()


async def test_odd_file_extension_is_dropped(w: World) -> None:
    data = slide_bytes("aperio/small.svs")
    await w.upload(data, header_for(data, filename="slide.sv s"))
    [env] = w.received_events()
    assert env.slide_received.extension == ""
    assert env.slide_received.format == common_pb2.SLIDE_FORMAT_APERIO_SVS


async def test_file_the_parser_chokes_on_is_rejected_and_leaves_nothing(w: World) -> None:
    # boxes_0.dcm with one byte of the Rows element's VR changed ("US" -> "UJ"): pydicom
    # raises NotImplementedError rather than a parse error while the slide is inspected
    data = bytearray(slide_bytes("dicom/boxes/boxes_0.dcm"))
    assert data[3384:3386] == b"US"
    data[3385] = ord("J")
    broken = bytes(data)
    with pytest.raises(InvalidArgument) as err:
        await w.upload(broken, header_for(broken, filename="x.dcm"))
    assert err.value.reason == "MALFORMED_FILE"
    await w.assert_nothing_left()


async def test_abandoned_partial_uploads_expire(w: World) -> None:
    import os
    import time

    data = slide_bytes("aperio/small.svs")
    old = await w.ing.begin(ALICE, header_for(data))
    await w.send(old, data, 0, len(data) // 2)
    fresh_data = slide_bytes("generic-tiff/boxes.tiff")
    fresh = await w.ing.begin(ALICE, header_for(fresh_data))
    await w.send(fresh, fresh_data, 0, len(fresh_data) // 2)
    past = time.time() - 7200
    os.utime(old.path, (past, past))

    assert await w.ing.expire_abandoned(max_age_s=3600) == 1
    assert not old.path.exists()
    assert fresh.path.exists()
    assert (await w.ing.status(ALICE, "ds-1", sha(data), len(data))).state == "NOT_STARTED"
    assert (await w.ing.status(ALICE, "ds-1", sha(fresh_data), len(fresh_data))).state == (
        "IN_PROGRESS"
    )


async def test_format_comes_from_content_not_the_file_name(w: World) -> None:
    """An NDPI keeps its first IFD at the end of the file, so the head alone cannot tell;
    a partner system that names it `.tif` still gets it ingested as NDPI."""
    data = slide_bytes("hamamatsu/test3-DAPI-2-(387).ndpi")
    result = await w.upload(data, header_for(data, filename="scan-0001.tif"))
    assert result.format == common_pb2.SLIDE_FORMAT_HAMAMATSU_NDPI
    [env] = w.received_events()
    assert env.slide_received.format == common_pb2.SLIDE_FORMAT_HAMAMATSU_NDPI
