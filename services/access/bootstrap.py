"""Composition root of the access-control service."""

from __future__ import annotations

from grpc import aio

from services.access.core import AccessControl
from services.access.servicer import AccessServicer
from services.shared import infra
from services.shared.auth import TokenVerifier
from services.shared.events import EventEmitter
from services.shared.grpc.server import Background, ServiceHost
from services.shared.outbox import Outbox
from services.shared.ports.bus import MessageBus, Publisher
from services.shared.ports.documents import DocumentStore
from services.shared.settings import KafkaSettings, MongoSettings, ServiceSettings
from tessera.access.v1 import access_pb2, access_pb2_grpc

NAME = "access"


class AccessSettings(ServiceSettings):
    kafka: KafkaSettings
    mongo: MongoSettings


def build_core(docs: DocumentStore, publisher: Publisher) -> tuple[AccessControl, Outbox]:
    emitter = EventEmitter(NAME, publisher)
    outbox = Outbox(docs.collection("access_outbox"), emitter)
    core = AccessControl(
        datasets=docs.collection("datasets"),
        grants=docs.collection("grants"),
        audit=docs.collection("audit"),
        outbox=outbox,
    )
    return core, outbox


def bootstrap(
    settings: AccessSettings,
    *,
    docs: DocumentStore | None = None,
    bus: MessageBus | None = None,
) -> ServiceHost:
    docs = docs or infra.document_store(settings.mongo)
    bus = bus or infra.kafka_bus(settings.kafka, f"tessera-{NAME}")
    publisher = bus.publisher()
    core, outbox = build_core(docs, publisher)

    def register(server: aio.Server) -> None:
        access_pb2_grpc.add_AccessServiceServicer_to_server(AccessServicer(core), server)

    async def start() -> None:
        await docs.ping()
        await publisher.start()
        await core.ensure_indexes()
        await outbox.ensure_indexes()

    async def close() -> None:
        await publisher.stop()
        await docs.close()

    verifier = TokenVerifier.from_file(
        settings.auth.public_key_file, settings.auth.issuer, settings.auth.audience
    )
    return ServiceHost(
        NAME,
        settings,
        verifier,
        service_names=[access_pb2.DESCRIPTOR.services_by_name["AccessService"].full_name],
        register=[register],
        background=[Background("outbox", outbox.run, outbox.stop)],
        on_start=[start],
        on_close=[close],
    )
