"""Composition root of the model-serving service."""

from __future__ import annotations

from grpc import aio
from pydantic import BaseModel

from inference import grpc_predict_v2_pb2 as oip
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from services.serving.core import InferenceService, ModelRegistry
from services.serving.handlers import handlers
from services.serving.servicer import OpenInferenceServicer, SlideInferenceServicer
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
from tessera.serving.v1 import serving_pb2, serving_pb2_grpc

NAME = "serving"


class ServingOptions(BaseModel):
    model_name: str = "tissue-detector"
    model_version: str = "1"


class ServingSettings(ServiceSettings):
    kafka: KafkaSettings
    s3: S3Settings
    mongo: MongoSettings
    buckets: BucketSettings = BucketSettings()
    serving: ServingOptions = ServingOptions()


def bootstrap(
    settings: ServingSettings,
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
    outbox = Outbox(docs.collection("serving_outbox"), EventEmitter(NAME, publisher))
    registry = ModelRegistry(objects, settings.buckets.models)
    service = InferenceService(
        registry=registry,
        objects=objects,
        results=docs.collection("inference_results"),
        slides=docs.collection("serving_slides"),
        outbox=outbox,
        access=access,
        results_bucket=settings.buckets.results,
    )
    runner = EventRunner(
        service=NAME,
        bus=bus,
        group=f"tessera-{NAME}",
        handlers=handlers(service),
        publisher=publisher,
        on_dead_letter=service.on_failure,
    )
    checker = access

    def register(server: aio.Server) -> None:
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(OpenInferenceServicer(service), server)
        serving_pb2_grpc.add_SlideInferenceServiceServicer_to_server(
            SlideInferenceServicer(service), server
        )

    async def start() -> None:
        await docs.ping()
        await publisher.start()
        await service.ensure_ready()
        await outbox.ensure_indexes()
        await registry.load(settings.serving.model_name, settings.serving.model_version)

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
        service_names=[
            oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            serving_pb2.DESCRIPTOR.services_by_name["SlideInferenceService"].full_name,
        ],
        register=[register],
        background=[
            Background("consumer", runner.run, runner.stop),
            Background("outbox", outbox.run, outbox.stop),
        ],
        on_start=[start],
        on_close=[close],
    )
