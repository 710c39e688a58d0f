"""Operator settings (pydantic-settings, `TESSERA_OPERATOR__` prefix)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TESSERA_OPERATOR__", extra="ignore", frozen=True)

    # empty: every namespace (cluster-wide); else a comma-separated list
    namespaces: str = ""
    # full reconcile (servers included) of every resource this often
    resync_s: float = Field(default=60.0, gt=0)
    # coalescing delay for reconciles triggered by owned objects' events
    debounce_s: float = Field(default=0.5, ge=0)
    # bound of each admin call to Kafka / S3 / MongoDB
    infra_timeout_s: float = Field(default=20.0, gt=0)
    liveness_host: str = "0.0.0.0"
    liveness_port: int = Field(default=8080, ge=1, le=65535)
    # kubeconfig file; unset: $KUBECONFIG / ~/.kube/config, then the in-cluster account
    kubeconfig: str | None = None
    log_level: str = "INFO"

    def namespace_list(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]
