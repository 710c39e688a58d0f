"""The client span of a client-streaming call (`open_channel`'s own stream-unary tracing):
the call is handed back at once, so the server's initial metadata is visible while the
requests are still being sent, and the span carries the trace to the server and ends with
the call's status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from grpc import StatusCode, aio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.shared.grpc.client import open_channel
from tessera.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc

METHOD = "/tessera.ingestion.v1.IngestionService/UploadSlide"


class Echo(ingestion_pb2_grpc.IngestionServiceServicer):
    """Says "go on" after the first message, counts the rest; refuses dataset "no"."""

    def __init__(self) -> None:
        self.traceparents: list[str] = []

    async def UploadSlide(
        self,
        request_iterator: AsyncIterator[ingestion_pb2.UploadSlideRequest],
        context: aio.ServicerContext,
    ) -> ingestion_pb2.UploadSlideResponse:
        md = dict(context.invocation_metadata() or ())
        self.traceparents.append(str(md.get("traceparent", "")))
        first = await anext(aiter(request_iterator))
        if first.header.dataset_id == "no":
            await context.abort(StatusCode.PERMISSION_DENIED, "no grant")
        await context.send_initial_metadata((("go-on", "1"),))
        n = 0
        async for _ in request_iterator:
            n += 1
        return ingestion_pb2.UploadSlideResponse(slide_id=str(n))


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, Echo]]:
    servicer = Echo()
    srv = aio.server()
    ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await srv.stop(None)


async def finished(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    """The call's client spans, once ended (that happens in a task after the call is done)."""
    for _ in range(500):
        done = [s for s in spans.get_finished_spans() if s.name == METHOD]
        if done:
            return done
        await asyncio.sleep(0.01)
    return []


def _request(dataset: str = "ds") -> ingestion_pb2.UploadSlideRequest:
    return ingestion_pb2.UploadSlideRequest(header=ingestion_pb2.UploadHeader(dataset_id=dataset))


async def test_initial_metadata_is_seen_while_requests_are_still_sent(
    echo: tuple[str, Echo], spans: InMemorySpanExporter
) -> None:
    target, servicer = echo
    seen: list[tuple[str, str]] = []

    async with open_channel(target, lambda: "token") as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)

        async def requests() -> AsyncIterator[ingestion_pb2.UploadSlideRequest]:
            yield _request()
            # With OpenTelemetry's stock interceptor this wait never ended: it hands the
            # call back only once the whole RPC is over.
            md = await asyncio.wait_for(call.initial_metadata(), 5)
            seen.extend((str(k), str(v)) for k, v in md or ())
            for i in range(3):
                yield ingestion_pb2.UploadSlideRequest(chunk=ingestion_pb2.UploadChunk(offset=i))

        call = stub.UploadSlide(requests())
        resp = await asyncio.wait_for(call, 10)

    assert resp.slide_id == "3"
    assert ("go-on", "1") in seen
    (span,) = await finished(spans)
    assert span.kind == SpanKind.CLIENT
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == StatusCode.OK.value[0]
    assert span.attributes["rpc.service"] == "tessera.ingestion.v1.IngestionService"
    assert span.attributes["rpc.method"] == "UploadSlide"
    ctx = span.get_span_context()
    assert ctx is not None
    (sent,) = servicer.traceparents
    assert sent.startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")


async def test_a_refused_call_ends_its_span_as_an_error(
    echo: tuple[str, Echo], spans: InMemorySpanExporter
) -> None:
    target, _ = echo

    async def requests() -> AsyncIterator[ingestion_pb2.UploadSlideRequest]:
        yield _request("no")

    async with open_channel(target, lambda: "token") as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.UploadSlide(requests(), timeout=10)
    assert err.value.code() == StatusCode.PERMISSION_DENIED
    (span,) = await finished(spans)
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == StatusCode.PERMISSION_DENIED.value[0]
    assert not span.status.is_ok
