"""A small async Kubernetes REST client (aiohttp) for what the reconciler needs: server-side
apply, get, list by label, delete, status patches. Credentials come from a kubeconfig or the
in-cluster service account (read through the `kubernetes` package's config loaders)."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from services.operator.schema import GROUP, VERSION

FIELD_MANAGER = "tessera-operator"

# kind -> (API path prefix, plural)
KINDS: Mapping[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "TesseraNode": (f"/apis/{GROUP}/{VERSION}", "tesseranodes"),
    "ModelDeployment": (f"/apis/{GROUP}/{VERSION}", "modeldeployments"),
}
OWNED_KINDS = (
    "ConfigMap",
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
)


class KubeError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"Kubernetes API answered {status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_file: str | None
    token: str | None
    token_file: str | None
    verify: bool = True

    @classmethod
    def load(cls, kubeconfig: str | None = None) -> Credentials:
        from kubernetes import client, config

        cfg = client.Configuration()
        token_file: str | None = None
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        except config.ConfigException:
            config.load_incluster_config(client_configuration=cfg)
            token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105
        auth = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        prefix = cfg.api_key_prefix.get("authorization", "")
        token = None
        if auth:
            token = auth.split(" ", 1)[1] if auth.startswith("Bearer ") else auth
            if prefix and prefix != "Bearer":
                token = auth
        return cls(
            server=cfg.host.rstrip("/"),
            ca_file=cfg.ssl_ca_cert,
            token=token,
            token_file=token_file,
            verify=bool(cfg.verify_ssl),
        )

    def bearer(self) -> str | None:
        if self.token_file and Path(self.token_file).exists():
            return Path(self.token_file).read_text().strip()  # bound tokens rotate
        return self.token


def path_of(kind: str, namespace: str | None, name: str | None = None, sub: str = "") -> str:
    prefix, plural = KINDS[kind]
    ns = f"/namespaces/{namespace}" if namespace else ""
    tail = f"/{name}" if name else ""
    return f"{prefix}{ns}/{plural}{tail}{'/' + sub if sub else ''}"


class KubeApi:
    def __init__(self, creds: Credentials, *, timeout_s: float = 30.0) -> None:
        self._creds = creds
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self._creds.verify:
            return False
        return ssl.create_default_context(cafile=self._creds.ca_file)

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(ssl=self._ssl())
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json"}
        token = self._creds.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        session = await self._http()
        async with session.request(
            method, self._creds.server + path, data=data, params=params, headers=headers
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                reason = resp.reason or ""
                with contextlib.suppress(ValueError):
                    reason = json.loads(text).get("message", reason)
                raise KubeError(resp.status, reason)
            if not text:
                return None
            try:
                return json.loads(text)
            except ValueError:
                return text  # /readyz and friends answer plain text

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply with force: the operator owns every field it sets."""
        meta = manifest["metadata"]
        result: dict[str, Any] = await self.request(
            "PATCH",
            path_of(manifest["kind"], meta.get("namespace"), meta["name"]),
            body=manifest,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )
        return result

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.request("GET", path_of(kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def list(
        self, kind: str, namespace: str, selector: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        result = await self.request(
            "GET", path_of(kind, namespace), params={"labelSelector": label_selector}
        )
        return list(result.get("items") or [])

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        try:
            await self.request(
                "DELETE",
                path_of(kind, namespace, name),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": "Background",
                },
            )
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> bool:
        """False when the object is gone (deleted while it was being reconciled)."""
        try:
            await self.request(
                "PATCH",
                path_of(kind, namespace, name, "status"),
                body={"status": dict(status)},
                content_type="application/merge-patch+json",
            )
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def healthy(self) -> bool:
        try:
            await self.request("GET", "/readyz")
        except (KubeError, aiohttp.ClientError, TimeoutError):
            return False
        return True
