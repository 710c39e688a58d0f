"""Composition root of the ingestion service."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc import aio
from pydantic import BaseModel, SecretStr

from services.ingestion.admission import Admission
from services.ingestion.core import Ingestion, IngestionLimits
from services.ingestion.servicer import IngestionServicer
from services.shared.access import AccessChecker
from services.shared.grpc.server import Background, ServiceHost
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
from services.shared.wiring import Adapters
from tessera.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc

NAME = "ingestion"


class IngestionOptions(BaseModel):
    spool_dir: Path
    # Per-node secret for keyed pseudonyms (at least 32 bytes).
    pseudonym_key: SecretStr
    max_upload_bytes: int = 8 * 1024**3
    max_concurrent_uploads: int = 16
    # Partial uploads untouched this long are deleted (their bytes may identify a patient).
    abandoned_upload_ttl_s: float = 72 * 3600
    # New uploads are refused (RESOURCE_EXHAUSTED, PIPELINE_BACKLOG) while more than this many
    # received slides wait for de-identification; 0 admits everything.
    max_pipeline_backlog: int = 100
    backlog_retry_after_s: float = 15.0


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
    a = Adapters.build(
        NAME,
        settings,
        kafka=settings.kafka,
        mongo=settings.mongo,
        s3=settings.s3,
        docs=docs,
        bus=bus,
        objects=objects,
        access=access,
    )
    opts = settings.ingestion
    core = Ingestion(
        spool_dir=opts.spool_dir,
        uploads=a.docs.collection("uploads"),
        objects=a.require_objects(),
        quarantine_bucket=settings.buckets.quarantine,
        access=a.require_access(),
        outbox=a.outbox("ingestion_outbox"),
        pseudonymizer=Pseudonymizer(opts.pseudonym_key.get_secret_value().encode(), settings.site),
        limits=IngestionLimits(max_upload_bytes=opts.max_upload_bytes),
        admission=Admission(
            a.bus,
            max_backlog=opts.max_pipeline_backlog,
            retry_after_s=opts.backlog_retry_after_s,
        ),
    )
    servicer = IngestionServicer(core, opts.max_concurrent_uploads)
    expiry_stop = asyncio.Event()

    def register(server: aio.Server) -> None:
        ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(servicer, server)

    return a.host(
        service_names=[ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"].full_name],
        register=[register],
        background=[
            Background(
                "upload-expiry",
                lambda: core.run_expiry(opts.abandoned_upload_ttl_s, expiry_stop),
                expiry_stop.set,
            )
        ],
        on_start=[core.ensure_ready],
    )
