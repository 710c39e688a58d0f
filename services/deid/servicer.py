"""gRPC servicer of de-identification: reports outcomes."""

from __future__ import annotations

from grpc import aio

from services.deid.core import DeidStage
from services.shared.auth import current_principal
from services.shared.errors import InvalidArgument
from tessera.common.v1 import common_pb2
from tessera.deid.v1 import deid_pb2, deid_pb2_grpc

_OUTCOMES = {
    "PENDING": deid_pb2.DEID_OUTCOME_PENDING,
    "DEIDENTIFIED": deid_pb2.DEID_OUTCOME_DEIDENTIFIED,
    "REJECTED": deid_pb2.DEID_OUTCOME_REJECTED,
}


class DeidServicer(deid_pb2_grpc.DeidentificationServiceServicer):
    def __init__(self, stage: DeidStage) -> None:
        self._stage = stage

    async def GetDeidentificationReport(
        self, request: deid_pb2.GetDeidentificationReportRequest, context: aio.ServicerContext
    ) -> deid_pb2.GetDeidentificationReportResponse:
        if not request.slide_id:
            raise InvalidArgument("slide_id is required", "MISSING_FIELD")
        view = await self._stage.report(current_principal(), request.slide_id)
        s = view.summary
        return deid_pb2.GetDeidentificationReportResponse(
            slide_id=view.slide_id,
            outcome=_OUTCOMES[view.outcome],
            summary=common_pb2.DeidSummary(
                removed=s.get("removed", {}),
                pseudonymized=s.get("pseudonymized", {}),
                levels_kept=s.get("levels_kept", 0),
                verified=s.get("verified", False),
            ),
            reason=view.reason,
            detail=view.detail,
        )
