"""Builds the real adapters from typed settings. Only composition roots call this."""

from __future__ import annotations

from services.shared.adapters.kafka import KafkaBus
from services.shared.adapters.mongo import MongoDocumentStore
from services.shared.adapters.s3 import S3ObjectStore
from services.shared.settings import AuthSettings, KafkaSettings, MongoSettings, S3Settings


def kafka_bus(settings: KafkaSettings, client_id: str) -> KafkaBus:
    return KafkaBus(settings.bootstrap_servers, client_id=client_id)


def object_store(settings: S3Settings) -> S3ObjectStore:
    return S3ObjectStore(
        settings.endpoint,
        settings.access_key.get_secret_value(),
        settings.secret_key.get_secret_value(),
        secure=settings.secure,
        region=settings.region,
    )


def document_store(settings: MongoSettings) -> MongoDocumentStore:
    return MongoDocumentStore(settings.uri.get_secret_value(), settings.database)


def service_token(settings: AuthSettings) -> str:
    if settings.service_token_file is None:
        raise SystemExit("TESSERA_AUTH__SERVICE_TOKEN_FILE is required for this service")
    return settings.service_token_file.read_text().strip()
