"""An async client of the Tessera gRPC APIs, as partner systems use them. The `tessera`
command, the demo and the end-to-end tests all go through it."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from grpc import StatusCode, aio

from services.shared.digest import file_sha256
from services.shared.grpc.client import open_channel
from tessera.access.v1 import access_pb2, access_pb2_grpc
from tessera.common.v1 import common_pb2
from tessera.deid.v1 import deid_pb2_grpc
from tessera.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from tessera.metadata.v1 import metadata_pb2, metadata_pb2_grpc
from tessera.serving.v1 import serving_pb2_grpc
from tessera.tiling.v1 import tiling_pb2, tiling_pb2_grpc

DEFAULT_PORTS = {
    "access": 50051,
    "ingestion": 50052,
    "deid": 50053,
    "tiling": 50054,
    "metadata": 50055,
    "serving": 50056,
}
CHUNK = 1024 * 1024
TERMINAL = {common_pb2.SLIDE_STATUS_READY, common_pb2.SLIDE_STATUS_REJECTED}
# Where waiting stops: a final status, or a slide held for a data steward's review.
SETTLED: frozenset[int] = frozenset(TERMINAL | {common_pb2.SLIDE_STATUS_NEEDS_REVIEW})


def endpoint(name: str) -> str:
    return os.environ.get(f"TESSERA_ENDPOINT_{name.upper()}", f"127.0.0.1:{DEFAULT_PORTS[name]}")


@dataclass(frozen=True)
class UploadOutcome:
    slide_id: str
    upload_id: str
    format: int
    duplicate: bool
    attempts: int


def retry_after_s(exc: aio.AioRpcError) -> float | None:
    """The server's wait hint on RESOURCE_EXHAUSTED (`tessera-retry-after-s` trailer)."""
    for key, value in exc.trailing_metadata() or ():
        if key == "tessera-retry-after-s":
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return None
    return None


class TesseraClient:
    """`endpoints` overrides the service addresses (default: `TESSERA_ENDPOINT_<NAME>` or the
    local stack's ports), e.g. for a second stack beside the first one."""

    def __init__(self, token: str, endpoints: Mapping[str, str] | None = None) -> None:
        self._token = token
        self._endpoints = dict(endpoints or {})
        self._channels: dict[str, aio.Channel] = {}

    def _ch(self, name: str) -> aio.Channel:
        if name not in self._channels:
            address = self._endpoints.get(name) or endpoint(name)
            self._channels[name] = open_channel(address, lambda: self._token)
        return self._channels[name]

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()

    async def __aenter__(self) -> TesseraClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def access(self) -> access_pb2_grpc.AccessServiceStub:
        return access_pb2_grpc.AccessServiceStub(self._ch("access"))

    @property
    def ingestion(self) -> ingestion_pb2_grpc.IngestionServiceStub:
        return ingestion_pb2_grpc.IngestionServiceStub(self._ch("ingestion"))

    @property
    def deid(self) -> deid_pb2_grpc.DeidentificationServiceStub:
        return deid_pb2_grpc.DeidentificationServiceStub(self._ch("deid"))

    @property
    def metadata(self) -> metadata_pb2_grpc.MetadataServiceStub:
        return metadata_pb2_grpc.MetadataServiceStub(self._ch("metadata"))

    @property
    def tiling(self) -> tiling_pb2_grpc.TilingServiceStub:
        return tiling_pb2_grpc.TilingServiceStub(self._ch("tiling"))

    @property
    def serving(self) -> serving_pb2_grpc.SlideInferenceServiceStub:
        return serving_pb2_grpc.SlideInferenceServiceStub(self._ch("serving"))

    def channel(self, name: str) -> aio.Channel:
        return self._ch(name)

    # -- access ---------------------------------------------------------------------------

    async def create_dataset(self, dataset_id: str, name: str = "", description: str = "") -> None:
        await self.access.CreateDataset(
            access_pb2.CreateDatasetRequest(
                dataset_id=dataset_id, name=name, description=description
            )
        )

    async def grant(
        self, dataset_id: str, subject: str, role: int, days: float = 30, purpose: str = ""
    ) -> access_pb2.Grant:
        req = access_pb2.GrantRoleRequest(
            dataset_id=dataset_id,
            subject=subject,
            role=role,  # type: ignore[arg-type]
            purpose=purpose,
        )
        req.expires_at.FromDatetime(datetime.now(UTC) + timedelta(days=days))
        return (await self.access.GrantRole(req)).grant

    # -- upload ---------------------------------------------------------------------------

    async def upload(
        self,
        path: Path,
        dataset_id: str,
        metadata: common_pb2.ClinicalMetadata | None = None,
        *,
        max_attempts: int = 5,
        sha256: str | None = None,
    ) -> UploadOutcome:
        """Stream a file; on a dropped connection ask how much arrived and resume there."""
        size = (await asyncio.to_thread(path.stat)).st_size
        digest = sha256 if sha256 else (await asyncio.to_thread(file_sha256, path))[0]
        header = ingestion_pb2.UploadHeader(
            dataset_id=dataset_id,
            filename=path.name,
            size_bytes=size,
            sha256=digest,
            metadata=metadata or common_pb2.ClinicalMetadata(),
        )
        attempt = 0
        while True:
            attempt += 1
            st = await self.ingestion.GetUploadStatus(
                ingestion_pb2.GetUploadStatusRequest(
                    dataset_id=dataset_id, sha256=digest, size_bytes=size
                )
            )
            start = st.received_bytes if st.state == ingestion_pb2.UPLOAD_STATE_IN_PROGRESS else 0
            try:
                resp = await _upload_once(self.ingestion, header, path, start)
            except aio.AioRpcError as exc:
                if attempt >= max_attempts:
                    raise
                if exc.code() == StatusCode.RESOURCE_EXHAUSTED:
                    hint = retry_after_s(exc)
                    if hint is None:
                        raise
                    await asyncio.sleep(min(30.0, hint))  # the server said when to come back
                    continue
                if exc.code() in (
                    StatusCode.UNAVAILABLE,
                    StatusCode.CANCELLED,
                    StatusCode.DEADLINE_EXCEEDED,
                ) or status_lost(exc):
                    await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
                    continue
                raise
            return UploadOutcome(
                resp.slide_id, resp.upload_id, resp.format, resp.duplicate, attempt
            )

    async def wait(
        self, slide_id: str, timeout_s: float = 300, until: frozenset[int] = SETTLED
    ) -> metadata_pb2.Slide:
        """Poll the catalogue until the slide is READY or REJECTED, or held for review
        (NEEDS_REVIEW: it waits on a person)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        last: metadata_pb2.Slide | None = None
        while True:
            try:
                resp = await self.metadata.GetSlide(metadata_pb2.GetSlideRequest(slide_id=slide_id))
                last = resp.slide
                if last.status in until:
                    return last
            except aio.AioRpcError as exc:
                if exc.code() != StatusCode.NOT_FOUND:
                    raise
            if asyncio.get_running_loop().time() > deadline:
                if last is None:
                    raise TimeoutError(f"slide {slide_id} never reached the catalogue")
                return last
            await asyncio.sleep(0.5)

    async def fetch(self, slide_id: str, out: Path) -> tuple[int, str]:
        """Download the de-identified slide; verifies the sha256 announced by the server."""
        h = hashlib.sha256()
        expected, size = "", 0
        # Written beside the target and renamed at the end: a failed download never
        # truncates or half-writes an existing file.
        partial = out.with_name(f".{out.name}.part")
        try:
            with partial.open("wb") as fh:
                async for msg in self.tiling.DownloadSlide(
                    tiling_pb2.DownloadSlideRequest(slide_id=slide_id)
                ):
                    if msg.sha256:
                        expected = msg.sha256
                    fh.write(msg.data)
                    h.update(msg.data)
                    size += len(msg.data)
            if expected and h.hexdigest() != expected:
                raise ValueError("downloaded bytes do not match the announced sha256")
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        return size, h.hexdigest()


# Sent by the server as initial metadata once it has accepted an upload's header.
UPLOAD_ACCEPTED_KEY = "tessera-upload-accepted"
# How long a client waits for that before it sends its chunks anyway (a server that never
# says, one older than the handshake, is then uploaded to as before).
ACCEPT_WAIT_S = 30.0


async def _upload_once(
    stub: ingestion_pb2_grpc.IngestionServiceStub,
    header: ingestion_pb2.UploadHeader,
    path: Path,
    start: int,
) -> ingestion_pb2.UploadSlideResponse:
    """One UploadSlide call: the header, then the chunks only once the server has accepted it.

    A server that refuses an upload (busy, no grant, bad header) ends the call at once. A
    chunk the client writes after that fails locally, and grpcio's asyncio client then
    reports INTERNAL "Internal error from Core" in place of the server's status
    (grpc/grpc#36066). Waiting for the server's acceptance keeps refusals reported as sent.
    """

    async def accepted() -> bool:
        try:
            # shielded: giving up the wait must not cancel the call
            md = await asyncio.wait_for(asyncio.shield(call.initial_metadata()), ACCEPT_WAIT_S)
        except TimeoutError:
            return True
        return any(key == UPLOAD_ACCEPTED_KEY for key, _ in md or ())

    call = stub.UploadSlide(_requests(header, path, start, accepted))
    return await call


def status_lost(exc: aio.AioRpcError) -> bool:
    """The call failed inside grpcio's own write path, so the server's status is unknown
    (grpc/grpc#36066: a server ending the call while chunks are still being sent)."""
    return exc.code() == StatusCode.INTERNAL and exc.details() == "Internal error from Core"


async def _requests(
    header: ingestion_pb2.UploadHeader,
    path: Path,
    start: int,
    accepted: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[ingestion_pb2.UploadSlideRequest]:
    yield ingestion_pb2.UploadSlideRequest(header=header)
    if accepted is not None and not await accepted():
        return  # the server refused the header; its status ends the call
    offset = start
    with path.open("rb") as fh:
        fh.seek(start)
        while True:
            data = await asyncio.to_thread(fh.read, CHUNK)
            if not data:
                break
            yield ingestion_pb2.UploadSlideRequest(
                chunk=ingestion_pb2.UploadChunk(offset=offset, data=data)
            )
            offset += len(data)
