"""The catalogue record of a slide, read from the metadata service with the caller's own token
(the viewer's side panel). The metadata service decides what the caller may see; tiling only
forwards the bearer token and converts the answer to JSON."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc import aio

from services.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TesseraError,
    Unauthenticated,
    Unavailable,
)
from services.shared.grpc.client import open_channel
from services.shared.grpc.interceptors import REASON_KEY
from tessera.metadata.v1 import metadata_pb2, metadata_pb2_grpc

_ERRORS: dict[grpc.StatusCode, type[TesseraError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


class CatalogueRecords:
    def __init__(self, target: str) -> None:
        if not target:
            raise ValueError("the metadata endpoint (TESSERA_ENDPOINTS__METADATA) is not set")
        self._channel: aio.Channel = open_channel(target)
        self._stub = metadata_pb2_grpc.MetadataServiceStub(self._channel)

    async def get(self, token: str, slide_id: str) -> dict[str, Any]:
        try:
            resp = await self._stub.GetSlide(
                metadata_pb2.GetSlideRequest(slide_id=slide_id),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
        except aio.AioRpcError as exc:
            cls = _ERRORS.get(exc.code())
            if cls is None:
                raise Unavailable("the catalogue is unavailable") from None
            reason = str(dict(exc.trailing_metadata() or ()).get(REASON_KEY, "")) or None
            raise cls(exc.details() or "refused by the catalogue", reason) from None
        return MessageToDict(resp.slide, preserving_proto_field_name=True)

    async def close(self) -> None:
        await self._channel.close()
