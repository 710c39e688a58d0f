"""Composition root of the de-identification service."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc import aio
from pydantic import BaseModel, Field, SecretStr

from services.deid.core import MAX_RETENTION_HOURS, DeidStage
from services.deid.engine import DeidPolicy
from services.deid.handlers import handlers
from services.deid.servicer import DeidServicer
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
from tessera.deid.v1 import deid_pb2, deid_pb2_grpc

NAME = "deid"


class DeidOptions(BaseModel):
    work_dir: Path
    pseudonym_key: SecretStr
    date_policy: str = "remove"  # "remove" | "year"
    macro_policy: str = "remove"  # "remove" | "blank_label"
    macro_label_fraction: float = 1 / 3
    # Node defaults for datasets without a stored policy (SetDatasetPolicy overrides them):
    # hours the identified original stays in quarantine after the outcome (0: erased at once).
    quarantine_retention_hours: int = Field(default=0, ge=0, le=MAX_RETENTION_HOURS)
    # How often the sweep erases raw copies whose retention has passed.
    sweep_interval_s: float = Field(default=60.0, gt=0)


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
    opts = settings.deid
    stage = DeidStage(
        objects=a.require_objects(),
        jobs=a.docs.collection("deid_jobs"),
        outbox=a.outbox("deid_outbox"),
        pseudonymizer=Pseudonymizer(opts.pseudonym_key.get_secret_value().encode(), settings.site),
        policy=DeidPolicy(
            date_policy=opts.date_policy,
            macro_policy=opts.macro_policy,
            macro_label_fraction=opts.macro_label_fraction,
        ),
        work_dir=opts.work_dir,
        output_bucket=settings.buckets.deidentified,
        access=a.require_access(),
        datasets=a.docs.collection("deid_datasets"),
        rules=a.docs.collection("deid_rules"),
        default_retention_hours=opts.quarantine_retention_hours,
    )
    a.consume(handlers(stage), on_dead_letter=stage.on_failure)
    sweep_stop = asyncio.Event()

    def register(server: aio.Server) -> None:
        deid_pb2_grpc.add_DeidentificationServiceServicer_to_server(DeidServicer(stage), server)

    return a.host(
        service_names=[deid_pb2.DESCRIPTOR.services_by_name["DeidentificationService"].full_name],
        register=[register],
        background=[
            Background(
                "quarantine-sweep",
                lambda: stage.run_sweeper(opts.sweep_interval_s, sweep_stop),
                sweep_stop.set,
            )
        ],
        on_start=[stage.ensure_ready],
    )
