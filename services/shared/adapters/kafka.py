"""MessageBus over Apache Kafka, through aiokafka.

* Publisher: one AIOKafkaProducer, `acks="all"` and idempotent, so `publish` returns once
  every in-sync replica has the record and producer retries cannot duplicate it.
* Subscription: one AIOKafkaConsumer per group member, auto-commit off, `earliest` reset, and
  explicit commits of `offset + 1` per partition. A rebalance listener forgets what this
  member committed for partitions it loses; after a rebalance Kafka resumes every assigned
  partition from the group's committed offset, so uncommitted messages are delivered again.
* ensure_topics: AIOKafkaAdminClient, creating the missing topics and waiting until they
  have leaders.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    TopicAlreadyExistsError,
    for_code,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from services.shared.ports.bus import Message, MessageBus, Publisher, Subscription

log = logging.getLogger(__name__)

__all__ = ["KafkaBus"]


class KafkaBus(MessageBus):
    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        client_id: str,
        *,
        replication_factor: int = 1,
        linger_ms: int = 5,
        request_timeout_ms: int = 30_000,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        max_poll_interval_ms: int = 300_000,
        topic_ready_timeout_s: float = 30.0,
    ) -> None:
        if isinstance(bootstrap_servers, str):
            servers = [s.strip() for s in bootstrap_servers.split(",") if s.strip()]
        else:
            servers = list(bootstrap_servers)
        if not servers:
            raise ValueError("no Kafka bootstrap servers")
        self.bootstrap_servers = servers
        self.client_id = client_id
        self.replication_factor = replication_factor
        self.linger_ms = linger_ms
        self.request_timeout_ms = request_timeout_ms
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.max_poll_interval_ms = max_poll_interval_ms
        self.topic_ready_timeout_s = topic_ready_timeout_s

    def publisher(self) -> Publisher:
        return KafkaPublisher(self)

    def subscription(self, group: str, topics: Sequence[str]) -> Subscription:
        if isinstance(topics, str):
            raise TypeError("topics must be a sequence of topic names, not a str")
        return KafkaSubscription(self, group, tuple(topics))

    def admin_client(self) -> AIOKafkaAdminClient:
        """A new (not yet started) admin client for this cluster."""
        return AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self.client_id}-admin",
            request_timeout_ms=self.request_timeout_ms,
        )

    async def backlog(self, group: str, topics: Sequence[str]) -> int:
        admin = self.admin_client()
        probe = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self.client_id}-backlog",
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=self.request_timeout_ms,
        )
        try:
            await admin.start()
            await probe.start()
            parts = [
                TopicPartition(meta["topic"], p["partition"])
                for meta in await admin.describe_topics(list(topics))
                if meta.get("error_code") == 0
                for p in meta.get("partitions") or []
            ]
            if not parts:
                return 0
            committed = await admin.list_consumer_group_offsets(group, partitions=parts)
            ends = await probe.end_offsets(parts)
            total = 0
            for tp in parts:
                meta = committed.get(tp)
                done = meta.offset if meta is not None and meta.offset >= 0 else 0
                total += max(0, ends.get(tp, 0) - done)
            return total
        finally:
            await probe.stop()
            await admin.close()

    async def ensure_topics(self, topics: Sequence[str], partitions: int = 1) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        wanted = list(dict.fromkeys(topics))
        if not wanted:
            return
        admin = self.admin_client()
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            if missing:
                await self._create(admin, missing, partitions)
            await self._wait_ready(admin, wanted)
        finally:
            await admin.close()

    async def _create(self, admin: AIOKafkaAdminClient, topics: list[str], partitions: int) -> None:
        response = await admin.create_topics(
            [NewTopic(t, partitions, self.replication_factor) for t in topics],
            timeout_ms=self.request_timeout_ms,
        )
        for entry in response.topic_errors:
            topic, code = entry[0], entry[1]
            message = entry[2] if len(entry) > 2 else None
            if code == 0:
                log.info("created Kafka topic %s (%d partitions)", topic, partitions)
                continue
            error = for_code(code)
            if error is TopicAlreadyExistsError:
                continue  # created concurrently by another process
            raise error(f"cannot create topic {topic!r}: {message or error.description}")

    async def _wait_ready(self, admin: AIOKafkaAdminClient, topics: list[str]) -> None:
        deadline = time.monotonic() + self.topic_ready_timeout_s
        pending = set(topics)
        while True:
            for meta in await admin.describe_topics(sorted(pending)):
                parts = meta.get("partitions") or []
                if (
                    meta.get("error_code") == 0
                    and parts
                    and all(p.get("error_code") == 0 and p.get("leader", -1) >= 0 for p in parts)
                ):
                    pending.discard(meta["topic"])
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Kafka topics not ready: {sorted(pending)}")
            await asyncio.sleep(0.1)


class KafkaPublisher(Publisher):
    def __init__(self, bus: KafkaBus) -> None:
        self._bus = bus
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bus.bootstrap_servers,
            client_id=self._bus.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=self._bus.linger_ms,
            request_timeout_ms=self._bus.request_timeout_ms,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()  # release the half-open client (else: "Unclosed" warning)
            raise
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is still batched

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        if self._producer is None:
            raise RuntimeError("publisher is not started")
        await self._producer.send_and_wait(
            topic, value=value, key=key, headers=[(k, bytes(v)) for k, v in headers]
        )


class _Listener(ConsumerRebalanceListener):
    def __init__(self, subscription: KafkaSubscription) -> None:
        self._subscription = subscription

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self._subscription._forget(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.debug(
            "group %s: assigned %s",
            self._subscription.group,
            sorted((tp.topic, tp.partition) for tp in assigned),
        )


class KafkaSubscription(Subscription):
    def __init__(self, bus: KafkaBus, group: str, topics: tuple[str, ...]) -> None:
        if not group:
            raise ValueError("empty group name")
        if not topics:
            raise ValueError("no topics")
        self._bus = bus
        self.group = group
        self.topics = topics
        self._consumer: AIOKafkaConsumer | None = None
        # next offset this member has committed, per partition it currently owns
        self._committed: dict[TopicPartition, int] = {}
        # the group's committed offset when a partition was assigned (for `lag` only)
        self._group_committed: dict[TopicPartition, int] = {}

    def _forget(self, partitions: Any) -> None:
        for tp in partitions:
            self._committed.pop(tp, None)
            self._group_committed.pop(tp, None)
        log.debug("group %s: revoked %s", self.group, list(partitions))

    async def start(self) -> None:
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bus.bootstrap_servers,
            client_id=self._bus.client_id,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=self._bus.request_timeout_ms,
            session_timeout_ms=self._bus.session_timeout_ms,
            heartbeat_interval_ms=self._bus.heartbeat_interval_ms,
            max_poll_interval_ms=self._bus.max_poll_interval_ms,
        )
        consumer.subscribe(topics=list(self.topics), listener=_Listener(self))
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        self._committed.clear()
        self._group_committed.clear()
        if consumer is not None:
            await consumer.stop()  # leaves the group; nothing is auto-committed

    async def fetch(self, timeout_s: float, max_messages: int = 100) -> list[Message]:
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("subscription is not started")
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            try:
                batches = await consumer.getmany(
                    timeout_ms=max(remaining_ms, 0), max_records=max_messages
                )
            except ConsumerStoppedError:
                if self._consumer is None:
                    return []  # stop() was called while this fetch waited
                raise
            out = [
                Message(
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    key=record.key,
                    value=record.value if record.value is not None else b"",
                    headers=tuple((k, bytes(v)) for k, v in (record.headers or ())),
                )
                for tp in sorted(batches)
                for record in batches[tp]
            ]
            if out or remaining_ms <= 0:
                return out

    async def commit(self, message: Message) -> None:
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("subscription is not started")
        tp = TopicPartition(message.topic, message.partition)
        nxt = message.offset + 1
        if self._committed.get(tp, -1) >= nxt:
            return  # already covered by a later commit
        try:
            await consumer.commit({tp: OffsetAndMetadata(nxt, "")})
        except (CommitFailedError, IllegalStateError) as exc:
            # The partition moved to another member in a rebalance: it resumes from the
            # group's committed offset and will see this message again (at-least-once).
            log.warning(
                "group %s: commit of %s[%d]@%d dropped after a rebalance: %s",
                self.group,
                message.topic,
                message.partition,
                message.offset,
                exc,
            )
            return
        self._committed[tp] = nxt

    async def lag(self) -> dict[tuple[str, int], int]:
        """High watermark (from the latest fetch responses) minus the group's committed
        offset; the committed offset is asked of the broker once per partition, then
        tracked from this member's own commits."""
        consumer = self._consumer
        if consumer is None:
            return {}
        out: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            nxt = self._committed.get(tp)
            if nxt is None:
                nxt = self._group_committed.get(tp)
            if nxt is None:
                committed = await consumer.committed(tp)
                nxt = committed if committed is not None else 0
                self._group_committed[tp] = nxt
            out[(tp.topic, tp.partition)] = max(0, high - nxt)
        return out
