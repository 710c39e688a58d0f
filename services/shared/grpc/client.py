"""Outgoing gRPC channels: bearer token, trace propagation, bounded retries on UNAVAILABLE."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from grpc import aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors

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


def open_channel(target: str, token: Callable[[], str] | None = None) -> aio.Channel:
    """An insecure (loopback / in-mesh) channel that sends the bearer token on every call."""
    interceptors: list[Any] = []
    if token is not None:
        interceptors += [_BearerUU(token), _BearerUS(token), _BearerSU(token), _BearerSS(token)]
    interceptors.extend(aio_client_interceptors())
    return aio.insecure_channel(
        target,
        interceptors=interceptors,
        options=[
            ("grpc.service_config", _RETRY_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ],
    )
