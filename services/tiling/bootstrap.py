"""Composition root of the tiling service."""

from __future__ import annotations

from pathlib import Path

from grpc import aio
from pydantic import BaseModel

from services.shared import infra
from services.shared.access import AccessChecker, GrpcAccessChecker
from services.shared.auth import TokenVerifier
from services.shared.events import EventEmitter, EventRunner
from services.shared.grpc.server import Background, ServiceHost
from services.shared.outbox import Outbox
from services.shared.ports.bus import MessageBus
from services.shared.ports.documents import DocumentStore
from services.shared.ports.objects import ObjectStore
from services.shared.settings import (
    BucketSettings,
    KafkaSettings,
    MongoSettings,
    S3Settings,
    ServiceSettings,
)
from services.tiling.core import TilingStage
from services.tiling.handlers import handlers
from services.tiling.http import TileHttpServer
from services.tiling.servicer import TilingServicer
from tessera.tiling.v1 import tiling_pb2, tiling_pb2_grpc

NAME = "tiling"


class TilingOptions(BaseModel):
    work_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int
    # Base URL clients use to reach the HTTP routes (behind an ingress it differs).
    public_base_url: str = ""
    tile_size: int = 254
    overlap: int = 1
    cache_bytes: int = 256 * 1024 * 1024


class TilingSettings(ServiceSettings):
    kafka: KafkaSettings
    s3: S3Settings
    mongo: MongoSettings
    buckets: BucketSettings = BucketSettings()
    tiling: TilingOptions


def bootstrap(
    settings: TilingSettings,
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
    outbox = Outbox(docs.collection("tiling_outbox"), EventEmitter(NAME, publisher))
    opts = settings.tiling
    stage = TilingStage(
        objects=objects,
        pyramids=docs.collection("pyramids"),
        outbox=outbox,
        access=access,
        tiles_bucket=settings.buckets.tiles,
        work_dir=opts.work_dir,
        tile_size=opts.tile_size,
        overlap=opts.overlap,
        cache_bytes=opts.cache_bytes,
    )
    runner = EventRunner(
        service=NAME,
        bus=bus,
        group=f"tessera-{NAME}",
        handlers=handlers(stage),
        publisher=publisher,
        on_dead_letter=stage.on_failure,
    )
    verifier = TokenVerifier.from_file(
        settings.auth.public_key_file, settings.auth.issuer, settings.auth.audience
    )
    base_url = opts.public_base_url or f"http://{opts.http_host}:{opts.http_port}"
    http = TileHttpServer(stage, verifier, opts.http_host, opts.http_port)
    checker = access

    def register(server: aio.Server) -> None:
        tiling_pb2_grpc.add_TilingServiceServicer_to_server(TilingServicer(stage, base_url), server)

    async def start() -> None:
        await docs.ping()
        await publisher.start()
        await stage.ensure_ready()
        await outbox.ensure_indexes()

    async def close() -> None:
        await publisher.stop()
        await checker.close()
        await docs.close()

    return ServiceHost(
        NAME,
        settings,
        verifier,
        service_names=[tiling_pb2.DESCRIPTOR.services_by_name["TilingService"].full_name],
        register=[register],
        background=[
            Background("consumer", runner.run, runner.stop),
            Background("outbox", outbox.run, outbox.stop),
            Background("http", http.run, http.stop),
        ],
        on_start=[start],
        on_close=[close],
    )
