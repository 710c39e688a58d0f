"""Composition root of the access-control service."""

from __future__ import annotations

from grpc import aio

from services.access.core import AccessControl
from services.access.servicer import AccessServicer
from services.shared.grpc.server import ServiceHost
from services.shared.ports.bus import MessageBus
from services.shared.ports.documents import DocumentStore
from services.shared.settings import KafkaSettings, MongoSettings, ServiceSettings
from services.shared.wiring import Adapters
from tessera.access.v1 import access_pb2, access_pb2_grpc

NAME = "access"


class AccessSettings(ServiceSettings):
    kafka: KafkaSettings
    mongo: MongoSettings


def build_core(a: Adapters) -> AccessControl:
    return AccessControl(
        datasets=a.docs.collection("datasets"),
        grants=a.docs.collection("grants"),
        audit=a.docs.collection("audit"),
        outbox=a.outbox("access_outbox"),
    )


def bootstrap(
    settings: AccessSettings,
    *,
    docs: DocumentStore | None = None,
    bus: MessageBus | None = None,
) -> ServiceHost:
    a = Adapters.build(
        NAME,
        settings,
        kafka=settings.kafka,
        mongo=settings.mongo,
        with_access=False,
        docs=docs,
        bus=bus,
    )
    core = build_core(a)

    def register(server: aio.Server) -> None:
        access_pb2_grpc.add_AccessServiceServicer_to_server(AccessServicer(core), server)

    return a.host(
        service_names=[access_pb2.DESCRIPTOR.services_by_name["AccessService"].full_name],
        register=[register],
        on_start=[core.ensure_indexes],
    )
