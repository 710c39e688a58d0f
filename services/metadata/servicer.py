"""gRPC servicer of the catalogue."""

from __future__ import annotations

from grpc import aio

from services.metadata.core import Catalogue, SearchQuery
from services.metadata.mapping import STATUS_NAME, slide_to_proto, to_proto
from services.shared.auth import current_principal
from tessera.metadata.v1 import metadata_pb2, metadata_pb2_grpc


class MetadataServicer(metadata_pb2_grpc.MetadataServiceServicer):
    def __init__(self, catalogue: Catalogue) -> None:
        self._cat = catalogue

    async def GetSlide(
        self, request: metadata_pb2.GetSlideRequest, context: aio.ServicerContext
    ) -> metadata_pb2.GetSlideResponse:
        doc = await self._cat.get(current_principal(), request.slide_id)
        return metadata_pb2.GetSlideResponse(slide=slide_to_proto(doc))

    async def SearchSlides(
        self, request: metadata_pb2.SearchSlidesRequest, context: aio.ServicerContext
    ) -> metadata_pb2.SearchSlidesResponse:
        q = SearchQuery(
            dataset_id=request.dataset_id,
            stain=request.stain,
            organ=request.organ,
            species=request.species,
            status=STATUS_NAME.get(request.status, ""),
            format=request.format,
            case_id=request.case_id,
            page_size=request.page_size,
            page_token=request.page_token,
            include_federated=request.include_federated,
        )
        result = await self._cat.search(current_principal(), q)
        return metadata_pb2.SearchSlidesResponse(
            slides=[to_proto(d) for d in result.slides],
            next_page_token=result.next_page_token,
            total_count=result.total_count,
        )
