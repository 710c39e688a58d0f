"""The operator's pure builders: a TesseraNode spec in, manifests out (no cluster)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from services.operator import builders
from services.operator.builders import Owner, PeerInfo
from services.operator.schema import SERVICE_NAMES, ModelDeploymentSpec, TesseraNodeSpec
from services.shared.events import ALL_TOPICS, dead_letter_topic

OWNER = Owner("TesseraNode", "alpha", "site-a", "0b7e4a9c-uid")


def node_spec(**over: Any) -> TesseraNodeSpec:
    raw: dict[str, Any] = {
        "site": "site-a",
        "image": "registry.example/tessera:1.0",
        "kafka": {"bootstrapServers": "kafka:9092", "partitions": 4},
        "s3": {
            "endpoint": "s3:7070",
            "accessKey": {"name": "s3", "key": "access"},
            "secretKey": {"name": "s3", "key": "secret"},
        },
        "mongo": {"uri": {"name": "mongo", "key": "uri"}, "database": "tessera_a"},
        "auth": {
            "publicKey": {"name": "auth", "key": "issuer.pub.pem"},
            "serviceTokensSecret": "tokens",
            "pseudonymKey": {"name": "auth", "key": "pseudonym"},
        },
    }
    raw.update(over)
    return TesseraNodeSpec.model_validate(raw)


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_every_service_gets_its_objects() -> None:
    objs = builders.build_node_objects(OWNER, node_spec())
    for kind in (
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    ):
        assert set(by_kind(objs, kind)) == {f"alpha-{s}" for s in SERVICE_NAMES}, kind
    cms = by_kind(objs, "ConfigMap")
    assert set(cms) == {f"alpha-{s}-config" for s in SERVICE_NAMES} | {"alpha-federation"}
    for o in objs:
        meta = o["metadata"]
        assert meta["namespace"] == "site-a"
        assert meta["labels"][builders.NODE_LABEL] == "alpha"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "tessera-operator"
        (ref,) = meta["ownerReferences"]
        assert ref == {
            "apiVersion": "tessera.io/v1alpha1",
            "kind": "TesseraNode",
            "name": "alpha",
            "uid": "0b7e4a9c-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_builders_are_pure() -> None:
    spec = node_spec()
    assert builders.build_node_objects(OWNER, spec) == builders.build_node_objects(OWNER, spec)


def test_deployment_probes_security_and_secrets() -> None:
    dep = builders.build_deployment(OWNER, node_spec(), "ingestion")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "services.ingestion"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": builders.GRPC_PORT}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # credentials only by reference, never as values
    env = {e["name"]: e for e in c["env"]}
    assert env["TESSERA_S3__SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3",
        "key": "secret",
    }
    assert env["TESSERA_MONGO__URI"]["valueFrom"]["secretKeyRef"]["name"] == "mongo"
    assert "TESSERA_INGESTION__PSEUDONYM_KEY" in env
    assert all("value" not in e for e in c["env"])
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/etc/tessera/auth", "/etc/tessera/token", "/var/lib/tessera/work"} <= mounts
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_only_pseudonymising_services_get_the_key() -> None:
    for service in SERVICE_NAMES:
        c = builders.build_deployment(OWNER, node_spec(), service)["spec"]["template"]["spec"][
            "containers"
        ][0]
        has_key = any(e["name"].endswith("__PSEUDONYM_KEY") for e in c["env"])
        assert has_key == (service in builders.PSEUDONYM_SERVICES), service


def test_config_points_services_at_each_other_and_the_servers() -> None:
    data = builders.service_config(OWNER, node_spec(), "tiling")
    assert data["TESSERA_SITE"] == "site-a"
    assert data["TESSERA_GRPC__PORT"] == "50051"
    assert data["TESSERA_ENDPOINTS__ACCESS"] == "alpha-access:50051"
    assert data["TESSERA_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert data["TESSERA_MONGO__DATABASE"] == "tessera_a"
    assert data["TESSERA_TILING__HTTP_PORT"] == str(builders.TILING_HTTP_PORT)
    assert not any("SECRET" in k or "URI" in k for k in data)


def test_config_change_changes_the_pod_template_hash() -> None:
    a = builders.build_deployment(OWNER, node_spec(), "access")
    b = builders.build_deployment(
        OWNER, node_spec(kafka={"bootstrapServers": "other:9092"}), "access"
    )
    key = builders.CONFIG_HASH
    ann_a = a["spec"]["template"]["metadata"]["annotations"][key]
    ann_b = b["spec"]["template"]["metadata"]["annotations"][key]
    assert ann_a != ann_b


def test_image_override_per_service() -> None:
    spec = node_spec(services={"deid": {"image": "registry.example/tessera-deid:2"}})
    deid = builders.build_deployment(OWNER, spec, "deid")
    access = builders.build_deployment(OWNER, spec, "access")
    assert deid["spec"]["template"]["spec"]["containers"][0]["image"].endswith("deid:2")
    assert access["spec"]["template"]["spec"]["containers"][0]["image"].endswith("tessera:1.0")


@pytest.mark.parametrize(
    ("replicas", "maximum", "current", "expected"),
    [
        (1, 3, None, 1),
        (2, 5, None, 2),
        (2, 5, 4, 4),  # the HPA scaled it up: keep
        (2, 5, 1, 2),  # below the minimum: raise
        (2, 5, 9, 2),  # above the maximum: back to the spec
        (0, 3, 2, 0),
    ],
)
def test_desired_replicas_leaves_the_hpa_its_range(
    replicas: int, maximum: int, current: int | None, expected: int
) -> None:
    svc = node_spec(services={"access": {"replicas": replicas, "maxReplicas": maximum}})
    assert builders.desired_replicas(svc.services.access, current) == expected


def test_hpa_and_pdb() -> None:
    spec = node_spec(services={"tiling": {"replicas": 2, "maxReplicas": 6}})
    hpa = builders.build_hpa(OWNER, spec, "tiling")
    assert hpa is not None
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 6
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "alpha-tiling",
    }
    pdb = builders.build_pdb(OWNER, "tiling")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == builders.selector_labels("alpha", "tiling")


def test_scaled_to_zero_has_no_hpa() -> None:
    spec = node_spec(services={"serving": {"replicas": 0}})
    assert builders.build_hpa(OWNER, spec, "serving") is None
    names = {
        o["metadata"]["name"]
        for o in builders.build_node_objects(OWNER, spec)
        if o["kind"] == "HorizontalPodAutoscaler"
    }
    assert "alpha-serving" not in names and "alpha-access" in names


def test_service_ports() -> None:
    svc = builders.build_service(OWNER, "tiling")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert set(ports) == {"grpc", "metrics", "http"}
    assert {p["name"] for p in builders.build_service(OWNER, "deid")["spec"]["ports"]} == {
        "grpc",
        "metrics",
    }


def test_network_policies() -> None:
    deid = builders.build_network_policy(OWNER, "deid")
    grpc_rule = deid["spec"]["ingress"][0]
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {builders.NODE_LABEL: "alpha"}}}]
    access = builders.build_network_policy(OWNER, "access")
    assert "from" not in access["spec"]["ingress"][0]  # clients call it
    peer = PeerInfo("beta", "site-b", "site-b", "", names_us=True)
    one_sided = PeerInfo("gamma", "site-c", "site-c", "", names_us=False)
    meta = builders.build_network_policy(OWNER, "metadata", [peer, one_sided])
    namespaces = [
        f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in meta["spec"]["ingress"]
        for f in rule.get("from", [])
        if f.get("namespaceSelector")
    ]
    assert namespaces == ["site-b"]


def test_topic_plan_has_partitions_dead_letters_and_federation() -> None:
    spec = node_spec(kafka={"bootstrapServers": "k:9092", "topicPrefix": "t1.", "partitions": 6})
    plan = {t.name: t.partitions for t in builders.topic_plan(spec)}
    for topic in ALL_TOPICS:
        assert plan["t1." + topic] == 6
    for service in SERVICE_NAMES:
        assert plan["t1." + dead_letter_topic(service)] == 1
    assert plan["t1.tessera.federation.catalogue.site-a.v1"] == 6
    assert len(plan) == len(ALL_TOPICS) + len(SERVICE_NAMES) + 1


def test_federation_only_with_mutual_peers() -> None:
    spec = node_spec(federation={"peers": [{"name": "beta", "namespace": "site-b"}]})
    mutual = PeerInfo("beta", "site-b", "site-b", "p.", names_us=True)
    data = builders.federation_entries(spec, [mutual])
    peers = json.loads(data["TESSERA_FEDERATION__PEERS"])
    assert peers == [
        {
            "site": "site-b",
            "node": "beta",
            "namespace": "site-b",
            "catalogueTopic": "p.tessera.federation.catalogue.site-b.v1",
            "metadataEndpoint": "beta-metadata.site-b.svc.cluster.local:50051",
        }
    ]
    assert (
        data["TESSERA_FEDERATION__SUBSCRIBE_TOPICS"] == "p.tessera.federation.catalogue.site-b.v1"
    )
    assert data["TESSERA_FEDERATION__RECORDS"] == "deidentified-catalogue"
    one_sided = builders.federation_entries(spec, [PeerInfo("beta", "site-b", "site-b", "", False)])
    assert json.loads(one_sided["TESSERA_FEDERATION__PEERS"]) == []
    # the metadata pods read the federation ConfigMap
    dep = builders.build_deployment(OWNER, spec, "metadata")
    refs = [
        e["configMapRef"]["name"]
        for e in dep["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    ]
    assert refs == ["alpha-metadata-config", "alpha-federation"]


def test_peer_change_rolls_the_metadata_pods() -> None:
    spec = node_spec(federation={"peers": [{"name": "beta", "namespace": "site-b"}]})
    before = builders.build_node_objects(OWNER, spec, peers=[])
    after = builders.build_node_objects(
        OWNER, spec, peers=[PeerInfo("beta", "site-b", "site-b", "", True)]
    )
    h = builders.CONFIG_HASH
    meta_b = by_kind(before, "Deployment")["alpha-metadata"]["spec"]["template"]["metadata"]
    meta_a = by_kind(after, "Deployment")["alpha-metadata"]["spec"]["template"]["metadata"]
    assert meta_b["annotations"][h] != meta_a["annotations"][h]
    acc_b = by_kind(before, "Deployment")["alpha-access"]["spec"]["template"]["metadata"]
    acc_a = by_kind(after, "Deployment")["alpha-access"]["spec"]["template"]["metadata"]
    assert acc_b == acc_a


def test_model_deployment_objects() -> None:
    model = ModelDeploymentSpec.model_validate(
        {
            "node": "alpha",
            "modelName": "tissue-detector",
            "version": "3",
            "storage": {"bucket": "tessera-models", "prefix": "tissue-detector/3/"},
            "replicas": 2,
        }
    )
    owner = Owner("ModelDeployment", "tissue", "site-a", "uid-m")
    dep, svc = builders.build_model_objects(owner, model, "alpha", node_spec())
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == "tissue-model"
    assert dep["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    assert dep["spec"]["replicas"] == 2
    env = {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TESSERA_SERVING__MODEL_NAME"] == "tissue-detector"
    assert env["TESSERA_SERVING__MODEL_VERSION"] == "3"
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == sel


def test_spec_validation() -> None:
    with pytest.raises(ValidationError):
        node_spec(site="Has Spaces")
    with pytest.raises(ValidationError):
        node_spec(kafka={"bootstrapServers": "k:9092", "partitions": 0})
    with pytest.raises(ValidationError):
        node_spec(unknown=1)
