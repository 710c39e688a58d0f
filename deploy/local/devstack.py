"""Local stack of the six Tessera services, each its own process on 127.0.0.1.

    python deploy/local/devstack.py init     keys, tokens, topics, buckets, model (idempotent)
    python deploy/local/devstack.py up       init, start what is not running, wait for health
    python deploy/local/devstack.py down     stop what `up` started (SIGTERM, then SIGKILL)
    python deploy/local/devstack.py status
    python deploy/local/devstack.py env      `export` lines for the `tessera` CLI

Needs the servers of `deploy/local/stack.sh up` (Kafka, S3, FerretDB). Everything it writes
lives under $TESSERA_HOME/stack (default <repo>/.tessera/stack).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOME = Path(os.environ.get("TESSERA_HOME", REPO / ".tessera"))
STACK = Path(os.environ.get("TESSERA_STACK_DIR", HOME / "stack"))
APP = STACK / "app"
KEYS = APP / "keys"
RUN = APP / "run"
LOGS = APP / "logs"
TRACES = APP / "traces"
DATA = APP / "data"

KAFKA = os.environ.get(
    "TESSERA_KAFKA_BOOTSTRAP", "127.0.0.1:" + os.environ.get("TESSERA_KAFKA_PORT", "9092")
)
S3 = os.environ.get("TESSERA_S3_ENDPOINT", "127.0.0.1:" + os.environ.get("TESSERA_S3_PORT", "7070"))
S3_KEY = os.environ.get("TESSERA_S3_ACCESS_KEY", "tessera")
S3_SECRET = os.environ.get("TESSERA_S3_SECRET_KEY", "tessera-local-secret")
MONGO = os.environ.get(
    "TESSERA_MONGO_URI",
    "mongodb://127.0.0.1:" + os.environ.get("TESSERA_MONGO_PORT", "27017") + "/",
)
DATABASE = os.environ.get("TESSERA_MONGO_DATABASE", "tessera")
SITE = "local"


@dataclass(frozen=True)
class Svc:
    name: str
    grpc_port: int
    metrics_port: int


# A second stack beside the first (the fault tests and the load run start one) takes its ports
# from a base: gRPC base+1..base+6, metrics base+11..base+16, tiles over HTTP base+20. Keep it
# below the kernel's ephemeral range (32768+), where an outgoing connection may hold the port.
PORT_BASE = int(os.environ.get("TESSERA_DEVSTACK_PORT_BASE", "0"))
_NAMES = ("access", "ingestion", "deid", "tiling", "metadata", "serving")
if PORT_BASE:
    SERVICES = tuple(
        Svc(name, PORT_BASE + 1 + i, PORT_BASE + 11 + i) for i, name in enumerate(_NAMES)
    )
    TILING_HTTP_PORT = PORT_BASE + 20
else:
    SERVICES = tuple(Svc(name, 50051 + i, 9461 + i) for i, name in enumerate(_NAMES))
    TILING_HTTP_PORT = 8180
GRPC_ENDPOINT = {svc.name: f"127.0.0.1:{svc.grpc_port}" for svc in SERVICES}
# For debugging one service at a time: TESSERA_DEVSTACK_ONLY=access,metadata
_ONLY = {n for n in os.environ.get("TESSERA_DEVSTACK_ONLY", "").split(",") if n}
if _ONLY:
    SERVICES = tuple(s for s in SERVICES if s.name in _ONLY)


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure_keys() -> None:
    from services.shared.auth import TokenIssuer, generate_keypair

    private, public = KEYS / "issuer.pem", KEYS / "issuer.pub.pem"
    if not private.exists():
        priv, pub = generate_keypair()
        _write_secret(private, priv)
        public.write_bytes(pub)
    if not (KEYS / "pseudonym.key").exists():
        _write_secret(KEYS / "pseudonym.key", secrets.token_hex(32).encode())
    issuer = TokenIssuer(private.read_bytes())
    for svc in SERVICES:
        # Service tokens of the local stack live 30 days and are re-minted by every `up`.
        _write_secret(
            KEYS / f"{svc.name}.jwt",
            issuer.issue(f"svc:{svc.name}", ["service"], ttl_s=30 * 86400).encode(),
        )


def service_env(svc: Svc) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "TESSERA_SITE": SITE,
            "TESSERA_GRPC__PORT": str(svc.grpc_port),
            "TESSERA_METRICS__PORT": str(svc.metrics_port),
            "TESSERA_AUTH__PUBLIC_KEY_FILE": str(KEYS / "issuer.pub.pem"),
            "TESSERA_AUTH__SERVICE_TOKEN_FILE": str(KEYS / f"{svc.name}.jwt"),
            "TESSERA_KAFKA__BOOTSTRAP_SERVERS": KAFKA,
            "TESSERA_S3__ENDPOINT": S3,
            "TESSERA_S3__ACCESS_KEY": S3_KEY,
            "TESSERA_S3__SECRET_KEY": S3_SECRET,
            "TESSERA_MONGO__URI": MONGO,
            "TESSERA_MONGO__DATABASE": DATABASE,
            "TESSERA_ENDPOINTS__ACCESS": GRPC_ENDPOINT["access"],
            "TESSERA_TELEMETRY__TRACES_EXPORTER": "file",
            "TESSERA_TELEMETRY__SPANS_FILE": str(TRACES / f"{svc.name}.jsonl"),
        }
    )
    # crash points for the fault tests (services/shared/failpoints.py); inert when unset
    for name in ("TESSERA_FAILPOINTS", "TESSERA_FAILPOINTS_DIR"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    pseudonym_key = (KEYS / "pseudonym.key").read_text().strip()
    if svc.name == "ingestion":
        env["TESSERA_INGESTION__SPOOL_DIR"] = str(DATA / "ingestion-spool")
        env["TESSERA_INGESTION__PSEUDONYM_KEY"] = pseudonym_key
    if svc.name == "metadata":
        env["TESSERA_METADATA__PSEUDONYM_KEY"] = pseudonym_key
    if svc.name == "deid":
        env["TESSERA_DEID__WORK_DIR"] = str(DATA / "deid-work")
        env["TESSERA_DEID__PSEUDONYM_KEY"] = pseudonym_key
    if svc.name == "tiling":
        env["TESSERA_TILING__WORK_DIR"] = str(DATA / "tiling-work")
        env["TESSERA_TILING__HTTP_PORT"] = str(TILING_HTTP_PORT)
        # the viewer's record panel reads the catalogue with the viewer's token
        env["TESSERA_ENDPOINTS__METADATA"] = GRPC_ENDPOINT["metadata"]
    return env


async def _init_infra() -> None:
    from services.serving.model.publish import publish_model
    from services.shared.adapters.kafka import KafkaBus
    from services.shared.adapters.s3 import S3ObjectStore
    from services.shared.events import ALL_TOPICS, dead_letter_topic
    from services.shared.settings import BucketSettings

    bus = KafkaBus(KAFKA, client_id="tessera-devstack")
    topics = [*ALL_TOPICS, *(dead_letter_topic(s.name) for s in SERVICES)]
    await bus.ensure_topics(topics, partitions=3)
    store = S3ObjectStore(S3, S3_KEY, S3_SECRET, secure=False)
    buckets = BucketSettings()
    for bucket in (
        buckets.quarantine,
        buckets.deidentified,
        buckets.tiles,
        buckets.models,
        buckets.results,
    ):
        await store.ensure_bucket(bucket)
    card = await publish_model(store, buckets.models, HOME / "cache" / "models")
    print(f"model {card['name']} version {card['version']} in s3://{buckets.models}/")


def init() -> None:
    for d in (KEYS, RUN, LOGS, TRACES, DATA):
        d.mkdir(parents=True, exist_ok=True)
    ensure_keys()
    asyncio.run(_init_infra())


def _pid(svc: Svc) -> int | None:
    path = RUN / f"{svc.name}.pid"
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError):
        path.unlink(missing_ok=True)
        return None
    return pid


async def _healthy(port: int) -> bool:
    from grpc import aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except aio.AioRpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def up(timeout_s: float = 120) -> None:
    init()
    started = []
    for svc in SERVICES:
        if _pid(svc) is not None:
            continue
        log = (LOGS / f"{svc.name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{svc.name}"],
            cwd=REPO,
            env=service_env(svc),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        (RUN / f"{svc.name}.pid").write_text(str(proc.pid))
        started.append(svc)
    deadline = time.monotonic() + timeout_s
    pending = list(SERVICES)
    while pending and time.monotonic() < deadline:
        for svc in list(pending):
            if _pid(svc) is None:
                tail = (LOGS / f"{svc.name}.log").read_text(errors="replace")[-3000:]
                sys.exit(f"service {svc.name} exited during start-up; log tail:\n{tail}")
            if asyncio.run(_healthy(svc.grpc_port)):
                pending.remove(svc)
        if pending:
            time.sleep(0.5)
    if pending:
        names = ", ".join(s.name for s in pending)
        sys.exit(f"services not healthy after {timeout_s:.0f}s: {names} (logs in {LOGS})")
    for svc in SERVICES:
        print(f"  {svc.name:<10} grpc 127.0.0.1:{svc.grpc_port}  metrics :{svc.metrics_port}")
    print(f"  tiles over HTTP: http://127.0.0.1:{TILING_HTTP_PORT}/slides/<slide-id>.dzi")
    print(f"all six services healthy (logs: {LOGS})")


def down(timeout_s: float = 20) -> None:
    for svc in SERVICES:
        pid = _pid(svc)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and _pid(svc) is not None:
            time.sleep(0.2)
        if _pid(svc) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        (RUN / f"{svc.name}.pid").unlink(missing_ok=True)
        print(f"stopped {svc.name}")


def status() -> int:
    bad = 0
    for svc in SERVICES:
        pid = _pid(svc)
        ok = pid is not None and asyncio.run(_healthy(svc.grpc_port))
        bad += not ok
        print(f"{svc.name:<10} {'SERVING' if ok else 'DOWN':<8} pid={pid or '-'}")
    return 1 if bad else 0


def env() -> None:
    print(f"export TESSERA_SIGNING_KEY={KEYS / 'issuer.pem'}")
    for svc in SERVICES:
        print(f"export TESSERA_ENDPOINT_{svc.name.upper()}=127.0.0.1:{svc.grpc_port}")
    print(f"export TESSERA_TILES_HTTP=http://127.0.0.1:{TILING_HTTP_PORT}")


def main() -> None:
    sys.path[:0] = [str(REPO), str(REPO / "protos")]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("command", choices=["init", "up", "down", "status", "env"])
    args = parser.parse_args()
    if args.command == "init":
        init()
    elif args.command == "up":
        up()
    elif args.command == "down":
        down()
    elif args.command == "status":
        sys.exit(status())
    else:
        env()


if __name__ == "__main__":
    main()
