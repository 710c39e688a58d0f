"""Transactional-outbox-style publishing without transactions.

A service that changes state and must announce it writes the envelope to its outbox
collection (keyed by the deterministic event id), then publishes and marks it sent. If the
bus is down, or the process dies in between, `flush` (run periodically in the background and
at start-up) publishes what is left. Consumers dedupe on event id, so a second publication
of the same event is harmless: at-least-once delivery, effectively-once effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from opentelemetry import context as otel_context

from services.shared import telemetry
from services.shared.errors import Unavailable
from services.shared.events import EventEmitter, check_topic
from services.shared.ports.documents import Collection, DuplicateKey
from tessera.events.v1 import events_pb2

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, collection: Collection, emitter: EventEmitter) -> None:
        self._col = collection
        self._emitter = emitter
        self._stopping = asyncio.Event()

    async def enqueue(self, topic: str, envelope: events_pb2.EventEnvelope) -> None:
        """Record only; the background flush publishes within its interval. For events whose
        producer must not wait on the bus (audit records of access decisions)."""
        check_topic(topic, envelope)
        with contextlib.suppress(DuplicateKey):
            await self._col.insert(
                {
                    "_id": envelope.event_id,
                    "topic": topic,
                    "envelope": envelope.SerializeToString(),
                    "sent": False,
                    "trace_context": telemetry.inject_headers(),
                }
            )

    async def publish(self, topic: str, envelope: events_pb2.EventEnvelope) -> bool:
        """Record then publish. True when the broker acknowledged; False when it is queued."""
        # Refuse a wrong envelope before recording it: a record that can never be emitted
        # would fail every later flush.
        check_topic(topic, envelope)
        try:
            await self._col.insert(
                {
                    "_id": envelope.event_id,
                    "topic": topic,
                    "envelope": envelope.SerializeToString(),
                    "sent": False,
                    # the caller's trace, so a later flush continues it
                    "trace_context": telemetry.inject_headers(),
                }
            )
        except DuplicateKey:
            existing = await self._col.get(envelope.event_id)
            if existing is not None and existing.get("sent"):
                return True  # the broker already acknowledged this very event
        try:
            await self._emitter.emit(topic, envelope)
        except Unavailable:
            log.warning("bus unavailable; event left in outbox", extra={"topic": topic})
            return False
        await self._col.update(
            {"_id": envelope.event_id}, set_fields={"sent": True, "sent_at": _now()}
        )
        return True

    async def flush(self) -> int:
        sent = 0
        for doc in await self._col.find({"sent": False}, limit=500):
            env = events_pb2.EventEnvelope()
            env.ParseFromString(bytes(doc["envelope"]))
            token = otel_context.attach(telemetry.extract_context(doc.get("trace_context") or {}))
            try:
                await self._emitter.emit(doc["topic"], env)
            except Unavailable:
                break
            finally:
                otel_context.detach(token)
            await self._col.update(
                {"_id": doc["_id"]}, set_fields={"sent": True, "sent_at": _now()}
            )
            sent += 1
        return sent

    async def purge(self, older_than: timedelta) -> int:
        """Forget acknowledged events older than `older_than`. Until then a re-announcement
        of the same event is recognised and skipped; after it, consumers' own dedupe on the
        event id still applies, so purging never duplicates an effect."""
        return await self._col.delete({"sent": True, "sent_at": {"$lte": _now() - older_than}})

    async def run(self, interval_s: float = 2.0, retention: timedelta = timedelta(days=7)) -> None:
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                await self.flush()
                if loop.time() - last_purge > 3600:
                    await self.purge(retention)
                    last_purge = loop.time()
            except Exception as exc:  # noqa: BLE001 - keep trying; the store may be down
                log.warning("outbox flush failed", extra={"reason": type(exc).__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)

    def stop(self) -> None:
        self._stopping.set()

    async def ensure_indexes(self) -> None:
        await self._col.ensure_index([("sent", 1)])


def _now() -> datetime:
    return datetime.now(UTC)
