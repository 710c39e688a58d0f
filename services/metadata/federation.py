"""Federation of the catalogue: de-identified records of READY slides, exchanged with peers.

A node publishes one `FederatedSlide` per READY slide on its own federation topic (through its
outbox, with a deterministic event id) and keeps the records its peers publish in a separate
collection, one document per (site, slide id). Only non-identifying fields travel: the ids a
node pseudonymised (case, patient, specimen, block) are keyed per node and would link nothing
across sites, so they are left out, as are bucket names, object keys and pixels.

Transport-free: the outbox and the collection are handed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from google.protobuf.json_format import MessageToDict, ParseDict

from services.shared.errors import PermanentEventError
from services.shared.events import (
    FEDERATION_PAYLOAD,
    Handler,
    event_id_for,
    federation_topic_site,
    new_envelope,
)
from services.shared.ports.documents import Collection
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2

# The stage name in the deterministic event id of a slide's federated record.
STAGE = "federation/catalogue"


class EventSink(Protocol):
    async def publish(self, topic: str, envelope: events_pb2.EventEnvelope) -> bool: ...


def _ts(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def record_of(doc: Mapping[str, Any], site: str) -> events_pb2.FederatedSlide:
    """The federated record of a catalogue document: an allow-list of fields, nothing else."""
    clinical = doc.get("clinical") or {}
    rec = events_pb2.FederatedSlide(
        site=site,
        slide_id=str(doc["_id"]),
        dataset_id=str(doc.get("dataset_id", "")),
        format=common_pb2.SlideFormat.ValueType(int(doc.get("format", 0))),
        status=common_pb2.SLIDE_STATUS_READY,
        stain=str(clinical.get("stain", "")),
        organ=str(clinical.get("organ", "")),
        species=str(clinical.get("species", "")),
        pyramid_level_count=int((doc.get("pyramid") or {}).get("level_count", 0)),
    )
    if doc.get("geometry"):
        ParseDict(doc["geometry"], rec.geometry, ignore_unknown_fields=True)
    results = doc.get("inference") or []
    if results:
        rec.tissue_fraction = float(results[-1].get("tissue_fraction", 0.0))
    if (created := _ts(doc.get("created_at"))) is not None:
        rec.created_at.FromDatetime(created)
    if (ready := _ts(doc.get("updated_at"))) is not None:
        rec.ready_at.FromDatetime(ready)
    return rec


@dataclass(frozen=True)
class FederationConfig:
    site: str
    publish_topic: str = ""
    subscribe_topics: Sequence[str] = ()


class Federation:
    """Publishes this node's READY records and keeps its peers' records."""

    def __init__(
        self, config: FederationConfig, *, records: Collection, outbox: EventSink | None
    ) -> None:
        for topic in (config.publish_topic, *config.subscribe_topics):
            if topic and federation_topic_site(topic) is None:
                raise ValueError(f"not a federation topic: {topic}")
        if config.publish_topic and federation_topic_site(config.publish_topic) != config.site:
            raise ValueError("the publish topic must name this node's site")
        if config.publish_topic and outbox is None:
            raise ValueError("publishing federated records needs an outbox")
        self.site = config.site
        self._config = config
        self._records = records
        self._outbox = outbox

    @property
    def publishes(self) -> bool:
        return bool(self._config.publish_topic)

    async def ensure_indexes(self) -> None:
        for field in ("site", "dataset_id", "stain", "organ", "species"):
            await self._records.ensure_index([(field, 1)])
        await self._records.ensure_index([("created_at", 1)])

    # -- publishing -----------------------------------------------------------------------

    async def publish_ready(self, doc: Mapping[str, Any]) -> None:
        """Announce a READY slide. Safe to repeat: the event id is fixed per slide, so the
        outbox skips what the broker already acknowledged and peers apply it once."""
        if not self.publishes or self._outbox is None or doc.get("status") != "READY":
            return
        rec = record_of(doc, self.site)
        env = new_envelope(
            payload_field=FEDERATION_PAYLOAD,
            payload=rec,
            slide_id=rec.slide_id,
            dataset_id=rec.dataset_id,
            event_id=event_id_for(rec.slide_id, STAGE),
        )
        await self._outbox.publish(self._config.publish_topic, env)

    # -- consuming ------------------------------------------------------------------------

    def handlers(self) -> Mapping[str, Handler]:
        """One handler per peer topic; each accepts only records of that topic's site."""

        def bind(site: str) -> Handler:
            async def handle(env: events_pb2.EventEnvelope) -> None:
                await self.on_record(site, env)

            return handle

        out: dict[str, Handler] = {}
        for topic in self._config.subscribe_topics:
            site = federation_topic_site(topic)
            if site is not None and site != self.site:
                out[topic] = bind(site)
        return out

    async def on_record(self, topic_site: str, env: events_pb2.EventEnvelope) -> None:
        rec = env.federated_slide
        if rec.site != topic_site:
            raise PermanentEventError("record of another site on this topic", "SITE_MISMATCH")
        if not rec.slide_id or len(rec.slide_id) > 128 or not rec.dataset_id:
            raise PermanentEventError("record without slide or dataset id", "MALFORMED_EVENT")
        if len(rec.dataset_id) > 128 or rec.status != common_pb2.SLIDE_STATUS_READY:
            raise PermanentEventError("record is not a READY slide", "MALFORMED_EVENT")
        fields: dict[str, Any] = {
            "site": rec.site,
            "slide_id": rec.slide_id,
            "dataset_id": rec.dataset_id,
            "format": int(rec.format),
            "status": "READY",
            # stored as the local catalogue stores them, so the same filters match
            "clinical": {
                k: v
                for k, v in (
                    ("stain", rec.stain.strip().lower()),
                    ("organ", rec.organ.strip().lower()),
                    ("species", rec.species.strip().lower()),
                )
                if v
            },
            "geometry": MessageToDict(rec.geometry, preserving_proto_field_name=True),
            "pyramid_level_count": int(rec.pyramid_level_count),
            "created_at": rec.created_at.ToDatetime(tzinfo=UTC),
            "updated_at": rec.ready_at.ToDatetime(tzinfo=UTC),
            "event_id": env.event_id,
        }
        if rec.HasField("tissue_fraction"):
            fields["tissue_fraction"] = rec.tissue_fraction
        # Keyed by (site, slide id): a redelivery rewrites the same values.
        await self._records.update(
            {"_id": f"{rec.site}/{rec.slide_id}"}, set_fields=fields, upsert=True
        )

    # -- queries --------------------------------------------------------------------------

    async def count(self, flt: Mapping[str, Any]) -> int:
        return await self._records.count(dict(flt))

    async def find(self, flt: Mapping[str, Any], *, skip: int, limit: int) -> list[dict[str, Any]]:
        return await self._records.find(
            dict(flt), sort=[("created_at", 1), ("_id", 1)], skip=skip, limit=limit
        )
