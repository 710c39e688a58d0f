"""Domain errors. Service code raises these; one interceptor maps them to gRPC status codes
(`services.shared.grpc.interceptors.ErrorInterceptor`) and one event runner maps them to
retry or dead-letter decisions. Messages must never contain identifying values."""

from __future__ import annotations


class TesseraError(Exception):
    """Base class. `reason` is a stable UPPER_SNAKE code for machines."""

    default_reason = "ERROR"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgument(TesseraError):
    default_reason = "INVALID_ARGUMENT"


class NotFound(TesseraError):
    default_reason = "NOT_FOUND"


class AlreadyExists(TesseraError):
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(TesseraError):
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(TesseraError):
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(TesseraError):
    default_reason = "FAILED_PRECONDITION"


class OutOfRange(TesseraError):
    default_reason = "OUT_OF_RANGE"


class DataLoss(TesseraError):
    """Bytes received do not match what was declared (checksum, size)."""

    default_reason = "DATA_LOSS"


class ResourceExhausted(TesseraError):
    """Over capacity; `retry_after_s` is the wait hinted to the caller (`tessera-retry-after-s`)."""

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, reason: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, reason)
        self.retry_after_s = retry_after_s


class Unavailable(TesseraError):
    """A dependency is down; the caller may retry."""

    default_reason = "UNAVAILABLE"


class PermanentEventError(TesseraError):
    """An event that can never be processed (malformed, unknown type): dead-letter it."""

    default_reason = "MALFORMED_EVENT"


def check_slide_id(slide_id: str) -> None:
    """Slide ids are server-made UUIDs; anything else is answered before any lookup."""
    if not slide_id:
        raise InvalidArgument("slide_id is required", "MISSING_FIELD")
    if len(slide_id) > 128:
        raise InvalidArgument("slide_id must be at most 128 characters", "BAD_SLIDE_ID")


def _outage_types() -> tuple[type[BaseException], ...]:
    """Exception types the adapters' client libraries raise when their server cannot be reached
    (refused, reset, timed out, 5xx). Imported lazily so this module stays dependency-free."""
    global _OUTAGE_TYPES
    if _OUTAGE_TYPES is None:
        found: list[type[BaseException]] = [Unavailable, ConnectionError]
        try:
            from pymongo.errors import ConnectionFailure

            found.append(ConnectionFailure)
        except ImportError:  # pragma: no cover - every service installs pymongo
            pass
        try:
            from urllib3.exceptions import HTTPError as Urllib3Error

            found.append(Urllib3Error)
        except ImportError:  # pragma: no cover
            pass
        try:
            from minio.error import ServerError

            found.append(ServerError)
        except ImportError:  # pragma: no cover
            pass
        try:
            from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

            found += [KafkaConnectionError, KafkaTimeoutError]
        except ImportError:  # pragma: no cover
            pass
        _OUTAGE_TYPES = tuple(found)
    return _OUTAGE_TYPES


_OUTAGE_TYPES: tuple[type[BaseException], ...] | None = None


def is_outage(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) says a dependency is down rather than that the
    input is bad: such failures are retried until the dependency returns, never dead-lettered
    and never reported as the caller's fault."""
    types = _outage_types()
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, types):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False
