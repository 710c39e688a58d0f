"""Uploads beyond the ingestion service's capacity: RESOURCE_EXHAUSTED with a wait hint, and a
client that honours the hint gets through once a slot is free."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc import StatusCode, aio

from services.cli.client import TesseraClient, retry_after_s
from services.ingestion.admission import DEID_GROUP, Admission
from services.ingestion.core import Ingestion, IngestionLimits, UploadHeader
from services.ingestion.servicer import IngestionServicer
from services.shared.access import Action, StaticAccessChecker
from services.shared.adapters.memory import InMemoryBus, InMemoryDocumentStore, InMemoryObjectStore
from services.shared.auth import Principal, TokenIssuer, TokenVerifier, generate_keypair
from services.shared.errors import ResourceExhausted
from services.shared.events import ALL_TOPICS, TOPIC_SLIDE_RECEIVED, EventEmitter
from services.shared.grpc.client import open_channel
from services.shared.grpc.interceptors import REASON_KEY, RETRY_AFTER_KEY, ServerPipeline
from services.shared.outbox import Outbox
from services.shared.ports.bus import Publisher
from services.shared.pseudonym import Pseudonymizer
from tessera.common.v1 import common_pb2
from tessera.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from tests.unit.rpc_counts import served, served_at_least

SLIDE = Path(__file__).resolve().parents[2].parent / "shared" / "slides" / "aperio" / "small.svs"
PRIVATE, PUBLIC = generate_keypair()


async def make_ingestion(
    tmp_path: Path, admission: Admission | None = None, bus: InMemoryBus | None = None
) -> tuple[Ingestion, InMemoryBus, Publisher, InMemoryDocumentStore]:
    """Ingestion over in-memory fakes; alice may upload to ds-1."""
    docs = InMemoryDocumentStore()
    bus = bus or InMemoryBus()
    await bus.ensure_topics(list(ALL_TOPICS))
    publisher = bus.publisher()
    await publisher.start()
    ingestion = Ingestion(
        spool_dir=tmp_path / "spool",
        uploads=docs.collection("uploads"),
        objects=InMemoryObjectStore(),
        quarantine_bucket="quarantine",
        access=StaticAccessChecker({("alice", "ds-1"): {Action.ACTION_UPLOAD}}, {"ds-1"}),
        outbox=Outbox(docs.collection("outbox"), EventEmitter("unit", publisher)),
        pseudonymizer=Pseudonymizer(b"k" * 32, "unit"),
        limits=IngestionLimits(),
        admission=admission,
    )
    await ingestion.ensure_ready()
    return ingestion, bus, publisher, docs


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[str]:
    ingestion, _, publisher, _ = await make_ingestion(tmp_path)
    srv = aio.server(
        interceptors=[ServerPipeline("unit", TokenVerifier(PUBLIC, "tessera", "tessera"))]
    )
    ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(
        IngestionServicer(ingestion, max_concurrent_uploads=1), srv
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await srv.stop(None)
        await publisher.stop()


def header(data: bytes) -> ingestion_pb2.UploadSlideRequest:
    return ingestion_pb2.UploadSlideRequest(
        header=ingestion_pb2.UploadHeader(
            dataset_id="ds-1",
            filename="x.svs",
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            metadata=common_pb2.ClinicalMetadata(stain="H&E"),
        )
    )


async def test_upload_beyond_capacity_is_refused_with_a_wait_hint(server: str) -> None:
    token = TokenIssuer(PRIVATE).issue("alice", [])
    data = SLIDE.read_bytes()
    release = asyncio.Event()

    async def slow() -> AsyncIterator[ingestion_pb2.UploadSlideRequest]:
        yield header(data)
        await release.wait()  # holds the only upload slot

    async with open_channel(server, lambda: token) as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        held = stub.UploadSlide(slow(), timeout=30)
        await asyncio.wait_for(held.initial_metadata(), 10)  # accepted: the slot is taken

        async def one() -> AsyncIterator[ingestion_pb2.UploadSlideRequest]:
            yield header(data)

        before = busy_refusals()
        with pytest.raises(aio.AioRpcError) as err:
            await stub.UploadSlide(one(), timeout=10)
        assert err.value.code() == StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(err.value.trailing_metadata() or ())
        assert trailers[REASON_KEY] == "BUSY"
        assert float(trailers[RETRY_AFTER_KEY]) > 0
        assert retry_after_s(err.value) == float(trailers[RETRY_AFTER_KEY])

        # a client that honours the hint gets in once the slot is free: the slot is freed
        # only after the server has refused the client once more (the server counts a call
        # just after its status is sent: first wait for the refusal above to be counted)
        refused = await served_at_least("unit", UPLOAD, "RESOURCE_EXHAUSTED", before + 1)
        assert refused >= before + 1, "the server never counted the refusal"

        async def free_after_a_refusal() -> None:
            while busy_refusals() <= refused:
                await asyncio.sleep(0.02)
            release.set()
            held.cancel()

        freer = asyncio.create_task(free_after_a_refusal())
        async with TesseraClient(token, {"ingestion": server}) as client:
            out = await client.upload(SLIDE, "ds-1", common_pb2.ClinicalMetadata(stain="H&E"))
        await freer
        assert out.attempts >= 2
        assert out.slide_id


UPLOAD = "/tessera.ingestion.v1.IngestionService/UploadSlide"


def busy_refusals() -> float:
    """UploadSlide calls the unit server answered RESOURCE_EXHAUSTED."""
    return served("unit", UPLOAD, "RESOURCE_EXHAUSTED")


# -- admission: new uploads wait while de-identification is behind --------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_new_uploads_are_refused_while_deid_is_behind_and_resumes_go_on(
    tmp_path: Path,
) -> None:
    clock = Clock()
    bus = InMemoryBus()
    admission = Admission(bus, max_backlog=2, refresh_s=5.0, retry_after_s=7.0, clock=clock)
    ingestion, bus, publisher, docs = await make_ingestion(tmp_path, admission, bus)
    alice = Principal("alice")
    data = SLIDE.read_bytes()

    def header_for(i: int) -> UploadHeader:
        body = data + bytes([i])  # distinct checksums: distinct uploads
        return UploadHeader(
            dataset_id="ds-1",
            filename="x.svs",
            size_bytes=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            metadata={"stain": "H&E"},
        )

    # one upload begun before de-identification fell behind
    started = await ingestion.begin(alice, header_for(0))
    for i in range(3):  # three received slides nobody has de-identified yet
        await publisher.publish(TOPIC_SLIDE_RECEIVED, b"x", key=b"s%d" % i)
    clock.t += 5.0
    with pytest.raises(ResourceExhausted) as err:
        await ingestion.begin(alice, header_for(1))
    assert err.value.reason == "PIPELINE_BACKLOG" and err.value.retry_after_s == 7.0
    assert (
        await docs.collection("uploads").get(
            ingestion.upload_id_for("alice", "ds-1", header_for(1).sha256, header_for(1).size_bytes)
        )
        is None
    )  # nothing half-registered
    # resuming the upload already begun is not new work: it goes on
    again = await ingestion.begin(alice, header_for(0))
    assert again.upload_id == started.upload_id
    # de-identification catches up (commits): new uploads are admitted again
    sub = bus.subscription(DEID_GROUP, [TOPIC_SLIDE_RECEIVED])
    await sub.start()
    for m in await sub.fetch(timeout_s=0.2):
        await sub.commit(m)
    await sub.stop()
    clock.t += 5.0
    assert (await ingestion.begin(alice, header_for(1))).upload_id
    await publisher.stop()


async def test_a_refused_upload_reports_the_servers_status_not_a_lost_write(
    server: str, tmp_path: Path
) -> None:
    """The server refuses at the header while the client has megabytes of chunks to send:
    the client must see the refusal as sent (BUSY with its hint, or no grant), every time,
    never grpcio's INTERNAL for a chunk written after the call ended."""
    big = tmp_path / "big.svs"
    big.write_bytes(bytes(range(256)) * (16 * 4096))  # 16 MiB: 16 chunks
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    alice = TokenIssuer(PRIVATE).issue("alice", [])
    bob = TokenIssuer(PRIVATE).issue("bob", [])
    release = asyncio.Event()

    async def slow() -> AsyncIterator[ingestion_pb2.UploadSlideRequest]:
        yield header(SLIDE.read_bytes())
        await release.wait()

    async with TesseraClient(bob, {"ingestion": server}) as client:  # no grant, a free slot
        for _ in range(40):
            with pytest.raises(aio.AioRpcError) as err:
                await client.upload(big, "ds-1", max_attempts=1, sha256=digest)
            assert err.value.code() == StatusCode.PERMISSION_DENIED

    async with open_channel(server, lambda: alice) as ch:
        held = ingestion_pb2_grpc.IngestionServiceStub(ch).UploadSlide(slow(), timeout=60)
        await asyncio.wait_for(held.initial_metadata(), 10)  # accepted: the slot is taken
        async with TesseraClient(alice, {"ingestion": server}) as client:
            for _ in range(40):
                with pytest.raises(aio.AioRpcError) as err:
                    await client.upload(big, "ds-1", max_attempts=1, sha256=digest)
                assert err.value.code() == StatusCode.RESOURCE_EXHAUSTED
                assert retry_after_s(err.value) is not None
        release.set()
        held.cancel()
