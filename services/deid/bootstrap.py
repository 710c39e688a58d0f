"""Composition root of the de-identification service."""

from __future__ import annotations

from pathlib import Path

from grpc import aio
from pydantic import BaseModel, SecretStr

from services.deid.core import DeidStage
from services.deid.engine import DeidPolicy
from services.deid.handlers import handlers
from services.deid.servicer import DeidServicer
from services.shared import infra
from services.shared.access import AccessChecker, GrpcAccessChecker
from services.shared.auth import TokenVerifier
from services.shared.events import EventEmitter, EventRunner
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
from tessera.deid.v1 import deid_pb2, deid_pb2_grpc

NAME = "deid"


class DeidOptions(BaseModel):
    work_dir: Path
    pseudonym_key: SecretStr
    date_policy: str = "remove"


class DeidSettings(ServiceSettings):
    kafka: KafkaSettings
    s3: S3Settings
    mongo: MongoSettings
    buckets: BucketSettings = BucketSettings()
    deid: DeidOptions


def bootstrap(
    settings: DeidSettings,
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
    outbox = Outbox(docs.collection("deid_outbox"), EventEmitter(NAME, publisher))
    stage = DeidStage(
        objects=objects,
        jobs=docs.collection("deid_jobs"),
        outbox=outbox,
        pseudonymizer=Pseudonymizer(
            settings.deid.pseudonym_key.get_secret_value().encode(), settings.site
        ),
        policy=DeidPolicy(date_policy=settings.deid.date_policy),
        work_dir=settings.deid.work_dir,
        output_bucket=settings.buckets.deidentified,
        access=access,
    )
    runner = EventRunner(
        service=NAME,
        bus=bus,
        group=f"tessera-{NAME}",
        handlers=handlers(stage),
        publisher=publisher,
        on_dead_letter=stage.on_failure,
    )
    checker = access

    def register(server: aio.Server) -> None:
        deid_pb2_grpc.add_DeidentificationServiceServicer_to_server(DeidServicer(stage), server)

    async def start() -> None:
        await docs.ping()
        await publisher.start()
        await stage.ensure_ready()
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
        service_names=[deid_pb2.DESCRIPTOR.services_by_name["DeidentificationService"].full_name],
        register=[register],
        background=[
            Background("consumer", runner.run, runner.stop),
            Background("outbox", outbox.run, outbox.stop),
        ],
        on_start=[start],
        on_close=[close],
    )
