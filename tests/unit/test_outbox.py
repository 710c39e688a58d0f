"""Outbox: record, publish, mark sent; what the bus refused is published later by flush."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.shared import telemetry
from services.shared.adapters.memory import InMemoryBus, InMemoryDocumentStore
from services.shared.events import (
    TOPIC_SLIDE_RECEIVED,
    EventEmitter,
    event_id_for,
    new_envelope,
)
from services.shared.outbox import Outbox
from services.shared.ports.bus import Publisher
from services.shared.ports.documents import Collection
from tessera.events.v1 import events_pb2


class FlakyPublisher(Publisher):
    """Delegates to the in-memory bus, or raises while `down` is set."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.down = False
        self.attempts = 0

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("broker unreachable")
        await self.inner.publish(topic, value, key=key, headers=headers)


@dataclass
class Env:
    bus: InMemoryBus
    publisher: FlakyPublisher
    col: Collection
    outbox: Outbox

    def published_ids(self) -> list[str]:
        return [
            events_pb2.EventEnvelope.FromString(m.value).event_id
            for m in self.bus.messages(TOPIC_SLIDE_RECEIVED)
        ]


def make_env(bus: InMemoryBus, publisher: FlakyPublisher) -> Env:
    col = InMemoryDocumentStore().collection("outbox")
    return Env(bus, publisher, col, Outbox(col, EventEmitter("unit", publisher)))


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    bus = InMemoryBus()
    await bus.ensure_topics([TOPIC_SLIDE_RECEIVED])
    publisher = FlakyPublisher(bus.publisher())
    await publisher.start()
    yield make_env(bus, publisher)
    await publisher.stop()


def received(slide_id: str) -> events_pb2.EventEnvelope:
    return new_envelope(
        payload_field="slide_received",
        payload=events_pb2.SlideReceived(size_bytes=1, extension="svs"),
        slide_id=slide_id,
        dataset_id="ds-1",
        event_id=event_id_for(slide_id, "received"),
    )


async def test_publish_when_bus_is_up_marks_sent(env: Env) -> None:
    e = received("s1")
    assert await env.outbox.publish(TOPIC_SLIDE_RECEIVED, e) is True
    doc = await env.col.get(e.event_id)
    assert doc is not None
    assert doc["sent"] is True
    assert doc["topic"] == TOPIC_SLIDE_RECEIVED
    assert events_pb2.EventEnvelope.FromString(bytes(doc["envelope"])).slide_id == "s1"
    assert env.published_ids() == [e.event_id]
    assert await env.outbox.flush() == 0  # nothing left to send
    assert env.published_ids() == [e.event_id]


async def test_bus_down_leaves_event_unsent_and_flush_sends_it_later(env: Env) -> None:
    e = received("s1")
    env.publisher.down = True
    assert await env.outbox.publish(TOPIC_SLIDE_RECEIVED, e) is False
    doc = await env.col.get(e.event_id)
    assert doc is not None and doc["sent"] is False
    assert env.published_ids() == []

    assert await env.outbox.flush() == 0  # still down: nothing sent, nothing lost
    assert (await env.col.get(e.event_id) or {})["sent"] is False

    env.publisher.down = False
    assert await env.outbox.flush() == 1
    assert (await env.col.get(e.event_id) or {})["sent"] is True
    assert env.published_ids() == [e.event_id]
    assert await env.outbox.flush() == 0
    assert env.published_ids() == [e.event_id]


async def test_flush_sends_every_pending_event(env: Env) -> None:
    env.publisher.down = True
    events = [received(f"s{i}") for i in range(3)]
    for e in events:
        await env.outbox.publish(TOPIC_SLIDE_RECEIVED, e)
    env.publisher.down = False
    assert await env.outbox.flush() == 3
    assert sorted(env.published_ids()) == sorted(e.event_id for e in events)
    assert await env.col.count({"sent": False}) == 0


async def test_duplicate_publish_keeps_one_record(env: Env) -> None:
    e = received("s1")
    assert await env.outbox.publish(TOPIC_SLIDE_RECEIVED, e)
    assert await env.outbox.publish(TOPIC_SLIDE_RECEIVED, received("s1"))  # same event id
    assert await env.col.count({}) == 1
    assert (await env.col.get(e.event_id) or {})["sent"] is True
    # a re-publication is allowed (consumers dedupe on the event id), a second record is not
    assert set(env.published_ids()) == {e.event_id}


async def test_duplicate_publish_after_failure_marks_the_one_record_sent(env: Env) -> None:
    env.publisher.down = True
    assert not await env.outbox.publish(TOPIC_SLIDE_RECEIVED, received("s1"))
    env.publisher.down = False
    assert await env.outbox.publish(TOPIC_SLIDE_RECEIVED, received("s1"))
    assert await env.col.count({}) == 1
    assert await env.col.count({"sent": False}) == 0
    assert await env.outbox.flush() == 0


async def test_envelope_that_does_not_belong_on_topic_is_refused_before_recording(
    env: Env,
) -> None:
    wrong = new_envelope(
        payload_field="slide_tiled", payload=events_pb2.SlideTiled(), slide_id="s1"
    )
    with pytest.raises(ValueError, match="does not belong"):
        await env.outbox.publish(TOPIC_SLIDE_RECEIVED, wrong)
    # nothing recorded, so nothing poisons later flushes
    assert await env.col.count({}) == 0
    env.publisher.down = True
    await env.outbox.publish(TOPIC_SLIDE_RECEIVED, received("s2"))
    env.publisher.down = False
    assert await env.outbox.flush() == 1


async def test_run_flushes_in_background_until_stopped(env: Env) -> None:
    env.publisher.down = True
    e = received("s1")
    await env.outbox.publish(TOPIC_SLIDE_RECEIVED, e)
    task = asyncio.create_task(env.outbox.run(interval_s=0.005))
    attempts = env.publisher.attempts

    async def retried() -> None:
        while env.publisher.attempts <= attempts:
            await asyncio.sleep(0.002)

    await asyncio.wait_for(retried(), 2)  # it keeps trying while the bus is down
    env.publisher.down = False

    async def sent() -> None:
        while env.published_ids() != [e.event_id]:
            await asyncio.sleep(0.002)

    await asyncio.wait_for(sent(), 2)
    env.outbox.stop()
    await asyncio.wait_for(task, 2)
    assert (await env.col.get(e.event_id) or {})["sent"] is True


async def test_flushed_event_keeps_the_trace_of_the_request_that_made_it(
    spans: InMemorySpanExporter,
) -> None:
    bus = InMemoryBus()
    await bus.ensure_topics([TOPIC_SLIDE_RECEIVED])
    publisher = FlakyPublisher(bus.publisher())
    await publisher.start()
    env = make_env(bus, publisher)  # built after the tracer patch
    tracer = telemetry.tracer("unit")

    publisher.down = True
    with tracer.start_as_current_span("upload rpc") as request_span:
        await env.outbox.publish(TOPIC_SLIDE_RECEIVED, received("s1"))
    trace_id = request_span.get_span_context().trace_id

    publisher.down = False
    await env.outbox.flush()  # outside any span, as the background loop runs it
    [msg] = bus.messages(TOPIC_SLIDE_RECEIVED)
    sent = events_pb2.EventEnvelope.FromString(msg.value)
    assert sent.trace_context["traceparent"].split("-")[1] == format(trace_id, "032x")
    producers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert producers[-1].context.trace_id == trace_id
    await publisher.stop()


async def test_purge_forgets_only_old_acknowledged_events(env: Env) -> None:
    from datetime import timedelta

    sent = new_envelope(
        payload_field="slide_received",
        payload=events_pb2.SlideReceived(),
        slide_id="s-sent",
        dataset_id="ds",
        event_id=event_id_for("s-sent", "received"),
    )
    assert await env.outbox.publish(TOPIC_SLIDE_RECEIVED, sent)
    env.publisher.down = True
    queued = new_envelope(
        payload_field="slide_received",
        payload=events_pb2.SlideReceived(),
        slide_id="s-queued",
        dataset_id="ds",
        event_id=event_id_for("s-queued", "received"),
    )
    assert not await env.outbox.publish(TOPIC_SLIDE_RECEIVED, queued)

    assert await env.outbox.purge(timedelta(days=1)) == 0  # nothing is old yet
    assert await env.outbox.purge(timedelta(seconds=-1)) == 1  # everything acknowledged is
    assert await env.col.get(sent.event_id) is None
    assert (await env.col.get(queued.event_id) or {}).get("sent") is False
