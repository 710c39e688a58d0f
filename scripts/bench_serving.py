"""Tile-serving benchmark on the running local stack (`make up`), loopback only.

    make bench-serving            (= .venv/bin/python scripts/bench_serving.py)
    scripts/bench_serving.py --concurrency 64 --requests 6000

Uploads the sample slides (../shared/slides) into a fresh dataset, so their tiles are in no
cache, grants a few readers, then in one run, with the same number of concurrent clients
(asyncio + aiohttp / grpc.aio) reading random tiles of those slides:

  (a) Tessera HTTP, cold    every tile of the slides once, in random order (first reads)
  (b) Tessera HTTP, cached  random tiles again (now in the tiling service's tile cache)
  (c) Tessera gRPC          GetTile of random tiles
  (d) raw S3                the same tile objects read straight from the S3 server with
                            presigned GETs (the floor: no auth, no access control, no cache)

and prints requests/s and p50/p99 latency per mode and the ratio to raw S3. Every loop is
bounded in requests and in time. Results are also written to .tessera/bench/serving-*.json.
Targets (issue 4): p99 < 20 ms for cached tiles; throughput within 2x of raw S3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
from grpc import aio
from minio import Minio
from yarl import URL

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "protos"))

from services.cli.client import TesseraClient  # noqa: E402
from services.shared.auth import TokenIssuer  # noqa: E402
from services.shared.settings import BucketSettings  # noqa: E402
from services.tiling.engine import DziGeometry, tile_key  # noqa: E402
from tessera.access.v1 import access_pb2  # noqa: E402
from tessera.common.v1 import common_pb2  # noqa: E402
from tessera.tiling.v1 import tiling_pb2, tiling_pb2_grpc  # noqa: E402
from tests.faults.world import live_pid  # noqa: E402

HOME = Path(os.environ.get("TESSERA_HOME", REPO / ".tessera"))
KEYS = HOME / "stack" / "app" / "keys"
SLIDES = REPO.parent / "shared" / "slides"
SAMPLES = (
    "aperio/CMU-1-Small-Region.svs",
    "hamamatsu/test3-DAPI-2-(387).ndpi",
    "dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm",
)
HTTP = "http://127.0.0.1:8180"
GRPC = "127.0.0.1:50054"
S3 = os.environ.get("TESSERA_S3_ENDPOINT", "127.0.0.1:7070")
S3_KEY = os.environ.get("TESSERA_S3_ACCESS_KEY", "tessera")
S3_SECRET = os.environ.get("TESSERA_S3_SECRET_KEY", "tessera-local-secret")
READERS = 8
TIME_CAP_S = 60.0
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (all its threads), or of this one for None."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass(frozen=True)
class TileRef:
    slide_id: str
    level: int
    col: int
    row: int

    @property
    def path(self) -> str:
        return f"/slides/{self.slide_id}_files/{self.level}/{self.col}_{self.row}.jpeg"

    @property
    def key(self) -> str:
        return tile_key(self.slide_id, self.level, self.col, self.row, "jpeg")


@dataclass
class Result:
    mode: str
    requests: int
    concurrency: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_bytes: float
    errors: int
    # CPU time per request of the server that answered, and of this client
    server_cpu_ms: float = 0.0
    client_cpu_ms: float = 0.0


async def run_load(
    mode: str,
    work: list[TileRef],
    concurrency: int,
    fetch: Callable[[TileRef, int], Awaitable[int]],
    server_pid: int | None,
) -> Result:
    """`concurrency` workers take the next item of `work` until it is done or TIME_CAP_S."""
    latencies: list[float] = []
    sizes: list[int] = []
    errors = 0
    it = iter(enumerate(work))
    deadline = time.perf_counter() + TIME_CAP_S

    async def worker() -> None:
        nonlocal errors
        for i, ref in it:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            try:
                sizes.append(await fetch(ref, i))
            except Exception:  # noqa: BLE001 - counted, reported
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    cpu0, own0 = cpu_seconds(server_pid) if server_pid else 0.0, cpu_seconds(None)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    server_cpu = (cpu_seconds(server_pid) - cpu0) if server_pid else 0.0
    own_cpu = cpu_seconds(None) - own0
    done = max(1, len(latencies))
    lat = sorted(latencies) or [0.0]
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return Result(
        mode=mode,
        requests=len(latencies),
        concurrency=concurrency,
        seconds=round(wall, 3),
        rps=round(len(latencies) / wall, 1),
        p50_ms=round(q[49] * 1000, 2),
        p99_ms=round(q[98] * 1000, 2),
        max_ms=round(lat[-1] * 1000, 2),
        mean_bytes=round(statistics.fmean(sizes), 1) if sizes else 0.0,
        errors=errors,
        server_cpu_ms=round(server_cpu * 1000 / done, 3),
        client_cpu_ms=round(own_cpu * 1000 / done, 3),
    )


async def prepare(issuer: TokenIssuer) -> tuple[list[str], list[TileRef]]:
    """Fresh dataset with the sample slides; readers granted; all tile refs of the slides."""
    admin_subject = f"bench-admin-{uuid.uuid4().hex[:6]}"
    admin = issuer.issue(admin_subject, ["admin"])
    dataset = f"bench-{uuid.uuid4().hex[:10]}"
    readers = [f"bench-reader-{i}-{uuid.uuid4().hex[:4]}" for i in range(READERS)]
    refs: list[TileRef] = []
    async with TesseraClient(admin) as c:
        await c.create_dataset(dataset, "serving bench", "tiles for scripts/bench_serving.py")
        ids = []
        for rel in SAMPLES:
            path = SLIDES / rel
            if not path.exists():
                sys.exit(f"sample slide missing: {path}")
            up = await c.upload(path, dataset, common_pb2.ClinicalMetadata(stain="H&E"))
            ids.append(up.slide_id)
        for sid in ids:
            rec = await c.wait(sid, timeout_s=600)
            if rec.status != common_pb2.SLIDE_STATUS_READY:
                sys.exit(f"slide did not become READY: {common_pb2.SlideStatus.Name(rec.status)}")
        for r in readers:
            await c.grant(dataset, r, int(access_pb2.Role.ROLE_RESEARCHER), days=1)
        for sid in ids:
            d = await c.tiling.GetDeepZoomDescriptor(
                tiling_pb2.GetDeepZoomDescriptorRequest(slide_id=sid)
            )
            g = DziGeometry.from_descriptor(d.descriptor_xml)
            for level in range(g.level_count):
                cols, rows = g.tile_grid(level)
                refs.extend(
                    TileRef(sid, level, col, row) for col in range(cols) for row in range(rows)
                )
    tokens = [issuer.issue(r, ttl_s=3600) for r in readers]
    return tokens, refs


def table(results: list[Result], s3: Result) -> str:
    head = (
        f"{'mode':<22}{'requests':>9}{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'errors':>8}{'rps vs S3':>11}{'srv CPU ms/req':>16}{'client':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = r.rps / s3.rps if s3.rps else 0.0
        lines.append(
            f"{r.mode:<22}{r.requests:>9}{r.concurrency:>6}{r.rps:>10.0f}{r.p50_ms:>9.2f}"
            f"{r.p99_ms:>9.2f}{r.max_ms:>9.2f}{r.errors:>8}{ratio:>10.2f}x"
            f"{r.server_cpu_ms:>16.3f}{r.client_cpu_ms:>8.3f}"
        )
    return "\n".join(lines)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=5000, help="per mode (cold: every tile once)")
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument(
        "--few",
        type=int,
        default=4,
        help="a second, light load (this many clients) for the cached and S3 modes: latency "
        "without the queueing of a saturated 2-core machine",
    )
    args = ap.parse_args()
    rnd = random.Random(args.seed)  # noqa: S311 - load pattern, not a secret
    key = KEYS / "issuer.pem"
    if not key.exists():
        sys.exit(f"no signing key at {key}: start the stack with `make up`")
    issuer = TokenIssuer(key.read_bytes())
    t0 = time.perf_counter()
    tokens, refs = await prepare(issuer)
    print(
        f"{len(refs)} tiles of {len(SAMPLES)} fresh slides ready in "
        f"{time.perf_counter() - t0:.1f} s; {READERS} readers; concurrency {args.concurrency}"
    )
    n, conc = args.requests, args.concurrency
    cold = refs[:]
    rnd.shuffle(cold)
    hot = [rnd.choice(refs) for _ in range(n)]
    headers = [{"Authorization": f"Bearer {t}"} for t in tokens]
    tiling_pid = live_pid(HOME / "stack" / "app" / "run" / "tiling.pid")
    s3_pid = live_pid(HOME / "stack" / "run" / "s3.pid")
    results: list[Result] = []

    connector = aiohttp.TCPConnector(limit=conc, limit_per_host=conc)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def via_http(ref: TileRef, i: int) -> int:
            async with http.get(HTTP + ref.path, headers=headers[i % len(headers)]) as r:
                body = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                return len(body)

        # warm the connections and the readers' decisions/tokens (not the tiles: thumbnails)
        sids = sorted({r.slide_id for r in refs})
        for h in headers:
            for sid in sids:
                async with http.get(f"{HTTP}/slides/{sid}.dzi", headers=h) as r:
                    await r.read()
        results.append(await run_load("HTTP tiles, cold", cold, conc, via_http, tiling_pid))
        results.append(await run_load("HTTP tiles, cached", hot, conc, via_http, tiling_pid))

        # raw S3: presigned GETs of the same objects (signing is local, done before the clock)
        bucket = BucketSettings().tiles
        mc = Minio(S3, access_key=S3_KEY, secret_key=S3_SECRET, secure=False, region="us-east-1")
        urls = {
            ref.key: URL(
                mc.presigned_get_object(bucket, ref.key, expires=timedelta(hours=1)),
                encoded=True,
            )
            for ref in set(hot)
        }

        async def via_s3(ref: TileRef, i: int) -> int:
            async with http.get(urls[ref.key]) as r:
                body = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"S3 {r.status}")
                return len(body)

        s3 = await run_load("raw S3 GET", hot, conc, via_s3, s3_pid)
        few = max(1, args.few)
        light = hot[: max(1000, n // 4)]
        light_http = await run_load(f"HTTP cached, {few} cl.", light, few, via_http, tiling_pid)
        light_s3 = await run_load(f"raw S3 GET, {few} cl.", light, few, via_s3, s3_pid)

    channels = [aio.insecure_channel(GRPC) for _ in range(2)]
    stubs = [tiling_pb2_grpc.TilingServiceStub(ch) for ch in channels]
    metadata = [(("authorization", f"Bearer {t}"),) for t in tokens]

    async def via_grpc(ref: TileRef, i: int) -> int:
        resp = await stubs[i % len(stubs)].GetTile(
            tiling_pb2.GetTileRequest(
                slide_id=ref.slide_id, level=ref.level, col=ref.col, row=ref.row
            ),
            metadata=metadata[i % len(metadata)],
            timeout=30,
        )
        return len(resp.data)

    try:
        results.append(await run_load("gRPC tiles, cached", hot, conc, via_grpc, tiling_pid))
    finally:
        for ch in channels:
            await ch.close()
    results.append(s3)
    results.extend([light_http, light_s3])

    print()
    print(table(results, s3))
    cached = results[1]
    print()
    print(
        f"cached HTTP p99 {cached.p99_ms:.1f} ms (target < 20 ms): "
        f"{'met' if cached.p99_ms < 20 else 'NOT met'}"
    )
    ratio = cached.rps / s3.rps if s3.rps else 0.0
    print(
        f"cached HTTP throughput {ratio:.2f}x of raw S3 (target >= 0.5x): "
        f"{'met' if ratio >= 0.5 else 'NOT met'}"
    )
    out = HOME / "bench" / f"serving-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"tiles": len(refs), "results": [asdict(r) for r in results]},
            indent=2,
        )
    )
    print(f"results: {out}")
    print(
        f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(client, server and S3 share them)"
    )


if __name__ == "__main__":
    asyncio.run(main())
