"""Fault campaign: upload a batch of slides into the fault world while its services are killed
with SIGKILL at random moments and its Kafka broker, S3 server and MongoDB-wire server are
stopped and started again; then check, from the servers' own state, that every acknowledged
upload reached its final state exactly once and that nothing was lost, duplicated, orphaned,
parked without cause or leaked.

    python -m tests.faults.harness [--slides 50] [--outage 30] [--seed 7]   (make test-faults)

The checks read Kafka, S3 and MongoDB directly (aiokafka, minio, pymongo), not through the
services' adapters, so a bug in an adapter cannot hide itself."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaProducer
from grpc import StatusCode, aio
from minio import Minio
from pymongo import AsyncMongoClient

REPO = Path(__file__).resolve().parents[2]
for extra in (REPO, REPO / "protos"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from services.cli.client import TesseraClient, status_lost  # noqa: E402
from services.shared.auth import TokenIssuer  # noqa: E402
from services.shared.events import dead_letter_topic  # noqa: E402
from tessera.common.v1 import common_pb2  # noqa: E402
from tessera.metadata.v1 import metadata_pb2  # noqa: E402
from tests.faults.leaks import Message, find_leaks, read_topics  # noqa: E402
from tests.faults.world import HOME, SERVICE_NAMES, FaultWorld, WorldError  # noqa: E402
from tests.fixtures import wsigen  # noqa: E402

SLIDES = REPO.parent / "shared" / "slides"
READY = common_pb2.SLIDE_STATUS_READY
REJECTED = common_pb2.SLIDE_STATUS_REJECTED
TERMINAL = {READY, REJECTED}
# Codes a careful client retries: the service or one of its dependencies is away, or busy.
RETRYABLE = {
    StatusCode.UNAVAILABLE,
    StatusCode.RESOURCE_EXHAUSTED,
    StatusCode.DEADLINE_EXCEEDED,
    StatusCode.CANCELLED,
    StatusCode.ABORTED,
}
BUCKETS = ("tessera-quarantine", "tessera-deidentified", "tessera-tiles", "tessera-results")


# -- the batch -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    path: Path
    expect: int  # final SlideStatus
    case_id: str
    patient_id: str
    identifying: tuple[bytes, ...]  # values that must never appear outside the quarantine


def real_samples() -> list[Item]:
    out = []
    for i, (rel, expect) in enumerate(
        (
            ("aperio/CMU-1-Small-Region.svs", READY),
            ("hamamatsu/test3-DAPI-2-(387).ndpi", READY),
            ("dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm", READY),
            ("broken/unreadable.svs", REJECTED),
        )
    ):
        path = SLIDES / rel
        if not path.exists():
            raise FileNotFoundError(f"sample slide missing: {path}")
        case, patient = f"FLT-CASE-R{i:02d}-5521", f"FLT-PAT-R{i:02d}-5521"
        out.append(Item(path, expect, case, patient, (case.encode(), patient.encode())))
    return out


def generated(count: int, seed: int) -> list[Item]:
    """Small Aperio SVS files with planted identifying values (cached: same seed, same bytes)."""
    out_dir = HOME / "cache" / "faults-slides" / f"seed{seed}"
    manifest = out_dir / "manifest.json"
    known: dict[str, list[str]] = {}
    if manifest.exists():
        known = json.loads(manifest.read_text())
    items = []
    for i in range(count):
        name = f"fault-{i:03d}"
        path = out_dir / f"{name}.svs"
        if name not in known or not path.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            fixture = wsigen.aperio_svs(out_dir, np.random.default_rng(seed * 1000 + i), name=name)
            if fixture.path != path:
                fixture.path.replace(path)
            known[name] = [v.decode("latin-1") for v in fixture.planted_values]
        case, patient = f"FLT-CASE-{seed}-{i:03d}-7713", f"FLT-PAT-{seed}-{i:03d}-7713"
        planted = tuple(v.encode("latin-1") for v in known[name])
        items.append(Item(path, READY, case, patient, (*planted, case.encode(), patient.encode())))
    manifest.write_text(json.dumps(known))
    return items


# -- the outcome -------------------------------------------------------------------------------


@dataclass
class Upload:
    item: Item
    slide_id: str = ""
    attempts: int = 0
    refused: str = ""  # a non-retryable status, if the service refused the upload for good
    acked_at: float = 0.0
    final: int = 0
    done_at: float = 0.0


@dataclass
class Fault:
    kind: str  # "kill <service>", "restart kafka", "stop s3 30s", ...
    at: float
    down_s: float = 0.0
    recovered_s: float = 0.0  # from the end of the fault until the component is healthy again


@dataclass
class Report:
    uploads: list[Upload]
    faults: list[Fault]
    problems: list[str] = field(default_factory=list)
    dead_letters: list[tuple[str, str]] = field(default_factory=list)  # (topic, reason)
    injected_bad: int = 0
    drain_s: float = 0.0
    wall_s: float = 0.0
    accepted: int = 0
    completed: int = 0
    duplicated: int = 0
    lost: int = 0
    leak_sources: int = 0  # log/trace files, events and /metrics pages scanned

    def table(self) -> str:
        kinds = Counter(f.kind.split(" ")[0] + " " + f.kind.split(" ")[1] for f in self.faults)
        lines = [
            "fault campaign",
            "  faults injected: "
            + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
            + f"  ({len(self.faults)} in all)",
            "",
            f"  {'fault':<24} {'at s':>7} {'down s':>7} {'recovered s':>12}",
        ]
        lines += [
            f"  {f.kind:<24} {f.at:>7.1f} {f.down_s:>7.1f} {f.recovered_s:>12.1f}"
            for f in self.faults
        ]
        lines += [
            "",
            f"  {'slides':<10} {'accepted':>9} {'completed':>10} {'duplicated':>11} "
            f"{'lost':>5} {'refused':>8}",
            f"  {len(self.uploads):<10} {self.accepted:>9} {self.completed:>10} "
            f"{self.duplicated:>11} {self.lost:>5} "
            f"{sum(1 for u in self.uploads if u.refused):>8}",
            "",
            f"  upload attempts: {sum(u.attempts for u in self.uploads)} for "
            f"{len(self.uploads)} slides (retries after faults: "
            f"{sum(u.attempts - 1 for u in self.uploads if u.attempts)})",
            f"  dead letters: {len(self.dead_letters)} (injected malformed: {self.injected_bad}) "
            + ", ".join(f"{r} x{n}" for r, n in Counter(r for _, r in self.dead_letters).items()),
            f"  drain after the last fault: {self.drain_s:.1f} s; campaign wall time "
            f"{self.wall_s:.1f} s",
            f"  leak scan: {self.leak_sources} logs, trace files, events and /metrics pages "
            "searched for the inputs' identifying values",
            f"  problems: {len(self.problems)}",
        ]
        lines += [f"    - {p}" for p in self.problems]
        return "\n".join(lines)


# -- the campaign ----------------------------------------------------------------------------


class Campaign:
    def __init__(
        self,
        world: FaultWorld,
        items: list[Item],
        *,
        outage_s: float,
        seed: int,
        spread_s: float = 150,
        concurrency: int = 4,
        timeout_s: float = 900,
        chaos: bool = True,
    ) -> None:
        self.world = world
        self.items = items
        self.outage_s = outage_s
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.spread_s = spread_s  # uploads start at random moments over this window
        self.chaos = chaos  # False: no injected faults, but a supervisor restarts crashed services
        self.timeout_s = timeout_s
        self.t0 = 0.0
        self.faults: list[Fault] = []
        self.uploads = [Upload(item) for item in items]
        self.dataset = f"faults-{uuid.uuid4().hex[:8]}"
        self.problems: list[str] = []
        self.injected: list[bytes] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> Report:
        issuer = TokenIssuer(self.world.signing_key())
        token = issuer.issue("faults-steward", ["admin"], ttl_s=6 * 3600)
        self.t0 = time.monotonic()
        async with TesseraClient(token, self.world.endpoints) as client:
            await self._retrying(lambda: client.create_dataset(self.dataset, "fault campaign"))
            uploader = asyncio.create_task(self._upload_all(client))
            if self.chaos:
                chaos = asyncio.create_task(self._chaos())
            else:
                chaos = asyncio.create_task(self._supervise(uploader))
            await self._inject_malformed()
            await uploader
            if self.chaos:
                await chaos
            last_fault_end = self.now()
            await self._wait_final(client)
            drain = self.now() - last_fault_end
            chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos
        report = Report(self.uploads, self.faults, self.problems, injected_bad=len(self.injected))
        report.drain_s = drain
        report.wall_s = self.now()
        await self._check(report)
        return report

    async def _retrying(self, call: Callable[[], Awaitable[object]], budget_s: float = 300) -> None:
        deadline = time.monotonic() + budget_s
        while True:
            try:
                await call()
                return
            except aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)

    # uploads: a client that retries what may be retried, as the README tells partners to

    async def _upload_all(self, client: TesseraClient) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        # Spread over the fault window, so crashes and outages hit uploads in flight and
        # slides in every stage, not an idle system.
        starts = sorted(self.rng.uniform(0, self.spread_s) for _ in self.uploads)

        async def one(up: Upload, start: float) -> None:
            await asyncio.sleep(start)
            async with gate:
                await self._upload(client, up)

        await asyncio.gather(*(one(u, t) for u, t in zip(self.uploads, starts, strict=True)))

    async def _upload(self, client: TesseraClient, up: Upload) -> None:
        md = common_pb2.ClinicalMetadata(
            stain="H&E",
            organ="lymph node",
            species="human",
            case_id=up.item.case_id,
            patient_id=up.item.patient_id,
        )
        deadline = time.monotonic() + self.timeout_s
        delay = 0.5
        while True:
            up.attempts += 1
            try:
                out = await client.upload(up.item.path, self.dataset, md, max_attempts=1)
            except aio.AioRpcError as exc:
                # a status lost to grpcio's write race (a service killed mid-stream) is
                # as retryable as the UNAVAILABLE it most likely was
                retryable = exc.code() in RETRYABLE or status_lost(exc)
                if retryable and time.monotonic() < deadline:
                    await asyncio.sleep(delay)
                    delay = min(5.0, delay * 2)
                    continue
                up.refused = exc.code().name
                if exc.code() == StatusCode.INTERNAL:
                    self.problems.append(f"upload of {up.item.path.name}: INTERNAL")
                return
            up.slide_id = out.slide_id
            up.acked_at = self.now()
            return

    # faults: every service killed once at a random moment, then the servers one by one

    async def _supervise(self, uploader: asyncio.Task[None]) -> None:
        """What a process supervisor (systemd, a kubelet) does: restart a service that died."""
        seen = {s: self.world.service_pid(s) for s in SERVICE_NAMES}
        while True:
            pids = {s: self.world.service_pid(s) for s in SERVICE_NAMES}
            # dead now, or restarted already by a start that another crash triggered
            dead = [s for s in SERVICE_NAMES if pids[s] is None or pids[s] != seen[s]]
            if dead:
                t = time.monotonic()
                fault = Fault(f"crash {'+'.join(dead)}", self.now())
                # another one may die while starting: the next round restarts it
                with contextlib.suppress(WorldError):
                    await self.world.start_services()
                fault.recovered_s = time.monotonic() - t
                self.faults.append(fault)
                seen = {s: self.world.service_pid(s) for s in SERVICE_NAMES}
            await asyncio.sleep(0.5)

    async def _chaos(self) -> None:
        plan: list[str] = [f"kill {s}" for s in SERVICE_NAMES]
        self.rng.shuffle(plan)
        plan.insert(self.rng.randrange(len(plan) + 1), "restart kafka")
        plan.insert(self.rng.randrange(len(plan) + 1), "stop s3")
        plan.insert(self.rng.randrange(len(plan) + 1), "stop ferretdb")
        gap = max(1.0, self.spread_s / (2 * len(plan)))
        for step in plan:
            await asyncio.sleep(self.rng.uniform(0.5 * gap, 1.5 * gap))
            await self._inject(step)

    async def _inject(self, step: str) -> None:
        verb, target = step.split(" ")
        kind = f"stop {target} {self.outage_s:.0f}s" if verb == "stop" else step
        fault = Fault(kind, self.now())
        started = time.monotonic()
        if verb == "kill":
            await self.world.kill_service(target)
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
            fault.down_s = time.monotonic() - started
            t = time.monotonic()
            await self.world.start_services()
            fault.recovered_s = time.monotonic() - t
        else:
            await self.world.stop_server(target)
            if verb == "stop":
                await asyncio.sleep(self.outage_s)
            fault.down_s = time.monotonic() - started
            t = time.monotonic()
            await self.world.start_server(target)
            # recovered: the server is ready and every service answers health again
            for name in SERVICE_NAMES:
                while not await self.world.healthy(name):
                    await asyncio.sleep(0.5)
            fault.recovered_s = time.monotonic() - t
        self.faults.append(fault)

    async def _inject_malformed(self) -> None:
        """Genuinely bad messages: they, and only they, must end in the dead-letter topics."""
        producer = AIOKafkaProducer(bootstrap_servers=self.world.kafka, acks="all")
        await producer.start()
        try:
            for i in range(3):
                value = f"not-an-envelope-{uuid.uuid4().hex}-{i}".encode()
                await producer.send_and_wait(
                    "tessera.slide.received.v1", value, key=f"garbage-{i}".encode()
                )
                self.injected.append(value)
        finally:
            await producer.stop()

    async def _wait_final(self, client: TesseraClient) -> None:
        deadline = time.monotonic() + self.timeout_s
        for up in self.uploads:
            if not up.slide_id:
                continue
            while time.monotonic() < deadline:
                try:
                    resp = await client.metadata.GetSlide(
                        metadata_pb2.GetSlideRequest(slide_id=up.slide_id)
                    )
                    if resp.slide.status in TERMINAL:
                        up.final = resp.slide.status
                        up.done_at = self.now()
                        break
                except aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE | {StatusCode.NOT_FOUND}:
                        raise
                await asyncio.sleep(0.5)

    # -- checks, from the servers' own state -----------------------------------------------

    async def _check(self, report: Report) -> None:
        acked = [u for u in self.uploads if u.slide_id]
        report.accepted = len(acked)
        ids = {u.slide_id for u in acked}
        if len(ids) != len(acked):
            self.problems.append("two uploads of different files got the same slide id")
        for u in self.uploads:
            if u.refused and u.item.expect == READY:
                self.problems.append(f"{u.item.path.name}: refused with {u.refused}")
            if u.slide_id and u.final != u.item.expect:
                report.lost += 1
                got = common_pb2.SlideStatus.Name(u.final) if u.final else "no final state"
                self.problems.append(f"{u.item.path.name}: {got}")
        report.completed = sum(1 for u in acked if u.final == u.item.expect)
        ready = {u.slide_id for u in acked if u.final == READY}
        await self._check_documents(report, ids, ready)
        self._check_objects(report, ids, ready)
        await self._check_dead_letters(report)
        await self._check_leaks(report)

    async def _check_documents(self, report: Report, ids: set[str], ready: set[str]) -> None:
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
            self.world.mongo_uri, serverSelectionTimeoutMS=10000
        )
        try:
            db = client["tessera"]
            slides = await db["catalogue_slides"].find({"dataset_id": self.dataset}).to_list()
            catalogued = Counter(str(d["_id"]) for d in slides)
            extra = set(catalogued) - ids
            if extra:
                report.duplicated += len(extra)
                self.problems.append(f"{len(extra)} catalogue records of unacknowledged slides")
            uploads = await db["uploads"].find({"dataset_id": self.dataset}).to_list()
            per_file = Counter(str(d.get("sha256")) for d in uploads)
            dup_files = [sha for sha, n in per_file.items() if n > 1]
            if dup_files:
                report.duplicated += len(dup_files)
                self.problems.append(f"{len(dup_files)} files were registered more than once")
            for sid in ids - set(catalogued):
                self.problems.append(f"slide {sid} acknowledged but not in the catalogue")
            results = Counter(
                str(d.get("slide_id"))
                for d in await db["inference_results"]
                .find({"slide_id": {"$in": list(ids)}})
                .to_list()
            )
            for sid in ready:
                if results.get(sid, 0) != 1:
                    self.problems.append(f"slide {sid}: {results.get(sid, 0)} inference results")
            pyramids = Counter(
                str(d["_id"])
                for d in await db["pyramids"].find({"_id": {"$in": list(ids)}}).to_list()
            )
            for sid in ready:
                if pyramids.get(sid, 0) != 1:
                    self.problems.append(f"slide {sid}: {pyramids.get(sid, 0)} pyramid records")
        finally:
            await client.close()

    def _check_objects(self, report: Report, ids: set[str], ready: set[str]) -> None:
        s3 = Minio(self.world.s3, "tessera", "tessera-local-secret", secure=False)
        per_bucket: dict[str, Counter[str]] = {}
        for bucket in BUCKETS:
            if not s3.bucket_exists(bucket):
                self.problems.append(f"bucket {bucket} missing")
                continue
            seen: Counter[str] = Counter()
            for obj in s3.list_objects(bucket, prefix="slides/", recursive=True):
                name = obj.object_name or ""
                sid = name.split("/")[1] if name.count("/") >= 1 else name
                if sid not in ids:
                    self.problems.append(f"orphan object in {bucket} (slide not acknowledged)")
                    report.duplicated += 1
                    continue
                # tiles: count descriptors (one per pyramid); elsewhere every object
                if bucket != "tessera-tiles" or name.endswith(".dzi"):
                    seen[sid] += 1
            per_bucket[bucket] = seen
        quarantine = per_bucket.get("tessera-quarantine", Counter())
        for sid in ready:
            if quarantine.get(sid):
                self.problems.append(f"slide {sid}: identified copy left in quarantine")
            if per_bucket.get("tessera-deidentified", Counter()).get(sid, 0) != 1:
                self.problems.append(f"slide {sid}: not exactly one de-identified object")
            if per_bucket.get("tessera-tiles", Counter()).get(sid, 0) != 1:
                self.problems.append(f"slide {sid}: not exactly one pyramid descriptor")
            if per_bucket.get("tessera-results", Counter()).get(sid, 0) != 1:
                self.problems.append(f"slide {sid}: not exactly one inference mask")
        leftovers = self.world.spool_files()
        if leftovers:
            self.problems.append(f"{len(leftovers)} files left in the ingestion spool")

    async def _read_topics(self, topics: list[str]) -> list[Message]:
        messages, unread = await read_topics(self.world.kafka, topics)
        if unread:
            self.problems.append(f"could not read {unread} partitions to their end")
        return messages

    async def _check_dead_letters(self, report: Report) -> None:
        dlqs = [dead_letter_topic(s) for s in SERVICE_NAMES]
        for topic, value, headers in await self._read_topics(dlqs):
            reason = headers.get("dlq-reason", b"").decode() or "(no reason)"
            report.dead_letters.append((topic, reason))
            if value not in self.injected:
                self.problems.append(f"{topic}: a good message was parked ({reason})")
            elif reason == "(no reason)":
                self.problems.append(f"{topic}: dead letter without a reason")
        parked = Counter(v for _, v, _ in await self._read_topics(dlqs) if v in self.injected)
        for value in self.injected:
            if parked.get(value, 0) < 1:
                self.problems.append("an injected malformed event is not in a dead-letter topic")

    async def _check_leaks(self, report: Report) -> None:
        """No identifying value of the inputs in any log, trace, event or metric."""
        needles = {v for u in self.uploads for v in u.item.identifying if len(v) >= 6}
        needles |= {u.item.path.name.encode() for u in self.uploads}
        try:
            found, report.leak_sources = await find_leaks(self.world, needles)
        except RuntimeError as exc:
            self.problems.append(f"leak scan incomplete: {exc}")
            return
        self.problems.extend(f"identifying value found in {where}" for where in found)


async def campaign(
    slides: int, outage_s: float, seed: int, spread_s: float = 150, keep: bool = False
) -> Report:
    items = real_samples() + generated(max(0, slides - 4), seed)
    world = FaultWorld()
    try:
        await world.up(fresh=True)
        return await Campaign(
            world, items[:slides], outage_s=outage_s, seed=seed, spread_s=spread_s
        ).run()
    finally:
        if not keep:
            await world.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=50)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds S3/FerretDB are down")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--spread", type=float, default=360.0, help="seconds uploads span")
    parser.add_argument("--keep", action="store_true", help="leave the fault world running")
    args = parser.parse_args()
    report = asyncio.run(campaign(args.slides, args.outage, args.seed, args.spread, args.keep))
    print(report.table())
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
