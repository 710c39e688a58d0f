"""Adapters implementing the ports in `services.shared.ports`.

Real ones: `KafkaBus` (aiokafka), `S3ObjectStore` (minio), `MongoDocumentStore` (PyMongo
AsyncMongoClient). In-memory fakes with the same semantics, for tests and single-process
runs: `InMemoryBus`, `InMemoryObjectStore`, `InMemoryDocumentStore`. Both kinds pass the
contract suites in tests/contract.
"""

from services.shared.adapters.kafka import KafkaBus
from services.shared.adapters.memory import (
    InMemoryBus,
    InMemoryDocumentStore,
    InMemoryObjectStore,
    UnknownTopic,
)
from services.shared.adapters.mongo import MongoDocumentStore
from services.shared.adapters.s3 import S3ObjectStore

__all__ = [
    "InMemoryBus",
    "InMemoryDocumentStore",
    "InMemoryObjectStore",
    "KafkaBus",
    "MongoDocumentStore",
    "S3ObjectStore",
    "UnknownTopic",
]
