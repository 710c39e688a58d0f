"""gRPC servicer for ingestion: converts messages and delegates to `Ingestion`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from services.ingestion.core import Ingestion, UploadHeader
from services.shared.auth import current_principal
from services.shared.errors import InvalidArgument, ResourceExhausted
from tessera.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc

# Initial metadata sent once an upload's header is accepted: a client sends its chunks only
# after it (see the UploadSlide comment in ingestion.proto).
UPLOAD_ACCEPTED_KEY = "tessera-upload-accepted"

_STATES = {
    "NOT_STARTED": ingestion_pb2.UPLOAD_STATE_NOT_STARTED,
    "IN_PROGRESS": ingestion_pb2.UPLOAD_STATE_IN_PROGRESS,
    "COMPLETED": ingestion_pb2.UPLOAD_STATE_COMPLETED,
}


def header_from_proto(h: ingestion_pb2.UploadHeader) -> UploadHeader:
    md = h.metadata
    metadata = {
        "stain": md.stain,
        "organ": md.organ,
        "species": md.species,
        "case_id": md.case_id,
        "patient_id": md.patient_id,
        "specimen_id": md.specimen_id,
        "block_id": md.block_id,
    }
    return UploadHeader(
        dataset_id=h.dataset_id,
        filename=h.filename,
        size_bytes=h.size_bytes,
        sha256=h.sha256.lower(),
        metadata={k: v for k, v in metadata.items() if v},
    )


class IngestionServicer(ingestion_pb2_grpc.IngestionServiceServicer):
    def __init__(self, core: Ingestion, max_concurrent_uploads: int = 16) -> None:
        self._core = core
        self._slots = max_concurrent_uploads
        self._active = 0

    async def UploadSlide(
        self,
        request_iterator: AsyncIterator[ingestion_pb2.UploadSlideRequest],
        context: aio.ServicerContext,
    ) -> ingestion_pb2.UploadSlideResponse:
        if self._active >= self._slots:
            raise ResourceExhausted(
                "too many concurrent uploads; retry later", "BUSY", retry_after_s=2.0
            )
        self._active += 1
        try:
            return await self._upload(request_iterator, context)
        finally:
            self._active -= 1

    async def _upload(
        self,
        requests: AsyncIterator[ingestion_pb2.UploadSlideRequest],
        context: aio.ServicerContext,
    ) -> ingestion_pb2.UploadSlideResponse:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidArgument("the first message must be the upload header", "NO_HEADER")
        session = await self._core.begin(current_principal(), header_from_proto(first.header))
        lock = self._core.lock(session.upload_id)
        if lock.locked():
            raise ResourceExhausted(
                "this upload is already streaming", "UPLOAD_BUSY", retry_after_s=5.0
            )
        async with lock:
            await context.send_initial_metadata(((UPLOAD_ACCEPTED_KEY, "1"),))
            async for req in requests:
                if req.WhichOneof("kind") != "chunk":
                    raise InvalidArgument("only chunks may follow the header", "SECOND_HEADER")
                await self._core.write_chunk(session, req.chunk.offset, req.chunk.data)
            result = await self._core.finish(session)
        return ingestion_pb2.UploadSlideResponse(
            slide_id=result.slide_id,
            upload_id=result.upload_id,
            format=result.format,  # type: ignore[arg-type]
            size_bytes=result.size_bytes,
            duplicate=result.duplicate,
        )

    async def GetUploadStatus(
        self, request: ingestion_pb2.GetUploadStatusRequest, context: aio.ServicerContext
    ) -> ingestion_pb2.GetUploadStatusResponse:
        st = await self._core.status(
            current_principal(), request.dataset_id, request.sha256.lower(), request.size_bytes
        )
        return ingestion_pb2.GetUploadStatusResponse(
            upload_id=st.upload_id,
            state=_STATES[st.state],
            received_bytes=st.received_bytes,
            size_bytes=st.size_bytes,
            slide_id=st.slide_id,
        )
