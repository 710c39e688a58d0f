"""Outgoing gRPC channels: bearer token, trace propagation, bounded retries on UNAVAILABLE,
optional mutual TLS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.shared import telemetry
from services.shared.settings import TlsSettings

_RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class _Bearer:
    """Adds `authorization: Bearer <token>` to every call. grpc.aio files an interceptor under
    one call type only, so there is one subclass per type."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", f"Bearer {self._token()}")
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _BearerUU(_Bearer, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUS(_Bearer, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerSU(_Bearer, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _BearerSS(_Bearer, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


_default_tls: TlsSettings | None = None


class _TracedStreamUnary(aio.StreamUnaryClientInterceptor):
    """The client span of a client-streaming call, ended when the call ends.

    OpenTelemetry's own stream-unary interceptor awaits the whole call before it hands the
    call back, so until the RPC is over the caller cannot see the server's initial metadata,
    which the upload protocol uses to say "header accepted, send the chunks" (see
    `services/cli/client.py`). This one returns the call at once."""

    def __init__(self) -> None:
        self._ending: set[asyncio.Task[None]] = set()

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        service, _, name = method.lstrip("/").partition("/")
        span = telemetry.tracer(__name__).start_span(
            method,
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        metadata = aio.Metadata(*tuple(details.metadata or ()))
        propagate.inject(metadata, context=trace.set_span_in_context(span))
        try:
            call = await continuation(
                aio.ClientCallDetails(
                    details.method,
                    details.timeout,
                    metadata,
                    details.credentials,
                    details.wait_for_ready,
                ),
                requests,
            )
        except BaseException:
            span.set_status(trace.StatusCode.ERROR)
            span.end()
            raise
        task = asyncio.create_task(self._end_when_done(span, call))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        return call

    @staticmethod
    async def _end_when_done(span: trace.Span, call: Any) -> None:
        try:
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(trace.StatusCode.ERROR, str(code.name))
        finally:
            span.end()


def _client_interceptors() -> list[Any]:
    """OpenTelemetry's interceptors, but ours for stream-unary calls (see above)."""
    stock = [
        i for i in aio_client_interceptors() if not isinstance(i, aio.StreamUnaryClientInterceptor)
    ]
    return [*stock, _TracedStreamUnary()]


def use_tls_by_default(tls: TlsSettings | None) -> None:
    """Make every later `open_channel` of this process use mutual TLS with `tls` (a service
    with `grpc.tls.enabled` calls this at start-up), or plaintext again with None."""
    global _default_tls
    _default_tls = tls if tls is not None and tls.enabled else None


def client_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    """Trust only the configured CA, and present this service's certificate."""
    if tls.ca_file is None or tls.cert_file is None or tls.key_file is None:
        raise ValueError("TLS needs ca_file, cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes(),
        private_key=tls.key_file.read_bytes(),
        certificate_chain=tls.cert_file.read_bytes(),
    )


def open_channel(
    target: str, token: Callable[[], str] | None = None, tls: TlsSettings | None = None
) -> aio.Channel:
    """A channel that sends the bearer token on every call: mutual TLS with `tls` (or the
    process default, see `use_tls_by_default`), else plaintext (loopback / in-mesh)."""
    interceptors: list[Any] = []
    if token is not None:
        interceptors += [_BearerUU(token), _BearerUS(token), _BearerSU(token), _BearerSS(token)]
    interceptors.extend(_client_interceptors())
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", _RETRY_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    tls = tls if tls is not None and tls.enabled else _default_tls
    if tls is None:
        return aio.insecure_channel(target, interceptors=interceptors, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return aio.secure_channel(
        target, client_credentials(tls), interceptors=interceptors, options=options
    )
