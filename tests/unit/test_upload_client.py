"""`TesseraClient.upload` against servers with and without the upload handshake: a server
that never sends `tessera-upload-accepted` (one older than the handshake) still gets the whole
file once the client's wait for it is over."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc import aio

from services.cli import client as client_module
from services.cli.client import UPLOAD_ACCEPTED_KEY, TesseraClient
from tessera.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc


class Ingestion(ingestion_pb2_grpc.IngestionServiceServicer):
    """Takes any upload and records what arrived; says "accepted" only if `handshake`."""

    def __init__(self, handshake: bool) -> None:
        self.handshake = handshake
        self.received = b""

    async def GetUploadStatus(
        self, request: ingestion_pb2.GetUploadStatusRequest, context: aio.ServicerContext
    ) -> ingestion_pb2.GetUploadStatusResponse:
        return ingestion_pb2.GetUploadStatusResponse(state=ingestion_pb2.UPLOAD_STATE_NOT_STARTED)

    async def UploadSlide(
        self,
        request_iterator: AsyncIterator[ingestion_pb2.UploadSlideRequest],
        context: aio.ServicerContext,
    ) -> ingestion_pb2.UploadSlideResponse:
        requests = aiter(request_iterator)
        header = (await anext(requests)).header
        if self.handshake:
            await context.send_initial_metadata(((UPLOAD_ACCEPTED_KEY, "1"),))
        async for req in requests:
            self.received += req.chunk.data
        assert hashlib.sha256(self.received).hexdigest() == header.sha256
        return ingestion_pb2.UploadSlideResponse(slide_id="s-1", size_bytes=len(self.received))


async def _serve(servicer: Ingestion) -> tuple[aio.Server, str]:
    srv = aio.server()
    ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    return srv, f"127.0.0.1:{port}"


@pytest.mark.parametrize("handshake", [True, False])
async def test_the_whole_file_arrives_with_or_without_the_handshake(
    handshake: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "ACCEPT_WAIT_S", 0.5)
    data = bytes(range(256)) * (3 * 4096 + 7)  # three chunks and a bit
    path = tmp_path / "s.svs"
    path.write_bytes(data)
    servicer = Ingestion(handshake)
    srv, target = await _serve(servicer)
    try:
        async with TesseraClient("token", {"ingestion": target}) as c:
            out = await c.upload(path, "ds-1", max_attempts=1)
    finally:
        await srv.stop(None)
    assert out.slide_id == "s-1"
    assert servicer.received == data
