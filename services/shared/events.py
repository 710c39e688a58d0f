"""Events on the bus: topics, the envelope, publishing with trace context, and the one
consumer loop every service uses (manual commit after the side effect, bounded retries with
backoff, dead-letter topic for what can never be processed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.shared import failpoints, metrics, telemetry
from services.shared.errors import PermanentEventError, TesseraError, Unavailable, is_outage
from services.shared.ports.bus import Message, MessageBus, Publisher, Subscription
from tessera.events.v1 import events_pb2

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

TOPIC_SLIDE_RECEIVED = "tessera.slide.received.v1"
TOPIC_SLIDE_DEIDENTIFIED = "tessera.slide.deidentified.v1"
TOPIC_SLIDE_REJECTED = "tessera.slide.rejected.v1"
TOPIC_SLIDE_TILED = "tessera.slide.tiled.v1"
TOPIC_INFERENCE_COMPLETED = "tessera.inference.completed.v1"
TOPIC_DATASET_CREATED = "tessera.dataset.created.v1"
TOPIC_AUDIT = "tessera.audit.v1"
TOPIC_SLIDE_HELD = "tessera.slide.held.v1"
TOPIC_SLIDE_REVIEWED = "tessera.slide.reviewed.v1"
TOPIC_QUARANTINE_ERASED = "tessera.quarantine.erased.v1"

# The payload field of the envelope that each topic carries.
TOPIC_PAYLOAD: Mapping[str, str] = {
    TOPIC_SLIDE_RECEIVED: "slide_received",
    TOPIC_SLIDE_DEIDENTIFIED: "slide_deidentified",
    TOPIC_SLIDE_REJECTED: "slide_rejected",
    TOPIC_SLIDE_TILED: "slide_tiled",
    TOPIC_INFERENCE_COMPLETED: "inference_completed",
    TOPIC_DATASET_CREATED: "dataset_created",
    TOPIC_AUDIT: "access_decided",
    TOPIC_SLIDE_HELD: "slide_held_for_review",
    TOPIC_SLIDE_REVIEWED: "slide_reviewed",
    TOPIC_QUARANTINE_ERASED: "quarantine_erased",
}
ALL_TOPICS = tuple(TOPIC_PAYLOAD)

# De-identified catalogue records a node publishes for its federation peers: one topic per
# site (`<prefix>tessera.federation.catalogue.<site>.v1`, named by the operator), so the set
# of topics is not fixed; they all carry `federated_slide`.
FEDERATION_PAYLOAD = "federated_slide"
_FEDERATION_TOPIC = re.compile(
    r"^[A-Za-z0-9._-]{0,100}?tessera\.federation\.catalogue\.([a-z0-9][a-z0-9-]{0,30})\.v1$"
)


def federation_topic_site(topic: str) -> str | None:
    """The site a federation topic belongs to, or None for any other topic."""
    m = _FEDERATION_TOPIC.match(topic)
    return m.group(1) if m else None


def payload_of(topic: str) -> str | None:
    """The envelope payload field `topic` carries (None for an unknown topic)."""
    if topic in TOPIC_PAYLOAD:
        return TOPIC_PAYLOAD[topic]
    return FEDERATION_PAYLOAD if federation_topic_site(topic) else None


def dead_letter_topic(service: str) -> str:
    return f"tessera.dlq.{service}.v1"


_EVENT_NS = uuid.UUID("8a4f3a52-7c1e-4c43-9a4e-0f3f6b1f2d11")


def event_id_for(subject_id: str, stage: str) -> str:
    """Deterministic id of the event a stage emits for a slide: a re-emitted event after a
    crash carries the same id, so consumers apply it once."""
    return str(uuid.uuid5(_EVENT_NS, f"{subject_id}/{stage}"))


def new_envelope(
    *,
    payload_field: str,
    payload: ProtoMessage,
    slide_id: str = "",
    dataset_id: str = "",
    event_id: str | None = None,
) -> events_pb2.EventEnvelope:
    env = events_pb2.EventEnvelope(
        event_id=event_id or str(uuid.uuid4()),
        event_type=payload.DESCRIPTOR.full_name,
        slide_id=slide_id,
        dataset_id=dataset_id,
        schema_version=SCHEMA_VERSION,
    )
    env.occurred_at.GetCurrentTime()
    getattr(env, payload_field).CopyFrom(payload)
    return env


def check_topic(topic: str, envelope: events_pb2.EventEnvelope) -> None:
    """Raise ValueError unless the envelope's payload is the one `topic` carries."""
    expected = payload_of(topic)
    if expected is None or envelope.WhichOneof("payload") != expected:
        raise ValueError(f"envelope payload does not belong on {topic}")


class EventEmitter:
    """Publishes envelopes; the broker has acknowledged when `emit` returns."""

    def __init__(self, service: str, publisher: Publisher, timeout_s: float = 10.0) -> None:
        self._service = service
        self._publisher = publisher
        self._timeout = timeout_s
        self._tracer = telemetry.tracer(__name__)

    async def emit(self, topic: str, envelope: events_pb2.EventEnvelope) -> None:
        check_topic(topic, envelope)
        with self._tracer.start_as_current_span(f"{topic} publish", kind=SpanKind.PRODUCER) as sp:
            sp.set_attribute("messaging.system", "kafka")
            sp.set_attribute("messaging.destination.name", topic)
            sp.set_attribute("messaging.message.id", envelope.event_id)
            envelope.producer = self._service
            carrier = telemetry.inject_headers()
            envelope.trace_context.clear()
            envelope.trace_context.update(carrier)
            headers = [(k, v.encode()) for k, v in carrier.items()]
            headers += [
                ("event-type", envelope.event_type.encode()),
                ("event-id", envelope.event_id.encode()),
            ]
            key = (envelope.slide_id or envelope.dataset_id or envelope.event_id).encode()
            try:
                # Bounded: a producer retries forever while the broker is away, and callers
                # (an RPC, a consumer) must not hang with it. A send that later completes
                # anyway only repeats an event id consumers already dedupe on.
                await asyncio.wait_for(
                    self._publisher.publish(
                        topic, envelope.SerializeToString(), key=key, headers=headers
                    ),
                    self._timeout,
                )
            except Exception as exc:
                raise Unavailable("event bus unavailable") from exc
        metrics.EVENTS_PUBLISHED.labels(self._service, topic).inc()


Handler = Callable[[events_pb2.EventEnvelope], Awaitable[None]]
# Called after a decodable event was dead-lettered (reason code, detail), so the stage can
# record a final outcome for the slide instead of leaving it pending forever.
DeadLetterHook = Callable[[events_pb2.EventEnvelope, str, str], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` bounds retries of a message that fails for an unknown reason (a poison
    message). A failure that says a dependency is down (`errors.is_outage`) is not the
    message's fault: it is retried, at most `outage_delay_s` apart, for up to `outage_budget_s`
    before the message is parked, so a 30 s S3 or MongoDB outage loses nothing."""

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    outage_delay_s: float = 2.0
    outage_budget_s: float = 1800.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1))))

    def outage_delay(self, attempt: int) -> float:
        return min(self.outage_delay_s, self.delay(attempt))


class EventRunner:
    """Consumes topics for one consumer group and calls one handler per topic.

    For each message, in partition order: decode and validate the envelope (malformed → dead
    letter), run the handler inside a consumer span that continues the producer's trace, and
    commit the offset only after the handler returned (or after the message was dead-lettered).
    Domain errors (`TesseraError` but not `Unavailable`) are permanent: dead-lettered at once.
    Anything else is retried with exponential backoff, then dead-lettered after
    `retry.max_attempts`, so one poisonous message never blocks its partition for long.

    With ``concurrency`` > 1 the messages of one fetched batch run in lanes, one per slide
    (the envelope's slide id; a message that does not decode is a lane of its own), at most
    ``concurrency`` lanes at once: a slide's events keep their order, different slides
    overlap their round trips to the stores. Each partition's offset is committed after the
    batch up to the last message before which every message of the batch was handled, so
    nothing is committed before its side effects (the handlers are idempotent: what was not
    committed is delivered again).
    """

    def __init__(
        self,
        *,
        service: str,
        bus: MessageBus,
        group: str,
        handlers: Mapping[str, Handler],
        publisher: Publisher,
        retry: RetryPolicy | None = None,
        on_dead_letter: DeadLetterHook | None = None,
        concurrency: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._concurrency = concurrency
        self._on_dead_letter = on_dead_letter
        self._service = service
        self._bus = bus
        self._group = group
        self._handlers = dict(handlers)
        self._publisher = publisher
        self._retry = retry or RetryPolicy()
        self._dlq = dead_letter_topic(service)
        self._stopping = asyncio.Event()
        self._tracer = telemetry.tracer(__name__)
        self.ready = asyncio.Event()
        self._lag_reported_at = float("-inf")
        self._lag_labels: set[tuple[str, str, str]] = set()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Consume until stopped. A broker outage does not end the loop: the subscription is
        dropped and opened again with backoff; what was not committed is delivered again."""
        failures = 0
        while not self._stopping.is_set():
            try:
                if await self._consume():
                    return
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the bus may be down: reconnect
                failures += 1
                log.warning(
                    "consumer lost its subscription; reconnecting",
                    extra={"reason": type(exc).__name__, "attempt": failures},
                )
                if await self._sleep_or_stop(self._retry.outage_delay(failures)):
                    return

    async def _consume(self) -> bool:
        """One subscription's life. True when the runner was asked to stop."""
        sub = self._bus.subscription(self._group, list(self._handlers))
        await sub.start()
        self.ready.set()
        try:
            while not self._stopping.is_set():
                await self._report_lag(sub)
                batch = await sub.fetch(timeout_s=0.5)
                if self._concurrency > 1 and len(batch) > 1:
                    if not await self._process_lanes(sub, batch):
                        return True
                    continue
                for msg in batch:
                    if self._stopping.is_set():
                        return True  # not committed: redelivered after restart
                    done = await self._process(msg)
                    if not done:
                        return True
                    failpoints.hit("events.before_commit", self._service)
                    await sub.commit(msg)
                    await self._report_lag(sub)
            return True
        finally:
            with contextlib.suppress(Exception):
                await sub.stop()

    def _lane(self, msg: Message) -> str:
        try:
            slide_id = events_pb2.EventEnvelope.FromString(msg.value).slide_id
        except Exception:  # noqa: BLE001 - undecodable: its own lane, dead-lettered there
            slide_id = ""
        return f"slide:{slide_id}" if slide_id else f"msg:{msg.topic}:{msg.partition}:{msg.offset}"

    async def _process_lanes(self, sub: Subscription, batch: Sequence[Message]) -> bool:
        """One batch in per-slide lanes (see the class docstring). False when stopping."""
        lanes: dict[str, list[Message]] = {}
        for msg in batch:
            lanes.setdefault(self._lane(msg), []).append(msg)
        gate = asyncio.Semaphore(self._concurrency)
        handled: set[tuple[str, int, int]] = set()
        stopped = False

        async def lane(msgs: list[Message]) -> None:
            nonlocal stopped
            async with gate:
                for msg in msgs:
                    if stopped or self._stopping.is_set() or not await self._process(msg):
                        stopped = True
                        return
                    handled.add((msg.topic, msg.partition, msg.offset))

        results = await asyncio.gather(*(lane(m) for m in lanes.values()), return_exceptions=True)
        for result in results:  # every lane has ended: nothing runs on after the subscription
            if isinstance(result, BaseException):
                raise result
        partitions: dict[tuple[str, int], list[Message]] = {}
        for msg in batch:
            partitions.setdefault((msg.topic, msg.partition), []).append(msg)
        for msgs in partitions.values():
            last: Message | None = None
            for msg in sorted(msgs, key=lambda m: m.offset):
                if (msg.topic, msg.partition, msg.offset) not in handled:
                    break
                last = msg
            if last is not None:
                failpoints.hit("events.before_commit", self._service)
                await sub.commit(last)
        await self._report_lag(sub)
        return not stopped

    async def _process(self, msg: Message) -> bool:
        """Handle one message. True when it may be committed."""
        try:
            envelope = self._decode(msg)
        except PermanentEventError as exc:
            await self._dead_letter(msg, exc.reason, exc.message)
            return True
        handler = self._handlers[msg.topic]
        carrier = {k: v.decode("latin-1") for k, v in msg.headers}
        ctx = telemetry.extract_context(carrier or dict(envelope.trace_context))
        attempt = 0  # failures of unknown cause (bounded by max_attempts)
        outages = 0  # failures because a dependency is down (bounded by outage_budget_s)
        outage_since: float | None = None
        while True:
            attempt += 1
            start = time.perf_counter()
            with self._tracer.start_as_current_span(
                f"{msg.topic} process", context=ctx, kind=SpanKind.CONSUMER
            ) as span:
                span.set_attribute("messaging.system", "kafka")
                span.set_attribute("messaging.destination.name", msg.topic)
                span.set_attribute("messaging.consumer.group.name", self._group)
                span.set_attribute("messaging.message.id", envelope.event_id)
                span.set_attribute("tessera.slide_id", envelope.slide_id)
                span.set_attribute("tessera.attempt", attempt)
                try:
                    await handler(envelope)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - classified below
                    err: Exception = exc
                    outcome = "retry"
                    if is_outage(exc):
                        outcome = "outage"
                    elif isinstance(exc, TesseraError):
                        span.set_status(Status(StatusCode.ERROR, exc.reason))
                        metrics.EVENTS_CONSUMED.labels(self._service, msg.topic, "rejected").inc()
                        await self._dead_letter(msg, exc.reason, exc.message)
                        await self._notify(envelope, exc.reason, exc.message)
                        return True
                else:
                    metrics.EVENTS_CONSUMED.labels(self._service, msg.topic, "ok").inc()
                    metrics.EVENT_HANDLER_LATENCY.labels(self._service, msg.topic).observe(
                        time.perf_counter() - start
                    )
                    return True
                span.set_status(Status(StatusCode.ERROR, type(err).__name__))
            metrics.EVENTS_CONSUMED.labels(self._service, msg.topic, outcome).inc()
            log.warning(
                "a dependency is unavailable, will retry"
                if outcome == "outage"
                else "event handler failed, will retry",
                extra={
                    "event_id": envelope.event_id,
                    "topic": msg.topic,
                    "attempt": attempt,
                    "reason": type(err).__name__,
                },
            )
            if outcome == "outage":
                # Not the message's fault: wait for the dependency instead of spending the
                # message's attempts; park it only after a long outage budget.
                attempt -= 1
                outages += 1
                now = time.monotonic()
                outage_since = now if outage_since is None else outage_since
                if now - outage_since >= self._retry.outage_budget_s:
                    await self._dead_letter(msg, "DEPENDENCY_UNAVAILABLE", type(err).__name__)
                    await self._notify(envelope, "DEPENDENCY_UNAVAILABLE", type(err).__name__)
                    return True
                if await self._sleep_or_stop(self._retry.outage_delay(outages)):
                    return False
                continue
            outage_since = None
            if attempt >= self._retry.max_attempts:
                await self._dead_letter(msg, "RETRIES_EXHAUSTED", type(err).__name__)
                await self._notify(envelope, "RETRIES_EXHAUSTED", type(err).__name__)
                return True
            if await self._sleep_or_stop(self._retry.delay(attempt)):
                return False  # stopping: leave uncommitted

    async def _report_lag(self, sub: Subscription, every_s: float = 5.0) -> None:
        """Consumer lag per owned partition into `tessera_consumer_lag`, every `every_s`."""
        now = time.monotonic()
        if now - self._lag_reported_at < every_s:
            return
        self._lag_reported_at = now
        try:
            lag = await asyncio.wait_for(sub.lag(), 2.0)  # never hold up consumption
        except Exception as exc:  # noqa: BLE001 - a metric must never stop consumption
            log.debug("consumer lag unavailable", extra={"reason": type(exc).__name__})
            return
        seen = set()
        for (topic, partition), value in lag.items():
            labels = (self._service, topic, str(partition))
            metrics.CONSUMER_LAG.labels(*labels).set(value)
            seen.add(labels)
        for labels in self._lag_labels - seen:  # partitions this member no longer owns
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(*labels)
        self._lag_labels = seen

    async def _notify(self, envelope: events_pb2.EventEnvelope, reason: str, detail: str) -> None:
        if self._on_dead_letter is None:
            return
        try:
            await self._on_dead_letter(envelope, reason, detail)
        except Exception as exc:  # noqa: BLE001 - the dead letter itself is already safe
            log.warning(
                "dead-letter hook failed",
                extra={"event_id": envelope.event_id, "reason": type(exc).__name__},
            )

    async def _sleep_or_stop(self, seconds: float) -> bool:
        """Sleep; True when asked to stop meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _decode(self, msg: Message) -> events_pb2.EventEnvelope:
        envelope = events_pb2.EventEnvelope()
        try:
            envelope.ParseFromString(msg.value)
        except DecodeError:
            raise PermanentEventError("value is not an EventEnvelope", "MALFORMED_EVENT") from None
        expected = payload_of(msg.topic)
        if envelope.WhichOneof("payload") != expected:
            raise PermanentEventError(f"payload is not {expected}", "UNEXPECTED_EVENT_TYPE")
        if not envelope.event_id:
            raise PermanentEventError("envelope has no event_id", "MALFORMED_EVENT")
        if envelope.schema_version != SCHEMA_VERSION:
            raise PermanentEventError(
                f"unsupported schema_version {envelope.schema_version}", "UNSUPPORTED_SCHEMA"
            )
        return envelope

    async def _dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        headers = [
            *msg.headers,
            ("dlq-reason", reason.encode()),
            ("dlq-detail", detail.encode()[:512]),
            ("dlq-source-topic", msg.topic.encode()),
            ("dlq-source-partition", str(msg.partition).encode()),
            ("dlq-source-offset", str(msg.offset).encode()),
            ("dlq-consumer-group", self._group.encode()),
        ]
        # Retry the dead-letter write itself until it succeeds or we stop: committing the
        # source offset without it would lose the message.
        attempt = 0
        while True:
            try:
                await self._publisher.publish(self._dlq, msg.value, key=msg.key, headers=headers)
                break
            except Exception:
                attempt += 1
                if self._stopping.is_set():
                    raise
                await asyncio.sleep(self._retry.delay(min(attempt, 6)))
        metrics.DEAD_LETTERS.labels(self._service, msg.topic, reason).inc()
        log.warning(
            "event dead-lettered",
            extra={"topic": msg.topic, "offset": msg.offset, "reason": reason},
        )
        trace.get_current_span().add_event("dead-lettered", {"reason": reason})


async def publish_stage_failure(
    outbox: Any,
    stage: str,
    outcome_stage: str,
    envelope: events_pb2.EventEnvelope,
    reason: str,
    detail: str,
) -> None:
    """Announce that `stage` gave up on a slide: the catalogue shows it REJECTED."""
    env = new_envelope(
        payload_field="slide_rejected",
        payload=events_pb2.SlideRejected(stage=stage, reason=reason, detail=detail[:300]),
        slide_id=envelope.slide_id,
        dataset_id=envelope.dataset_id,
        event_id=event_id_for(envelope.slide_id, outcome_stage),
    )
    await outbox.publish(TOPIC_SLIDE_REJECTED, env)
