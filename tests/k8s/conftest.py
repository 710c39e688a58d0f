"""Fixtures for the operator's integration tests against a real kube-apiserver.

The session starts (or reuses) etcd + kube-apiserver with `deploy/local/kube.sh up` (built from
source the first time, cached in .tessera/cache), installs the generated CRDs, starts the
operator as its own process (`python -m services.operator`) watching two namespaces made for
this run, and stops it at the end. Kafka, S3 and FerretDB are the shared local stack
(`make stack-up`): a server that is not reachable fails the tests, nothing is skipped. Every
name outside Kubernetes (topic prefix, buckets, database) carries this run's id, so the run
cannot touch the shared stack's own topics, buckets or data.

Only the API server runs: no controller-manager, scheduler or kubelet, so no pod is ever
created, Deployment status is never written by a controller, and ownerReferences are not
garbage-collected (the operator's finalizer deletes what the node owns itself).
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from services.operator.schema import GROUP, VERSION
from services.shared.auth import TokenIssuer, generate_keypair

REPO = Path(__file__).resolve().parents[2]
KUBE_SH = REPO / "deploy" / "local" / "kube.sh"
CRD_DIR = REPO / "deploy" / "k8s" / "crds"
HOME = Path(os.environ.get("TESSERA_HOME", REPO / ".tessera"))

KAFKA = os.environ.get("TESSERA_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
S3 = os.environ.get("TESSERA_S3__ENDPOINT", "127.0.0.1:7070")
S3_KEY = os.environ.get("TESSERA_S3__ACCESS_KEY", "tessera")
S3_SECRET = os.environ.get("TESSERA_S3__SECRET_KEY", "tessera-local-secret")
MONGO = os.environ.get("TESSERA_MONGO__URI", "mongodb://127.0.0.1:27017/")

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0) -> T:
    """Poll until `probe` returns something truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except ApiException as exc:
            last = f"API {exc.status}"  # e.g. not created yet: keep waiting
        else:
            if value:
                return value
            last = value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})", pytrace=False)


def _reachable(address: str) -> None:
    host, _, port = address.split(",")[0].split("://", 1)[-1].split("/", 1)[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        pytest.fail(
            f"{address} is not reachable ({exc}); start the local stack (`make stack-up`)",
            pytrace=False,
        )


@dataclass
class Cluster:
    kubeconfig: str
    api: client.ApiClient

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def autoscaling(self) -> client.AutoscalingV2Api:
        return client.AutoscalingV2Api(self.api)

    @property
    def policy(self) -> client.PolicyV1Api:
        return client.PolicyV1Api(self.api)

    @property
    def networking(self) -> client.NetworkingV1Api:
        return client.NetworkingV1Api(self.api)

    def node(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, "tesseranodes", name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def condition(self, namespace: str, name: str, ctype: str) -> dict[str, Any] | None:
        body = self.node(namespace, name) or {}
        for cond in (body.get("status") or {}).get("conditions") or []:
            if cond["type"] == ctype:
                return dict(cond)
        return None


@pytest.fixture(scope="session")
def run_id() -> str:
    return secrets.token_hex(3)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    for address in (KAFKA, S3, MONGO):
        _reachable(address)
    started = time.monotonic()
    subprocess.run([str(KUBE_SH), "up"], check=True, cwd=REPO)
    print(f"\n[k8s] kube.sh up took {time.monotonic() - started:.1f}s")
    env = subprocess.run(
        [str(KUBE_SH), "env"], check=True, cwd=REPO, capture_output=True, text=True
    ).stdout
    kubeconfig = next(
        line.split("=", 1)[1] for line in env.splitlines() if line.startswith("export KUBECONFIG=")
    )
    api = config.new_client_from_config(config_file=kubeconfig)
    ext = client.ApiextensionsV1Api(api)
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = ext.read_custom_resource_definition(crd["metadata"]["name"])
            crd["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(crd["metadata"]["name"], crd)

        def established(name: str = crd["metadata"]["name"]) -> bool:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        wait_for(f"CRD {crd['metadata']['name']} Established", established)
    yield Cluster(kubeconfig, api)
    api.close()


@dataclass
class Site:
    namespace: str
    prefix: str
    database: str
    buckets: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def sites(cluster: Cluster, run_id: str) -> Iterator[dict[str, Site]]:
    """Two namespaces (two data centres) with the Secrets a TesseraNode references."""
    priv, pub = generate_keypair()
    issuer = TokenIssuer(priv)
    out: dict[str, Site] = {}
    for letter in ("a", "b"):
        ns = f"tessera-k8s-{run_id}-{letter}"
        cluster.core.create_namespace(
            {"metadata": {"name": ns, "labels": {"tessera.io/test": run_id}}}
        )
        tokens = {
            f"{s}.jwt": issuer.issue(f"svc:{s}", ["service"], ttl_s=3600)
            for s in ("access", "ingestion", "deid", "tiling", "metadata", "serving")
        }
        for name, data in (
            ("s3", {"access": S3_KEY, "secret": S3_SECRET}),
            ("mongo", {"uri": MONGO}),
            ("auth", {"issuer.pub.pem": pub.decode(), "pseudonym": secrets.token_hex(32)}),
            ("tokens", tokens),
        ):
            cluster.core.create_namespaced_secret(
                ns,
                {
                    "metadata": {"name": name},
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
                },
            )
        out[letter] = Site(
            namespace=ns,
            prefix=f"k8stest.{run_id}.{letter}.",
            database=f"k8stest_{run_id}_{letter}",
            buckets={
                b: f"k8stest-{run_id}-{letter}-{b}"
                for b in ("quarantine", "deidentified", "tiles", "models", "results")
            },
        )
    yield out
    for site in out.values():
        # no namespace controller runs here, so a deleted namespace stays Terminating; the
        # objects in it are removed by the tests (nodes) and here (Secrets)
        for name in ("s3", "mongo", "auth", "tokens"):
            try:
                cluster.core.delete_namespaced_secret(name, site.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        cluster.core.delete_namespace(site.namespace)


@dataclass
class Operator:
    proc: subprocess.Popen[bytes]
    liveness_url: str
    log: Path


@pytest.fixture(scope="session")
def operator(cluster: Cluster, sites: dict[str, Site], run_id: str) -> Iterator[Operator]:
    port = _free_port()
    log_dir = HOME / "stack" / "kube" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"operator-test-{run_id}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_OPERATOR__")}
    env.update(
        {
            "KUBECONFIG": cluster.kubeconfig,
            "TESSERA_OPERATOR__NAMESPACES": ",".join(s.namespace for s in sites.values()),
            "TESSERA_OPERATOR__LIVENESS_HOST": "127.0.0.1",
            "TESSERA_OPERATOR__LIVENESS_PORT": str(port),
            "TESSERA_OPERATOR__RESYNC_S": "15",
            "TESSERA_OPERATOR__DEBOUNCE_S": "0.2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.operator"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/healthz"

    def alive() -> bool:
        if proc.poll() is not None:
            pytest.fail(
                f"the operator exited ({proc.returncode}); log:\n{log_path.read_text()[-3000:]}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    wait_for("the operator's liveness endpoint", alive, timeout_s=60)
    yield Operator(proc, url, log_path)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def node_manifest(
    name: str, site: Site, *, peers: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TesseraNode",
        "metadata": {"name": name, "namespace": site.namespace},
        "spec": {
            "site": site.namespace.rsplit("-", 1)[-1] + "-" + site.prefix.split(".")[1],
            "image": "tessera/services:test",
            "services": {"tiling": {"replicas": 1, "maxReplicas": 4}},
            "kafka": {"bootstrapServers": KAFKA, "topicPrefix": site.prefix, "partitions": 2},
            "s3": {
                "endpoint": S3,
                "accessKey": {"name": "s3", "key": "access"},
                "secretKey": {"name": "s3", "key": "secret"},
                "buckets": site.buckets,
            },
            "mongo": {"uri": {"name": "mongo", "key": "uri"}, "database": site.database},
            "auth": {
                "publicKey": {"name": "auth", "key": "issuer.pub.pem"},
                "serviceTokensSecret": "tokens",
                "pseudonymKey": {"name": "auth", "key": "pseudonym"},
            },
            "federation": {"peers": peers or []},
            "cleanupPolicy": "Delete",
        },
    }
