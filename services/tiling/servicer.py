"""gRPC servicer of tiling: converts messages and delegates to `TilingStage`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from services.shared.auth import current_principal
from services.tiling.core import TilingStage
from tessera.tiling.v1 import tiling_pb2, tiling_pb2_grpc


class TilingServicer(tiling_pb2_grpc.TilingServiceServicer):
    def __init__(self, stage: TilingStage, http_base_url: str) -> None:
        self._stage = stage
        self._http = http_base_url.rstrip("/")

    async def GetDeepZoomDescriptor(
        self, request: tiling_pb2.GetDeepZoomDescriptorRequest, context: aio.ServicerContext
    ) -> tiling_pb2.GetDeepZoomDescriptorResponse:
        view = await self._stage.descriptor(current_principal(), request.slide_id)
        g = view.geometry
        return tiling_pb2.GetDeepZoomDescriptorResponse(
            descriptor_xml=view.descriptor_xml,
            width=g.width,
            height=g.height,
            tile_size=g.tile_size,
            overlap=g.overlap,
            tile_format=g.format,
            level_count=g.level_count,
            http_url=f"{self._http}/slides/{view.slide_id}.dzi",
        )

    async def GetTile(
        self, request: tiling_pb2.GetTileRequest, context: aio.ServicerContext
    ) -> tiling_pb2.GetTileResponse:
        tile = await self._stage.tile(
            current_principal(), request.slide_id, request.level, request.col, request.row
        )
        return tiling_pb2.GetTileResponse(data=tile.data, content_type=tile.content_type)

    async def GetThumbnail(
        self, request: tiling_pb2.GetThumbnailRequest, context: aio.ServicerContext
    ) -> tiling_pb2.GetThumbnailResponse:
        t = await self._stage.thumbnail(current_principal(), request.slide_id)
        return tiling_pb2.GetThumbnailResponse(data=t.data, content_type=t.content_type)

    async def DownloadSlide(
        self, request: tiling_pb2.DownloadSlideRequest, context: aio.ServicerContext
    ) -> AsyncIterator[tiling_pb2.DownloadSlideResponse]:
        doc, chunks = await self._stage.download(current_principal(), request.slide_id)
        first = True
        async for offset, data in chunks:
            msg = tiling_pb2.DownloadSlideResponse(offset=offset, data=data)
            if first:
                msg.size_bytes = doc["size"]
                msg.sha256 = doc["source_sha256"]
                msg.extension = doc["extension"]
                first = False
            yield msg
