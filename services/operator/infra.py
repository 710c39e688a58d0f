"""Reconciles what a node needs outside Kubernetes, through each server's admin API: Kafka topics
(partitions, dead-letter topics), S3 buckets and MongoDB indexes. Reuses the shared adapters
(services/shared/adapters) where they already do the job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka.admin import NewPartitions
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError
from minio.error import S3Error
from pymongo.errors import PyMongoError

from services.operator.builders import INDEXES, TopicPlan
from services.shared.adapters.kafka import KafkaBus
from services.shared.adapters.mongo import MongoDocumentStore
from services.shared.adapters.s3 import S3ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    """Where a node's servers are and the credentials (read from its Secrets)."""

    kafka_bootstrap: str
    replication_factor: int
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_secure: bool
    s3_region: str
    mongo_uri: str
    mongo_database: str


@dataclass
class InfraReport:
    topics: list[str] = field(default_factory=list)
    buckets: list[str] = field(default_factory=list)
    indexes: int = 0
    problems: dict[str, str] = field(default_factory=dict)


class InfraReconciler:
    def __init__(self, timeout_s: float = 20.0) -> None:
        self._timeout = timeout_s

    # -- Kafka -------------------------------------------------------------------------------

    async def ensure_topics(self, ep: Endpoints, plan: Sequence[TopicPlan]) -> list[str]:
        """Creates missing topics with their partitions and raises the partition count of
        existing ones that have fewer (Kafka cannot lower it)."""
        bus = KafkaBus(
            ep.kafka_bootstrap,
            client_id="tessera-operator",
            replication_factor=ep.replication_factor,
            request_timeout_ms=int(self._timeout * 1000),
        )
        by_count: dict[int, list[str]] = {}
        for t in plan:
            by_count.setdefault(t.partitions, []).append(t.name)
        for count, names in sorted(by_count.items()):
            await bus.ensure_topics(names, partitions=count)
        wanted = {t.name: t.partitions for t in plan}
        admin = bus.admin_client()
        try:
            await admin.start()
            grow: dict[str, NewPartitions] = {}
            for meta in await admin.describe_topics(sorted(wanted)):
                have = len(meta.get("partitions") or [])
                if have < wanted[meta["topic"]]:
                    grow[meta["topic"]] = NewPartitions(total_count=wanted[meta["topic"]])
            if grow:
                await admin.create_partitions(grow, timeout_ms=int(self._timeout * 1000))
                log.info("raised the partition count of %d topics", len(grow))
        finally:
            await admin.close()
        return sorted(wanted)

    async def delete_topics(self, ep: Endpoints, names: Sequence[str]) -> None:
        bus = KafkaBus(ep.kafka_bootstrap, client_id="tessera-operator")
        admin = bus.admin_client()
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            doomed = [n for n in names if n in existing]
            if doomed:
                with contextlib.suppress(UnknownTopicOrPartitionError):
                    await admin.delete_topics(doomed, timeout_ms=int(self._timeout * 1000))
        finally:
            await admin.close()

    # -- S3 ----------------------------------------------------------------------------------

    def _store(self, ep: Endpoints) -> S3ObjectStore:
        return S3ObjectStore(
            ep.s3_endpoint,
            ep.s3_access_key,
            ep.s3_secret_key,
            secure=ep.s3_secure,
            region=ep.s3_region,
        )

    async def ensure_buckets(self, ep: Endpoints, buckets: Sequence[str]) -> list[str]:
        store = self._store(ep)
        for bucket in buckets:
            await store.ensure_bucket(bucket)
        return sorted(buckets)

    async def delete_buckets(self, ep: Endpoints, buckets: Sequence[str]) -> None:
        from minio import Minio
        from minio.deleteobjects import DeleteObject

        client = Minio(
            ep.s3_endpoint,
            access_key=ep.s3_access_key,
            secret_key=ep.s3_secret_key,
            secure=ep.s3_secure,
            region=ep.s3_region,
        )

        def remove(bucket: str) -> None:
            if not client.bucket_exists(bucket):
                return
            objects = [
                DeleteObject(o.object_name)
                for o in client.list_objects(bucket, recursive=True)
                if o.object_name
            ]
            for err in client.remove_objects(bucket, objects):
                raise RuntimeError(f"cannot empty bucket {bucket}: {err.code}")
            client.remove_bucket(bucket)

        for bucket in buckets:
            await asyncio.to_thread(remove, bucket)

    async def object_count(self, ep: Endpoints, bucket: str, prefix: str) -> int:
        from minio import Minio

        client = Minio(
            ep.s3_endpoint,
            access_key=ep.s3_access_key,
            secret_key=ep.s3_secret_key,
            secure=ep.s3_secure,
            region=ep.s3_region,
        )

        def count() -> int:
            if not client.bucket_exists(bucket):
                return 0
            return sum(1 for _ in client.list_objects(bucket, prefix=prefix, recursive=True))

        return await asyncio.to_thread(count)

    # -- MongoDB -----------------------------------------------------------------------------

    async def ensure_indexes(
        self, ep: Endpoints, indexes: Mapping[str, Sequence[Sequence[tuple[str, int]]]] = INDEXES
    ) -> int:
        docs = MongoDocumentStore(
            ep.mongo_uri,
            ep.mongo_database,
            server_selection_timeout_ms=int(self._timeout * 1000),
            app_name="tessera-operator",
        )
        n = 0
        try:
            await docs.ping()
            for name, specs in sorted(indexes.items()):
                coll = docs.collection(name)
                for spec in specs:
                    await coll.ensure_index(list(spec))
                    n += 1
        finally:
            await docs.close()
        return n

    async def drop_database(self, ep: Endpoints) -> None:
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
            ep.mongo_uri, serverSelectionTimeoutMS=int(self._timeout * 1000)
        )
        try:
            await client.drop_database(ep.mongo_database)
        finally:
            await client.close()

    # -- all ---------------------------------------------------------------------------------

    async def reconcile(
        self, ep: Endpoints, topics: Sequence[TopicPlan], buckets: Sequence[str]
    ) -> InfraReport:
        """Each server separately: one being away does not stop the others being reconciled."""
        report = InfraReport()

        async def bounded(coro):  # type: ignore[no-untyped-def]
            return await asyncio.wait_for(coro, self._timeout * 3)

        try:
            report.topics = await bounded(self.ensure_topics(ep, topics))
        except (KafkaError, OSError, TimeoutError) as exc:
            report.problems["KafkaUnavailable"] = (
                f"Kafka topics not reconciled ({type(exc).__name__})"
            )
        try:
            report.buckets = await bounded(self.ensure_buckets(ep, buckets))
        except (S3Error, OSError, TimeoutError, ValueError) as exc:
            report.problems["ObjectStoreUnavailable"] = (
                f"buckets not reconciled ({type(exc).__name__})"
            )
        except Exception as exc:  # noqa: BLE001 - urllib3 errors and the like: report, retry later
            report.problems["ObjectStoreUnavailable"] = (
                f"buckets not reconciled ({type(exc).__name__})"
            )
        try:
            report.indexes = await bounded(self.ensure_indexes(ep))
        except (PyMongoError, OSError, TimeoutError) as exc:
            report.problems["DocumentStoreUnavailable"] = (
                f"indexes not reconciled ({type(exc).__name__})"
            )
        return report
