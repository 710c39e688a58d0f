"""Protobuf <-> domain conversion for access control."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from services.access.core import AuditRecord, Dataset, Grant
from tessera.access.v1 import access_pb2


def ts(dt: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(dt)
    return out


def dataset_to_proto(d: Dataset) -> access_pb2.Dataset:
    return access_pb2.Dataset(
        dataset_id=d.dataset_id,
        name=d.name,
        description=d.description,
        created_at=ts(d.created_at),
        created_by=d.created_by,
    )


def grant_to_proto(g: Grant) -> access_pb2.Grant:
    return access_pb2.Grant(
        grant_id=g.grant_id,
        dataset_id=g.dataset_id,
        subject=g.subject,
        role=g.role,  # type: ignore[arg-type]
        purpose=g.purpose,
        expires_at=ts(g.expires_at),
        granted_at=ts(g.granted_at),
        granted_by=g.granted_by,
    )


def audit_to_proto(a: AuditRecord) -> access_pb2.AuditRecord:
    return access_pb2.AuditRecord(
        decision_id=a.decision_id,
        at=ts(a.at),
        subject=a.subject,
        action=a.action,  # type: ignore[arg-type]
        dataset_id=a.dataset_id,
        resource=a.resource,
        allowed=a.allowed,
        reason=a.reason,
        requester=a.requester,
    )
