"""Fixtures for the port contract suites.

Every fixture here is parametrised over two backends: "memory" (the in-memory fake) and
"real" (the production adapter against the local stack, marked `integration`). The same test
body runs against both, so the fake cannot drift from the real thing.

A real backend that is not reachable makes its tests fail (an error at setup naming the
server, the address and the variable to set), never skip: CI must not go green on a suite
that did not run. Deselect them explicitly with `-m "not integration"`.

Every test gets its own topics, groups, bucket and database (uuid-named) and removes them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from minio import Minio
from pymongo import AsyncMongoClient

from services.shared.adapters.kafka import KafkaBus
from services.shared.adapters.memory import (
    InMemoryBus,
    InMemoryDocumentStore,
    InMemoryObjectStore,
)
from services.shared.adapters.mongo import MongoDocumentStore
from services.shared.adapters.s3 import S3ObjectStore
from services.shared.ports.bus import Message, MessageBus, Publisher, Subscription
from services.shared.ports.documents import DocumentStore
from services.shared.ports.objects import ObjectStore

KAFKA_BOOTSTRAP = os.environ.get("TESSERA_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
S3_ENDPOINT = os.environ.get("TESSERA_S3__ENDPOINT", "127.0.0.1:7070")
S3_ACCESS_KEY = os.environ.get("TESSERA_S3__ACCESS_KEY", "tessera")
S3_SECRET_KEY = os.environ.get("TESSERA_S3__SECRET_KEY", "tessera-local-secret")
MONGO_URI = os.environ.get("TESSERA_MONGO__URI", "mongodb://127.0.0.1:27017/")

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("real", id="real", marks=pytest.mark.integration),
]

HINT = "start the local stack with `deploy/local/stack.sh up` (or set {var})"


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    address = address.split(",")[0].strip()
    address = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    return host.strip("[]"), int(port)


async def require_reachable(what: str, address: str, default_port: int, var: str) -> None:
    """Fail (not skip) the test when a real server does not accept TCP connections."""
    host, port = _host_port(address, default_port)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3.0)
    except (OSError, TimeoutError) as exc:
        error = repr(exc)
    else:
        writer.close()
        await writer.wait_closed()
        return
    pytest.fail(
        f"{what} is not reachable at {host}:{port}: {error}; " + HINT.format(var=var),
        pytrace=False,
    )


# ---------------------------------------------------------------------------------------------
# bus
# ---------------------------------------------------------------------------------------------


@dataclass
class BusEnv:
    """A bus plus bookkeeping, so each test gets fresh topics/groups and a clean teardown."""

    kind: str
    bus: MessageBus
    # how long to wait for messages that must arrive (a Kafka group join takes seconds)
    patience_s: float
    topics: list[str] = field(default_factory=list)
    _running: list[Publisher | Subscription] = field(default_factory=list)

    async def topic(self, partitions: int = 1) -> str:
        name = _unique("contract")
        self.topics.append(name)
        await self.bus.ensure_topics([name], partitions=partitions)
        return name

    @staticmethod
    def group() -> str:
        return _unique("group")

    async def publisher(self) -> Publisher:
        pub = self.bus.publisher()
        await pub.start()
        self._running.append(pub)
        return pub

    async def subscription(self, group: str, topics: list[str]) -> Subscription:
        sub = self.bus.subscription(group, topics)
        await sub.start()
        self._running.append(sub)
        return sub

    async def stop(self, part: Publisher | Subscription) -> None:
        await part.stop()
        if part in self._running:
            self._running.remove(part)

    async def fetch_n(
        self, sub: Subscription, n: int, timeout_s: float | None = None
    ) -> list[Message]:
        """Fetch until `n` messages arrived or the patience ran out (then return what came)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.patience_s if timeout_s is None else timeout_s)
        got: list[Message] = []
        while len(got) < n:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            got.extend(await sub.fetch(min(remaining, 1.0), max_messages=n - len(got)))
        return got

    async def close(self) -> None:
        for part in reversed(self._running):
            await part.stop()
        self._running.clear()


async def _delete_topics(topics: list[str]) -> None:
    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP, client_id="contract-cleanup")
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


@pytest.fixture(params=BACKENDS)
async def bus_env(request: pytest.FixtureRequest) -> AsyncIterator[BusEnv]:
    if request.param == "memory":
        env = BusEnv("memory", InMemoryBus(), patience_s=2.0)
        yield env
        await env.close()
        return
    await require_reachable("Kafka", KAFKA_BOOTSTRAP, 9092, "TESSERA_KAFKA__BOOTSTRAP_SERVERS")
    env = BusEnv("real", KafkaBus(KAFKA_BOOTSTRAP, _unique("contract")), patience_s=30.0)
    try:
        yield env
    finally:
        await env.close()
        await _delete_topics(env.topics)


# ---------------------------------------------------------------------------------------------
# object store
# ---------------------------------------------------------------------------------------------


@dataclass
class ObjectEnv:
    kind: str
    store: ObjectStore
    bucket: str


@pytest.fixture(params=BACKENDS)
async def object_env(request: pytest.FixtureRequest) -> AsyncIterator[ObjectEnv]:
    bucket = _unique("tessera-contract")
    if request.param == "memory":
        store: ObjectStore = InMemoryObjectStore()
        await store.ensure_bucket(bucket)
        yield ObjectEnv("memory", store, bucket)
        return
    await require_reachable("S3 (versitygw)", S3_ENDPOINT, 7070, "TESSERA_S3__ENDPOINT")
    store = S3ObjectStore(S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY, secure=False)
    await store.ensure_bucket(bucket)
    try:
        yield ObjectEnv("real", store, bucket)
    finally:
        raw = Minio(S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY, secure=False, region="us-east-1")
        await store.delete_prefix(bucket, "")
        await asyncio.to_thread(raw.remove_bucket, bucket)


# ---------------------------------------------------------------------------------------------
# document store
# ---------------------------------------------------------------------------------------------


@dataclass
class DocumentEnv:
    kind: str
    store: DocumentStore
    database: str


@pytest.fixture(params=BACKENDS)
async def document_env(request: pytest.FixtureRequest) -> AsyncIterator[DocumentEnv]:
    database = f"contract_{uuid.uuid4().hex[:16]}"
    if request.param == "memory":
        mem = InMemoryDocumentStore()
        yield DocumentEnv("memory", mem, database)
        await mem.close()
        return
    await require_reachable("MongoDB (FerretDB)", MONGO_URI, 27017, "TESSERA_MONGO__URI")
    store = MongoDocumentStore(MONGO_URI, database, server_selection_timeout_ms=5_000)
    error = None
    try:
        await store.ping()
    except Exception as exc:
        error = repr(exc)
    if error is not None:
        await store.close()
        pytest.fail(
            f"MongoDB at {MONGO_URI} does not answer ping: {error}; "
            + HINT.format(var="TESSERA_MONGO__URI"),
            pytrace=False,
        )
    try:
        yield DocumentEnv("real", store, database)
    finally:
        await store.close()
        raw: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            MONGO_URI, serverSelectionTimeoutMS=5_000
        )
        try:
            await raw.drop_database(database)
        finally:
            await raw.close()
