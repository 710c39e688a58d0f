"""Settings fail fast naming the variables; JSON logs keep only whitelisted fields."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.ingestion.bootstrap import IngestionSettings
from services.shared.settings import ConfigError, ServiceSettings, load_settings
from services.shared.telemetry import JsonFormatter

BASE_ENV = {
    "TESSERA_GRPC__PORT": "50051",
    "TESSERA_METRICS__PORT": "9100",
    "TESSERA_AUTH__PUBLIC_KEY_FILE": "/keys/tokens.pub",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean TESSERA_* environment."""
    for key in list(os.environ):
        if key.startswith("TESSERA_"):
            monkeypatch.delenv(key)
    return monkeypatch


def set_env(mp: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    for key, value in values.items():
        mp.setenv(key, value)


def config_error(cls: type[ServiceSettings]) -> str:
    with pytest.raises(SystemExit) as err:
        load_settings(cls)
    assert isinstance(err.value, ConfigError)
    return str(err.value)


# -- settings -----------------------------------------------------------------------------


def test_complete_environment_loads(env: pytest.MonkeyPatch) -> None:
    set_env(env, {**BASE_ENV, "TESSERA_SITE": "site-a", "TESSERA_GRPC__HOST": "0.0.0.0"})
    s = load_settings(ServiceSettings)
    assert (s.site, s.grpc.host, s.grpc.port) == ("site-a", "0.0.0.0", 50051)
    assert s.metrics.port == 9100
    assert s.auth.public_key_file == Path("/keys/tokens.pub")
    assert s.auth.issuer == "tessera"


def test_missing_variable_is_named(env: pytest.MonkeyPatch) -> None:
    set_env(env, {k: v for k, v in BASE_ENV.items() if k != "TESSERA_GRPC__PORT"})
    env.setenv("TESSERA_GRPC__HOST", "127.0.0.1")
    message = config_error(ServiceSettings)
    assert "TESSERA_GRPC__PORT" in message
    assert "TESSERA_METRICS__PORT" not in message


def test_empty_environment_names_every_required_variable(env: pytest.MonkeyPatch) -> None:
    message = config_error(IngestionSettings)
    for var in (
        "TESSERA_GRPC__PORT",
        "TESSERA_METRICS__PORT",
        "TESSERA_AUTH__PUBLIC_KEY_FILE",
        "TESSERA_KAFKA__BOOTSTRAP_SERVERS",
        "TESSERA_S3__ENDPOINT",
        "TESSERA_S3__ACCESS_KEY",
        "TESSERA_S3__SECRET_KEY",
        "TESSERA_MONGO__URI",
        "TESSERA_INGESTION__SPOOL_DIR",
        "TESSERA_INGESTION__PSEUDONYM_KEY",
    ):
        assert var in message
    # optional ones are not demanded
    assert "TESSERA_KAFKA__CLIENT_ID" not in message
    assert "TESSERA_AUTH__ISSUER" not in message


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("TESSERA_GRPC__PORT", "70000"),
        ("TESSERA_GRPC__PORT", "not-a-port"),
        ("TESSERA_SITE", "Site With Spaces"),
        ("TESSERA_GRPC__DRAIN_GRACE_S", "-1"),
    ],
)
def test_invalid_value_is_named_without_echoing_it(
    env: pytest.MonkeyPatch, var: str, value: str
) -> None:
    set_env(env, {**BASE_ENV, var: value})
    message = config_error(ServiceSettings)
    assert var in message
    assert value not in message


def test_undecodable_section_variable_is_a_config_error(env: pytest.MonkeyPatch) -> None:
    set_env(env, {**BASE_ENV, "TESSERA_S3": "{secret-key: hunter2"})
    message = config_error(IngestionSettings)
    assert "s3" in message
    assert "hunter2" not in message


def test_secret_values_stay_secret(env: pytest.MonkeyPatch) -> None:
    set_env(
        env,
        {
            **BASE_ENV,
            "TESSERA_KAFKA__BOOTSTRAP_SERVERS": "k:9092",
            "TESSERA_S3__ENDPOINT": "s3:9000",
            "TESSERA_S3__ACCESS_KEY": "ak",
            "TESSERA_S3__SECRET_KEY": "very-secret",
            "TESSERA_MONGO__URI": "mongodb://user:pw@m/",
            "TESSERA_INGESTION__SPOOL_DIR": "/spool",
            "TESSERA_INGESTION__PSEUDONYM_KEY": "k" * 32,
        },
    )
    s = load_settings(IngestionSettings)
    assert s.s3.secret_key.get_secret_value() == "very-secret"
    assert "very-secret" not in repr(s)
    assert "user:pw" not in repr(s)
    assert "k" * 32 not in repr(s)


# -- JSON logs ----------------------------------------------------------------------------


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("unit"))
    log = logging.getLogger("services.unit.json")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, stream
    log.handlers.clear()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_only_whitelisted_extra_fields_are_kept(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logger
    # ("filename" itself is a LogRecord attribute the logging module refuses in `extra`)
    log.info(
        "slide received",
        extra={
            "slide_id": "s-1",
            "dataset_id": "ds-1",
            "attempt": 2,
            "original_filename": "Doe-Jane-CASE-4711.svs",
            "patient_name": "Jane Doe",
            "metadata": {"case_id": "CASE-4711"},
        },
    )
    [entry] = lines(stream)
    assert entry["msg"] == "slide received"
    assert entry["level"] == "INFO"
    assert entry["service"] == "unit"
    assert entry["logger"] == "services.unit.json"
    assert (entry["slide_id"], entry["dataset_id"], entry["attempt"]) == ("s-1", "ds-1", 2)
    for dropped in ("original_filename", "patient_name", "metadata", "filename", "pathname"):
        assert dropped not in entry
    text = stream.getvalue()
    for secret in ("Doe-Jane", "Jane Doe", "CASE-4711"):
        assert secret not in text
    assert "trace_id" not in entry  # no span, no trace ids


def test_trace_ids_inside_a_span(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    provider = TracerProvider()
    tracer = provider.get_tracer("unit")
    with tracer.start_as_current_span("work") as span:
        log.warning("inside")
    log.warning("outside")
    inside, outside = lines(stream)
    ctx = span.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert "trace_id" not in outside and "span_id" not in outside
    provider.shutdown()


def test_exceptions_are_logged_by_type_only(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    try:
        raise ValueError("could not parse patient Jane Doe")
    except ValueError:
        log.exception("parse failed")
    [entry] = lines(stream)
    assert entry["error_type"] == "ValueError"
    assert "Jane Doe" not in stream.getvalue()
    assert "Traceback" not in stream.getvalue()


def test_third_party_parser_messages_are_withheld() -> None:
    """pydicom, tifffile and friends may quote file content in warnings: only our own and the
    transport libraries' messages are written."""
    import json
    import logging

    from services.shared.telemetry import JsonFormatter

    fmt = JsonFormatter("deid")
    leaky = logging.LogRecord(
        "pydicom", logging.WARNING, __file__, 1, "Invalid value for VR PN: 'Doe^Jane'", None, None
    )
    warned = logging.LogRecord(
        "py.warnings", logging.WARNING, __file__, 1, "UserWarning: PatientName Doe^Jane", None, None
    )
    ours = logging.LogRecord(
        "services.deid.core", logging.INFO, __file__, 1, "slide de-identified", None, None
    )
    for record in (leaky, warned):
        entry = json.loads(fmt.format(record))
        assert "Doe" not in json.dumps(entry)
        assert entry["logger"] == record.name
    assert json.loads(fmt.format(ours))["msg"] == "slide de-identified"
