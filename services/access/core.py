"""Access control: datasets, grants and decisions. Transport-free."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.shared.auth import Principal
from services.shared.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from services.shared.events import (
    TOPIC_AUDIT,
    TOPIC_DATASET_CREATED,
    event_id_for,
    new_envelope,
)
from services.shared.outbox import Outbox
from services.shared.ports.documents import Collection, DuplicateKey
from tessera.access.v1.access_pb2 import Action, Role
from tessera.events.v1 import events_pb2

DATASET_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")

ROLE_ACTIONS: dict[int, frozenset[int]] = {
    Role.ROLE_DATA_STEWARD: frozenset(
        {
            Action.ACTION_READ_RECORD,
            Action.ACTION_READ_PIXELS,
            Action.ACTION_UPLOAD,
            Action.ACTION_INFER,
            Action.ACTION_MANAGE,
            Action.ACTION_REVIEW,
        }
    ),
    Role.ROLE_RESEARCHER: frozenset({Action.ACTION_READ_RECORD, Action.ACTION_READ_PIXELS}),
    Role.ROLE_AI_DEVELOPER: frozenset(
        {Action.ACTION_READ_RECORD, Action.ACTION_READ_PIXELS, Action.ACTION_INFER}
    ),
    Role.ROLE_PATHOLOGIST: frozenset({Action.ACTION_READ_RECORD, Action.ACTION_READ_PIXELS}),
    Role.ROLE_OPERATOR: frozenset({Action.ACTION_READ_RECORD}),
    Role.ROLE_CONTRIBUTOR: frozenset({Action.ACTION_UPLOAD, Action.ACTION_READ_RECORD}),
}
STEWARD_TERM = timedelta(days=3650)
MAX_GRANT_TERM = timedelta(days=5 * 365)


@dataclass(frozen=True)
class Dataset:
    dataset_id: str
    name: str
    description: str
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class Grant:
    grant_id: str
    dataset_id: str
    subject: str
    role: int
    purpose: str
    expires_at: datetime
    granted_at: datetime
    granted_by: str


@dataclass(frozen=True)
class Decision:
    decision_id: str
    allowed: bool
    reason: str


@dataclass(frozen=True)
class AuditRecord:
    decision_id: str
    at: datetime
    subject: str
    action: int
    dataset_id: str
    resource: str
    allowed: bool
    reason: str
    requester: str


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class AccessControl:
    def __init__(
        self,
        *,
        datasets: Collection,
        grants: Collection,
        audit: Collection,
        outbox: Outbox,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._datasets = datasets
        self._grants = grants
        self._audit = audit
        self._outbox = outbox
        self._now = clock

    async def ensure_indexes(self) -> None:
        await self._grants.ensure_index([("dataset_id", 1), ("subject", 1)])
        await self._grants.ensure_index([("subject", 1)])
        await self._audit.ensure_index([("subject", 1)])
        await self._audit.ensure_index([("resource", 1)])

    # -- datasets -------------------------------------------------------------------------

    async def create_dataset(
        self, caller: Principal, dataset_id: str, name: str, description: str
    ) -> Dataset:
        if not caller.is_admin:
            raise PermissionDenied("only a node administrator may create datasets", "NOT_ADMIN")
        if not DATASET_ID.fullmatch(dataset_id):
            raise InvalidArgument(
                "dataset_id must be 3-63 lower-case letters, digits or dashes", "BAD_DATASET_ID"
            )
        if len(name) > 200 or len(description) > 2000:
            raise InvalidArgument("name or description too long", "FIELD_TOO_LONG")
        now = self._now()
        doc = {
            "_id": dataset_id,
            "name": name or dataset_id,
            "description": description,
            "created_at": now,
            "created_by": caller.subject,
        }
        try:
            await self._datasets.insert(doc)
        except DuplicateKey:
            existing = await self._datasets.get(dataset_id)
            if existing is not None and existing["created_by"] == caller.subject:
                # A retry after a crash between the insert and the rest: finish the job.
                await self._complete_creation(existing)
            raise AlreadyExists("dataset already exists", "DATASET_EXISTS") from None
        await self._complete_creation(doc)
        return self._dataset(doc)

    async def _complete_creation(self, doc: dict[str, Any]) -> None:
        """Steward grant and announcement of a new dataset; safe to repeat."""
        dataset_id, creator = str(doc["_id"]), str(doc["created_by"])
        stewards = await self._grants.find(
            {"dataset_id": dataset_id, "subject": creator, "role": int(Role.ROLE_DATA_STEWARD)}
        )
        if not stewards:
            await self._insert_grant(
                dataset_id,
                creator,
                Role.ROLE_DATA_STEWARD,
                "dataset stewardship",
                _aware(doc["created_at"]) + STEWARD_TERM,
                creator,
            )
        env = new_envelope(
            payload_field="dataset_created",
            payload=events_pb2.DatasetCreated(
                name=str(doc["name"]), description=str(doc["description"])
            ),
            dataset_id=dataset_id,
            event_id=event_id_for(dataset_id, "dataset-created"),
        )
        await self._outbox.publish(TOPIC_DATASET_CREATED, env)

    async def get_dataset(self, caller: Principal, dataset_id: str) -> Dataset:
        doc = await self._datasets.get(dataset_id)
        if doc is None:
            raise NotFound("dataset not found", "DATASET_NOT_FOUND")
        if not caller.is_admin and not caller.is_service:
            decision = await self.check(
                caller,
                caller.subject,
                Action.ACTION_READ_RECORD,
                dataset_id,
                f"dataset/{dataset_id}",
            )
            if not decision.allowed:
                raise PermissionDenied("no grant on this dataset", decision.reason)
        return self._dataset(doc)

    # -- grants ---------------------------------------------------------------------------

    async def grant(
        self,
        caller: Principal,
        dataset_id: str,
        subject: str,
        role: int,
        purpose: str,
        expires_at: datetime | None,
    ) -> Grant:
        await self._require_manage(caller, dataset_id)
        if not SUBJECT.fullmatch(subject):
            raise InvalidArgument("subject is not a valid identifier", "BAD_SUBJECT")
        if role not in ROLE_ACTIONS:
            raise InvalidArgument("role must be set", "BAD_ROLE")
        if expires_at is None:
            raise InvalidArgument("expires_at is required", "EXPIRY_REQUIRED")
        expires_at = _aware(expires_at)
        if expires_at <= self._now():
            raise InvalidArgument("expires_at must be in the future", "EXPIRY_IN_PAST")
        if expires_at > self._now() + MAX_GRANT_TERM:
            raise InvalidArgument(
                f"grants last at most {MAX_GRANT_TERM.days} days", "EXPIRY_TOO_FAR"
            )
        if len(purpose) > 500:
            raise InvalidArgument("purpose too long", "FIELD_TOO_LONG")
        return await self._insert_grant(
            dataset_id, subject, role, purpose, expires_at, caller.subject
        )

    async def revoke(self, caller: Principal, dataset_id: str, subject: str, role: int) -> int:
        await self._require_manage(caller, dataset_id)
        flt: dict[str, object] = {"dataset_id": dataset_id, "subject": subject}
        if role:
            flt["role"] = int(role)
        return await self._grants.delete(flt)

    async def list_grants(self, caller: Principal, dataset_id: str, subject: str) -> list[Grant]:
        if dataset_id:
            await self._require_manage(caller, dataset_id)
        elif not caller.is_admin and subject != caller.subject:
            raise PermissionDenied("may only list own grants", "NOT_ADMIN")
        flt: dict[str, object] = {}
        if dataset_id:
            flt["dataset_id"] = dataset_id
        if subject:
            flt["subject"] = subject
        docs = await self._grants.find(flt, sort=[("granted_at", 1)], limit=1000)
        return [self._grant(d) for d in docs]

    # -- decisions ------------------------------------------------------------------------

    async def check(
        self,
        requester: Principal,
        subject: str,
        action: int,
        dataset_id: str,
        resource: str,
        purpose: str = "",
    ) -> Decision:
        if not requester.is_service and not requester.is_admin and subject != requester.subject:
            raise PermissionDenied("may only check own permissions", "NOT_SERVICE")
        if action not in Action.values() or action == Action.ACTION_UNSPECIFIED:
            raise InvalidArgument("action must be set", "BAD_ACTION")
        if not subject or not dataset_id:
            raise InvalidArgument("subject and dataset_id are required", "MISSING_FIELD")
        allowed, reason = await self._decide(subject, action, dataset_id)
        decision = Decision(uuid.uuid4().hex, allowed, reason)
        await self._record(requester, subject, action, dataset_id, resource, purpose, decision)
        return decision

    async def permitted_datasets(
        self, requester: Principal, subject: str, action: int
    ) -> list[str]:
        if not requester.is_service and not requester.is_admin and subject != requester.subject:
            raise PermissionDenied("may only list own permissions", "NOT_SERVICE")
        now = self._now()
        out: set[str] = set()
        for g in await self._grants.find({"subject": subject}, limit=10000):
            if _aware(g["expires_at"]) > now and action in ROLE_ACTIONS.get(g["role"], ()):
                out.add(g["dataset_id"])
        decision = Decision(uuid.uuid4().hex, True, "LISTED")
        await self._record(requester, subject, action, "*", "datasets", "", decision)
        return sorted(out)

    async def list_audit(
        self, caller: Principal, subject: str, dataset_id: str, resource: str, limit: int
    ) -> list[AuditRecord]:
        if dataset_id:
            if not caller.is_admin:
                await self._require_manage(caller, dataset_id)
        elif not caller.is_admin:
            raise PermissionDenied(
                "only administrators list audit records across datasets", "NOT_ADMIN"
            )
        flt: dict[str, object] = {}
        for key, value in (
            ("subject", subject),
            ("dataset_id", dataset_id),
            ("resource", resource),
        ):
            if value:
                flt[key] = value
        docs = await self._audit.find(flt, sort=[("at", -1)], limit=max(1, min(limit or 100, 1000)))
        return [
            AuditRecord(
                d["_id"],
                _aware(d["at"]),
                d["subject"],
                d["action"],
                d["dataset_id"],
                d["resource"],
                d["allowed"],
                d["reason"],
                d["requester"],
            )
            for d in docs
        ]

    # -- internals ------------------------------------------------------------------------

    async def _decide(self, subject: str, action: int, dataset_id: str) -> tuple[bool, str]:
        if await self._datasets.get(dataset_id) is None:
            return False, "DATASET_NOT_FOUND"
        grants = await self._grants.find({"dataset_id": dataset_id, "subject": subject})
        if not grants:
            return False, "NO_GRANT"
        now = self._now()
        live = [g for g in grants if _aware(g["expires_at"]) > now]
        if not live:
            return False, "GRANT_EXPIRED"
        if any(action in ROLE_ACTIONS.get(g["role"], ()) for g in live):
            return True, "GRANTED"
        return False, "ROLE_LACKS_ACTION"

    async def _require_manage(self, caller: Principal, dataset_id: str) -> None:
        if await self._datasets.get(dataset_id) is None:
            raise NotFound("dataset not found", "DATASET_NOT_FOUND")
        if caller.is_admin:
            return
        decision = await self.check(
            caller, caller.subject, Action.ACTION_MANAGE, dataset_id, f"dataset/{dataset_id}"
        )
        if not decision.allowed:
            raise PermissionDenied("managing grants needs the data steward role", decision.reason)

    async def _insert_grant(
        self,
        dataset_id: str,
        subject: str,
        role: int,
        purpose: str,
        expires_at: datetime,
        granted_by: str,
    ) -> Grant:
        doc = {
            "_id": uuid.uuid4().hex,
            "dataset_id": dataset_id,
            "subject": subject,
            "role": int(role),
            "purpose": purpose,
            "expires_at": expires_at,
            "granted_at": self._now(),
            "granted_by": granted_by,
        }
        await self._grants.insert(doc)
        return self._grant(doc)

    async def _record(
        self,
        requester: Principal,
        subject: str,
        action: int,
        dataset_id: str,
        resource: str,
        purpose: str,
        decision: Decision,
    ) -> None:
        now = self._now()
        await self._audit.insert(
            {
                "_id": decision.decision_id,
                "at": now,
                "subject": subject,
                "action": int(action),
                "dataset_id": dataset_id,
                "resource": resource[:300],
                "allowed": decision.allowed,
                "reason": decision.reason,
                "purpose": purpose[:200],
                "requester": requester.subject,
            }
        )
        env = new_envelope(
            payload_field="access_decided",
            payload=events_pb2.AccessDecided(
                decision_id=decision.decision_id,
                subject=subject,
                action=Action.Name(action),  # type: ignore[arg-type]
                resource=resource[:300],
                allowed=decision.allowed,
                reason=decision.reason,
                purpose=purpose[:200],
            ),
            dataset_id=dataset_id if dataset_id != "*" else "",
            event_id=decision.decision_id,
        )
        # The decision never waits on the bus: the audit record above is durable, and the
        # outbox publishes the event within seconds (also after a broker outage).
        await self._outbox.enqueue(TOPIC_AUDIT, env)

    @staticmethod
    def _dataset(doc: dict[str, Any]) -> Dataset:
        return Dataset(
            str(doc["_id"]),
            str(doc["name"]),
            str(doc["description"]),
            _aware(doc["created_at"]),
            str(doc["created_by"]),
        )

    @staticmethod
    def _grant(doc: dict[str, Any]) -> Grant:
        return Grant(
            str(doc["_id"]),
            str(doc["dataset_id"]),
            str(doc["subject"]),
            int(doc["role"]),
            str(doc["purpose"]),
            _aware(doc["expires_at"]),
            _aware(doc["granted_at"]),
            str(doc["granted_by"]),
        )
