"""Composition root of the metadata (catalogue) service."""

from __future__ import annotations

from grpc import aio
from pydantic import BaseModel, Field, SecretStr

from services.metadata.core import Catalogue
from services.metadata.federation import Federation, FederationConfig
from services.metadata.handlers import handlers
from services.metadata.servicer import MetadataServicer
from services.shared.access import AccessChecker
from services.shared.events import EventRunner
from services.shared.grpc.server import Background, ServiceHost
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
    # slides whose events are projected at once (each event is a few store round trips;
    # one at a time, the catalogue fell behind a sustained ~4 slides/s load)
    consumer_concurrency: int = Field(default=8, ge=1, le=64)


class FederationOptions(BaseModel):
    """Exchange of de-identified catalogue records with peer nodes; the operator writes these
    into the `<node>-federation` ConfigMap (`TESSERA_FEDERATION__ENABLED`,
    `TESSERA_FEDERATION__PUBLISH_TOPIC`, `TESSERA_FEDERATION__SUBSCRIBE_TOPICS` as a comma
    list); the site is `TESSERA_SITE`. Off unless enabled."""

    enabled: bool = False
    publish_topic: str = ""
    subscribe_topics: str = ""

    def topics(self) -> list[str]:
        return [t.strip() for t in self.subscribe_topics.split(",") if t.strip()]


class MetadataSettings(ServiceSettings):
    kafka: KafkaSettings
    mongo: MongoSettings
    metadata: MetadataOptions = MetadataOptions()
    federation: FederationOptions = FederationOptions()


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
    fed = settings.federation
    federation = (
        Federation(
            FederationConfig(settings.site, fed.publish_topic.strip(), fed.topics()),
            records=a.docs.collection("federated_slides"),
            outbox=a.outbox("metadata_outbox") if fed.publish_topic.strip() else None,
        )
        if fed.enabled
        else None
    )
    background: list[Background] = []
    if federation is not None and (peer_handlers := federation.handlers()):
        # its own consumer group: a peer's topic never holds up the local projection
        runner = EventRunner(
            service=NAME,
            bus=a.bus,
            group=f"tessera-{NAME}-federation",
            handlers=peer_handlers,
            publisher=a.publisher,
        )
        background.append(Background("federation-consumer", runner.run, runner.stop))
    catalogue = Catalogue(
        slides=a.docs.collection("catalogue_slides"),
        datasets=a.docs.collection("catalogue_datasets"),
        access=a.require_access(),
        pseudonymizer=Pseudonymizer(key.get_secret_value().encode(), settings.site)
        if (key := settings.metadata.pseudonym_key) is not None
        else None,
        site=settings.site,
        federation=federation,
    )
    a.consume(handlers(catalogue), concurrency=settings.metadata.consumer_concurrency)

    def register(server: aio.Server) -> None:
        metadata_pb2_grpc.add_MetadataServiceServicer_to_server(MetadataServicer(catalogue), server)

    return a.host(
        service_names=[metadata_pb2.DESCRIPTOR.services_by_name["MetadataService"].full_name],
        register=[register],
        background=background,
        on_start=[catalogue.ensure_indexes],
    )
