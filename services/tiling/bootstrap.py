"""Composition root of the tiling service."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from grpc import aio
from pydantic import BaseModel, Field

from services.shared.access import AccessChecker
from services.shared.grpc.server import Background, ServiceHost
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
from services.shared.wiring import Adapters
from services.tiling.cache import CACHE_METRICS
from services.tiling.core import TilingStage
from services.tiling.handlers import handlers
from services.tiling.http import TileHttpServer
from services.tiling.records import CatalogueRecords
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
    # Tiled-JPEG sources (SVS, tiled TIFF) keep their own tile size with no overlap, so the
    # full-resolution tiles are the scanner's bytes; tile_size/overlap apply to other formats.
    lossless_copy: bool = True
    # DICOM WSI archive series of every slide next to its pyramid (slides/ID/dicom/).
    dicom_export: bool = True
    # Frames of sources whose tiles cannot be copied: "jpeg" (Q 95) or "jpeg2000" (lossless,
    # far slower to encode).
    dicom_codec: Literal["jpeg", "jpeg2000"] = "jpeg"
    # In-process LRU of hot tiles, bounded in bytes.
    cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Seconds an allow decision of access control is reused for viewing one slide (tiles,
    # descriptor, thumbnail, IIIF): also the longest a revoked grant keeps working here, and
    # the audit granularity (one record per subject, slide and window). 0 asks every request.
    access_cache_ttl_s: float = Field(default=30.0, ge=0, le=300)


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
    opts = settings.tiling
    stage = TilingStage(
        objects=a.require_objects(),
        pyramids=a.docs.collection("pyramids"),
        outbox=a.outbox("tiling_outbox"),
        access=a.require_access(),
        tiles_bucket=settings.buckets.tiles,
        work_dir=opts.work_dir,
        tile_size=opts.tile_size,
        overlap=opts.overlap,
        lossless_copy=opts.lossless_copy,
        dicom_export=opts.dicom_export,
        dicom_codec=opts.dicom_codec,
        cache_bytes=opts.cache_bytes,
        access_ttl_s=opts.access_cache_ttl_s,
    )
    CACHE_METRICS.watch(stage.cache, stage.decisions)
    a.consume(handlers(stage), on_dead_letter=stage.on_failure)
    verifier = a.verifier()
    base_url = opts.public_base_url or f"http://{opts.http_host}:{opts.http_port}"
    # The viewer's record panel asks the catalogue with the viewer's own token.
    records = CatalogueRecords(settings.endpoints.metadata) if settings.endpoints.metadata else None
    http = TileHttpServer(
        stage,
        verifier,
        opts.http_host,
        opts.http_port,
        records=records,
        public_base_url=opts.public_base_url,
    )

    def register(server: aio.Server) -> None:
        tiling_pb2_grpc.add_TilingServiceServicer_to_server(TilingServicer(stage, base_url), server)

    return a.host(
        service_names=[tiling_pb2.DESCRIPTOR.services_by_name["TilingService"].full_name],
        register=[register],
        background=[Background("http", http.run, http.stop)],
        on_start=[stage.ensure_ready],
        verifier=verifier,
    )
