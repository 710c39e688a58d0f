"""EventEmitter and EventRunner over the in-memory bus: commits, retries, dead letters, traces."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.shared.adapters.memory import InMemoryBus
from services.shared.errors import InvalidArgument, Unavailable
from services.shared.events import (
    SCHEMA_VERSION,
    TOPIC_SLIDE_RECEIVED,
    TOPIC_SLIDE_TILED,
    DeadLetterHook,
    EventEmitter,
    EventRunner,
    RetryPolicy,
    dead_letter_topic,
    event_id_for,
    new_envelope,
)
from services.shared.ports.bus import Message, Publisher
from tessera.events.v1 import events_pb2

SERVICE = "unit"
GROUP = "unit-group"
DLQ = dead_letter_topic(SERVICE)
FAST = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.005)


def received(slide_id: str = "slide-1") -> events_pb2.EventEnvelope:
    return new_envelope(
        payload_field="slide_received",
        payload=events_pb2.SlideReceived(size_bytes=10, quarantine_key="slides/x", extension="svs"),
        slide_id=slide_id,
        dataset_id="ds-1",
        event_id=event_id_for(slide_id, "received"),
    )


def tiled(slide_id: str = "slide-1") -> events_pb2.EventEnvelope:
    return new_envelope(
        payload_field="slide_tiled",
        payload=events_pb2.SlideTiled(),
        slide_id=slide_id,
        dataset_id="ds-1",
    )


async def wait_until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(poll(), timeout)


@dataclass
class Harness:
    bus: InMemoryBus
    publisher: Publisher
    emitter: EventEmitter
    seen: list[events_pb2.EventEnvelope] = field(default_factory=list)
    runners: list[tuple[EventRunner, asyncio.Task[None]]] = field(default_factory=list)

    async def start(
        self,
        handler: Callable[[events_pb2.EventEnvelope], Awaitable[None]],
        retry: RetryPolicy = FAST,
        topic: str = TOPIC_SLIDE_RECEIVED,
        on_dead_letter: DeadLetterHook | None = None,
        concurrency: int = 1,
    ) -> tuple[EventRunner, asyncio.Task[None]]:
        runner = EventRunner(
            service=SERVICE,
            bus=self.bus,
            group=GROUP,
            handlers={topic: handler},
            publisher=self.publisher,
            retry=retry,
            on_dead_letter=on_dead_letter,
            concurrency=concurrency,
        )
        task = asyncio.create_task(runner.run())
        await asyncio.wait_for(runner.ready.wait(), 2)
        self.runners.append((runner, task))
        return runner, task

    async def stop(
        self, runner: EventRunner, task: asyncio.Task[None], *, graceful: bool = False
    ) -> None:
        """End the runner. `stop()` is noticed between fetches (up to the runner's 0.5 s
        poll); where the shutdown path is not what a test is about, cancel instead."""
        if graceful:
            runner.stop()
            await asyncio.wait_for(task, 3)
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def dlq(self) -> list[Message]:
        return self.bus.messages(DLQ)

    async def redelivered(self, topic: str = TOPIC_SLIDE_RECEIVED) -> list[Message]:
        """What a fresh member of the same group gets (uncommitted messages)."""
        sub = self.bus.subscription(GROUP, [topic])
        await sub.start()
        try:
            return await sub.fetch(timeout_s=0.05)
        finally:
            await sub.stop()


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    bus = InMemoryBus()
    await bus.ensure_topics([TOPIC_SLIDE_RECEIVED, TOPIC_SLIDE_TILED, DLQ])
    publisher = bus.publisher()
    await publisher.start()
    harness = Harness(bus, publisher, EventEmitter("producer", publisher))
    yield harness
    for runner, task in harness.runners:
        runner.stop()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await publisher.stop()


def header(msg: Message, name: str) -> str | None:
    value = msg.header(name)
    return None if value is None else value.decode()


# -- handled messages ---------------------------------------------------------------------


async def test_handled_message_is_committed(h: Harness) -> None:
    async def handler(env: events_pb2.EventEnvelope) -> None:
        h.seen.append(env)

    env = received()
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, env)
    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task, graceful=True)

    assert [e.event_id for e in h.seen] == [env.event_id]
    assert h.seen[0].slide_received.quarantine_key == "slides/x"
    assert h.seen[0].producer == "producer"
    assert h.dlq() == []
    assert await h.redelivered() == []


# -- dead letters for what can never be processed -----------------------------------------


def _no_event_id() -> bytes:
    env = received()
    env.event_id = ""
    return env.SerializeToString()


def _future_schema() -> bytes:
    env = received()
    env.schema_version = SCHEMA_VERSION + 1
    return env.SerializeToString()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(b"\xff\xff\xff not protobuf", "MALFORMED_EVENT", id="garbage"),
        pytest.param(tiled().SerializeToString(), "UNEXPECTED_EVENT_TYPE", id="wrong-payload"),
        pytest.param(b"", "UNEXPECTED_EVENT_TYPE", id="empty"),
        pytest.param(_no_event_id(), "MALFORMED_EVENT", id="no-event-id"),
        pytest.param(_future_schema(), "UNSUPPORTED_SCHEMA", id="future-schema"),
    ],
)
async def test_undecodable_message_is_dead_lettered_and_committed(
    h: Harness, value: bytes, reason: str
) -> None:
    async def handler(env: events_pb2.EventEnvelope) -> None:
        h.seen.append(env)

    await h.publisher.publish(TOPIC_SLIDE_RECEIVED, value, key=b"k1", headers=[("event-id", b"e1")])
    good = received("slide-2")
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, good)
    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 2)
    await h.stop(runner, task)

    # the bad one never reached the handler; the good one after it did
    assert [e.event_id for e in h.seen] == [good.event_id]
    [dead] = h.dlq()
    assert dead.value == value
    assert dead.key == b"k1"
    assert header(dead, "dlq-reason") == reason
    assert header(dead, "dlq-source-topic") == TOPIC_SLIDE_RECEIVED
    assert header(dead, "dlq-source-offset") == "0"
    assert header(dead, "dlq-consumer-group") == GROUP
    assert header(dead, "event-id") == "e1"  # original headers are kept
    assert await h.redelivered() == []


async def test_domain_error_is_dead_lettered_at_once(h: Harness) -> None:
    calls = 0

    async def handler(env: events_pb2.EventEnvelope) -> None:
        nonlocal calls
        calls += 1
        raise InvalidArgument("geometry is absurd", "ABSURD_DIMENSIONS")

    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received())
    runner, task = await h.start(handler, RetryPolicy(max_attempts=5, base_delay_s=0.001))
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task)

    assert calls == 1
    [dead] = h.dlq()
    assert header(dead, "dlq-reason") == "ABSURD_DIMENSIONS"
    assert header(dead, "dlq-detail") == "geometry is absurd"
    assert await h.redelivered() == []


async def test_transient_failures_are_retried_then_committed_once(h: Harness) -> None:
    calls = 0
    succeeded: list[str] = []

    async def handler(env: events_pb2.EventEnvelope) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("store hiccup")
        succeeded.append(env.event_id)

    env = received()
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, env)
    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task)

    assert calls == 3
    assert succeeded == [env.event_id]
    assert h.dlq() == []
    assert h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1
    assert await h.redelivered() == []


async def test_unavailable_is_retried_not_dead_lettered(h: Harness) -> None:
    calls = 0

    async def handler(env: events_pb2.EventEnvelope) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Unavailable("object store down")

    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received())
    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task)

    assert calls == 2
    assert h.dlq() == []


async def test_dependency_outage_outlasts_max_attempts_without_dead_letter(h: Harness) -> None:
    """S3/MongoDB down for longer than the poison-message budget: the message waits for the
    dependency (connection errors of the client libraries count as outages) and is handled
    once, never dead-lettered."""
    from pymongo.errors import ServerSelectionTimeoutError
    from urllib3.exceptions import MaxRetryError

    failures = [
        ConnectionRefusedError("refused"),
        ServerSelectionTimeoutError("no server"),
        MaxRetryError(None, "http://127.0.0.1:1/", "refused"),  # type: ignore[arg-type]
        Unavailable("bus down"),
    ] * 2  # 8 outage failures, far more than FAST.max_attempts (3)
    calls = 0

    async def handler(env: events_pb2.EventEnvelope) -> None:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        h.seen.append(env)

    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received())
    retry = RetryPolicy(max_attempts=3, base_delay_s=0.001, outage_delay_s=0.002)
    runner, task = await h.start(handler, retry)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task)

    assert calls == 9
    assert len(h.seen) == 1
    assert h.dlq() == []


async def test_outage_wrapped_in_another_error_is_still_an_outage(h: Harness) -> None:
    calls = 0

    async def handler(env: events_pb2.EventEnvelope) -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:
            try:
                raise ConnectionResetError("reset by peer")
            except ConnectionResetError as exc:
                raise RuntimeError("upload failed") from exc

    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received())
    retry = RetryPolicy(max_attempts=2, base_delay_s=0.001, outage_delay_s=0.002)
    runner, task = await h.start(handler, retry)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task)
    assert calls == 6
    assert h.dlq() == []


async def test_endless_outage_is_parked_after_its_budget(h: Harness) -> None:
    async def handler(env: events_pb2.EventEnvelope) -> None:
        raise ConnectionRefusedError("refused")

    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received())
    retry = RetryPolicy(max_attempts=2, outage_delay_s=0.01, outage_budget_s=0.1)
    runner, task = await h.start(handler, retry)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task)
    [dead] = h.dlq()
    assert header(dead, "dlq-reason") == "DEPENDENCY_UNAVAILABLE"
    assert header(dead, "dlq-detail") == "ConnectionRefusedError"


async def test_always_failing_handler_is_dead_lettered_and_partition_moves_on(
    h: Harness,
) -> None:
    attempts: dict[str, int] = {}

    async def handler(env: events_pb2.EventEnvelope) -> None:
        attempts[env.slide_id] = attempts.get(env.slide_id, 0) + 1
        if env.slide_id == "poison":
            raise RuntimeError("boom")
        h.seen.append(env)

    poison, after = received("poison"), received("after")
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, poison)
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, after)
    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 2)
    await h.stop(runner, task)

    assert attempts == {"poison": FAST.max_attempts, "after": 1}
    assert [e.slide_id for e in h.seen] == ["after"]
    [dead] = h.dlq()
    assert header(dead, "dlq-reason") == "RETRIES_EXHAUSTED"
    assert header(dead, "dlq-detail") == "RuntimeError"  # the type only, not the message
    parsed = events_pb2.EventEnvelope.FromString(dead.value)
    assert parsed.event_id == poison.event_id
    assert await h.redelivered() == []


async def test_stop_during_backoff_leaves_message_uncommitted(h: Harness) -> None:
    calls = 0

    async def handler(env: events_pb2.EventEnvelope) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("down")

    env = received()
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, env)
    runner, task = await h.start(handler, RetryPolicy(max_attempts=5, base_delay_s=60))
    await wait_until(lambda: calls == 1)
    # graceful stop; would take a minute if the backoff ignored stop()
    await h.stop(runner, task, graceful=True)

    assert calls == 1
    assert h.dlq() == []
    assert h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 0
    again = await h.redelivered()
    assert [events_pb2.EventEnvelope.FromString(m.value).event_id for m in again] == [env.event_id]


async def test_handler_sees_messages_in_partition_order(h: Harness) -> None:
    async def handler(env: events_pb2.EventEnvelope) -> None:
        h.seen.append(env)

    ids = [f"s{i}" for i in range(5)]
    for slide_id in ids:
        await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received(slide_id))
    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 5)
    await h.stop(runner, task)
    assert [e.slide_id for e in h.seen] == ids


async def test_stop_mid_batch_commits_only_what_was_handled(h: Harness) -> None:
    async def handler(env: events_pb2.EventEnvelope) -> None:
        h.seen.append(env)
        runner.stop()  # asked to stop while the rest of the batch is waiting

    runner = EventRunner(
        service=SERVICE,
        bus=h.bus,
        group=GROUP,
        handlers={TOPIC_SLIDE_RECEIVED: handler},
        publisher=h.publisher,
        retry=FAST,
    )
    for slide_id in ("a", "b", "c"):  # all three arrive in the runner's first fetch
        await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received(slide_id))
    await asyncio.wait_for(runner.run(), 3)

    assert [e.slide_id for e in h.seen] == ["a"]
    assert h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1
    again = await h.redelivered()
    assert [events_pb2.EventEnvelope.FromString(m.value).slide_id for m in again] == ["b", "c"]


# -- per-slide lanes (concurrency > 1) ------------------------------------------------------


async def test_lanes_overlap_slides_and_keep_each_slides_order(h: Harness) -> None:
    active = 0
    most = 0
    order: dict[str, list[str]] = {}

    async def handler(env: events_pb2.EventEnvelope) -> None:
        nonlocal active, most
        active += 1
        most = max(most, active)
        await asyncio.sleep(0.02)  # a store round trip
        order.setdefault(env.slide_id, []).append(env.event_id)
        active -= 1

    sent: dict[str, list[str]] = {}
    for round_ in range(3):
        for slide_id in ("a", "b", "c", "d", "e"):
            env = received(slide_id)
            env.event_id = f"{slide_id}-{round_}"
            sent.setdefault(slide_id, []).append(env.event_id)
            await h.emitter.emit(TOPIC_SLIDE_RECEIVED, env)
    await h.start(handler, concurrency=4)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 15)
    assert order == sent  # every slide's events in the order they were sent
    assert most == 4  # four slides at once, never more
    assert h.dlq() == []


async def test_lanes_commit_only_up_to_the_first_unhandled_message(h: Harness) -> None:
    async def handler(env: events_pb2.EventEnvelope) -> None:
        if env.slide_id == "b":
            await asyncio.sleep(0.05)
            runner.stop()  # stopping while b's retry or handling is pending
            raise RuntimeError("b fails, then the runner stops during its backoff")
        h.seen.append(env)

    for slide_id in ("a", "b", "c", "d"):
        await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received(slide_id))
    runner, task = await h.start(handler, concurrency=4)
    await asyncio.wait_for(task, 3)
    # c and d ran in their own lanes, but b (offset 1) was never handled: only a is committed
    assert {e.slide_id for e in h.seen} == {"a", "c", "d"}
    assert h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1
    again = await h.redelivered()
    assert [events_pb2.EventEnvelope.FromString(m.value).slide_id for m in again] == ["b", "c", "d"]


async def test_lanes_dead_letter_an_undecodable_message_on_its_own(h: Harness) -> None:
    async def handler(env: events_pb2.EventEnvelope) -> None:
        h.seen.append(env)

    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received("a"))
    await h.publisher.publish(TOPIC_SLIDE_RECEIVED, b"\xff\xff not protobuf")
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received("b"))
    await h.start(handler, concurrency=4)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 3)
    assert sorted(e.slide_id for e in h.seen) == ["a", "b"]
    assert [header(m, "dlq-reason") for m in h.dlq()] == ["MALFORMED_EVENT"]


# -- tracing ------------------------------------------------------------------------------


async def test_consumer_span_continues_producer_trace(
    h: Harness, spans: InMemorySpanExporter
) -> None:
    h.emitter = EventEmitter("producer", h.publisher)  # picks up the patched tracer
    inside: list[trace.SpanContext] = []

    async def handler(env: events_pb2.EventEnvelope) -> None:
        inside.append(trace.get_current_span().get_span_context())

    env = received()
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, env)
    [msg] = h.bus.messages(TOPIC_SLIDE_RECEIVED)
    assert header(msg, "traceparent") is not None
    assert env.trace_context["traceparent"] == header(msg, "traceparent")

    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task)

    [producer] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    [consumer] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.attributes is not None
    assert consumer.attributes["messaging.message.id"] == env.event_id
    assert consumer.attributes["messaging.consumer.group.name"] == GROUP
    # the handler runs inside the consumer span
    assert [c.span_id for c in inside] == [consumer.context.span_id]


async def test_trace_context_falls_back_to_envelope_without_headers(
    h: Harness, spans: InMemorySpanExporter
) -> None:
    h.emitter = EventEmitter("producer", h.publisher)
    env = received()
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, env)
    # the same envelope again, as a producer that does not set headers would send it
    await h.publisher.publish(TOPIC_SLIDE_RECEIVED, env.SerializeToString(), key=b"x")

    async def handler(env: events_pb2.EventEnvelope) -> None:
        return None

    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 2)
    await h.stop(runner, task)

    [producer] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    consumers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert len(consumers) == 2
    for span in consumers:
        assert span.context.trace_id == producer.context.trace_id
        assert span.parent is not None and span.parent.span_id == producer.context.span_id


async def test_retries_are_separate_spans_of_one_trace(
    h: Harness, spans: InMemorySpanExporter
) -> None:
    h.emitter = EventEmitter("producer", h.publisher)
    calls = 0

    async def handler(env: events_pb2.EventEnvelope) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("once")

    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received())
    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task)

    consumers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert [s.attributes["tessera.attempt"] for s in consumers if s.attributes] == [1, 2]
    assert len({s.context.trace_id for s in consumers}) == 1


# -- emitter ------------------------------------------------------------------------------


async def test_emitter_refuses_payload_that_does_not_belong_on_topic(h: Harness) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        await h.emitter.emit(TOPIC_SLIDE_RECEIVED, tiled())
    with pytest.raises(ValueError, match="does not belong"):
        await h.emitter.emit("tessera.no-such-topic.v1", received())
    with pytest.raises(ValueError, match="does not belong"):
        await h.emitter.emit(TOPIC_SLIDE_RECEIVED, events_pb2.EventEnvelope(event_id="x"))
    assert h.bus.messages(TOPIC_SLIDE_RECEIVED) == []


async def test_emitter_keys_by_slide_and_sets_event_headers(h: Harness) -> None:
    env = received("slide-9")
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, env)
    [msg] = h.bus.messages(TOPIC_SLIDE_RECEIVED)
    assert msg.key == b"slide-9"
    assert header(msg, "event-id") == env.event_id
    assert header(msg, "event-type") == "tessera.events.v1.SlideReceived"
    assert events_pb2.EventEnvelope.FromString(msg.value).producer == "producer"


async def test_emitter_reports_bus_failure_as_unavailable(h: Harness) -> None:
    await h.publisher.stop()  # the in-memory publisher refuses to publish when stopped
    with pytest.raises(Unavailable):
        await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received())
    await h.publisher.start()


async def test_dead_letter_hook_hears_the_final_outcome(h: Harness) -> None:
    """The stage hook gets the envelope and reason of every dead-lettered, decodable event
    (so the slide can be marked REJECTED); undecodable values never reach it."""
    heard: list[tuple[str, str, str]] = []

    async def hook(env: events_pb2.EventEnvelope, reason: str, detail: str) -> None:
        heard.append((env.slide_id, reason, detail))

    async def handler(env: events_pb2.EventEnvelope) -> None:
        if env.slide_id == "bad-input":
            raise InvalidArgument("cannot process", "CANNOT")
        raise RuntimeError("always")

    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received("bad-input"))
    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received("flaky"))
    await h.publisher.publish(TOPIC_SLIDE_RECEIVED, b"garbage", key=b"k")
    runner, task = await h.start(handler, on_dead_letter=hook)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 3)
    await h.stop(runner, task)
    assert heard == [
        ("bad-input", "CANNOT", "cannot process"),
        ("flaky", "RETRIES_EXHAUSTED", "RuntimeError"),
    ]
    assert len(h.dlq()) == 3


async def test_consumer_survives_a_broker_outage(h: Harness) -> None:
    """A fetch that fails (broker restarting) drops the subscription and opens a new one;
    the message is then handled once and committed."""
    from services.shared.ports.bus import Subscription

    class Outage(Subscription):
        failures = 2

        def __init__(self, inner: Subscription) -> None:
            self.inner = inner

        async def start(self) -> None:
            await self.inner.start()

        async def stop(self) -> None:
            await self.inner.stop()

        async def fetch(self, timeout_s: float, max_messages: int = 100) -> list[Message]:
            if Outage.failures:
                Outage.failures -= 1
                raise ConnectionError("broker unreachable")
            return await self.inner.fetch(timeout_s, max_messages)

        async def commit(self, message: Message) -> None:
            await self.inner.commit(message)

    real = h.bus.subscription
    h.bus.subscription = lambda group, topics: Outage(real(group, topics))  # type: ignore[method-assign]

    async def handler(env: events_pb2.EventEnvelope) -> None:
        h.seen.append(env)

    await h.emitter.emit(TOPIC_SLIDE_RECEIVED, received("after-outage"))
    runner, task = await h.start(handler)
    await wait_until(lambda: h.bus.committed(GROUP, TOPIC_SLIDE_RECEIVED) == 1)
    await h.stop(runner, task)
    assert [e.slide_id for e in h.seen] == ["after-outage"]
    assert Outage.failures == 0


async def test_emit_gives_up_when_the_broker_never_answers(h: Harness) -> None:
    """A producer retries forever while the broker is away; emit is bounded so the RPC or
    consumer calling it gets Unavailable (and the outbox keeps the event) instead of hanging."""

    class Stuck(Publisher):
        async def start(self) -> None: ...

        async def stop(self) -> None: ...

        async def publish(
            self,
            topic: str,
            value: bytes,
            *,
            key: bytes | None = None,
            headers: Sequence[tuple[str, bytes]] = (),
        ) -> None:
            await asyncio.Event().wait()

    emitter = EventEmitter("producer", Stuck(), timeout_s=0.05)
    with pytest.raises(Unavailable):
        await emitter.emit(TOPIC_SLIDE_RECEIVED, received("stuck"))
