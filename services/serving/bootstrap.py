"""Composition root of the model-serving service."""

from __future__ import annotations

from grpc import aio
from pydantic import BaseModel

from inference import grpc_predict_v2_pb2 as oip
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from services.serving.core import InferenceService, ModelRegistry
from services.serving.handlers import handlers
from services.serving.servicer import OpenInferenceServicer, SlideInferenceServicer
from services.shared.access import AccessChecker
from services.shared.grpc.server import ServiceHost
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
    objects_ = a.require_objects()
    registry = ModelRegistry(objects_, settings.buckets.models)
    service = InferenceService(
        registry=registry,
        objects=objects_,
        results=a.docs.collection("inference_results"),
        slides=a.docs.collection("serving_slides"),
        outbox=a.outbox("serving_outbox"),
        access=a.require_access(),
        results_bucket=settings.buckets.results,
    )
    a.consume(handlers(service), on_dead_letter=service.on_failure)

    def register(server: aio.Server) -> None:
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(OpenInferenceServicer(service), server)
        serving_pb2_grpc.add_SlideInferenceServiceServicer_to_server(
            SlideInferenceServicer(service), server
        )

    async def load_model() -> None:
        await registry.load(settings.serving.model_name, settings.serving.model_version)

    return a.host(
        service_names=[
            oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            serving_pb2.DESCRIPTOR.services_by_name["SlideInferenceService"].full_name,
        ],
        register=[register],
        on_start=[service.ensure_ready, load_model],
    )
