"""The main job end to end on the real stack: real sample slides through all six services,
real Kafka, S3 (versitygw) and MongoDB-wire (FerretDB)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import openslide
import pytest
import tifffile
from grpc import StatusCode, aio
from PIL import Image

from inference import grpc_predict_v2_pb2 as oip
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from services.cli.client import TesseraClient
from services.shared.adapters.kafka import KafkaBus
from services.shared.adapters.s3 import S3ObjectStore
from services.shared.events import ALL_TOPICS, TOPIC_SLIDE_RECEIVED, dead_letter_topic
from services.shared.grpc.interceptors import REASON_KEY
from services.shared.settings import BucketSettings
from services.tiling.engine import DziGeometry
from tessera.access.v1 import access_pb2
from tessera.common.v1 import common_pb2
from tessera.deid.v1 import deid_pb2
from tessera.ingestion.v1 import ingestion_pb2
from tessera.metadata.v1 import metadata_pb2
from tessera.tiling.v1 import tiling_pb2
from tests.faults.leaks import read_topics

from .conftest import KAFKA, LOGS, S3, SAMPLES, SLIDES, TRACES, World, role, token

pytestmark = pytest.mark.e2e
BUCKETS = BucketSettings()

# Identifying values each input carries (SOURCES.md), which must appear nowhere after ingest.
IDENTIFYING: dict[str, list[bytes]] = {
    "svs": [
        b"b414003d-95c6-48b0-9369-8010ed517ba7",
        b"CPAPERIOCS",
        b"1004486",
        b"12/29/09",
        b"09:59:15",
        b"Filename = CMU-1",
    ],
    "ndpi": [b"950291", b"2017:02:07 13:06:43", b"2011/05/23"],
    "dicom": [
        b"GenLast^Penelope",
        b"PN-1-692-287-590-758-1",
        b"16340811",
        b"GO-1692287590758",
        b"GenLast^Bruce",
        b"Example Hospital",
        b"tumor_102.tif",
    ],
}


def _reason(exc: aio.AioRpcError) -> str:
    return str(dict(exc.trailing_metadata() or ()).get(REASON_KEY, ""))


def _store() -> S3ObjectStore:
    return S3ObjectStore(S3[0], S3[1], S3[2], secure=False)


async def _fetch(world: World, key: str, tmp_path: Path) -> Path:
    out = tmp_path / f"{key}.out"
    async with TesseraClient(world.admin_token) as c:
        await c.fetch(world.slides[key], out)
    return out


def _all_forbidden(key: str) -> list[bytes]:
    s = SAMPLES[key]
    return [*IDENTIFYING[key], s.case_id.encode(), s.patient_id.encode()]


# -- the pipeline --------------------------------------------------------------------------


def test_every_sample_reaches_ready_with_full_timeline(world: World) -> None:
    for key, slide in world.records.items():
        assert slide.status == common_pb2.SLIDE_STATUS_READY, (key, slide.rejection_reason)
        stages = [t.status for t in slide.timeline]
        assert stages == [
            common_pb2.SLIDE_STATUS_RECEIVED,
            common_pb2.SLIDE_STATUS_DEIDENTIFIED,
            common_pb2.SLIDE_STATUS_TILED,
            common_pb2.SLIDE_STATUS_READY,
        ], key
        assert slide.deid.verified
        assert slide.deid.removed, key
        assert slide.geometry.width > 0 and slide.geometry.height > 0
        assert slide.pyramid.tile_count > 0
        assert slide.clinical.stain == SAMPLES[key].stain.lower()


def test_case_and_patient_ids_are_pseudonymised(world: World) -> None:
    for key, slide in world.records.items():
        assert slide.clinical.case_id and slide.clinical.case_id != SAMPLES[key].case_id
        assert slide.clinical.case_id.startswith("local-cas-")
        assert slide.clinical.patient_id.startswith("local-pat-")


async def test_svs_label_and_macro_are_gone(world: World, tmp_path: Path) -> None:
    out = await _fetch(world, "svs", tmp_path)
    with openslide.OpenSlide(out) as s:
        assert not {"label", "macro"} & set(s.associated_images)
    data = out.read_bytes()
    # The compressed bytes of the input's label and macro pages must not be in the output.
    with tifffile.TiffFile(SAMPLES["svs"].path) as tf, SAMPLES["svs"].path.open("rb") as fh:
        found = 0
        for page in tf.pages:
            desc = page.tags.get("ImageDescription")
            text = desc.value if desc else ""
            if "label" in text or "macro" in text:
                found += 1
                fh.seek(page.dataoffsets[0])
                sample = fh.read(min(4096, page.databytecounts[0]))
                assert sample not in data
        assert found == 2


async def test_ndpi_macro_is_gone(world: World, tmp_path: Path) -> None:
    out = await _fetch(world, "ndpi", tmp_path)
    with openslide.OpenSlide(out) as s:
        assert "macro" not in s.associated_images
        assert s.properties.get("openslide.vendor") == "hamamatsu"


async def test_no_identifying_value_in_output_bytes(world: World, tmp_path: Path) -> None:
    for key in SAMPLES:
        data = (await _fetch(world, key, tmp_path)).read_bytes()
        for value in _all_forbidden(key):
            assert value not in data, (key, value)


async def test_no_identifying_value_in_catalogue_events_or_logs(world: World) -> None:
    forbidden = [v for k in SAMPLES for v in _all_forbidden(k)]
    forbidden += [SAMPLES[k].path.name.encode() for k in SAMPLES]  # file names identify too
    async with TesseraClient(world.admin_token) as c:
        for slide_id in world.slides.values():
            r = await c.metadata.GetSlide(metadata_pb2.GetSlideRequest(slide_id=slide_id))
            blob = r.SerializeToString()
            for value in forbidden:
                assert value not in blob
    # every event on every topic, each partition read to its end offset
    messages, unread = await read_topics(KAFKA, ALL_TOPICS)
    assert unread == 0, f"{unread} partitions could not be read to their end"
    for topic, value_bytes, headers in messages:
        for value in forbidden:
            assert value not in value_bytes, topic
            assert all(value not in v for v in headers.values())
    assert len(messages) >= 4 * len(SAMPLES)
    for log in LOGS.glob("*.log"):
        text = log.read_bytes()
        for value in forbidden:
            assert value not in text, (log.name, value)
    for spans in TRACES.glob("*.jsonl"):
        text = _span_content(spans)
        for value in forbidden:
            assert value not in text, (spans.name, value)


# Span fields that are the tracer's own numbers (nanosecond times, random ids): decimal digits
# of a serial number turn up in them by chance, and they carry nothing from the input.
_SPAN_OWN_FIELDS = ("start", "end", "trace_id", "span_id", "parent_span_id")


def _span_content(path: Path) -> bytes:
    """Everything in a span file except the tracer's own timing and id fields."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            span = json.loads(line)
        except ValueError:
            out.append(line)  # not a span: scan it whole
            continue
        for name in _SPAN_OWN_FIELDS:
            span.pop(name, None)
        out.append(json.dumps(span, ensure_ascii=False))
    return "\n".join(out).encode()


async def test_level0_pixels_unchanged(world: World, tmp_path: Path) -> None:
    for key in SAMPLES:
        out = await _fetch(world, key, tmp_path)
        with openslide.OpenSlide(SAMPLES[key].path) as a, openslide.OpenSlide(out) as b:
            assert a.dimensions == b.dimensions
            assert a.level_count == b.level_count
            w, h = a.dimensions
            for x, y in ((0, 0), (w // 2, h // 3), (max(0, w - 600), max(0, h - 600))):
                ra = np.asarray(a.read_region((x, y), 0, (min(600, w), min(600, h))))
                rb = np.asarray(b.read_region((x, y), 0, (min(600, w), min(600, h))))
                assert np.array_equal(ra, rb), (key, x, y)


async def test_dzi_tiles_over_grpc_and_http(world: World) -> None:
    slide_id = world.slides["svs"]
    async with TesseraClient(world.admin_token) as c:
        d = await c.tiling.GetDeepZoomDescriptor(
            tiling_pb2.GetDeepZoomDescriptorRequest(slide_id=slide_id)
        )
        geom = DziGeometry.from_descriptor(d.descriptor_xml)
        assert (geom.width, geom.height) == (2220, 2967)
        top = geom.max_level
        cols, rows = geom.tile_grid(top)
        for level, col, row in ((0, 0, 0), (top, 0, 0), (top, cols - 1, rows - 1), (top - 3, 0, 0)):
            t = await c.tiling.GetTile(
                tiling_pb2.GetTileRequest(slide_id=slide_id, level=level, col=col, row=row)
            )
            with Image.open(io.BytesIO(t.data)) as im:
                assert im.size == geom.tile_size_at(level, col, row)
        with pytest.raises(aio.AioRpcError) as err:
            await c.tiling.GetTile(
                tiling_pb2.GetTileRequest(slide_id=slide_id, level=top, col=cols, row=0)
            )
        assert err.value.code() == StatusCode.OUT_OF_RANGE
        thumb = await c.tiling.GetThumbnail(tiling_pb2.GetThumbnailRequest(slide_id=slide_id))
        with Image.open(io.BytesIO(thumb.data)) as im:
            assert max(im.size) <= 1024
    url = d.http_url
    base = url.rsplit(".dzi", 1)[0]
    auth = {"Authorization": f"Bearer {world.admin_token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=auth) as r:
            assert r.status == 200
            assert DziGeometry.from_descriptor(await r.text()).width == 2220
        async with http.get(f"{base}_files/{top}/0_0.jpeg", headers=auth) as r:
            assert r.status == 200
            etag = r.headers["ETag"]
            assert "max-age" in r.headers["Cache-Control"]
            with Image.open(io.BytesIO(await r.read())) as im:
                assert im.size == geom.tile_size_at(top, 0, 0)
        async with http.get(
            f"{base}_files/{top}/0_0.jpeg", headers={**auth, "If-None-Match": etag}
        ) as r:
            assert r.status == 304
        async with http.get(f"{base}_files/{top}/0_0.jpeg") as r:
            assert r.status == 401
        async with http.options(
            f"{base}_files/{top}/0_0.jpeg",
            headers={"Origin": "http://viewer.example", "Access-Control-Request-Method": "GET"},
        ) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        async with http.get(f"{base}_files/{top}/0_0.png", headers=auth) as r:
            assert r.status == 404
        stranger = {"Authorization": f"Bearer {token('e2e-stranger')}"}
        async with http.get(f"{base}_files/{top}/0_0.jpeg", headers=stranger) as r:
            assert r.status == 403


async def test_search_by_stain_and_dataset(world: World) -> None:
    async with TesseraClient(world.admin_token) as c:
        r = await c.metadata.SearchSlides(
            metadata_pb2.SearchSlidesRequest(dataset_id=world.dataset, stain="H&E")
        )
        ids = {s.slide_id for s in r.slides}
        assert {world.slides["svs"], world.slides["dicom"]} <= ids
        assert world.slides["ndpi"] not in ids
        r = await c.metadata.SearchSlides(
            metadata_pb2.SearchSlidesRequest(dataset_id=world.dataset, stain="dapi")
        )
        assert [s.slide_id for s in r.slides] == [world.slides["ndpi"]]
        # a partner searches with its own case id; the node pseudonymises the query
        # (within this run's dataset: the developer stack keeps earlier runs' slides)
        r = await c.metadata.SearchSlides(
            metadata_pb2.SearchSlidesRequest(
                dataset_id=world.dataset, case_id=SAMPLES["ndpi"].case_id
            )
        )
        assert [s.slide_id for s in r.slides] == [world.slides["ndpi"]]
        r = await c.metadata.SearchSlides(
            metadata_pb2.SearchSlidesRequest(dataset_id=world.dataset, page_size=2)
        )
        assert r.total_count == 4 and len(r.slides) == 2 and r.next_page_token
        r2 = await c.metadata.SearchSlides(
            metadata_pb2.SearchSlidesRequest(
                dataset_id=world.dataset, page_size=2, page_token=r.next_page_token
            )
        )
        assert len(r2.slides) == 2
        assert not {s.slide_id for s in r.slides} & {s.slide_id for s in r2.slides}


async def test_reader_without_grant_is_denied_and_audited(world: World) -> None:
    subject = f"e2e-reader-{uuid.uuid4().hex[:6]}"
    slide_id = world.slides["svs"]
    async with TesseraClient(token(subject)) as reader, TesseraClient(world.admin_token) as adm:
        calls = [
            reader.metadata.GetSlide(metadata_pb2.GetSlideRequest(slide_id=slide_id)),
            reader.tiling.GetTile(
                tiling_pb2.GetTileRequest(slide_id=slide_id, level=0, col=0, row=0)
            ),
            reader.tiling.GetDeepZoomDescriptor(
                tiling_pb2.GetDeepZoomDescriptorRequest(slide_id=slide_id)
            ),
        ]
        for call in calls:
            with pytest.raises(aio.AioRpcError) as err:
                await call
            assert err.value.code() == StatusCode.PERMISSION_DENIED
        with pytest.raises(aio.AioRpcError) as err:
            async for _ in reader.tiling.DownloadSlide(
                tiling_pb2.DownloadSlideRequest(slide_id=slide_id)
            ):
                pass
        assert err.value.code() == StatusCode.PERMISSION_DENIED
        search = await reader.metadata.SearchSlides(metadata_pb2.SearchSlidesRequest())
        assert search.total_count == 0
        audit = await adm.access.ListAuditRecords(
            access_pb2.ListAuditRecordsRequest(subject=subject, page_size=100)
        )
        denied = [a for a in audit.records if not a.allowed]
        assert len(denied) >= 4
        assert {a.reason for a in denied} == {"NO_GRANT"}
        # a grant opens the record; revoking it closes it again
        await adm.grant(world.dataset, subject, role("researcher"), days=1)
        r = await reader.metadata.GetSlide(metadata_pb2.GetSlideRequest(slide_id=slide_id))
        assert r.slide.slide_id == slide_id
        await adm.access.RevokeRole(
            access_pb2.RevokeRoleRequest(dataset_id=world.dataset, subject=subject)
        )
        with pytest.raises(aio.AioRpcError) as err:
            await reader.metadata.GetSlide(metadata_pb2.GetSlideRequest(slide_id=slide_id))
        assert err.value.code() == StatusCode.PERMISSION_DENIED
    # the decisions were also written to the audit topic
    bus = KafkaBus(KAFKA, client_id="e2e-audit")
    sub = bus.subscription(f"e2e-audit-{uuid.uuid4().hex[:8]}", ["tessera.audit.v1"])
    await sub.start()
    wanted = {a.decision_id for a in denied}
    deadline = asyncio.get_running_loop().time() + 120
    try:
        while wanted and asyncio.get_running_loop().time() < deadline:
            for m in await sub.fetch(timeout_s=1.0, max_messages=1000):
                wanted -= {v.decode() for k, v in m.headers if k == "event-id"}
    finally:
        await sub.stop()
    assert not wanted


async def test_inference_result_is_stored(world: World) -> None:
    store = _store()
    for key, slide in world.records.items():
        assert len(slide.inference) == 1, key
        r = slide.inference[0]
        assert r.model_name == "tissue-detector" and r.model_version == "1"
        if key == "ndpi":  # fluorescence: the brightfield detector sees no background
            assert 0.0 <= r.tissue_fraction <= 1.0
        else:
            assert 0.0 < r.tissue_fraction < 1.0, (key, r.tissue_fraction)
        mask = await store.get_bytes(r.mask_bucket, r.mask_key)
        with Image.open(io.BytesIO(mask)) as im:
            assert im.mode in ("L", "1", "P")
            arr = np.asarray(im.convert("L")) > 0
            assert abs(arr.mean() - r.tissue_fraction) < 0.05


async def test_open_inference_protocol(world: World) -> None:
    ch = TesseraClient(world.admin_token)
    try:
        stub = oip_grpc.GRPCInferenceServiceStub(ch.channel("serving"))
        assert (await stub.ServerLive(oip.ServerLiveRequest())).live
        assert (await stub.ServerReady(oip.ServerReadyRequest())).ready
        assert (await stub.ModelReady(oip.ModelReadyRequest(name="tissue-detector"))).ready
        meta = await stub.ModelMetadata(oip.ModelMetadataRequest(name="tissue-detector"))
        assert meta.versions == ["1"]
        inp = meta.inputs[0]
        h, w = 64, 96
        img = np.ones((1, 3, h, w), dtype=np.float32)
        img[:, 0, :, : w // 2] = 0.55  # left half pink: tissue
        img[:, 1, :, : w // 2] = 0.25
        img[:, 2, :, : w // 2] = 0.55
        req = oip.ModelInferRequest(model_name="tissue-detector", id="e2e")
        req.inputs.add(name=inp.name, datatype="FP32", shape=[1, 3, h, w])
        req.raw_input_contents.append(img.tobytes())
        resp = await stub.ModelInfer(req)
        outs = {
            o.name: (o, raw) for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)
        }
        frac_meta, frac_raw = next(v for k, v in outs.items() if "fraction" in k)
        assert frac_meta.datatype == "FP32"
        fraction = float(np.frombuffer(frac_raw, dtype=np.float32)[0])
        assert 0.4 < fraction < 0.6
        bad = oip.ModelInferRequest(model_name="tissue-detector")
        bad.inputs.add(name=inp.name, datatype="FP32", shape=[1, 3, h, w])
        bad.raw_input_contents.append(b"\x00" * 10)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.ModelInfer(bad)
        assert err.value.code() == StatusCode.INVALID_ARGUMENT
        with pytest.raises(aio.AioRpcError) as err:
            await stub.ModelMetadata(oip.ModelMetadataRequest(name="no-such-model"))
        assert err.value.code() == StatusCode.NOT_FOUND
    finally:
        await ch.close()


def test_spans_follow_one_slide_across_services(world: World) -> None:
    slide_id = world.slides["svs"]
    spans = []
    for f in TRACES.glob("*.jsonl"):
        spans += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    mine = [s for s in spans if s["attributes"].get("tessera.slide_id") == slide_id]
    assert mine, "no consumer spans for the slide"
    traces = {s["trace_id"] for s in mine}
    assert len(traces) == 1, traces
    trace_id = traces.pop()
    services = {s["service"] for s in spans if s["trace_id"] == trace_id}
    assert {"ingestion", "deid", "tiling", "serving", "metadata"} <= services
    upload = [
        s
        for s in spans
        if s["trace_id"] == trace_id and s["kind"] == "SERVER" and s["name"].endswith("UploadSlide")
    ]
    assert len(upload) == 1


# -- bad input -----------------------------------------------------------------------------


async def _object_counts() -> dict[str, int]:
    store = _store()
    return {
        b: len(await store.list_keys(b))
        for b in (BUCKETS.quarantine, BUCKETS.deidentified, BUCKETS.tiles, BUCKETS.results)
    }


async def test_bad_uploads_get_precise_status_and_leave_nothing(
    world: World, tmp_path: Path
) -> None:
    before = await _object_counts()
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 100)
    good = SAMPLES["svs"].path
    async with TesseraClient(world.admin_token) as c:

        async def expect(coro, code: StatusCode, reason: str) -> None:  # type: ignore[no-untyped-def]
            with pytest.raises(aio.AioRpcError) as err:
                await coro
            assert err.value.code() == code, err.value.details()
            assert _reason(err.value) == reason
            assert "Traceback" not in (err.value.details() or "")

        await expect(c.upload(junk, world.dataset), StatusCode.INVALID_ARGUMENT, "UNKNOWN_FORMAT")
        await expect(
            c.upload(SLIDES / "broken/unopenable.tiff", world.dataset),
            StatusCode.INVALID_ARGUMENT,
            "UNSUPPORTED_COMPRESSION",
        )
        await expect(
            c.upload(good, world.dataset, sha256="0" * 64),
            StatusCode.DATA_LOSS,
            "CHECKSUM_MISMATCH",
        )
        await expect(c.upload(good, "no-such-dataset"), StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")
        async with TesseraClient(token("e2e-nobody")) as nobody:
            await expect(
                nobody.upload(good, world.dataset), StatusCode.PERMISSION_DENIED, "NO_GRANT"
            )

        async def raw(header: ingestion_pb2.UploadHeader, chunks: list[bytes]):  # type: ignore[no-untyped-def]
            async def gen():  # type: ignore[no-untyped-def]
                yield ingestion_pb2.UploadSlideRequest(header=header)
                off = 0
                for ch in chunks:
                    yield ingestion_pb2.UploadSlideRequest(
                        chunk=ingestion_pb2.UploadChunk(offset=off, data=ch)
                    )
                    off += len(ch)

            return await c.ingestion.UploadSlide(gen())

        data = good.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        await expect(
            raw(
                ingestion_pb2.UploadHeader(
                    dataset_id=world.dataset, filename="x.svs", size_bytes=10**13, sha256=digest
                ),
                [],
            ),
            StatusCode.INVALID_ARGUMENT,
            "TOO_LARGE",
        )
        # a truncated stream: fewer bytes than declared
        other = bytearray(data)
        other[-1] ^= 0xFF
        odigest = hashlib.sha256(other).hexdigest()
        hdr = ingestion_pb2.UploadHeader(
            dataset_id=world.dataset, filename="x.svs", size_bytes=len(other), sha256=odigest
        )
        await expect(
            raw(hdr, [bytes(other[:100_000])]), StatusCode.FAILED_PRECONDITION, "TRUNCATED"
        )
        await expect(
            raw(ingestion_pb2.UploadHeader(dataset_id="", size_bytes=1, sha256=digest), []),
            StatusCode.INVALID_ARGUMENT,
            "MISSING_DATASET",
        )
    assert await _object_counts() == before


async def test_resumed_upload_completes_once(world: World, tmp_path: Path) -> None:
    src = SAMPLES["svs"].path.read_bytes()
    data = bytearray(src)
    data[-2] ^= 0x01  # a different file with the same structure
    path = tmp_path / "resume.svs"
    path.write_bytes(bytes(data))
    digest = hashlib.sha256(data).hexdigest()
    async with TesseraClient(world.admin_token) as c:
        hdr = ingestion_pb2.UploadHeader(
            dataset_id=world.dataset, filename="r.svs", size_bytes=len(data), sha256=digest
        )
        half = len(data) // 2

        async def first_half():  # type: ignore[no-untyped-def]
            yield ingestion_pb2.UploadSlideRequest(header=hdr)
            yield ingestion_pb2.UploadSlideRequest(
                chunk=ingestion_pb2.UploadChunk(offset=0, data=bytes(data[:half]))
            )

        with pytest.raises(aio.AioRpcError):
            await c.ingestion.UploadSlide(first_half())
        st = await c.ingestion.GetUploadStatus(
            ingestion_pb2.GetUploadStatusRequest(
                dataset_id=world.dataset, sha256=digest, size_bytes=len(data)
            )
        )
        assert st.state == ingestion_pb2.UPLOAD_STATE_IN_PROGRESS
        assert st.received_bytes == half
        res = await c.upload(path, world.dataset, sha256=digest)
        again = await c.upload(path, world.dataset, sha256=digest)
        assert again.duplicate and again.slide_id == res.slide_id
        # the corrupted last bytes make this one a reject or a slide; either way one record
        final = await c.wait(res.slide_id, timeout_s=300)
        assert final.status in (common_pb2.SLIDE_STATUS_READY, common_pb2.SLIDE_STATUS_REJECTED)
        assert len([t for t in final.timeline if t.status == common_pb2.SLIDE_STATUS_RECEIVED]) == 1


async def test_corrupt_slide_is_rejected_with_reason(world: World) -> None:
    async with TesseraClient(world.admin_token) as c:
        slide = (
            await c.metadata.GetSlide(metadata_pb2.GetSlideRequest(slide_id=world.rejected_slide))
        ).slide
    assert slide.status == common_pb2.SLIDE_STATUS_REJECTED
    assert slide.rejection_reason == "CORRUPT_IMAGE_DATA"
    store = _store()
    for bucket in (BUCKETS.deidentified, BUCKETS.tiles, BUCKETS.results):
        assert not await store.list_keys(bucket, f"slides/{world.rejected_slide}")
    # issue 3: a rejected slide's raw upload is erased like any other once the outcome is
    # final (the dataset's retention is 0 hours), and the erasure is recorded
    assert await store.stat(BUCKETS.quarantine, f"slides/{world.rejected_slide}") is None
    async with TesseraClient(world.admin_token) as c:
        report = await c.deid.GetDeidentificationReport(
            deid_pb2.GetDeidentificationReportRequest(slide_id=world.rejected_slide)
        )
    assert report.outcome == deid_pb2.DEID_OUTCOME_REJECTED
    assert report.HasField("quarantine_erased_at")
    assert report.quarantine_erasure_reason == "REJECTED"


async def test_malformed_events_are_dead_lettered(world: World) -> None:
    bus = KafkaBus(KAFKA, client_id="e2e-dlq")
    pub = bus.publisher()
    await pub.start()
    marker = uuid.uuid4().hex.encode()
    try:
        await pub.publish(TOPIC_SLIDE_RECEIVED, b"\xff\xfe garbage " + marker, key=marker)
    finally:
        await pub.stop()
    for service in ("deid", "metadata"):
        sub = bus.subscription(f"e2e-dlq-{uuid.uuid4().hex[:8]}", [dead_letter_topic(service)])
        await sub.start()
        found = None
        deadline = asyncio.get_running_loop().time() + 120
        try:
            while found is None and asyncio.get_running_loop().time() < deadline:
                for m in await sub.fetch(timeout_s=1.0, max_messages=1000):
                    if marker in m.value:
                        found = m
        finally:
            await sub.stop()
        assert found is not None, service
        assert found.header("dlq-reason") == b"MALFORMED_EVENT"
        assert found.header("dlq-source-topic") == TOPIC_SLIDE_RECEIVED.encode()


async def test_quarantine_is_not_readable_and_erased_after_deid(world: World) -> None:
    store = _store()
    for slide_id in world.slides.values():
        assert await store.stat(BUCKETS.quarantine, f"slides/{slide_id}") is None
    await asyncio.sleep(0)
