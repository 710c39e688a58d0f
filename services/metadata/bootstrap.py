"""Composition root of the metadata (catalogue) service."""

from __future__ import annotations

from grpc import aio
from pydantic import BaseModel, SecretStr

from services.metadata.core import Catalogue
from services.metadata.handlers import handlers
from services.metadata.servicer import MetadataServicer
from services.shared.access import AccessChecker
from services.shared.grpc.server import ServiceHost
from services.shared.ports.bus import MessageBus
from services.shared.ports.documents import DocumentStore
from services.shared.pseudonym import Pseudonymizer
from services.shared.settings import KafkaSettings, MongoSettings, ServiceSettings
from services.shared.wiring import Adapters
from tessera.metadata.v1 import metadata_pb2, metadata_pb2_grpc

NAME = "metadata"


class MetadataOptions(BaseModel):
    # The node's pseudonym key, so searches by a partner's own case id work.
    pseudonym_key: SecretStr | None = None


class MetadataSettings(ServiceSettings):
    kafka: KafkaSettings
    mongo: MongoSettings
    metadata: MetadataOptions = MetadataOptions()


def bootstrap(
    settings: MetadataSettings,
    *,
    docs: DocumentStore | None = None,
    bus: MessageBus | None = None,
    access: AccessChecker | None = None,
) -> ServiceHost:
    a = Adapters.build(
        NAME,
        settings,
        kafka=settings.kafka,
        mongo=settings.mongo,
        docs=docs,
        bus=bus,
        access=access,
    )
    catalogue = Catalogue(
        slides=a.docs.collection("catalogue_slides"),
        datasets=a.docs.collection("catalogue_datasets"),
        access=a.require_access(),
        pseudonymizer=Pseudonymizer(key.get_secret_value().encode(), settings.site)
        if (key := settings.metadata.pseudonym_key) is not None
        else None,
    )
    a.consume(handlers(catalogue))

    def register(server: aio.Server) -> None:
        metadata_pb2_grpc.add_MetadataServiceServicer_to_server(MetadataServicer(catalogue), server)

    return a.host(
        service_names=[metadata_pb2.DESCRIPTOR.services_by_name["MetadataService"].full_name],
        register=[register],
        on_start=[catalogue.ensure_indexes],
    )
