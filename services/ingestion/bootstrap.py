"""Composition root of the ingestion service."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc import aio
from pydantic import BaseModel, SecretStr

from services.ingestion.core import Ingestion, IngestionLimits
from services.ingestion.servicer import IngestionServicer
from services.shared import infra
from services.shared.access import AccessChecker, GrpcAccessChecker
from services.shared.auth import TokenVerifier
from services.shared.events import EventEmitter
from services.shared.grpc.server import Background, ServiceHost
from services.shared.outbox import Outbox
from services.shared.ports.bus import MessageBus
from services.shared.ports.documents import DocumentStore
from services.shared.ports.objects import ObjectStore
from services.shared.pseudonym import Pseudonymizer
from services.shared.settings import (
    BucketSettings,
    KafkaSettings,
    MongoSettings,
    S3Settings,
    ServiceSettings,
)
from tessera.ingestion.v1 import ingestion_pb2

NAME = "ingestion"


class IngestionOptions(BaseModel):
    spool_dir: Path
    # Per-node secret for keyed pseudonyms (at least 32 bytes).
    pseudonym_key: SecretStr
    max_upload_bytes: int = 8 * 1024**3
    max_concurrent_uploads: int = 16
    # Partial uploads untouched this long are deleted (their bytes may identify a patient).
    abandoned_upload_ttl_s: float = 72 * 3600


class IngestionSettings(ServiceSettings):
    kafka: KafkaSettings
    s3: S3Settings
    mongo: MongoSettings
    buckets: BucketSettings = BucketSettings()
    ingestion: IngestionOptions


def bootstrap(
    settings: IngestionSettings,
    *,
    docs: DocumentStore | None = None,
    bus: MessageBus | None = None,
    objects: ObjectStore | None = None,
    access: AccessChecker | None = None,
) -> ServiceHost:
    docs = docs or infra.document_store(settings.mongo)
    bus = bus or infra.kafka_bus(settings.kafka, f"tessera-{NAME}")
    objects = objects or infra.object_store(settings.s3)
    if access is None:
        token = infra.service_token(settings.auth)
        access = GrpcAccessChecker(settings.endpoints.access, lambda: token)
    publisher = bus.publisher()
    outbox = Outbox(docs.collection("ingestion_outbox"), EventEmitter(NAME, publisher))
    opts = settings.ingestion
    core = Ingestion(
        spool_dir=opts.spool_dir,
        uploads=docs.collection("uploads"),
        objects=objects,
        quarantine_bucket=settings.buckets.quarantine,
        access=access,
        outbox=outbox,
        pseudonymizer=Pseudonymizer(opts.pseudonym_key.get_secret_value().encode(), settings.site),
        limits=IngestionLimits(max_upload_bytes=opts.max_upload_bytes),
    )
    servicer = IngestionServicer(core, opts.max_concurrent_uploads)
    expiry_stop = asyncio.Event()
    checker = access

    def register(server: aio.Server) -> None:
        from tessera.ingestion.v1 import ingestion_pb2_grpc

        ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(servicer, server)

    async def start() -> None:
        await docs.ping()
        await publisher.start()
        await core.ensure_ready()
        await outbox.ensure_indexes()

    async def close() -> None:
        await publisher.stop()
        await checker.close()
        await docs.close()

    verifier = TokenVerifier.from_file(
        settings.auth.public_key_file, settings.auth.issuer, settings.auth.audience
    )
    return ServiceHost(
        NAME,
        settings,
        verifier,
        service_names=[ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"].full_name],
        register=[register],
        background=[
            Background("outbox", outbox.run, outbox.stop),
            Background(
                "upload-expiry",
                lambda: core.run_expiry(opts.abandoned_upload_ttl_s, expiry_stop),
                expiry_stop.set,
            ),
        ],
        on_start=[start],
        on_close=[close],
    )
