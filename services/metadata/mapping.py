"""Catalogue documents -> protobuf."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import ParseDict
from google.protobuf.timestamp_pb2 import Timestamp

from services.shared.counts import from_entries
from tessera.common.v1 import common_pb2
from tessera.metadata.v1 import metadata_pb2

STATUS = {
    "RECEIVED": common_pb2.SLIDE_STATUS_RECEIVED,
    "DEIDENTIFIED": common_pb2.SLIDE_STATUS_DEIDENTIFIED,
    "TILED": common_pb2.SLIDE_STATUS_TILED,
    "READY": common_pb2.SLIDE_STATUS_READY,
    "REJECTED": common_pb2.SLIDE_STATUS_REJECTED,
    "NEEDS_REVIEW": common_pb2.SLIDE_STATUS_NEEDS_REVIEW,
}
STATUS_NAME = {v: k for k, v in STATUS.items()}


def _ts(value: Any) -> Timestamp:
    out = Timestamp()
    if isinstance(value, datetime):
        out.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return out


def slide_to_proto(doc: dict[str, Any]) -> metadata_pb2.Slide:
    s = metadata_pb2.Slide(
        slide_id=doc["_id"],
        dataset_id=doc.get("dataset_id", ""),
        format=doc.get("format", 0),
        status=STATUS.get(doc.get("status", ""), common_pb2.SLIDE_STATUS_UNSPECIFIED),
        size_bytes=int(doc.get("size_bytes", 0)),
        rejection_reason=doc.get("rejection_reason", ""),
        rejection_detail=doc.get("rejection_detail", ""),
        created_at=_ts(doc.get("created_at")),
        updated_at=_ts(doc.get("updated_at")),
        site=str(doc.get("site", "")),
    )
    for entry in sorted(doc.get("timeline", []), key=lambda e: (e["at"], e["status"])):
        s.timeline.append(
            metadata_pb2.StatusChange(
                status=STATUS.get(entry["status"], common_pb2.SLIDE_STATUS_UNSPECIFIED),
                at=_ts(entry["at"]),
                stage=entry.get("stage", ""),
                reason=entry.get("reason", ""),
            )
        )
    deid = doc.get("deid") or {}
    if deid:
        s.deid.removed.update(from_entries(deid.get("removed")))
        s.deid.pseudonymized.update(from_entries(deid.get("pseudonymized")))
        s.deid.levels_kept = int(deid.get("levels_kept", 0))
        s.deid.verified = bool(deid.get("verified", False))
    for field, msg in (("geometry", s.geometry), ("clinical", s.clinical), ("pyramid", s.pyramid)):
        if doc.get(field):
            ParseDict(doc[field], msg, ignore_unknown_fields=True)
    for result in doc.get("inference", []):
        ParseDict(result, s.inference.add(), ignore_unknown_fields=True)
    return s


def federated_to_proto(doc: dict[str, Any]) -> metadata_pb2.Slide:
    """A peer's de-identified record (see `federation.py`) as a catalogue slide."""
    s = metadata_pb2.Slide(
        slide_id=doc["slide_id"],
        dataset_id=doc.get("dataset_id", ""),
        site=doc.get("site", ""),
        format=doc.get("format", 0),
        status=STATUS.get(doc.get("status", ""), common_pb2.SLIDE_STATUS_UNSPECIFIED),
        created_at=_ts(doc.get("created_at")),
        updated_at=_ts(doc.get("updated_at")),
    )
    for field, msg in (("geometry", s.geometry), ("clinical", s.clinical)):
        if doc.get(field):
            ParseDict(doc[field], msg, ignore_unknown_fields=True)
    s.pyramid.level_count = int(doc.get("pyramid_level_count", 0))
    if "tissue_fraction" in doc:
        s.inference.add(tissue_fraction=float(doc["tissue_fraction"]))
    return s


def to_proto(doc: dict[str, Any]) -> metadata_pb2.Slide:
    return federated_to_proto(doc) if doc.get("federated") else slide_to_proto(doc)
