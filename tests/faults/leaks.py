"""What a fault or load run left behind, read straight from the servers and files of its world:
every message of some Kafka topics, and a scan of every log line, trace file, event and
`/metrics` page for identifying values of the inputs. Shared by the fault campaign
(tests/faults/harness.py) and the load run (scripts/bench_load.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import aiohttp
from aiokafka import AIOKafkaConsumer

from services.deid.engine.streams import PatternSet
from services.shared.events import ALL_TOPICS
from tests.faults.world import SERVICE_NAMES, FaultWorld

Message = tuple[str, bytes, dict[str, bytes]]  # topic, value, headers


async def read_topics(kafka: str, topics: Iterable[str]) -> tuple[list[Message], int]:
    """Every message of `topics`, from the beginning (no consumer group, nothing committed),
    and how many partitions could not be read to their end within a minute."""
    probe = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=None)
    await probe.start()
    try:
        existing = [t for t in topics if t in await probe.topics()]
    finally:
        await probe.stop()
    out: list[Message] = []
    if not existing:
        return out, 0
    consumer = AIOKafkaConsumer(
        *existing,
        bootstrap_servers=kafka,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 60
        batch = await consumer.getmany(timeout_ms=1000)
        while not consumer.assignment() and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
        parts = list(consumer.assignment())
        ends = await consumer.end_offsets(parts)
        pending = {tp for tp in parts if ends[tp] > 0}
        while True:
            for tp, msgs in batch.items():
                for m in msgs:
                    out.append((tp.topic, m.value or b"", dict(m.headers or ())))
                    if m.offset + 1 >= ends[tp]:
                        pending.discard(tp)
            if not pending or time.monotonic() > deadline:
                break
            batch = await consumer.getmany(timeout_ms=500)
    finally:
        await consumer.stop()
    return out, len(pending)


async def find_leaks(world: FaultWorld, needles: Iterable[bytes]) -> tuple[list[str], int]:
    """Where any of `needles` occurs: names of the log and trace files, topics and `/metrics`
    pages holding one (never the value itself), and how many sources were scanned. Raises
    RuntimeError when a topic could not be read to its end (an unread message proves nothing)."""
    patterns = sorted({n for n in needles if n})
    if not patterns:
        raise ValueError("no identifying values to look for")
    found: list[str] = []
    scanned = 0
    search = PatternSet(patterns)

    def check(where: str, data: bytes) -> None:
        nonlocal scanned
        scanned += 1
        if search.scan(data, lambda _index, _offset: True):
            found.append(where)

    for path in world.logs() + world.traces():
        check(path.name, path.read_bytes())
    messages, unread = await read_topics(world.kafka, ALL_TOPICS)
    if unread:
        raise RuntimeError(f"could not read {unread} partitions to their end")
    per_topic: dict[str, list[bytes]] = {}
    for topic, value, headers in messages:
        per_topic.setdefault(topic, []).append(value + b"".join(headers.values()))
    for topic, parts in sorted(per_topic.items()):
        # one scan per message: a value never spans two messages
        before = len(found)
        for part in parts:
            check(topic, part)
            if len(found) > before:
                break
    async with aiohttp.ClientSession() as http:
        for name in SERVICE_NAMES:
            with contextlib.suppress(aiohttp.ClientError):
                url = f"http://127.0.0.1:{world.metrics_port(name)}/metrics"
                async with http.get(url) as r:
                    check(f"{name} /metrics", await r.read())
    return sorted(set(found)), scanned
