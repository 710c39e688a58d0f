"""Runs one service process: gRPC server with the standard health service, Prometheus
`/metrics`, background consumers, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from prometheus_client import start_http_server

from services.shared import metrics
from services.shared.auth import TokenVerifier
from services.shared.grpc.interceptors import ServerPipeline
from services.shared.settings import ServiceSettings, TlsSettings

log = logging.getLogger(__name__)

Register = Callable[[aio.Server], None]


class Background:
    """A long-running task (a consumer loop, an HTTP server) with its stop function."""

    def __init__(self, name: str, run: Callable[[], Awaitable[None]], stop: Callable[[], None]):
        self.name = name
        self.run = run
        self.stop = stop


class ServiceHost:
    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        verifier: TokenVerifier,
        *,
        service_names: Sequence[str],
        register: Sequence[Register],
        background: Sequence[Background] = (),
        on_start: Sequence[Callable[[], Awaitable[None]]] = (),
        on_close: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self.name = name
        self._settings = settings
        self._verifier = verifier
        self._service_names = list(service_names)
        self._register = list(register)
        self._background = list(background)
        self._on_start = list(on_start)
        self._on_close = list(on_close)
        self._stop = asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.bound_port: int = 0

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        grpc_cfg = self._settings.grpc
        server = aio.server(
            interceptors=[aio_server_interceptor(), ServerPipeline(self.name, self._verifier)],
            options=[
                ("grpc.max_receive_message_length", grpc_cfg.max_message_bytes),
                ("grpc.max_send_message_length", grpc_cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for register in self._register:
            register(server)
        address = f"{grpc_cfg.host}:{grpc_cfg.port}"
        if grpc_cfg.tls.enabled:
            self.bound_port = server.add_secure_port(address, server_credentials(grpc_cfg.tls))
        else:
            self.bound_port = server.add_insecure_port(address)
        if self.bound_port == 0:
            raise SystemExit(f"{self.name}: cannot bind {grpc_cfg.host}:{grpc_cfg.port}")

        for hook in self._on_start:
            await hook()
        if self._settings.metrics.port:
            start_http_server(self._settings.metrics.port, addr=self._settings.metrics.host)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)

        await server.start()
        tasks: list[asyncio.Task[None]] = [
            asyncio.create_task(_await(b.run), name=b.name) for b in self._background
        ]
        for svc in ["", *self._service_names]:
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        metrics.SERVICE_UP.labels(self.name).set(1)
        log.info("serving", extra={"service": self.name, "port": self.bound_port})

        stop_wait = asyncio.create_task(self._stop.wait())
        pending: set[asyncio.Task[None]] = set(tasks)
        try:
            while not self._stop.is_set():
                done, _ = await asyncio.wait(
                    {stop_wait, *pending}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done - {stop_wait}:
                    pending.discard(task)
                    exc = task.exception()
                    if exc is not None:
                        log.error(
                            "background task failed; shutting down",
                            extra={"service": task.get_name(), "reason": type(exc).__name__},
                        )
                        self._stop.set()
        finally:
            # Drain: stop advertising, stop taking events, let in-flight calls finish.
            metrics.SERVICE_UP.labels(self.name).set(0)
            await self.health.enter_graceful_shutdown()
            for b in self._background:
                b.stop()
            if pending:
                await asyncio.wait(pending, timeout=grpc_cfg.drain_grace_s)
            await server.stop(grpc_cfg.drain_grace_s)
            for hook in self._on_close:
                with contextlib.suppress(Exception):
                    await hook()
            stop_wait.cancel()
            log.info("stopped", extra={"service": self.name})


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """This service's certificate; with `require_client_auth`, only clients presenting a
    certificate signed by the configured CA complete the handshake."""
    if tls.ca_file is None or tls.cert_file is None or tls.key_file is None:
        raise SystemExit("TLS needs TESSERA_GRPC__TLS__{CERT,KEY,CA}_FILE")
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=tls.ca_file.read_bytes(),
        require_client_auth=tls.require_client_auth,
    )


async def _await(run: Callable[[], Awaitable[None]]) -> None:
    await run()
