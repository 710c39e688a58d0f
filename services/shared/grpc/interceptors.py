"""Server interceptors: authentication, error mapping and metrics, in one place each."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from services.shared import metrics
from services.shared.auth import (
    TokenVerifier,
    bearer_from_metadata,
    reset_current_principal,
    set_current_principal,
)
from services.shared.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermanentEventError,
    PermissionDenied,
    ResourceExhausted,
    TesseraError,
    Unauthenticated,
    Unavailable,
    is_outage,
)

log = logging.getLogger(__name__)

STATUS_OF: dict[type[TesseraError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    DataLoss: grpc.StatusCode.DATA_LOSS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    PermanentEventError: grpc.StatusCode.INVALID_ARGUMENT,
}

# Methods reachable without a token: probes.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

REASON_KEY = "tessera-reason"
RETRY_AFTER_KEY = "tessera-retry-after-s"  # seconds a caller over capacity should wait


def status_for(exc: TesseraError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


class ServerPipeline(aio.ServerInterceptor):
    """Authenticates every call, maps domain errors to status codes and records metrics.

    - Authentication: the bearer token in `authorization` metadata is verified (signature,
      issuer, audience, expiry) and the principal set for the call; public methods (health)
      are exempt. A missing or bad token is UNAUTHENTICATED.
    - Errors: a `TesseraError` becomes its status code with its message and a
      `tessera-reason` trailer; any other exception becomes INTERNAL with a reference id and is
      logged by type only, so neither stack traces nor input values reach the caller.
    """

    def __init__(self, service: str, verifier: TokenVerifier) -> None:
        self._service = service
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._wrap(handler, handler_call_details.method)

    def _enter(self, method: str, context: aio.ServicerContext) -> Any:
        if method.startswith(PUBLIC_PREFIXES):
            return None
        principal = self._verifier.verify(bearer_from_metadata(context.invocation_metadata()))
        return set_current_principal(principal)

    def _exit(self, method: str, token: Any, started: float, code: str) -> None:
        if token is not None:
            reset_current_principal(token)
        metrics.RPC_LATENCY.labels(self._service, method).observe(time.perf_counter() - started)
        metrics.RPC_REQUESTS.labels(self._service, method, code).inc()

    async def _fail(self, method: str, context: aio.ServicerContext, exc: BaseException) -> str:
        """Abort the call for `exc`; returns the status code name recorded."""
        if isinstance(exc, TesseraError):
            code = status_for(exc)
            # Operators see refusals by method, code and reason; never the message (it may
            # name a tag or a key the caller sent).
            log.info("rpc refused", extra={"rpc": method, "code": code.name, "reason": exc.reason})
            trailers: tuple[tuple[str, str], ...] = ((REASON_KEY, exc.reason),)
            hint = getattr(exc, "retry_after_s", None)
            if hint is not None:
                trailers += ((RETRY_AFTER_KEY, f"{hint:g}"),)
            await context.abort(code, exc.message, trailing_metadata=trailers)
        if is_outage(exc):
            # S3, MongoDB or Kafka unreachable: the caller's request was fine; it may retry.
            log.warning("rpc failed: dependency unavailable", extra={"rpc": method})
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "a dependency of this service is unavailable; retry later",
                trailing_metadata=((REASON_KEY, "DEPENDENCY_UNAVAILABLE"),),
            )
        if isinstance(exc, NotImplementedError):
            # A method declared in the proto that its servicer does not implement (the
            # generated base class raises this), e.g. grpc's aio health servicer's List.
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "method not implemented",
                trailing_metadata=((REASON_KEY, "UNIMPLEMENTED"),),
            )
        ref = uuid.uuid4().hex[:12]
        log.error(
            "unhandled error in rpc",
            extra={"rpc": method, "reason": type(exc).__name__, "event_id": ref},
        )
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error (reference {ref})",
            trailing_metadata=((REASON_KEY, "INTERNAL"),),
        )
        return "INTERNAL"  # pragma: no cover - abort raises

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        pipeline = self

        def classify(exc: BaseException) -> str:
            if isinstance(exc, TesseraError):
                return status_for(exc).name
            if isinstance(exc, NotImplementedError):
                return "UNIMPLEMENTED"
            return "UNAVAILABLE" if is_outage(exc) else "INTERNAL"

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: aio.ServicerContext) -> Any:
                started = time.perf_counter()
                token = None
                code = "OK"
                try:
                    token = pipeline._enter(method, context)
                    return await inner(request, context)
                except (aio.AbortError, asyncio.CancelledError):
                    code = "ABORTED_BY_HANDLER"
                    raise
                except Exception as exc:
                    code = classify(exc)
                    await pipeline._fail(method, context, exc)
                    raise
                finally:
                    pipeline._exit(method, token, started, code)

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(
                unary_response,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner_stream = handler.unary_stream or handler.stream_stream
        if not inspect.isasyncgenfunction(inner_stream):
            inner_stream = _writes_as_items(inner_stream)

        async def stream_response(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            token = None
            code = "OK"
            try:
                token = pipeline._enter(method, context)
                async for item in inner_stream(request, context):
                    yield item
            except (aio.AbortError, asyncio.CancelledError):
                code = "ABORTED_BY_HANDLER"
                raise
            except Exception as exc:
                code = classify(exc)
                await pipeline._fail(method, context, exc)
                raise
            finally:
                pipeline._exit(method, token, started, code)

        factory2 = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return factory2(
            stream_response,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _QueueWriter:
    """A servicer context whose `write` hands the message to the wrapping generator."""

    def __init__(self, context: aio.ServicerContext, queue: asyncio.Queue[Any]) -> None:
        self._context = context
        self._queue = queue

    async def write(self, message: Any) -> None:
        await self._queue.put(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _writes_as_items(
    behavior: Callable[[Any, Any], Awaitable[None]],
) -> Callable[[Any, aio.ServicerContext], AsyncIterator[Any]]:
    """Adapts a streaming handler that answers with `context.write` (grpc's own aio health
    Watch does) to an async generator: the pipeline and the OpenTelemetry interceptor iterate
    streaming handlers, and a coroutine there fails with TypeError (INTERNAL)."""

    async def items(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        task = asyncio.ensure_future(behavior(request, _QueueWriter(context, queue)))
        getter: asyncio.Future[Any] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                while not queue.empty():
                    yield queue.get_nowait()
                task.result()  # re-raises what the handler raised
                return
        finally:
            if getter is not None:
                getter.cancel()
            task.cancel()

    return items
