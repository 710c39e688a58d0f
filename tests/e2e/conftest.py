"""End-to-end fixtures: the real local stack (`make up`) must be running. Nothing here skips:
a missing stack fails the run with the command to start it."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc import StatusCode, aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.client import DEFAULT_PORTS, TesseraClient, endpoint
from services.shared.auth import TokenIssuer
from tessera.access.v1 import access_pb2
from tessera.common.v1 import common_pb2
from tessera.metadata.v1 import metadata_pb2

REPO = Path(__file__).resolve().parents[2]
SLIDES = REPO.parent / "shared" / "slides"
HOME = Path(os.environ.get("TESSERA_HOME", REPO / ".tessera"))
APP = HOME / "stack" / "app"
KEYS = APP / "keys"
LOGS = APP / "logs"
TRACES = APP / "traces"
S3 = ("127.0.0.1:7070", "tessera", "tessera-local-secret")
KAFKA = "127.0.0.1:9092"

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Sample:
    key: str
    path: Path
    stain: str
    case_id: str
    patient_id: str


SAMPLES = {
    "svs": Sample(
        "svs",
        SLIDES / "aperio/CMU-1-Small-Region.svs",
        "H&E",
        "E2E-CASE-SVS-7781",
        "E2E-PATIENT-SVS-7781",
    ),
    "ndpi": Sample(
        "ndpi",
        SLIDES / "hamamatsu/test3-DAPI-2-(387).ndpi",
        "DAPI",
        "E2E-CASE-NDPI-7782",
        "E2E-PATIENT-NDPI-7782",
    ),
    "dicom": Sample(
        "dicom",
        SLIDES / "dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm",
        "H&E",
        "E2E-CASE-DCM-7783",
        "E2E-PATIENT-DCM-7783",
    ),
}


def issuer() -> TokenIssuer:
    key = KEYS / "issuer.pem"
    if not key.exists():
        pytest.fail(f"no signing key at {key}: start the stack with `make up`")
    return TokenIssuer(key.read_bytes())


def token(subject: str, roles: tuple[str, ...] = ()) -> str:
    return issuer().issue(subject, list(roles))


async def health_status(target: str, service: str = "", patience_s: float = 60.0) -> int | None:
    """The health of `service` at `target` (None: the server does not host it). A slow or
    not-yet-listening server is asked again until `patience_s` is spent."""
    deadline = asyncio.get_running_loop().time() + patience_s
    async with aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                return int(r.status)
            except aio.AioRpcError as exc:
                if exc.code() == StatusCode.NOT_FOUND:
                    return None
                if asyncio.get_running_loop().time() > deadline:
                    return int(health_pb2.HealthCheckResponse.UNKNOWN)
            await asyncio.sleep(0.5)


async def _all_healthy() -> list[str]:
    return [
        name
        for name in DEFAULT_PORTS
        if await health_status(endpoint(name)) != health_pb2.HealthCheckResponse.SERVING
    ]


@dataclass
class World:
    dataset: str
    admin_token: str
    slides: dict[str, str]  # sample key -> slide id
    records: dict[str, metadata_pb2.Slide]
    rejected_slide: str


async def _setup() -> World:
    down = await _all_healthy()
    if down:
        pytest.fail(f"services not serving: {down}; start the stack with `make up`")
    for s in SAMPLES.values():
        if not s.path.exists():
            pytest.fail(f"sample slide missing: {s.path}")
    dataset = f"e2e-{uuid.uuid4().hex[:10]}"
    admin = token("e2e-steward", ("admin",))
    async with TesseraClient(admin) as c:
        await c.create_dataset(dataset, "e2e", "end-to-end test dataset")
        uploads = {}
        for s in SAMPLES.values():
            md = common_pb2.ClinicalMetadata(
                stain=s.stain,
                organ="lymph node",
                species="human",
                case_id=s.case_id,
                patient_id=s.patient_id,
            )
            uploads[s.key] = (await c.upload(s.path, dataset, md)).slide_id
        broken = await c.upload(
            SLIDES / "broken/unreadable.svs", dataset, common_pb2.ClinicalMetadata(stain="H&E")
        )
        records = {}
        for key, slide_id in uploads.items():
            records[key] = await c.wait(slide_id, timeout_s=300)
        await c.wait(broken.slide_id, timeout_s=300)
    return World(dataset, admin, uploads, records, broken.slide_id)


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    yield asyncio.run(_setup())


def role(name: str) -> int:
    return int(access_pb2.Role.Value(f"ROLE_{name.upper()}"))
