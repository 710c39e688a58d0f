"""Contract of the MessageBus port (services/shared/ports/bus.py).

Runs against InMemoryBus and KafkaBus (the `bus_env` fixture, see conftest.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from services.shared.ports.bus import Message


def values(messages: list[Message]) -> list[bytes]:
    return [m.value for m in messages]


async def test_round_trip_with_key_and_headers(bus_env):
    topic = await bus_env.topic()
    pub = await bus_env.publisher()
    await pub.publish(
        topic, b"hello", key=b"slide-1", headers=[("trace-id", b"abc"), ("attempt", b"1")]
    )
    await pub.publish(topic, b"")  # keyless, empty value, no headers

    sub = await bus_env.subscription(bus_env.group(), [topic])
    got = await bus_env.fetch_n(sub, 2)
    assert len(got) == 2
    first, second = got
    assert first.topic == topic
    assert first.partition == 0
    assert first.key == b"slide-1"
    assert first.value == b"hello"
    assert first.headers == (("trace-id", b"abc"), ("attempt", b"1"))
    assert first.header("trace-id") == b"abc"
    assert first.header("missing") is None
    assert second.key is None
    assert second.value == b""
    assert second.headers == ()
    assert second.offset == first.offset + 1


async def test_order_is_kept_within_a_partition(bus_env):
    topic = await bus_env.topic(partitions=3)
    pub = await bus_env.publisher()
    keys = [b"a", b"b", b"c", b"d"]
    sent: dict[bytes, list[bytes]] = defaultdict(list)
    for i in range(40):
        key = keys[i % len(keys)]
        value = b"%s-%03d" % (key, i)
        sent[key].append(value)
        await pub.publish(topic, value, key=key)

    sub = await bus_env.subscription(bus_env.group(), [topic])
    got = await bus_env.fetch_n(sub, 40)
    assert len(got) == 40

    partition_of: dict[bytes, int] = {}
    by_key: dict[bytes, list[bytes]] = defaultdict(list)
    last_offset: dict[int, int] = {}
    for m in got:
        assert m.key is not None
        # one key always lands in one partition
        assert partition_of.setdefault(m.key, m.partition) == m.partition
        assert 0 <= m.partition < 3
        # offsets only grow within a partition
        assert m.offset > last_offset.get(m.partition, -1)
        last_offset[m.partition] = m.offset
        by_key[m.key].append(m.value)
    assert dict(by_key) == dict(sent)


async def test_commit_then_next_subscription_resumes_after_it(bus_env):
    topic = await bus_env.topic()
    group = bus_env.group()
    pub = await bus_env.publisher()
    for i in range(5):
        await pub.publish(topic, b"m%d" % i)

    sub = await bus_env.subscription(group, [topic])
    got = await bus_env.fetch_n(sub, 5)
    assert values(got) == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    await sub.commit(got[2])
    await sub.commit(got[4])  # covers everything before it
    await sub.commit(got[1])  # an older commit does not move the group back
    await bus_env.stop(sub)

    await pub.publish(topic, b"m5")
    await pub.publish(topic, b"m6")
    sub2 = await bus_env.subscription(group, [topic])
    got2 = await bus_env.fetch_n(sub2, 2)
    assert values(got2) == [b"m5", b"m6"]
    assert await sub2.fetch(1.0) == []


async def test_uncommitted_messages_are_redelivered_to_the_group(bus_env):
    topic = await bus_env.topic()
    group = bus_env.group()
    pub = await bus_env.publisher()
    for i in range(3):
        await pub.publish(topic, b"m%d" % i, key=b"k")

    sub = await bus_env.subscription(group, [topic])
    got = await bus_env.fetch_n(sub, 3)
    assert values(got) == [b"m0", b"m1", b"m2"]
    await sub.commit(got[0])  # m1 and m2 were fetched but never committed
    await bus_env.stop(sub)

    sub2 = await bus_env.subscription(group, [topic])
    again = await bus_env.fetch_n(sub2, 2)
    assert values(again) == [b"m1", b"m2"]
    assert [m.offset for m in again] == [got[1].offset, got[2].offset]
    # nothing committed by sub2 either: a third member sees the same two again
    await bus_env.stop(sub2)
    sub3 = await bus_env.subscription(group, [topic])
    assert values(await bus_env.fetch_n(sub3, 2)) == [b"m1", b"m2"]


async def test_backlog_counts_what_a_group_has_not_committed(bus_env):
    topic = await bus_env.topic(partitions=2)
    group = bus_env.group()
    assert await bus_env.bus.backlog(group, [topic]) == 0
    pub = await bus_env.publisher()
    for i in range(5):
        await pub.publish(topic, b"m%d" % i, key=b"k%d" % i)
    # a group that never committed has everything ahead of it
    assert await bus_env.bus.backlog(group, [topic]) == 5
    sub = await bus_env.subscription(group, [topic])
    got = await bus_env.fetch_n(sub, 5)
    for m in got[:3]:
        await sub.commit(m)
    committed_per_partition = {}
    for m in got[:3]:
        committed_per_partition[m.partition] = m.offset + 1
    # committing a message commits everything before it in its partition
    done = sum(1 for m in got if m.offset < committed_per_partition.get(m.partition, 0))
    assert await bus_env.bus.backlog(group, [topic]) == 5 - done
    for m in got:
        await sub.commit(m)
    assert await bus_env.bus.backlog(group, [topic]) == 0
    # another group's progress is its own
    assert await bus_env.bus.backlog(bus_env.group(), [topic]) == 5
    await bus_env.stop(sub)


async def test_each_group_sees_every_message(bus_env):
    topic = await bus_env.topic(partitions=2)
    pub = await bus_env.publisher()
    sent = {b"v%d" % i for i in range(10)}
    for i, value in enumerate(sorted(sent)):
        await pub.publish(topic, value, key=b"k%d" % i)

    first = await bus_env.subscription(bus_env.group(), [topic])
    second = await bus_env.subscription(bus_env.group(), [topic])
    got1, got2 = await asyncio.gather(bus_env.fetch_n(first, 10), bus_env.fetch_n(second, 10))
    assert set(values(got1)) == sent
    assert set(values(got2)) == sent
    assert len(got1) == len(got2) == 10
    # committing in one group does not affect the other
    for m in got1:
        await first.commit(m)
    assert await first.fetch(0.5) == []


async def test_subscription_over_several_topics(bus_env):
    t1 = await bus_env.topic()
    t2 = await bus_env.topic()
    pub = await bus_env.publisher()
    await pub.publish(t1, b"one")
    await pub.publish(t2, b"two")
    sub = await bus_env.subscription(bus_env.group(), [t1, t2])
    got = await bus_env.fetch_n(sub, 2)
    assert {(m.topic, m.value) for m in got} == {(t1, b"one"), (t2, b"two")}


async def test_fetch_respects_max_messages(bus_env):
    topic = await bus_env.topic()
    pub = await bus_env.publisher()
    for i in range(10):
        await pub.publish(topic, b"%d" % i)
    sub = await bus_env.subscription(bus_env.group(), [topic])
    got = await bus_env.fetch_n(sub, 10)
    assert len(got) == 10
    # and a bounded batch from a fresh member of a fresh group
    sub2 = await bus_env.subscription(bus_env.group(), [topic])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bus_env.patience_s
    batch: list[Message] = []
    while not batch and loop.time() < deadline:
        batch = await sub2.fetch(1.0, max_messages=3)
    assert 1 <= len(batch) <= 3
    assert values(batch) == [b"%d" % i for i in range(len(batch))]


async def test_fetch_returns_empty_after_timeout_when_idle(bus_env):
    topic = await bus_env.topic()
    sub = await bus_env.subscription(bus_env.group(), [topic])
    for timeout in (1.0, 0.5):
        started = time.monotonic()
        assert await sub.fetch(timeout) == []
        elapsed = time.monotonic() - started
        # the lower bound is the contract; the upper one only says "bounded, not hung"
        assert timeout * 0.9 <= elapsed < timeout + 30.0


async def test_fetch_wakes_up_when_a_message_arrives(bus_env):
    topic = await bus_env.topic()
    sub = await bus_env.subscription(bus_env.group(), [topic])
    pub = await bus_env.publisher()
    assert await sub.fetch(0.2) == []  # (for Kafka: lets the group join start)

    async def later() -> None:
        await asyncio.sleep(0.3)
        await pub.publish(topic, b"late")

    task = asyncio.create_task(later())
    got = await bus_env.fetch_n(sub, 1)
    await task
    assert values(got) == [b"late"]


async def test_publish_before_start_is_an_error(bus_env):
    pub = bus_env.bus.publisher()
    with pytest.raises(RuntimeError):
        await pub.publish("whatever", b"x")


async def test_members_of_one_group_share_the_work(bus_env):
    """Two live members split the partitions; with every message committed by whoever got it
    (commits lost to a rebalance are dropped and the message comes again), a later member of
    the group finds nothing left."""
    topic = await bus_env.topic(partitions=4)
    group = bus_env.group()
    pub = await bus_env.publisher()
    sent = {b"v%02d" % i for i in range(40)}
    for value in sorted(sent):
        await pub.publish(topic, value, key=value)

    first = await bus_env.subscription(group, [topic])
    second = await bus_env.subscription(group, [topic])
    seen: dict[str, list[bytes]] = {"first": [], "second": []}

    async def work(name: str, sub) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bus_env.patience_s
        idle = 0
        while loop.time() < deadline and idle < 3:
            batch = await sub.fetch(0.5)
            for m in batch:
                seen[name].append(m.value)
                await sub.commit(m)
            all_seen = set(seen["first"]) | set(seen["second"])
            idle = idle + 1 if not batch and all_seen == sent else 0

    await asyncio.gather(work("first", first), work("second", second))
    assert set(seen["first"]) | set(seen["second"]) == sent
    await bus_env.stop(first)
    await bus_env.stop(second)

    late = await bus_env.subscription(group, [topic])
    assert await late.fetch(2.0) == []


async def test_stop_ends_a_waiting_fetch(bus_env):
    topic = await bus_env.topic()
    sub = await bus_env.subscription(bus_env.group(), [topic])
    assert await sub.fetch(0.2) == []
    waiting = asyncio.create_task(sub.fetch(20.0))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await bus_env.stop(sub)
    assert await asyncio.wait_for(waiting, 30.0) == []  # well before the fetch's own 20 s
    assert time.monotonic() - started < 19.0


async def test_keyed_messages_go_where_kafkas_default_partitioner_puts_them(bus_env):
    from aiokafka.partitioner import murmur2

    topic = await bus_env.topic(partitions=3)
    pub = await bus_env.publisher()
    keys = [b"slide-%d" % i for i in range(12)]
    for key in keys:
        await pub.publish(topic, key, key=key)
    sub = await bus_env.subscription(bus_env.group(), [topic])
    got = await bus_env.fetch_n(sub, len(keys))
    assert {m.key: m.partition for m in got} == {k: (murmur2(k) & 0x7FFFFFFF) % 3 for k in keys}
