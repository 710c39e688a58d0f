"""Security walk on in-process servers: each service's real composition root (`bootstrap`)
over in-memory fakes, served by a grpc.aio server with the production interceptors.

Every RPC of every service in the generated descriptors (`security_walk.all_methods`) is
called with no token and with every forged token (UNAUTHENTICATED), and with a valid token of
a caller that holds no role and no grant, about a dataset and slide that exist in the fakes
(PERMISSION_DENIED), except the reviewed allow-lists. The e2e twin runs the same walk against
the six running services.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from services.access.bootstrap import AccessSettings
from services.access.bootstrap import bootstrap as access_bootstrap
from services.deid.bootstrap import DeidSettings
from services.deid.bootstrap import bootstrap as deid_bootstrap
from services.ingestion.bootstrap import IngestionSettings
from services.ingestion.bootstrap import bootstrap as ingestion_bootstrap
from services.metadata.bootstrap import MetadataSettings
from services.metadata.bootstrap import bootstrap as metadata_bootstrap
from services.serving.bootstrap import ServingSettings
from services.serving.bootstrap import bootstrap as serving_bootstrap
from services.shared.access import StaticAccessChecker
from services.shared.adapters.memory import (
    InMemoryBus,
    InMemoryDocumentStore,
    InMemoryObjectStore,
)
from services.shared.auth import TokenIssuer, generate_keypair
from services.shared.grpc.interceptors import ServerPipeline
from services.shared.grpc.server import ServiceHost
from tests.unit.security_walk import (
    OPEN_TO_AUTHENTICATED,
    PUBLIC,
    Fill,
    Rpc,
    all_methods,
    build_request,
    call,
    forged_tokens,
)

PRIVATE, PUBLIC_KEY = generate_keypair()
DATASET = "ds-walk"
SLIDE = "5f0c3a52-0000-4000-8000-00000000walk"
OUTSIDER = "walk-outsider"
RPCS = all_methods()


@dataclass
class Walk:
    targets: dict[str, str]  # service full name -> 127.0.0.1:port
    any_target: str
    fill: Fill


async def _seed(docs: InMemoryDocumentStore) -> None:
    now = datetime.now(UTC)
    await docs.collection("datasets").insert(
        {"_id": DATASET, "name": DATASET, "description": "", "created_at": now, "created_by": "x"}
    )
    await docs.collection("catalogue_slides").insert({"_id": SLIDE, "dataset_id": DATASET})
    await docs.collection("deid_jobs").insert(
        {"_id": SLIDE, "dataset_id": DATASET, "outcome": "DEIDENTIFIED"}
    )
    await docs.collection("pyramids").insert(
        {"_id": SLIDE, "dataset_id": DATASET, "state": "TILED"}
    )
    await docs.collection("serving_slides").insert({"_id": SLIDE, "dataset_id": DATASET})


def _hosts(tmp: Path, docs: InMemoryDocumentStore) -> list[ServiceHost]:
    key_file = tmp / "issuer.pub.pem"
    key_file.write_bytes(PUBLIC_KEY)
    common = {
        "grpc": {"port": 1},
        "metrics": {"port": 0},
        "auth": {"public_key_file": key_file},
        "kafka": {"bootstrap_servers": "unused:9"},
        "mongo": {"uri": "mongodb://unused"},
    }
    s3 = {"s3": {"endpoint": "unused:9", "access_key": "x", "secret_key": "y"}}
    bus = InMemoryBus()
    objects = InMemoryObjectStore()
    denied = StaticAccessChecker({}, {DATASET})  # the dataset exists; nobody holds a grant
    from services.tiling.bootstrap import TilingSettings
    from services.tiling.bootstrap import bootstrap as tiling_bootstrap

    key = "k" * 64
    return [
        access_bootstrap(AccessSettings(**common), docs=docs, bus=bus),
        ingestion_bootstrap(
            IngestionSettings(
                **common, **s3, ingestion={"spool_dir": tmp / "spool", "pseudonym_key": key}
            ),
            docs=docs,
            bus=bus,
            objects=objects,
            access=denied,
        ),
        deid_bootstrap(
            DeidSettings(**common, **s3, deid={"work_dir": tmp / "deid", "pseudonym_key": key}),
            docs=docs,
            bus=bus,
            objects=objects,
            access=denied,
        ),
        tiling_bootstrap(
            TilingSettings(**common, **s3, tiling={"work_dir": tmp / "tiling", "http_port": 1}),
            docs=docs,
            bus=bus,
            objects=objects,
            access=denied,
        ),
        metadata_bootstrap(MetadataSettings(**common), docs=docs, bus=bus, access=denied),
        serving_bootstrap(
            ServingSettings(**common, **s3), docs=docs, bus=bus, objects=objects, access=denied
        ),
    ]


@pytest.fixture
async def walk(tmp_path: Path) -> AsyncIterator[Walk]:
    docs = InMemoryDocumentStore()
    await _seed(docs)
    servers: list[aio.Server] = []
    targets: dict[str, str] = {}
    from services.shared.auth import TokenVerifier

    verifier = TokenVerifier(PUBLIC_KEY, "tessera", "tessera")
    for host in _hosts(tmp_path, docs):
        # What ServiceHost.run serves, without its start-up hooks (no model, no buckets).
        server = aio.server(
            interceptors=[aio_server_interceptor(), ServerPipeline(host.name, verifier)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(host.health, server)
        for register in host._register:
            register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        for name in host._service_names:
            targets[name] = f"127.0.0.1:{port}"
    yield Walk(targets, next(iter(targets.values())), Fill(DATASET, SLIDE, "someone-else"))
    for server in servers:
        await server.stop(None)


def _target(walk: Walk, rpc: Rpc) -> str:
    if rpc.path in PUBLIC:
        return walk.any_target
    target = walk.targets.get(rpc.service)
    assert target is not None, f"no composition root registers {rpc.service}"
    return target


async def test_every_declared_service_has_a_composition_root(walk: Walk) -> None:
    declared = {r.service for r in RPCS if r.path not in PUBLIC}
    assert declared <= set(walk.targets), sorted(declared - set(walk.targets))


async def test_walk_every_rpc(walk: Walk) -> None:
    issuer = TokenIssuer(PRIVATE)
    outsider = f"Bearer {issuer.issue(OUTSIDER)}"
    forged = forged_tokens(PRIVATE, PUBLIC_KEY, OUTSIDER)
    failures: list[str] = []
    walked = 0
    async with asyncio.timeout(120):
        for rpc in RPCS:
            async with aio.insecure_channel(_target(walk, rpc)) as ch:
                req = build_request(rpc, walk.fill)
                code, _ = await call(ch, rpc, req, None)
                want = (
                    PUBLIC[rpc.path][0] if rpc.path in PUBLIC else grpc.StatusCode.UNAUTHENTICATED
                )
                if code != want:
                    failures.append(f"{rpc.path} without token: {code.name}")
                if rpc.path in PUBLIC:
                    walked += 1
                    continue
                for name, header in forged.items():
                    code, _ = await call(ch, rpc, req, header)
                    if code != grpc.StatusCode.UNAUTHENTICATED:
                        failures.append(f"{rpc.path} with {name} token: {code.name}")
                code, reason = await call(ch, rpc, req, outsider)
                if rpc.path in OPEN_TO_AUTHENTICATED:
                    if code in (
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED,
                    ):
                        failures.append(f"{rpc.path} (allow-listed open) refused: {code.name}")
                elif code != grpc.StatusCode.PERMISSION_DENIED:
                    failures.append(f"{rpc.path} without role or grant: {code.name} ({reason})")
                walked += 1
    assert walked == len(RPCS)
    assert not failures, "\n".join(failures)
