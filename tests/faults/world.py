"""A second, disposable Tessera stack for fault injection: its own Kafka, S3 server, FerretDB and
six services, on ports shifted away from the developer stack (`make up`), with its own data
folder. Faults are injected only into this stack and only on 127.0.0.1.

The same scripts start it as the developer stack (`deploy/local/stack.sh`, `devstack.py`), with
`TESSERA_STACK_DIR`, `TESSERA_*_PORT` and `TESSERA_DEVSTACK_PORT_BASE` set. Every port is
below the kernel's ephemeral range (32768+), so no outgoing connection can be holding it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
HOME = Path(os.environ.get("TESSERA_HOME", REPO / ".tessera"))
SERVICE_NAMES = ("access", "ingestion", "deid", "tiling", "metadata", "serving")
SERVER_NAMES = ("kafka", "s3", "ferretdb")
INDEX = {name: i for i, name in enumerate(SERVICE_NAMES)}


class WorldError(RuntimeError):
    pass


def live_pid(path: Path) -> int | None:
    """The pid a pid file names, if that process is alive."""
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


@dataclass
class FaultWorld:
    root: Path = field(default_factory=lambda: HOME / "faults")
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    s3_port: int = 17070
    mongo_port: int = 28017
    postgres_port: int = 25432
    ferretdb_debug_port: int = 18088
    port_base: int = 21000  # services: gRPC base+1.., metrics base+11.. (deploy/local/devstack.py)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. armed failpoints

    @property
    def stack_dir(self) -> Path:
        return self.root / "stack"

    @property
    def app(self) -> Path:
        return self.stack_dir / "app"

    @property
    def kafka(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def s3(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    @property
    def mongo_uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongo_port}/"

    def grpc_port(self, service: str) -> int:
        return self.port_base + 1 + INDEX[service]

    def metrics_port(self, service: str) -> int:
        return self.port_base + 11 + INDEX[service]

    @property
    def endpoints(self) -> dict[str, str]:
        return {name: f"127.0.0.1:{self.grpc_port(name)}" for name in SERVICE_NAMES}

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env.update(
            {
                "TESSERA_HOME": str(HOME),  # the download/build cache is shared
                "TESSERA_STACK_DIR": str(self.stack_dir),
                "TESSERA_KAFKA_PORT": str(self.kafka_port),
                "TESSERA_KAFKA_CONTROLLER_PORT": str(self.kafka_controller_port),
                "TESSERA_S3_PORT": str(self.s3_port),
                "TESSERA_MONGO_PORT": str(self.mongo_port),
                "TESSERA_POSTGRES_PORT": str(self.postgres_port),
                "TESSERA_FERRETDB_DEBUG_PORT": str(self.ferretdb_debug_port),
                "TESSERA_DEVSTACK_PORT_BASE": str(self.port_base),
                "TESSERA_STOP_TIMEOUT": "20",
            }
        )
        env.update(self.extra_env)
        return env

    # -- commands ----------------------------------------------------------------------------

    async def _run(self, *argv: str, timeout_s: float = 600) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO,
            env=self.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise WorldError(f"{' '.join(argv[-2:])} did not finish in {timeout_s:.0f}s") from None
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise WorldError(f"{' '.join(argv)} failed ({proc.returncode}):\n{text[-4000:]}")
        return text

    async def _devstack(self, command: str) -> str:
        return await self._run(sys.executable, "deploy/local/devstack.py", command)

    async def _stack(self, *args: str) -> str:
        return await self._run("bash", "deploy/local/stack.sh", *args)

    async def up(self, *, fresh: bool = True) -> None:
        """Start everything from empty data (a fault run must not see a previous run's state)."""
        if fresh:
            await self.down()
            shutil.rmtree(self.stack_dir, ignore_errors=True)
        await self._stack("up")
        await self._devstack("up")

    async def down(self) -> None:
        if not self.stack_dir.exists():
            return
        with contextlib.suppress(WorldError):
            await self._devstack("down")
        await self._stack("down")

    async def start_services(self) -> None:
        """Start whichever of the six services is not running; waits until all are healthy."""
        await self._devstack("up")

    async def stop_server(self, name: str) -> None:
        await self._stack("stop", name)

    async def start_server(self, name: str) -> None:
        await self._stack("start", name)

    def service_pid(self, service: str) -> int | None:
        return live_pid(self.app / "run" / f"{service}.pid")

    async def kill_service(self, service: str) -> None:
        """SIGKILL: no drain, no commit, no flush — the harshest crash there is."""
        pid = self.service_pid(service)
        if pid is None:
            raise WorldError(f"{service} is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            # a killed child stays a zombie until its parent (the devstack launcher, gone) is
            # reaped by init; /proc tells whether it is still running
            with contextlib.suppress(OSError):
                state = (Path("/proc") / str(pid) / "stat").read_text().split()[2]
                if state == "Z":
                    return
            await asyncio.sleep(0.05)
        raise WorldError(f"{service} (pid {pid}) survived SIGKILL")

    async def healthy(self, service: str) -> bool:
        async with aio.insecure_channel(self.endpoints[service]) as ch:
            try:
                resp = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            except aio.AioRpcError:
                return False
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def service_rss_mb(self) -> dict[str, float]:
        """Resident memory of each running service (from /proc)."""
        out = {}
        for name in SERVICE_NAMES:
            pid = self.service_pid(name)
            if pid is None:
                continue
            with contextlib.suppress(OSError):
                for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) / 1024
        return out

    def signing_key(self) -> bytes:
        return (self.app / "keys" / "issuer.pem").read_bytes()

    def logs(self) -> list[Path]:
        return sorted((self.app / "logs").glob("*.log*")) + sorted(
            (self.stack_dir / "logs").glob("*.log*")
        )

    def traces(self) -> list[Path]:
        return sorted((self.app / "traces").glob("*.jsonl"))

    def spool_files(self) -> list[Path]:
        spool = self.app / "data" / "ingestion-spool"
        return [p for p in spool.rglob("*") if p.is_file()] if spool.exists() else []
