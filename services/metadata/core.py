"""The catalogue: a projection of every slide event into one document per slide.

Transport-free. Events of one slide arrive on different topics, so in any order; each event
is applied once (its id is remembered on the document) and the status only moves forward
(a rank decides), so redeliveries and reordering leave the same document.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict

from services.metadata.federation import Federation
from services.shared.access import AccessChecker, Action
from services.shared.auth import Principal
from services.shared.counts import to_entries
from services.shared.errors import (
    InvalidArgument,
    NotFound,
    PermanentEventError,
    PermissionDenied,
    check_slide_id,
)
from services.shared.events import (
    TOPIC_DATASET_CREATED,
    TOPIC_INFERENCE_COMPLETED,
    TOPIC_SLIDE_DEIDENTIFIED,
    TOPIC_SLIDE_HELD,
    TOPIC_SLIDE_RECEIVED,
    TOPIC_SLIDE_REJECTED,
    TOPIC_SLIDE_TILED,
)
from services.shared.ports.documents import Collection
from services.shared.pseudonym import Pseudonymizer
from tessera.events.v1 import events_pb2

# NEEDS_REVIEW lies between RECEIVED and DEIDENTIFIED (a held slide that is approved moves
# on; one that is rejected ends REJECTED); a status applies over any lower rank.
RANK = {
    "RECEIVED": 1,
    "NEEDS_REVIEW": 1.5,
    "DEIDENTIFIED": 2,
    "TILED": 3,
    "READY": 4,
    "REJECTED": 100,
}
# What a status needs before it is shown (REJECTED needs nothing: it ends the slide).
REQUIRES = {
    "RECEIVED": (),
    "NEEDS_REVIEW": ("RECEIVED",),
    "DEIDENTIFIED": ("RECEIVED",),
    "TILED": ("RECEIVED", "DEIDENTIFIED"),
    "READY": ("RECEIVED", "DEIDENTIFIED", "TILED"),
    "REJECTED": (),
}


def _furthest_complete(reached: set[Any]) -> str:
    """The highest-ranked reached status whose prerequisites were all reached ('' if none)."""
    complete = [s for s in reached if s in RANK and all(r in reached for r in REQUIRES[s])]
    return max(complete, key=RANK.__getitem__, default="")


def _known_before_or_equal(stored: Any, at: datetime, *, earlier: bool) -> bool:
    """True only when `stored` is a datetime that makes the conditional time update a no-op:
    for created_at (earlier=True) stored < at; for updated_at stored > at. Unknown types or
    equal times answer False, so the (conditional, atomic) update is sent."""
    if not isinstance(stored, datetime):
        return False
    if stored.tzinfo is None:
        stored = stored.replace(tzinfo=UTC)
    return stored < at if earlier else stored > at


MAX_PAGE = 200
MAX_OFFSET = 10_000_000
DEFAULT_PAGE = 50


def _dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, use_integers_for_enums=True)


@dataclass(frozen=True)
class SearchQuery:
    dataset_id: str = ""
    stain: str = ""
    organ: str = ""
    species: str = ""
    status: str = ""
    format: int = 0
    case_id: str = ""
    page_size: int = DEFAULT_PAGE
    page_token: str = ""
    include_federated: bool = False


@dataclass(frozen=True)
class SearchResult:
    slides: list[dict[str, Any]]
    next_page_token: str
    total_count: int


class Catalogue:
    def __init__(
        self,
        *,
        slides: Collection,
        datasets: Collection,
        access: AccessChecker,
        pseudonymizer: Pseudonymizer | None = None,
        site: str = "local",
        federation: Federation | None = None,
    ):
        self.site = site
        self._federation = federation
        self._slides = slides
        self._datasets = datasets
        self._access = access
        # With the node's key, a partner may search by its own case id: the query value is
        # pseudonymised exactly as ingestion pseudonymised the upload's metadata.
        self._pseudo = pseudonymizer

    async def ensure_indexes(self) -> None:
        for field in (
            "dataset_id",
            "clinical.stain",
            "clinical.organ",
            "clinical.species",
            "status",
            "clinical.case_id",
        ):
            await self._slides.ensure_index([(field, 1)])
        await self._slides.ensure_index([("created_at", 1)])
        if self._federation is not None:
            await self._federation.ensure_indexes()

    # -- projection -----------------------------------------------------------------------

    def handlers(self) -> Mapping[str, Any]:
        return {
            TOPIC_SLIDE_RECEIVED: self.on_event,
            TOPIC_SLIDE_DEIDENTIFIED: self.on_event,
            TOPIC_SLIDE_REJECTED: self.on_event,
            TOPIC_SLIDE_HELD: self.on_event,
            TOPIC_SLIDE_TILED: self.on_event,
            TOPIC_INFERENCE_COMPLETED: self.on_event,
            TOPIC_DATASET_CREATED: self.on_dataset,
        }

    async def on_dataset(self, env: events_pb2.EventEnvelope) -> None:
        p = env.dataset_created
        await self._datasets.update(
            {"_id": env.dataset_id},
            set_fields={"name": p.name, "description": p.description},
            set_on_insert={"created_at": env.occurred_at.ToDatetime(tzinfo=UTC)},
            upsert=True,
        )

    async def on_event(self, env: events_pb2.EventEnvelope) -> None:
        if not env.slide_id or len(env.slide_id) > 128 or not env.dataset_id:
            raise PermanentEventError("slide event without slide or dataset id", "MALFORMED_EVENT")
        kind = env.WhichOneof("payload")
        at = env.occurred_at.ToDatetime(tzinfo=UTC)
        fields: dict[str, Any] = {}
        push: dict[str, Any] = {}
        stage = ""
        reason = ""
        if kind == "slide_received":
            p = env.slide_received
            status, stage = "RECEIVED", "ingestion"
            fields = {
                "format": int(p.format),
                "size_bytes": int(p.size_bytes),
                "clinical": _dict(p.metadata),
                "received_at": at,
            }
        elif kind == "slide_deidentified":
            d = env.slide_deidentified
            status, stage = "DEIDENTIFIED", "deidentification"
            fields = {
                "format": int(d.format),
                "geometry": _dict(d.geometry),
                "deid": {
                    "removed": to_entries(d.summary.removed),
                    "pseudonymized": to_entries(d.summary.pseudonymized),
                    "levels_kept": d.summary.levels_kept,
                    "verified": d.summary.verified,
                },
                "deidentified_size_bytes": int(d.size_bytes),
            }
        elif kind == "slide_rejected":
            r = env.slide_rejected
            status, stage, reason = "REJECTED", r.stage, r.reason
            fields = {"rejection_reason": r.reason, "rejection_detail": r.detail}
        elif kind == "slide_held_for_review":
            h = env.slide_held_for_review
            status, stage, reason = "NEEDS_REVIEW", h.stage, h.reason
            # rule keys only ("tiff:40001"), never values
            fields = {"review_reason": h.reason, "review_detail": h.detail}
        elif kind == "slide_tiled":
            t = env.slide_tiled
            status, stage = "TILED", "tiling"
            fields = {"pyramid": _dict(t.pyramid)}
        elif kind == "inference_completed":
            status, stage = "READY", "serving"
            push = {"inference": _dict(env.inference_completed.result)}
        else:
            return
        slide_id = env.slide_id
        await self._slides.update(
            {"_id": slide_id},
            set_on_insert={
                "dataset_id": env.dataset_id,
                "created_at": at,
                "updated_at": at,
                "status": "",
                "status_rank": 0,
                "applied": [],
                "timeline": [],
            },
            upsert=True,
        )
        # Conditional updates are sent only when a read says they would apply: a conditional
        # update that matches nothing makes FerretDB scan the whole collection (measured:
        # ~100 ms at 1,000 slides, growing with the catalogue), while a read by _id is ~2 ms.
        # Skipping is exact, not a heuristic: a conditional update that would not match has
        # no effect, so it may be taken to have run at the moment of the read; when the read
        # says it would match, the update still carries its condition and stays atomic.
        before = await self._slides.get(slide_id) or {}
        if env.event_id not in before.get("applied", []):
            await self._slides.update(
                {"_id": slide_id, "applied": {"$ne": env.event_id}},
                set_fields=fields or None,
                push={
                    "timeline": {"status": status, "at": at, "stage": stage, "reason": reason},
                    **push,
                },
                add_to_set={"applied": env.event_id},
            )
        # The rest only moves forward, so it is safe to repeat: it runs for a redelivered
        # event too, which repairs a crash between the update above and these. Timestamps
        # are the earliest and latest event times, whatever order the events came in.
        # The status shown is the furthest stage whose earlier stages are all applied too:
        # events of different topics arrive in any order, and a reader who sees READY must
        # see the clinical fields, the format, the pyramid and the result. Each handler reads
        # after its own write, so of two racing handlers at least one sees both writes.
        doc = await self._slides.get(slide_id) or {}
        reached = {e.get("status") for e in doc.get("timeline", [])}
        shown = _furthest_complete(reached)
        if shown and float(doc.get("status_rank", 0)) <= RANK[shown] - 0.5:
            await self._slides.update(
                {"_id": slide_id, "status_rank": {"$lte": RANK[shown] - 0.5}},
                set_fields={"status": shown, "status_rank": RANK[shown]},
            )
        if not _known_before_or_equal(doc.get("created_at"), at, earlier=True):
            await self._slides.update(
                {"_id": slide_id, "created_at": {"$gte": at}}, set_fields={"created_at": at}
            )
        if not _known_before_or_equal(doc.get("updated_at"), at, earlier=False):
            await self._slides.update(
                {"_id": slide_id, "updated_at": {"$lte": at}}, set_fields={"updated_at": at}
            )
        # A READY slide's de-identified record goes to the federation peers. Repeated for a
        # redelivered or later event of a READY slide, which the fixed event id makes harmless
        # (and which repairs a crash before the first publication).
        if shown == "READY" and self._federation is not None and self._federation.publishes:
            latest = await self._slides.get(slide_id)
            if latest is not None:
                await self._federation.publish_ready(latest)

    # -- queries --------------------------------------------------------------------------

    async def get(self, caller: Principal, slide_id: str) -> dict[str, Any]:
        check_slide_id(slide_id)
        doc = await self._slides.get(slide_id)
        if doc is None:
            raise NotFound("slide not found", "SLIDE_NOT_FOUND")
        await self._access.require(
            caller.subject, Action.ACTION_READ_RECORD, doc["dataset_id"], f"slide/{slide_id}"
        )
        return {**doc, "site": self.site}

    async def search(self, caller: Principal, q: SearchQuery) -> SearchResult:
        page_size = q.page_size or DEFAULT_PAGE
        if not 1 <= page_size <= MAX_PAGE:
            raise InvalidArgument(f"page_size must be within 1..{MAX_PAGE}", "BAD_PAGE_SIZE")
        offset = _decode_token(q.page_token)
        permitted = await self._access.permitted_datasets(caller.subject, Action.ACTION_READ_RECORD)
        # Peers' records: to admins and to callers the node already admits to its catalogue
        # (a read grant on some local dataset). Peers' datasets are not in the local access
        # service, so no finer rule is possible here; the records identify no one.
        federated = (
            q.include_federated
            and self._federation is not None
            and (caller.is_admin or bool(permitted))
        )
        flt: dict[str, Any] = {}
        if q.dataset_id:
            if q.dataset_id not in permitted and federated:
                # maybe a peer's dataset: no local slides, no error (the denial is audited)
                await self._access.check(
                    caller.subject,
                    Action.ACTION_READ_RECORD,
                    q.dataset_id,
                    f"dataset/{q.dataset_id}/search",
                )
                flt["dataset_id"] = {"$in": []}
            elif q.dataset_id not in permitted:
                # Audited, but the answer is the same whether or not the dataset exists.
                await self._access.check(
                    caller.subject,
                    Action.ACTION_READ_RECORD,
                    q.dataset_id,
                    f"dataset/{q.dataset_id}/search",
                )
                raise PermissionDenied("no grant on this dataset", "NO_GRANT")
            else:
                flt["dataset_id"] = q.dataset_id
        else:
            flt["dataset_id"] = {"$in": permitted}
        case_id = q.case_id.strip()
        if case_id and self._pseudo is not None and not self._pseudo.is_pseudonym(case_id):
            case_id = self._pseudo.pseudonym("case", case_id)
        for key, value in (
            ("clinical.stain", q.stain),
            ("clinical.organ", q.organ),
            ("clinical.species", q.species),
            ("clinical.case_id", case_id),
        ):
            if value:
                flt[key] = value.strip().lower() if key != "clinical.case_id" else value
        if q.status:
            flt["status"] = q.status
        if q.format:
            flt["format"] = q.format
        total = await self._slides.count(flt)
        docs = [
            {**d, "site": self.site}
            for d in await self._slides.find(
                flt, sort=[("created_at", 1), ("_id", 1)], skip=offset, limit=page_size
            )
        ]
        if federated and self._federation is not None:
            # One result list: this node's matches first, then the peers'; one offset spans
            # both. Federated records have no case id, so a case-id search matches none.
            fed_flt = {k: v for k, v in flt.items() if k != "clinical.case_id"}
            if q.dataset_id:
                fed_flt["dataset_id"] = q.dataset_id
            else:
                fed_flt.pop("dataset_id", None)
            fed_total = 0 if case_id else await self._federation.count(fed_flt)
            room = page_size - len(docs)
            if room > 0 and fed_total:
                docs += [
                    {**d, "federated": True}
                    for d in await self._federation.find(
                        fed_flt, skip=max(0, offset - total), limit=room
                    )
                ]
            total += fed_total
        nxt = offset + len(docs)
        token = _encode_token(nxt) if nxt < total else ""
        return SearchResult(docs, token, total)


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _decode_token(token: str) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token.encode()).decode()
        offset = int(raw[2:]) if raw.startswith("o:") and len(raw) <= 14 else -1
    except (ValueError, binascii.Error, UnicodeDecodeError):
        offset = -1
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidArgument("malformed page_token", "BAD_PAGE_TOKEN")
    return offset
