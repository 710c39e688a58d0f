"""gRPC servicer of de-identification: outcomes, reviews by data stewards, dataset policies.
Thin: converts messages and delegates to `DeidStage`."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from services.deid.core import DatasetPolicy, DeidStage, HeldSlide, JobView
from services.deid.engine import ReviewItem
from services.shared.auth import current_principal
from services.shared.errors import InvalidArgument
from tessera.common.v1 import common_pb2
from tessera.deid.v1 import deid_pb2, deid_pb2_grpc

_OUTCOMES = {
    "PENDING": deid_pb2.DEID_OUTCOME_PENDING,
    "DEIDENTIFIED": deid_pb2.DEID_OUTCOME_DEIDENTIFIED,
    "REJECTED": deid_pb2.DEID_OUTCOME_REJECTED,
    "NEEDS_REVIEW": deid_pb2.DEID_OUTCOME_NEEDS_REVIEW,
}
_ACTIONS = {deid_pb2.RULE_ACTION_REMOVE: "REMOVE", deid_pb2.RULE_ACTION_KEEP: "KEEP"}
_ACTION_PROTO = {v: k for k, v in _ACTIONS.items()}
_MACRO = {
    deid_pb2.MACRO_POLICY_REMOVE: "REMOVE",
    deid_pb2.MACRO_POLICY_KEEP_LABEL_BLANKED: "KEEP_LABEL_BLANKED",
}
_MACRO_PROTO = {v: k for k, v in _MACRO.items()}
_DATES = {deid_pb2.DATE_POLICY_REMOVE: "REMOVE", deid_pb2.DATE_POLICY_YEAR_ONLY: "YEAR_ONLY"}
_DATES_PROTO = {v: k for k, v in _DATES.items()}


def _ts(dt: datetime | None) -> Timestamp | None:
    if dt is None:
        return None
    out = Timestamp()
    out.FromDatetime(dt if dt.tzinfo else dt.replace(tzinfo=UTC))
    return out


def _items(items: tuple[ReviewItem, ...]) -> list[deid_pb2.ReviewItem]:
    return [deid_pb2.ReviewItem(key=i.key, reason=i.reason, where=i.where) for i in items]


def _policy(p: DatasetPolicy) -> deid_pb2.DatasetPolicy:
    return deid_pb2.DatasetPolicy(
        dataset_id=p.dataset_id,
        macro=_MACRO_PROTO.get(p.macro, deid_pb2.MACRO_POLICY_UNSPECIFIED),
        dates=_DATES_PROTO.get(p.dates, deid_pb2.DATE_POLICY_UNSPECIFIED),
        quarantine_retention_hours=p.retention_hours,
        rules=[
            deid_pb2.ApprovedRule(
                key=r.key,
                action=_ACTION_PROTO.get(r.action, deid_pb2.RULE_ACTION_UNSPECIFIED),
                approved_by=r.approved_by,
                approved_at=_ts(r.approved_at),
                slide_id=r.slide_id,
            )
            for r in p.rules
        ],
        updated_at=_ts(p.updated_at),
        updated_by=p.updated_by,
    )


def _review(h: HeldSlide) -> deid_pb2.Review:
    return deid_pb2.Review(
        slide_id=h.slide_id,
        dataset_id=h.dataset_id,
        reason=h.reason,
        detail=h.detail,
        items=_items(h.items),
        held_at=_ts(h.held_at),
        round=h.round,
    )


def _require(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required", "MISSING_FIELD")
    return value


class DeidServicer(deid_pb2_grpc.DeidentificationServiceServicer):
    def __init__(self, stage: DeidStage) -> None:
        self._stage = stage

    async def GetDeidentificationReport(
        self, request: deid_pb2.GetDeidentificationReportRequest, context: aio.ServicerContext
    ) -> deid_pb2.GetDeidentificationReportResponse:
        view: JobView = await self._stage.report(
            current_principal(), _require(request.slide_id, "slide_id")
        )
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
            review_items=_items(view.review_items),
            quarantine_erased_at=_ts(view.quarantine_erased_at),
            quarantine_erasure_reason=view.quarantine_erasure_reason,
            quarantine_erase_after=_ts(view.quarantine_erase_after),
        )

    async def ListReviews(
        self, request: deid_pb2.ListReviewsRequest, context: aio.ServicerContext
    ) -> deid_pb2.ListReviewsResponse:
        held = await self._stage.list_reviews(
            current_principal(), request.dataset_id, request.page_size
        )
        return deid_pb2.ListReviewsResponse(reviews=[_review(h) for h in held])

    async def ApproveSlide(
        self, request: deid_pb2.ApproveSlideRequest, context: aio.ServicerContext
    ) -> deid_pb2.ApproveSlideResponse:
        rules = []
        for r in request.rules:
            if r.action not in _ACTIONS:
                raise InvalidArgument("a rule's action is REMOVE or KEEP", "BAD_RULE_ACTION")
            rules.append((r.key, _ACTIONS[r.action]))
        view = await self._stage.approve(
            current_principal(), _require(request.slide_id, "slide_id"), rules
        )
        return deid_pb2.ApproveSlideResponse(
            slide_id=view.slide_id,
            outcome=_OUTCOMES[view.outcome],
            reason=view.reason,
            detail=view.detail,
            review_items=_items(view.review_items),
        )

    async def RejectSlide(
        self, request: deid_pb2.RejectSlideRequest, context: aio.ServicerContext
    ) -> deid_pb2.RejectSlideResponse:
        view = await self._stage.reject_review(
            current_principal(), _require(request.slide_id, "slide_id")
        )
        return deid_pb2.RejectSlideResponse(
            slide_id=view.slide_id, quarantine_erased_at=_ts(view.quarantine_erased_at)
        )

    async def GetDatasetPolicy(
        self, request: deid_pb2.GetDatasetPolicyRequest, context: aio.ServicerContext
    ) -> deid_pb2.GetDatasetPolicyResponse:
        p = await self._stage.get_policy(current_principal(), request.dataset_id)
        return deid_pb2.GetDatasetPolicyResponse(policy=_policy(p))

    async def SetDatasetPolicy(
        self, request: deid_pb2.SetDatasetPolicyRequest, context: aio.ServicerContext
    ) -> deid_pb2.SetDatasetPolicyResponse:
        p = await self._stage.set_policy(
            current_principal(),
            request.dataset_id,
            macro=_MACRO.get(request.macro, ""),
            dates=_DATES.get(request.dates, ""),
            retention_hours=(
                request.quarantine_retention_hours
                if request.HasField("quarantine_retention_hours")
                else None
            ),
        )
        return deid_pb2.SetDatasetPolicyResponse(policy=_policy(p))
