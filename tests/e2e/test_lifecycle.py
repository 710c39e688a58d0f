"""Service processes: fail fast on bad configuration, expose metrics, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import REPO, World

pytestmark = pytest.mark.e2e
sys.path.insert(0, str(REPO / "deploy" / "local"))
import devstack  # noqa: E402


def test_missing_configuration_stops_start_up_with_the_variable_named() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    proc = subprocess.run(
        [sys.executable, "-m", "services.ingestion"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "TESSERA_GRPC__PORT" in proc.stderr
    assert "TESSERA_INGESTION__PSEUDONYM_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_metrics_are_exported(world: World) -> None:
    async with aiohttp.ClientSession() as http:
        for svc in devstack.SERVICES:
            async with http.get(f"http://127.0.0.1:{svc.metrics_port}/metrics") as r:
                assert r.status == 200
                text = await r.text()
                if svc.name in ("access", "ingestion", "metadata"):  # called by the setup
                    assert "tessera_rpc_requests_total{" in text
                assert f'tessera_service_ready{{service="{svc.name}"}} 1.0' in text
        async with http.get("http://127.0.0.1:9463/metrics") as r:
            assert "tessera_events_consumed_total" in await r.text()


async def _health(port: int) -> int | None:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except aio.AioRpcError:
            return None
        return int(r.status)


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    svc = devstack.Svc("access", 50151, 0)
    env = devstack.service_env(svc)
    env["TESSERA_TELEMETRY__TRACES_EXPORTER"] = "none"
    log = tmp_path / "access.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.access"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while asyncio.run(_health(svc.grpc_port)) != health_pb2.HealthCheckResponse.SERVING:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "second access instance never became healthy"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert '"msg": "stopped"' in text
    assert "Traceback" not in text
