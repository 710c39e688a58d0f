"""The main job on real input: sample slides through all six services (`make run`)."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from grpc import StatusCode, aio

from services.cli.client import TesseraClient
from services.cli.main import DEFAULT_SIGNING_KEY, slide_text
from services.shared.auth import TokenIssuer
from services.shared.grpc.interceptors import REASON_KEY
from tessera.common.v1 import common_pb2
from tessera.tiling.v1 import tiling_pb2

REPO = Path(__file__).resolve().parents[2]
SLIDES = REPO.parent / "shared" / "slides"
DATASET = "demo-slides"


@dataclass(frozen=True)
class Sample:
    path: str
    stain: str
    organ: str
    species: str
    case_id: str


SAMPLES = (
    Sample("aperio/CMU-1-Small-Region.svs", "H&E", "unknown", "human", "CASE-0001"),
    Sample("hamamatsu/test3-DAPI-2-(387).ndpi", "DAPI", "unknown", "human", "CASE-0002"),
    Sample(
        "dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm",
        "H&E",
        "lymph node",
        "human",
        "CASE-0003",
    ),
    Sample("broken/unreadable.svs", "H&E", "unknown", "human", "CASE-0004"),
    Sample("broken/unopenable.tiff", "H&E", "unknown", "human", "CASE-0005"),
)


async def run() -> int:
    if not SLIDES.is_dir():
        print(f"sample slides not found at {SLIDES}", file=sys.stderr)
        return 2
    token = TokenIssuer(DEFAULT_SIGNING_KEY.read_bytes()).issue("demo-steward", ["admin"])
    failures = 0
    async with TesseraClient(token) as c:
        try:
            await c.create_dataset(DATASET, "Demo slides", "Public sample slides")
        except aio.AioRpcError as exc:
            if exc.code() != StatusCode.ALREADY_EXISTS:
                raise
        http = ""
        for s in SAMPLES:
            path = SLIDES / s.path
            print(f"\n=== {s.path}")
            started = time.perf_counter()
            md = common_pb2.ClinicalMetadata(
                stain=s.stain, organ=s.organ, species=s.species, case_id=s.case_id
            )
            try:
                up = await c.upload(path, DATASET, md)
            except aio.AioRpcError as exc:
                reason = dict(exc.trailing_metadata() or ()).get(REASON_KEY, "")
                print(f"upload rejected: {exc.code().name} ({reason}): {exc.details()}")
                continue
            slide = await c.wait(up.slide_id, timeout_s=300)
            elapsed = time.perf_counter() - started
            print(slide_text(slide))
            if slide.status == common_pb2.SLIDE_STATUS_READY:
                d = await c.tiling.GetDeepZoomDescriptor(
                    tiling_pb2.GetDeepZoomDescriptorRequest(slide_id=up.slide_id)
                )
                http = d.http_url
                print(f"dzi       {d.http_url}")
                print(
                    "            (HTTP needs a bearer token: Authorization header or "
                    "?access_token=...)"
                )
            elif slide.status != common_pb2.SLIDE_STATUS_REJECTED:
                failures += 1
                print("did not finish in time")
            print(f"end-to-end {elapsed:.1f} s{' (already uploaded)' if up.duplicate else ''}")
        if http:
            print(
                f"\nresults: catalogue via `tessera search --dataset {DATASET}`, "
                f"tiles under {http.rsplit('/', 2)[0]}/"
            )
    return 1 if failures else 0


def main() -> None:
    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
