"""The Helm chart: `helm lint` and `helm template` with the helm that deploy/local/kube.sh
builds from its Go module, then every rendered object sent to the real kube-apiserver as a
server-side dry run (schema, RBAC and the TesseraNode's CRD validation all apply)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

from tests.k8s.conftest import KUBE_SH, REPO, Cluster, Site

pytestmark = pytest.mark.k8s

CHART = REPO / "charts" / "tessera"


@pytest.fixture(scope="module")
def helm() -> Path:
    subprocess.run([str(KUBE_SH), "install"], check=True, cwd=REPO)
    env = subprocess.run(
        [str(KUBE_SH), "env"], check=True, cwd=REPO, capture_output=True, text=True
    )
    line = next(x for x in env.stdout.splitlines() if x.startswith("export TESSERA_HELM_BIN="))
    return Path(line.split("=", 1)[1])


def render(helm: Path, *args: str, namespace: str = "tessera-system") -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            str(helm),
            "template",
            "tessera",
            str(CHART),
            "--namespace",
            namespace,
            "--include-crds",
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def kinds(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def test_helm_lint(helm: Path) -> None:
    for values in (
        [],
        ["--set", "node.enabled=true"],
        ["--set", "metrics.serviceMonitor.enabled=true"],
    ):
        result = subprocess.run(
            [str(helm), "lint", "--strict", str(CHART), *values], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_default_render(helm: Path) -> None:
    k = kinds(render(helm))
    assert {c["metadata"]["name"] for c in k["CustomResourceDefinition"]} == {
        "tesseranodes.tessera.io",
        "modeldeployments.tessera.io",
    }
    (dep,) = k["Deployment"]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "services.operator"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "ClusterRole" in k and "ServiceAccount" in k
    assert {n["metadata"]["name"] for n in k["NetworkPolicy"]} == {
        "tessera-operator",
        "tessera-default-deny",
    }
    (dash,) = k["ConfigMap"]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert '"uid": "tessera-overview"' in dash["data"]["tessera.json"]
    assert "ServiceMonitor" not in k and "TesseraNode" not in k
    # the CRDs the chart ships are the generated ones
    for crd in k["CustomResourceDefinition"]:
        path = REPO / "deploy" / "k8s" / "crds" / f"{crd['metadata']['name']}.yaml"
        assert yaml.safe_load(path.read_text()) == crd


def test_namespaced_render_with_a_node_and_a_service_monitor(helm: Path) -> None:
    k = kinds(
        render(
            helm,
            "--set",
            "operator.watchNamespaces={site-a,site-b}",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "node.enabled=true",
        )
    )
    assert "ClusterRole" in k  # discovery only
    assert {(r["metadata"]["namespace"], r["kind"]) for r in k["Role"] + k["RoleBinding"]} == {
        ("site-a", "Role"),
        ("site-b", "Role"),
        ("site-a", "RoleBinding"),
        ("site-b", "RoleBinding"),
    }
    (sm,) = k["ServiceMonitor"]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["site-a", "site-b"]}
    (node,) = k["TesseraNode"]
    assert node["spec"]["image"] == "tessera/services:0.1.0"
    env = {
        e["name"]: e["value"]
        for e in k["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TESSERA_OPERATOR__NAMESPACES"] == "site-a,site-b"


def test_rendered_objects_pass_a_server_side_dry_run(
    helm: Path, cluster: Cluster, sites: dict[str, Site]
) -> None:
    ns = sites["a"].namespace
    dyn = DynamicClient(cluster.api)
    docs = [
        d
        for d in render(helm, "--set", "node.enabled=true", namespace=ns)
        if d["kind"] != "CustomResourceDefinition"
    ]
    sent = []
    for doc in docs:
        resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        namespace = ns if resource.namespaced else None
        resource.create(body=doc, namespace=namespace, dry_run="All")
        sent.append(doc["kind"])
    assert {
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "NetworkPolicy",
        "ConfigMap",
        "TesseraNode",
    } <= set(sent)
    # the TesseraNode the chart renders is validated by the generated schema: a bad value fails
    (node,) = [d for d in docs if d["kind"] == "TesseraNode"]
    node["spec"]["kafka"]["partitions"] = 0
    with pytest.raises(ApiException) as err:
        dyn.resources.get(api_version=node["apiVersion"], kind="TesseraNode").create(
            body=node, namespace=ns, dry_run="All"
        )
    assert err.value.status == 422
