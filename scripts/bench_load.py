"""Sustained-ingestion load run (`make bench-load`): generated slides uploaded without pause for
a fixed time into a second stack of real servers and services on 127.0.0.1 (the same one the
fault tests use, on its own ports and data folder), then a table of what it sustained.

    python scripts/bench_load.py [--minutes 10] [--clients 6]

Printed: slides and bytes per minute accepted and tiled, refusals (RESOURCE_EXHAUSTED with the
server's wait hint, honoured by the client), upload-to-tiled latency p50/p99, consumer lag per
consumer group over time and each service's resident memory at the start and the end; then
every log line, trace file, event and `/metrics` page of the run is searched for the inputs'
identifying values (exit 1 if one is found)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from grpc import StatusCode, aio

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "protos")]

from services.cli.client import TesseraClient, retry_after_s  # noqa: E402
from services.shared.auth import TokenIssuer  # noqa: E402
from services.shared.events import TOPIC_SLIDE_TILED  # noqa: E402
from tessera.common.v1 import common_pb2  # noqa: E402
from tessera.events.v1 import events_pb2  # noqa: E402
from tests.faults.leaks import find_leaks  # noqa: E402
from tests.faults.world import HOME, FaultWorld  # noqa: E402
from tests.fixtures import wsigen  # noqa: E402

POOL = HOME / "cache" / "load-slides"


def load_world() -> FaultWorld:
    return FaultWorld(
        root=HOME / "load",
        kafka_port=29092,
        kafka_controller_port=29093,
        s3_port=27070,
        mongo_port=23017,
        postgres_port=35432,
        ferretdb_debug_port=28088,
        port_base=22000,
    )


def slide_pool(count: int, bases: int = 6) -> tuple[list[Path], set[bytes]]:
    """Distinct small SVS files (uploads are de-duplicated by checksum): a few generated slides,
    each copied with one planted identifying token replaced by another of the same length, so
    every file is a valid, different slide that still has something to de-identify. Also
    returns the identifying values of the pool (planted values, fresh tokens, file names)."""
    (POOL / "bases").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4242)
    base_data: list[tuple[bytes, bytes]] = []
    identifying: set[bytes] = set()
    for b in range(bases):
        fixture = wsigen.aperio_svs(POOL / "bases", np.random.default_rng(90_000 + b), name=f"b{b}")
        token = max(fixture.planted_values, key=len)
        base_data.append((fixture.path.read_bytes(), token))
        identifying.update(v for v in fixture.planted_values if len(v) >= 6)
    paths = []
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", dtype=np.uint8)
    for i in range(count):
        data, token = base_data[i % bases]
        fresh = rng.choice(alphabet, size=len(token)).tobytes()
        path = POOL / f"load-{i:04d}.svs"
        path.write_bytes(data.replace(token, fresh))
        paths.append(path)
        identifying.update((fresh, path.name.encode()))
    return paths, identifying


@dataclass
class Stats:
    started: dict[str, float] = field(default_factory=dict)  # slide id -> upload start
    tiled: dict[str, float] = field(default_factory=dict)  # slide id -> tiled event seen
    accepted_bytes: int = 0
    refused_busy: int = 0
    refused_other: dict[str, int] = field(default_factory=dict)
    lag: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    rss: list[tuple[float, dict[str, float]]] = field(default_factory=list)


async def uploader(
    client: TesseraClient, dataset: str, files: list[Path], stop_at: float, stats: Stats
) -> None:
    md = common_pb2.ClinicalMetadata(stain="H&E", organ="lymph node", species="human")
    while files and time.monotonic() < stop_at:
        path = files.pop()
        t = time.monotonic()
        while True:
            try:
                out = await client.upload(path, dataset, md, max_attempts=1)
                break
            except aio.AioRpcError as exc:
                if exc.code() == StatusCode.RESOURCE_EXHAUSTED:
                    stats.refused_busy += 1
                    await asyncio.sleep(retry_after_s(exc) or 1.0)
                    continue
                name = exc.code().name
                stats.refused_other[name] = stats.refused_other.get(name, 0) + 1
                out = None
                break
        if out is not None:
            stats.started[out.slide_id] = t
            stats.accepted_bytes += path.stat().st_size


async def watch_tiled(world: FaultWorld, stats: Stats, stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(
        TOPIC_SLIDE_TILED,
        bootstrap_servers=world.kafka,
        group_id=f"bench-load-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                for m in msgs:
                    with contextlib.suppress(Exception):
                        env = events_pb2.EventEnvelope.FromString(m.value or b"")
                        stats.tiled.setdefault(env.slide_id, time.monotonic())
    finally:
        await consumer.stop()


async def consumer_lag(world: FaultWorld) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=world.kafka)
    await admin.start()
    probe = AIOKafkaConsumer(bootstrap_servers=world.kafka, group_id=None)
    await probe.start()
    try:
        out = {}
        for group, _ in await admin.list_consumer_groups():
            if not group.startswith("tessera-"):
                continue
            committed = await admin.list_consumer_group_offsets(group)
            if not committed:
                continue
            ends = await probe.end_offsets(list(committed))
            out[group] = sum(max(0, ends[tp] - meta.offset) for tp, meta in committed.items())
        return out
    finally:
        await probe.stop()
        await admin.close()


async def sample(world: FaultWorld, stats: Stats, t0: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            stats.lag.append((time.monotonic() - t0, await consumer_lag(world)))
        stats.rss.append((time.monotonic() - t0, world.service_rss_mb()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 15)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def run(minutes: float, clients: int, pool: int, keep: bool) -> bool:
    files, identifying = slide_pool(pool)
    world = load_world()
    print(f"starting the load stack under {world.root} ...", flush=True)
    await world.up(fresh=True)
    stats = Stats()
    try:
        token = TokenIssuer(world.signing_key()).issue("bench-load", ["admin"], ttl_s=7200)
        async with TesseraClient(token, world.endpoints) as client:
            dataset = f"load-{uuid.uuid4().hex[:8]}"
            await client.create_dataset(dataset, "load run")
            stop = asyncio.Event()
            t0 = time.monotonic()
            watchers = [
                asyncio.create_task(watch_tiled(world, stats, stop)),
                asyncio.create_task(sample(world, stats, t0, stop)),
            ]
            stop_at = t0 + minutes * 60
            todo = list(reversed(files))
            print(f"uploading for {minutes:g} min with {clients} clients ...", flush=True)
            await asyncio.gather(
                *(uploader(client, dataset, todo, stop_at, stats) for _ in range(clients))
            )
            upload_s = time.monotonic() - t0
            drain_deadline = time.monotonic() + 600
            pending = set(stats.started) - set(stats.tiled)
            while pending and time.monotonic() < drain_deadline:
                await asyncio.sleep(1)
                pending = set(stats.started) - set(stats.tiled)
            total_s = time.monotonic() - t0
            stats.rss.append((total_s, world.service_rss_mb()))
            with contextlib.suppress(Exception):
                stats.lag.append((total_s, await consumer_lag(world)))
            stop.set()
            await asyncio.gather(*watchers, return_exceptions=True)
        print("searching the run's logs, traces, events and metrics ...", flush=True)
        leaks, scanned = await find_leaks(world, identifying)
    finally:
        if not keep:
            await world.down()
    report(stats, minutes, clients, upload_s, total_s, len(files))
    print(
        f"  leak scan: {scanned} logs, trace files, events and /metrics pages searched for "
        f"{len(identifying)} identifying values: "
        + (("FOUND in " + ", ".join(leaks)) if leaks else "none found")
    )
    return not leaks


def report(
    stats: Stats, minutes: float, clients: int, upload_s: float, total_s: float, pool: int
) -> None:
    latencies = [stats.tiled[s] - t for s, t in stats.started.items() if s in stats.tiled]
    accepted, tiled = len(stats.started), len(latencies)
    print()
    print(f"load run: {minutes:g} min of uploads, {clients} concurrent clients, {pool} files")
    print(f"  {'accepted':>9} {'tiled':>6} {'slides/min':>11} {'MB/s in':>8} {'busy':>5}  other")
    print(
        f"  {accepted:>9} {tiled:>6} {tiled / (total_s / 60):>11.1f} "
        f"{stats.accepted_bytes / upload_s / 1e6:>8.2f} {stats.refused_busy:>5}  "
        f"{stats.refused_other or '-'}"
    )
    print(
        f"  upload-to-tiled latency: p50 {pct(latencies, 0.5):.1f} s, p99 "
        f"{pct(latencies, 0.99):.1f} s, max {max(latencies, default=float('nan')):.1f} s"
    )
    if stats.lag:
        groups = sorted({g for _, lag in stats.lag for g in lag})
        print("  consumer lag (messages) over time:")
        names = " ".join(f"{g.removeprefix('tessera-'):>9}" for g in groups)
        print("    " + f"{'t s':>6} " + names)
        for t, lag in stats.lag:
            print("    " + f"{t:>6.0f} " + " ".join(f"{lag.get(g, 0):>9}" for g in groups))
    if len(stats.rss) >= 2:
        first, last = stats.rss[0][1], stats.rss[-1][1]
        mid = stats.rss[len(stats.rss) // 2][1]
        print("  service memory (RSS MB): start / middle / end")
        for name in sorted(first):
            print(
                f"    {name:<10} {first[name]:>7.0f} {mid.get(name, 0):>7.0f} "
                f"{last.get(name, 0):>7.0f}"
            )
    if latencies:
        print(f"  mean latency {statistics.fmean(latencies):.1f} s over {tiled} slides")
    if accepted != tiled:
        print(f"  NOT TILED within the drain window: {accepted - tiled}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--pool", type=int, default=0, help="files to generate (default: enough)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    # enough files for the whole run: it has accepted up to ~4 slides/s here
    pool = args.pool or int(max(40, args.minutes * 60 * 5))
    sys.exit(0 if asyncio.run(run(args.minutes, args.clients, pool, args.keep)) else 1)


if __name__ == "__main__":
    main()
