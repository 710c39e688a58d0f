"""`tessera_consumer_lag{service,topic,partition}`: the EventRunner reports, per partition it
owns, how many messages its group has not committed yet (in-memory bus; the Kafka adapter
computes the same from the high watermark and the committed offset)."""

from __future__ import annotations

import asyncio
import uuid

from prometheus_client import REGISTRY

from services.shared.adapters.memory import InMemoryBus
from services.shared.events import (
    TOPIC_SLIDE_RECEIVED,
    EventEmitter,
    EventRunner,
    event_id_for,
    new_envelope,
)
from tessera.events.v1 import events_pb2


def _lag(service: str, topic: str, partition: int = 0) -> float | None:
    return REGISTRY.get_sample_value(
        "tessera_consumer_lag", {"service": service, "topic": topic, "partition": str(partition)}
    )


async def test_consumer_lag_follows_the_backlog() -> None:
    service = f"lag-{uuid.uuid4().hex[:6]}"
    bus = InMemoryBus()
    await bus.ensure_topics([TOPIC_SLIDE_RECEIVED])
    publisher = bus.publisher()
    await publisher.start()
    emitter = EventEmitter(service, publisher)
    gate = asyncio.Event()
    handled: list[str] = []

    async def handler(env: events_pb2.EventEnvelope) -> None:
        await gate.wait()
        handled.append(env.slide_id)

    for i in range(5):
        await emitter.emit(
            TOPIC_SLIDE_RECEIVED,
            new_envelope(
                payload_field="slide_received",
                payload=events_pb2.SlideReceived(size_bytes=1),
                slide_id=f"s-{i}",
                dataset_id="ds",
                event_id=event_id_for(f"s-{i}", "received"),
            ),
        )
    runner = EventRunner(
        service=service,
        bus=bus,
        group=f"g-{service}",
        handlers={TOPIC_SLIDE_RECEIVED: handler},
        publisher=publisher,
    )
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(10):
            while _lag(service, TOPIC_SLIDE_RECEIVED) is None:
                await asyncio.sleep(0.01)
        assert _lag(service, TOPIC_SLIDE_RECEIVED) == 5  # nothing committed yet
        runner._lag_reported_at = float("-inf")  # report on the next commit, not in 5 s
        gate.set()
        async with asyncio.timeout(10):
            while len(handled) < 5 or _lag(service, TOPIC_SLIDE_RECEIVED) != 0:
                runner._lag_reported_at = float("-inf")
                await asyncio.sleep(0.01)
    finally:
        runner.stop()
        await asyncio.wait_for(task, 10)
