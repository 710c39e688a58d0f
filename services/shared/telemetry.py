"""Tracing and structured logs.

Traces: one TracerProvider per process named after the service; gRPC spans come from the
OpenTelemetry gRPC aio interceptors, Kafka hops carry W3C trace context in message headers
(see `services.shared.events`). Logs: one JSON object per line carrying trace and span ids.
Nothing identifying goes into spans or logs: attributes are ids, codes and counts only.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from services.shared.settings import TelemetrySettings

# Fields a log call may attach with `extra={...}`; anything else is dropped, so a careless
# log call cannot leak a file name or a metadata value.
LOG_FIELDS = frozenset(
    {
        "slide_id",
        "dataset_id",
        "event_id",
        "event_type",
        "topic",
        "partition",
        "offset",
        "stage",
        "reason",
        "rpc",
        "code",
        "duration_ms",
        "attempt",
        "outcome",
        "count",
        "port",
        "service",
        "upload_id",
        "model",
        "version",
        "level",
    }
)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": _message(record),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
            entry["span_id"] = format(ctx.span_id, "016x")
        for key in LOG_FIELDS:
            if key in record.__dict__:
                entry[key] = record.__dict__[key]
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: messages and tracebacks may quote input.
            entry["error_type"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


# Loggers whose messages are about connections and protocol state, never file content.
# Parsers and image libraries (pydicom, tifffile, PIL, openslide, warnings) can quote values
# from a slide in their messages: for them only the logger name and level are written.
_TRUSTED_PREFIXES = ("services.", "aiokafka", "kafka", "grpc", "pymongo", "aiohttp", "asyncio")


def _message(record: logging.LogRecord) -> str:
    name = record.name
    if name == "root" or name.startswith(_TRUSTED_PREFIXES) or name.startswith("__main__"):
        return record.getMessage()
    return "third-party message withheld (it may quote slide content)"


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka", "pymongo", "urllib3", "grpc", "pydicom", "tifffile"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # warnings.warn() from parsers becomes a log record (withheld text), not raw stderr.
    logging.captureWarnings(True)


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans as JSON lines to a file (local stack and tests)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "trace_id": format(ctx.trace_id, "032x") if ctx else "",
                        "span_id": format(ctx.span_id, "016x") if ctx else "",
                        "parent_span_id": format(span.parent.span_id, "016x")
                        if span.parent
                        else "",
                        "kind": span.kind.name,
                        "service": span.resource.attributes.get("service.name", ""),
                        "start": span.start_time,
                        "end": span.end_time,
                        "attributes": dict(span.attributes or {}),
                        "status": span.status.status_code.name,
                    },
                    default=str,
                )
            )
        with self._lock, self._path.open("a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


def configure_tracing(service: str, settings: TelemetrySettings) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if settings.traces_exporter == "file" and settings.spans_file is not None:
        settings.spans_file.parent.mkdir(parents=True, exist_ok=True)
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(settings.spans_file)))
    elif settings.traces_exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    trace.set_tracer_provider(provider)
    return provider


def inject_headers() -> dict[str, str]:
    """W3C trace context of the current span, for an outgoing message."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> Any:
    return propagate.extract(dict(carrier))


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
