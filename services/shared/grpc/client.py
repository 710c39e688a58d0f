"""Outgoing gRPC channels: bearer token, trace propagation, bounded retries on UNAVAILABLE."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
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


class _BearerAuth(grpc.AuthMetadataPlugin):
    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def __call__(self, context: Any, callback: Any) -> None:
        callback((("authorization", f"Bearer {self._token()}"),), None)


class _BearerInterceptor(
    aio.UnaryUnaryClientInterceptor,
    aio.UnaryStreamClientInterceptor,
    aio.StreamUnaryClientInterceptor,
    aio.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call on an insecure channel."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", f"Bearer {self._token()}")
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def open_channel(target: str, token: Callable[[], str] | None = None) -> aio.Channel:
    """An insecure (loopback / in-mesh) channel that sends the bearer token on every call."""
    interceptors: list[Any] = list(aio_client_interceptors())
    if token is not None:
        interceptors.append(_BearerInterceptor(token))
    return aio.insecure_channel(
        target,
        interceptors=interceptors,
        options=[
            ("grpc.service_config", _RETRY_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ],
    )
