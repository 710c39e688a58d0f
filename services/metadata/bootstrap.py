"""Composition root of the metadata (catalogue) service."""

from __future__ import annotations

from grpc import aio

from services.metadata.core import Catalogue
from services.metadata.handlers import handlers
from services.metadata.servicer import MetadataServicer
from services.shared import infra
from services.shared.access import AccessChecker, GrpcAccessChecker
from services.shared.auth import TokenVerifier
from services.shared.events import EventRunner
from services.shared.grpc.server import Background, ServiceHost
from services.shared.ports.bus import MessageBus
from services.shared.ports.documents import DocumentStore
from services.shared.settings import KafkaSettings, MongoSettings, ServiceSettings
from tessera.metadata.v1 import metadata_pb2, metadata_pb2_grpc

NAME = "metadata"


class MetadataSettings(ServiceSettings):
    kafka: KafkaSettings
    mongo: MongoSettings


def bootstrap(
    settings: MetadataSettings,
    *,
    docs: DocumentStore | None = None,
    bus: MessageBus | None = None,
    access: AccessChecker | None = None,
) -> ServiceHost:
    docs = docs or infra.document_store(settings.mongo)
    bus = bus or infra.kafka_bus(settings.kafka, f"tessera-{NAME}")
    if access is None:
        token = infra.service_token(settings.auth)
        access = GrpcAccessChecker(settings.endpoints.access, lambda: token)
    catalogue = Catalogue(
        slides=docs.collection("catalogue_slides"),
        datasets=docs.collection("catalogue_datasets"),
        access=access,
    )
    publisher = bus.publisher()  # dead letters only
    runner = EventRunner(
        service=NAME,
        bus=bus,
        group=f"tessera-{NAME}",
        handlers=handlers(catalogue),
        publisher=publisher,
    )
    checker = access

    def register(server: aio.Server) -> None:
        metadata_pb2_grpc.add_MetadataServiceServicer_to_server(MetadataServicer(catalogue), server)

    async def start() -> None:
        await docs.ping()
        await publisher.start()
        await catalogue.ensure_indexes()

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
        service_names=[metadata_pb2.DESCRIPTOR.services_by_name["MetadataService"].full_name],
        register=[register],
        background=[Background("consumer", runner.run, runner.stop)],
        on_start=[start],
        on_close=[close],
    )
