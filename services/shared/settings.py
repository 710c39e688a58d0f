"""Typed settings shared by every service (pydantic-settings).

Every variable starts with `TESSERA_`; nested sections use `__`, for example
`TESSERA_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092` or `TESSERA_GRPC__PORT=50051`. Required values
have no default, so a service started without them stops at once with a message naming them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError


class KafkaSettings(BaseModel):
    bootstrap_servers: str
    client_id: str = "tessera"
    partitions: int = Field(default=3, ge=1)


class S3Settings(BaseModel):
    endpoint: str
    access_key: SecretStr
    secret_key: SecretStr
    secure: bool = False
    region: str = "us-east-1"


class MongoSettings(BaseModel):
    uri: SecretStr
    database: str = "tessera"


class BucketSettings(BaseModel):
    quarantine: str = "tessera-quarantine"
    deidentified: str = "tessera-deidentified"
    tiles: str = "tessera-tiles"
    models: str = "tessera-models"
    results: str = "tessera-results"


class AuthSettings(BaseModel):
    # PEM of the Ed25519 public key that verifies bearer tokens.
    public_key_file: Path
    issuer: str = "tessera"
    audience: str = "tessera"
    # This service's own token, used for service-to-service calls.
    service_token_file: Path | None = None


class TlsSettings(BaseModel):
    """Mutual TLS between services (off by default: loopback / a mesh that does it). On, the
    server presents `cert_file`/`key_file` and accepts only clients whose certificate chains
    to `ca_file`; this service's own outgoing channels present the same certificate and trust
    only `ca_file`. `TESSERA_GRPC__TLS__ENABLED=true`, `TESSERA_GRPC__TLS__CERT_FILE=...`."""

    enabled: bool = False
    cert_file: Path | None = None  # PEM certificate chain of this service
    key_file: Path | None = None  # PEM private key of this service
    ca_file: Path | None = None  # PEM of the CA that signs every service's certificate
    require_client_auth: bool = True
    # Name expected in the peers' certificates when it differs from the dialled host.
    server_name: str = ""

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled:
            missing = [n for n in ("cert_file", "key_file", "ca_file") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"TLS is enabled but {', '.join(missing)} not set")
        return self


class GrpcSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    tls: TlsSettings = TlsSettings()
    # Seconds in-flight calls get to finish after SIGTERM (keep below the pod's
    # terminationGracePeriodSeconds).
    drain_grace_s: float = Field(default=10.0, gt=0)
    max_message_bytes: int = 8 * 1024 * 1024


class MetricsSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)


class TelemetrySettings(BaseModel):
    # "none", "console" (JSON spans to stderr) or "file" (JSON lines to `spans_file`).
    traces_exporter: str = "none"
    spans_file: Path | None = None
    log_level: str = "INFO"


class Endpoints(BaseModel):
    """gRPC addresses of the other services (host:port)."""

    access: str = ""
    metadata: str = ""
    tiling: str = ""


class ServiceSettings(BaseSettings):
    """Fields every service has; each service subclasses it with its own section."""

    model_config = SettingsConfigDict(
        env_prefix="TESSERA_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    site: str = Field(default="local", pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    grpc: GrpcSettings
    metrics: MetricsSettings
    auth: AuthSettings
    telemetry: TelemetrySettings = TelemetrySettings()
    endpoints: Endpoints = Endpoints()


S = TypeVar("S", bound=ServiceSettings)


class ConfigError(SystemExit):
    """Raised at start-up when configuration is missing or invalid."""


def _env_var(path: tuple[str, ...]) -> str:
    return "TESSERA_" + "__".join(p.upper() for p in path)


def _section_model(cls: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The model class of the settings section at `loc`, or None for a plain value."""
    model: Any = cls
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _required_leaves(model: type[BaseModel], prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Paths of the variables a section cannot do without (one per required leaf field)."""
    out: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        if not field.is_required():
            continue
        path = (*prefix, name)
        sub = _section_model(model, (name,))
        out.extend((_required_leaves(sub, path) or [path]) if sub is not None else [path])
    return out


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment, or exit with a message naming what is wrong."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines: list[str] = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            # A whole section missing: name the variables to set, not the section.
            section = _section_model(cls, loc) if err["type"] == "missing" else None
            paths = (_required_leaves(section, loc) if section is not None else []) or [loc]
            lines.extend(f"  {_env_var(path)}: {err['msg']}" for path in paths)
        raise ConfigError(
            f"{cls.__name__}: invalid or missing configuration:\n" + "\n".join(lines)
        ) from None
    except SettingsError as exc:
        # e.g. a section variable (TESSERA_GRPC) that is not valid JSON; the message names
        # the field and the source, never the value
        raise ConfigError(f"{cls.__name__}: invalid configuration: {exc}") from None
