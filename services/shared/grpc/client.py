"""Outgoing gRPC channels: bearer token, trace propagation, bounded retries on UNAVAILABLE,
optional mutual TLS."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors

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
    interceptors.extend(aio_client_interceptors())
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
