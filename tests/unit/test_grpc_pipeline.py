"""ServerPipeline on a real in-process grpc.aio server: authentication, error mapping (unary,
stream-unary and unary-stream) and metrics, with real servicers over in-memory fakes."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.access.core import AccessControl
from services.access.servicer import AccessServicer
from services.ingestion.core import Ingestion, IngestionLimits
from services.ingestion.servicer import IngestionServicer
from services.shared.access import StaticAccessChecker
from services.shared.adapters.memory import (
    InMemoryBus,
    InMemoryDocumentStore,
    InMemoryObjectStore,
)
from services.shared.auth import TokenIssuer, TokenVerifier, generate_keypair
from services.shared.events import ALL_TOPICS, EventEmitter
from services.shared.grpc.client import open_channel
from services.shared.grpc.interceptors import REASON_KEY, ServerPipeline
from services.shared.outbox import Outbox
from services.shared.pseudonym import Pseudonymizer
from services.tiling.core import TilingStage
from services.tiling.servicer import TilingServicer
from tessera.access.v1 import access_pb2, access_pb2_grpc
from tessera.common.v1 import common_pb2
from tessera.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from tessera.tiling.v1 import tiling_pb2, tiling_pb2_grpc
from tests.unit.rpc_counts import served, served_at_least

SERVICE = "unit-pipeline"
SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"
Action = access_pb2.Action
INTERNAL_DETAILS = re.compile(r"^internal error \(reference [0-9a-f]{12}\)$")
SECRET_TEXT = "patient Jane Doe, file CASE-123.svs"

PRIVATE, PUBLIC = generate_keypair()
OTHER_PRIVATE, _ = generate_keypair()


def slide(rel: str) -> bytes:
    path = SLIDES / rel
    if not path.is_file():
        pytest.fail(f"sample slide missing: {path}")
    return path.read_bytes()


@dataclass
class Stack:
    target: str
    tokens: TokenIssuer
    access: AccessControl
    ingestion: Ingestion
    tiling: TilingStage
    objects: InMemoryObjectStore
    download_bytes: bytes

    def token(self, subject: str = "alice", roles: tuple[str, ...] = ()) -> str:
        return self.tokens.issue(subject, roles)

    def channel(self, subject: str = "alice", roles: tuple[str, ...] = ()) -> aio.Channel:
        tok = self.token(subject, roles)
        return open_channel(self.target, lambda: tok)

    def bare(self) -> aio.Channel:
        return aio.insecure_channel(self.target)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    docs = InMemoryDocumentStore()
    bus = InMemoryBus()
    await bus.ensure_topics(list(ALL_TOPICS))
    publisher = bus.publisher()
    await publisher.start()
    emitter = EventEmitter(SERVICE, publisher)
    objects = InMemoryObjectStore()
    checker = StaticAccessChecker(
        {("alice", "ds-1"): {Action.ACTION_UPLOAD, Action.ACTION_READ_PIXELS}}, {"ds-1"}
    )

    access = AccessControl(
        datasets=docs.collection("datasets"),
        grants=docs.collection("grants"),
        audit=docs.collection("audit"),
        outbox=Outbox(docs.collection("access_outbox"), emitter),
    )
    ingestion = Ingestion(
        spool_dir=tmp_path / "spool",
        uploads=docs.collection("uploads"),
        objects=objects,
        quarantine_bucket="quarantine",
        access=checker,
        outbox=Outbox(docs.collection("ingestion_outbox"), emitter),
        pseudonymizer=Pseudonymizer(b"k" * 32, "unit"),
        limits=IngestionLimits(),
    )
    await ingestion.ensure_ready()
    tiling = TilingStage(
        objects=objects,
        pyramids=docs.collection("pyramids"),
        outbox=Outbox(docs.collection("tiling_outbox"), emitter),
        access=checker,
        tiles_bucket="tiles",
        work_dir=tmp_path / "work",
    )
    # a de-identified file of 2.5 chunks, registered as tiled
    download = bytes(range(256)) * (5 * 1024 * 1024 // 256) + b"tail"
    await objects.ensure_bucket("deid")
    await objects.put_bytes("deid", "slides/s-1.svs", download)
    await docs.collection("pyramids").insert(
        {
            "_id": "s-1",
            "dataset_id": "ds-1",
            "state": "TILED",
            "source_bucket": "deid",
            "source_key": "slides/s-1.svs",
            "source_sha256": hashlib.sha256(download).hexdigest(),
            "extension": "svs",
        }
    )

    server = aio.server(
        interceptors=[ServerPipeline(SERVICE, TokenVerifier(PUBLIC, "tessera", "tessera"))]
    )
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    access_pb2_grpc.add_AccessServiceServicer_to_server(AccessServicer(access), server)
    ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(IngestionServicer(ingestion), server)
    tiling_pb2_grpc.add_TilingServiceServicer_to_server(
        TilingServicer(tiling, "http://127.0.0.1:1"), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    try:
        yield Stack(
            f"127.0.0.1:{port}",
            TokenIssuer(PRIVATE),
            access,
            ingestion,
            tiling,
            objects,
            download,
        )
    finally:
        await server.stop(None)
        await publisher.stop()


def trailer(err: aio.AioRpcError, key: str = REASON_KEY) -> str | None:
    for k, v in err.trailing_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


async def call_get_dataset(
    channel: aio.Channel, metadata: tuple[tuple[str, str], ...] | None = None
) -> access_pb2.GetDatasetResponse:
    async with channel:
        stub = access_pb2_grpc.AccessServiceStub(channel)
        return await stub.GetDataset(
            access_pb2.GetDatasetRequest(dataset_id="ds-x"), metadata=metadata, timeout=5
        )


# -- authentication -----------------------------------------------------------------------


async def test_missing_token_is_unauthenticated(stack: Stack) -> None:
    method = "/tessera.access.v1.AccessService/GetDataset"
    before = served(SERVICE, method, "UNAUTHENTICATED")
    with pytest.raises(aio.AioRpcError) as err:
        await call_get_dataset(stack.bare())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert trailer(err.value) == "TOKEN_MISSING"
    assert await served_at_least(SERVICE, method, "UNAUTHENTICATED", before + 1) == before + 1


def _tampered(token: str) -> str:
    head, payload, sig = token.split(".")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    return f"{head}.{payload}.{flipped}"


def _forged_payload(token: str) -> str:
    """The signature of one token over the claims of another (roles: admin)."""
    other = TokenIssuer(OTHER_PRIVATE).issue("alice", ["admin"])
    return ".".join([*other.split(".")[:2], token.split(".")[2]])


def _unsigned() -> str:
    return jwt.encode(
        {"sub": "alice", "iss": "tessera", "aud": "tessera", "iat": 1, "exp": 2**40},
        key=None,
        algorithm="none",
    )


BAD_HEADERS: list[Any] = [
    pytest.param(lambda t: f"Basic {t}", "TOKEN_INVALID", id="wrong-scheme"),
    pytest.param(lambda t: "Bearer ", "TOKEN_INVALID", id="empty-bearer"),
    pytest.param(lambda t: t, "TOKEN_INVALID", id="no-scheme"),
    pytest.param(lambda t: "Bearer not-a-jwt", "TOKEN_INVALID", id="garbage"),
    pytest.param(lambda t: f"Bearer {_tampered(t)}", "TOKEN_INVALID", id="tampered-signature"),
    pytest.param(lambda t: f"Bearer {_forged_payload(t)}", "TOKEN_INVALID", id="forged-claims"),
    pytest.param(
        lambda t: f"Bearer {TokenIssuer(OTHER_PRIVATE).issue('alice')}",
        "TOKEN_INVALID",
        id="other-key",
    ),
    pytest.param(
        lambda t: f"Bearer {TokenIssuer(PRIVATE, issuer='elsewhere').issue('alice')}",
        "TOKEN_INVALID",
        id="wrong-issuer",
    ),
    pytest.param(
        lambda t: f"Bearer {TokenIssuer(PRIVATE, audience='other-app').issue('alice')}",
        "TOKEN_INVALID",
        id="wrong-audience",
    ),
    pytest.param(
        lambda t: f"Bearer {TokenIssuer(PRIVATE).issue('alice', ttl_s=-60)}",
        "TOKEN_EXPIRED",
        id="expired",
    ),
    pytest.param(lambda t: f"Bearer {_unsigned()}", "TOKEN_INVALID", id="alg-none"),
]


@pytest.mark.parametrize(("make_header", "reason"), BAD_HEADERS)
async def test_bad_token_is_unauthenticated(stack: Stack, make_header: Any, reason: str) -> None:
    metadata = (("authorization", make_header(stack.token())),)
    with pytest.raises(aio.AioRpcError) as err:
        await call_get_dataset(stack.bare(), metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert trailer(err.value) == reason


async def test_token_is_accepted_and_the_caller_is_known(stack: Stack) -> None:
    async with stack.channel("root", ("admin",)) as ch:
        stub = access_pb2_grpc.AccessServiceStub(ch)
        resp = await stub.CreateDataset(
            access_pb2.CreateDatasetRequest(dataset_id="ds-new", name="New"), timeout=5
        )
    assert resp.dataset.created_by == "root"  # the principal came from the token


async def test_health_needs_no_token(stack: Stack) -> None:
    async with stack.bare() as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


# -- error mapping (unary) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "roles", "dataset_id", "code", "reason"),
    [
        ("alice", (), "ds-ok", grpc.StatusCode.PERMISSION_DENIED, "NOT_ADMIN"),
        ("root", ("admin",), "Bad_Id!", grpc.StatusCode.INVALID_ARGUMENT, "BAD_DATASET_ID"),
    ],
)
async def test_domain_error_maps_to_status_and_reason(
    stack: Stack, subject: str, roles: tuple[str, ...], dataset_id: str, code: Any, reason: str
) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        async with stack.channel(subject, roles) as ch:
            await access_pb2_grpc.AccessServiceStub(ch).CreateDataset(
                access_pb2.CreateDatasetRequest(dataset_id=dataset_id), timeout=5
            )
    assert err.value.code() == code
    assert trailer(err.value) == reason


async def test_not_found_and_already_exists(stack: Stack) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await call_get_dataset(stack.channel("root", ("admin",)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "dataset not found"
    assert trailer(err.value) == "DATASET_NOT_FOUND"

    async with stack.channel("root", ("admin",)) as ch:
        stub = access_pb2_grpc.AccessServiceStub(ch)
        await stub.CreateDataset(access_pb2.CreateDatasetRequest(dataset_id="ds-2"), timeout=5)
        with pytest.raises(aio.AioRpcError) as err2:
            await stub.CreateDataset(access_pb2.CreateDatasetRequest(dataset_id="ds-2"), timeout=5)
    assert err2.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert trailer(err2.value) == "DATASET_EXISTS"


async def test_unreachable_dependency_is_unavailable_without_its_text(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MongoDB or S3 down is not the caller's fault: UNAVAILABLE (retry), not INTERNAL."""
    from pymongo.errors import ServerSelectionTimeoutError

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ServerSelectionTimeoutError(SECRET_TEXT)

    monkeypatch.setattr(stack.access, "get_dataset", unreachable)
    method = "/tessera.access.v1.AccessService/GetDataset"
    before = served(SERVICE, method, "UNAVAILABLE")
    with pytest.raises(aio.AioRpcError) as err:
        await call_get_dataset(stack.channel())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert SECRET_TEXT not in (err.value.details() or "")
    assert trailer(err.value) == "DEPENDENCY_UNAVAILABLE"
    # the client's channel retries UNAVAILABLE a bounded number of times: each try is counted
    assert await served_at_least(SERVICE, method, "UNAVAILABLE", before + 1) >= before + 1


async def test_unexpected_exception_is_internal_without_its_text(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(SECRET_TEXT)

    monkeypatch.setattr(stack.access, "get_dataset", explode)
    method = "/tessera.access.v1.AccessService/GetDataset"
    before = served(SERVICE, method, "INTERNAL")
    with pytest.raises(aio.AioRpcError) as err:
        await call_get_dataset(stack.channel())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details() or ""
    assert INTERNAL_DETAILS.match(details), details
    assert trailer(err.value) == "INTERNAL"
    assert await served_at_least(SERVICE, method, "INTERNAL", before + 1) == before + 1
    # the log line carries the reference and the exception type, never its text
    ref = details.split("reference ")[1].rstrip(")")
    [record] = [r for r in caplog.records if r.getMessage() == "unhandled error in rpc"]
    assert record.__dict__["event_id"] == ref
    assert record.__dict__["reason"] == "RuntimeError"
    assert SECRET_TEXT not in caplog.text


# -- stream-unary: ingestion's UploadSlide ------------------------------------------------


def upload_requests(
    data: bytes, chunk: int = 1024, offsets: list[int] | None = None
) -> list[ingestion_pb2.UploadSlideRequest]:
    header = ingestion_pb2.UploadHeader(
        dataset_id="ds-1",
        filename="CASE-123.svs",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        metadata=common_pb2.ClinicalMetadata(stain="HE", case_id="CASE-123"),
    )
    reqs = [ingestion_pb2.UploadSlideRequest(header=header)]
    for off in offsets if offsets is not None else range(0, len(data), chunk):
        reqs.append(
            ingestion_pb2.UploadSlideRequest(
                chunk=ingestion_pb2.UploadChunk(offset=off, data=data[off : off + chunk])
            )
        )
    return reqs


async def _stream(reqs: list[ingestion_pb2.UploadSlideRequest]) -> AsyncIterator[Any]:
    for r in reqs:
        yield r


async def test_upload_stream_through_the_pipeline(stack: Stack) -> None:
    data = slide("aperio/small.svs")
    async with stack.channel() as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        resp = await stub.UploadSlide(_stream(upload_requests(data)), timeout=10)
        status = await stub.GetUploadStatus(
            ingestion_pb2.GetUploadStatusRequest(
                dataset_id="ds-1", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
            ),
            timeout=5,
        )
    assert resp.format == common_pb2.SLIDE_FORMAT_APERIO_SVS
    assert resp.size_bytes == len(data)
    assert not resp.duplicate
    assert status.state == ingestion_pb2.UPLOAD_STATE_COMPLETED
    assert status.slide_id == resp.slide_id
    assert await stack.objects.list_keys("quarantine") == [f"slides/{resp.slide_id}"]


async def test_upload_stream_without_token_is_unauthenticated(stack: Stack) -> None:
    data = slide("aperio/small.svs")
    async with stack.bare() as ch:
        with pytest.raises(aio.AioRpcError) as err:
            # the header alone: chunks written after the refusal would only race its status
            # in grpcio's client (grpc/grpc#36066; see services/cli/client.py)
            await ingestion_pb2_grpc.IngestionServiceStub(ch).UploadSlide(
                _stream(upload_requests(data)[:1]), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await stack.objects.list_keys("quarantine") == []


async def test_upload_stream_domain_error_keeps_its_reason(stack: Stack) -> None:
    data = slide("aperio/small.svs")
    async with stack.channel() as ch:
        with pytest.raises(aio.AioRpcError) as err:
            await ingestion_pb2_grpc.IngestionServiceStub(ch).UploadSlide(
                _stream(upload_requests(data, chunk=1000, offsets=[0, 2000])), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert trailer(err.value) == "OFFSET_GAP"
    assert "resume at 1000" in (err.value.details() or "")


async def test_upload_stream_needs_a_header_first(stack: Stack) -> None:
    data = slide("aperio/small.svs")
    async with stack.channel() as ch:
        with pytest.raises(aio.AioRpcError) as err:
            # a chunk, and no header
            await ingestion_pb2_grpc.IngestionServiceStub(ch).UploadSlide(
                _stream(upload_requests(data)[1:2]), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailer(err.value) == "NO_HEADER"


# -- unary-stream: tiling's DownloadSlide -------------------------------------------------


async def test_download_stream_through_the_pipeline(stack: Stack) -> None:
    async with stack.channel() as ch:
        stub = tiling_pb2_grpc.TilingServiceStub(ch)
        parts = [
            m async for m in stub.DownloadSlide(tiling_pb2.DownloadSlideRequest(slide_id="s-1"))
        ]
    assert len(parts) == 3
    assert parts[0].size_bytes == len(stack.download_bytes)
    assert parts[0].sha256 == hashlib.sha256(stack.download_bytes).hexdigest()
    assert parts[0].extension == "svs"
    assert [p.offset for p in parts] == [0, 2 * 1024 * 1024, 4 * 1024 * 1024]
    assert b"".join(p.data for p in parts) == stack.download_bytes


async def test_download_stream_without_token_is_unauthenticated(stack: Stack) -> None:
    async with stack.bare() as ch:
        call = tiling_pb2_grpc.TilingServiceStub(ch).DownloadSlide(
            tiling_pb2.DownloadSlideRequest(slide_id="s-1")
        )
        with pytest.raises(aio.AioRpcError) as err:
            _ = [m async for m in call]
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert trailer(err.value) == "TOKEN_MISSING"


@pytest.mark.parametrize(
    ("subject", "slide_id", "code", "reason"),
    [
        ("alice", "nope", grpc.StatusCode.NOT_FOUND, "NOT_TILED"),
        ("mallory", "s-1", grpc.StatusCode.PERMISSION_DENIED, "NO_GRANT"),
    ],
)
async def test_download_stream_domain_errors(
    stack: Stack, subject: str, slide_id: str, code: Any, reason: str
) -> None:
    async with stack.channel(subject) as ch:
        call = tiling_pb2_grpc.TilingServiceStub(ch).DownloadSlide(
            tiling_pb2.DownloadSlideRequest(slide_id=slide_id)
        )
        with pytest.raises(aio.AioRpcError) as err:
            _ = [m async for m in call]
    assert err.value.code() == code
    assert trailer(err.value) == reason


async def test_download_stream_failing_midway_is_internal_without_its_text(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = stack.objects.get_range
    calls = 0

    async def flaky(bucket: str, key: str, offset: int, length: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(SECRET_TEXT)
        return await original(bucket, key, offset, length)

    monkeypatch.setattr(stack.objects, "get_range", flaky)
    got: list[tiling_pb2.DownloadSlideResponse] = []
    async with stack.channel() as ch:
        call = tiling_pb2_grpc.TilingServiceStub(ch).DownloadSlide(
            tiling_pb2.DownloadSlideRequest(slide_id="s-1")
        )
        with pytest.raises(aio.AioRpcError) as err:
            async for m in call:
                got.append(m)
    assert len(got) == 1  # the first chunk arrived before the failure
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert INTERNAL_DETAILS.match(err.value.details() or "")
    assert trailer(err.value) == "INTERNAL"


@pytest.fixture(autouse=True)
def _slides_present() -> Iterator[None]:
    if not SLIDES.is_dir():
        pytest.fail(f"sample slides folder missing: {SLIDES}")
    yield
