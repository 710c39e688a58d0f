"""The operator against a real kube-apiserver and the real Kafka, S3 and FerretDB.

The tests run in file order and share one TesseraNode per site (made by the `alpha` and
`beta` fixtures): objects created, status, servers reconciled, drift corrected, a spec change
rolled out, federation, a ModelDeployment, and deletion with cleanup.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from kubernetes.client.rest import ApiException
from minio import Minio
from pymongo import AsyncMongoClient

from services.operator import builders
from services.operator.schema import GROUP, SERVICE_NAMES, VERSION
from services.shared.events import ALL_TOPICS, dead_letter_topic
from tests.k8s.conftest import (
    KAFKA,
    MONGO,
    S3,
    S3_KEY,
    S3_SECRET,
    Cluster,
    Operator,
    Site,
    node_manifest,
    wait_for,
)

pytestmark = pytest.mark.k8s

OWNED_PER_SERVICE = ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler")


def _minio() -> Minio:
    return Minio(S3, access_key=S3_KEY, secret_key=S3_SECRET, secure=False)


async def _topics(prefix: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA, client_id="tessera-k8s-test")
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if not names:
            return {}
        return {m["topic"]: len(m["partitions"]) for m in await admin.describe_topics(names)}
    finally:
        await admin.close()


async def _indexes(database: str) -> dict[str, set[tuple[tuple[str, int], ...]]]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(MONGO)
    try:
        db = mongo[database]
        out: dict[str, set[tuple[tuple[str, int], ...]]] = {}
        for name in await db.list_collection_names():
            info = await db[name].index_information()
            out[name] = {
                tuple((f, int(d)) for f, d in v["key"]) for k, v in info.items() if k != "_id_"
            }
        return out
    finally:
        await mongo.close()


async def _databases() -> list[str]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(MONGO)
    try:
        return list(await mongo.list_database_names())
    finally:
        await mongo.close()


def _apply_node(cluster: Cluster, manifest: dict[str, Any]) -> None:
    cluster.custom.create_namespaced_custom_object(
        GROUP, VERSION, manifest["metadata"]["namespace"], "tesseranodes", manifest
    )


def _delete_node(cluster: Cluster, namespace: str, name: str) -> None:
    try:
        cluster.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, "tesseranodes", name
        )
    except ApiException as exc:
        if exc.status != 404:
            raise


def _owned_names(cluster: Cluster, namespace: str, node: str) -> dict[str, set[str]]:
    sel = f"{builders.NODE_LABEL}={node}"
    return {
        "Deployment": {
            d.metadata.name
            for d in cluster.apps.list_namespaced_deployment(namespace, label_selector=sel).items
        },
        "Service": {
            d.metadata.name
            for d in cluster.core.list_namespaced_service(namespace, label_selector=sel).items
        },
        "ConfigMap": {
            d.metadata.name
            for d in cluster.core.list_namespaced_config_map(namespace, label_selector=sel).items
        },
        "PodDisruptionBudget": {
            d.metadata.name
            for d in cluster.policy.list_namespaced_pod_disruption_budget(
                namespace, label_selector=sel
            ).items
        },
        "HorizontalPodAutoscaler": {
            d.metadata.name
            for d in cluster.autoscaling.list_namespaced_horizontal_pod_autoscaler(
                namespace, label_selector=sel
            ).items
        },
        "NetworkPolicy": {
            d.metadata.name
            for d in cluster.networking.list_namespaced_network_policy(
                namespace, label_selector=sel
            ).items
        },
    }


def _all_present(cluster: Cluster, namespace: str, node: str) -> bool:
    names = _owned_names(cluster, namespace, node)
    want = {f"{node}-{s}" for s in SERVICE_NAMES}
    return all(names[k] == want for k in (*OWNED_PER_SERVICE, "NetworkPolicy")) and names[
        "ConfigMap"
    ] == {f"{node}-{s}-config" for s in SERVICE_NAMES} | {f"{node}-federation"}


def _mark_available(cluster: Cluster, namespace: str, node: str) -> None:
    """Write each Deployment's status as the deployment controller would once its pods are
    available. No controller-manager or kubelet runs here, so nothing else ever writes it."""
    sel = f"{builders.NODE_LABEL}={node}"
    for dep in cluster.apps.list_namespaced_deployment(namespace, label_selector=sel).items:
        n = dep.spec.replicas
        cluster.apps.patch_namespaced_deployment_status(
            dep.metadata.name,
            namespace,
            {
                "status": {
                    "observedGeneration": dep.metadata.generation,
                    "replicas": n,
                    "updatedReplicas": n,
                    "readyReplicas": n,
                    "availableReplicas": n,
                }
            },
        )


@pytest.fixture(scope="module")
def alpha(cluster: Cluster, sites: dict[str, Site], operator: Operator) -> Iterator[str]:
    site_a, site_b = sites["a"], sites["b"]
    _apply_node(
        cluster,
        node_manifest("alpha", site_a, peers=[{"name": "beta", "namespace": site_b.namespace}]),
    )
    yield "alpha"
    _delete_node(cluster, site_a.namespace, "alpha")
    wait_for("alpha to be gone", lambda: cluster.node(site_a.namespace, "alpha") is None, 90)


# -- the API server and the CRDs -------------------------------------------------------------


def test_the_api_server_enforces_the_generated_schema(
    cluster: Cluster, sites: dict[str, Site]
) -> None:
    bad = node_manifest("invalid", sites["a"])
    bad["spec"]["kafka"]["partitions"] = 0
    with pytest.raises(ApiException) as err:
        _apply_node(cluster, bad)
    assert err.value.status == 422
    assert "partitions" in json.loads(err.value.body)["message"]


def test_liveness_endpoint(operator: Operator) -> None:
    with urllib.request.urlopen(operator.liveness_url, timeout=5) as resp:
        assert resp.status == 200
        body = json.loads(resp.read())
    assert body["kubeApi"] is True


# -- a node's objects --------------------------------------------------------------------------


def test_a_node_gets_every_object(cluster: Cluster, sites: dict[str, Site], alpha: str) -> None:
    ns = sites["a"].namespace
    wait_for("alpha's objects", lambda: _all_present(cluster, ns, alpha), 90)
    node = cluster.node(ns, alpha)
    assert node is not None
    assert "tessera.io/finalizer" in node["metadata"]["finalizers"]
    dep = cluster.apps.read_namespaced_deployment(f"{alpha}-ingestion", ns)
    (ref,) = dep.metadata.owner_references
    assert (ref.kind, ref.name, ref.uid, ref.controller) == (
        "TesseraNode",
        alpha,
        node["metadata"]["uid"],
        True,
    )
    c = dep.spec.template.spec.containers[0]
    assert c.readiness_probe.grpc.port == builders.GRPC_PORT
    assert c.liveness_probe.grpc.port == builders.GRPC_PORT
    assert c.security_context.read_only_root_filesystem is True
    assert c.security_context.run_as_non_root is True
    env = {e.name: e for e in c.env}
    assert env["TESSERA_S3__SECRET_KEY"].value_from.secret_key_ref.name == "s3"
    cm = cluster.core.read_namespaced_config_map(f"{alpha}-ingestion-config", ns)
    assert cm.data["TESSERA_KAFKA__TOPIC_PREFIX"] == sites["a"].prefix
    assert cm.data["TESSERA_BUCKETS__QUARANTINE"] == sites["a"].buckets["quarantine"]
    hpa = cluster.autoscaling.read_namespaced_horizontal_pod_autoscaler(f"{alpha}-tiling", ns)
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (1, 4)


def test_status_conditions_while_no_pod_runs(
    cluster: Cluster, sites: dict[str, Site], alpha: str
) -> None:
    ns = sites["a"].namespace

    def settled() -> dict[str, Any] | None:
        """alpha's status once a reconcile has both reported every condition and recorded the
        infrastructure: a first pass that met a slow server reports Degraded and tries again."""
        status = (cluster.node(ns, alpha) or {}).get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions") or []}
        if {"Ready", "Progressing", "Degraded"} <= conds.keys() and status.get("infrastructure"):
            return {"status": status, "conds": conds}
        return None

    snap = wait_for("alpha's conditions and infrastructure", settled, 120)
    conds, status = snap["conds"], snap["status"]
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["reason"] == "DeploymentsUnavailable"
    assert conds["Progressing"]["status"] == "True"
    assert conds["Progressing"]["reason"] == "RollingOut"
    assert conds["Degraded"]["status"] == "False", conds["Degraded"]
    assert status["observedGeneration"] == 1
    assert status["infrastructure"]["topics"] == len(ALL_TOPICS) + len(SERVICE_NAMES) + 1


# -- the servers ---------------------------------------------------------------------------------


async def test_kafka_topics_with_partitions_and_dead_letters(
    sites: dict[str, Site], alpha: str
) -> None:
    site = sites["a"]
    topics = await _topics(site.prefix)
    for topic in ALL_TOPICS:
        assert topics.get(site.prefix + topic) == 2, topic
    for service in SERVICE_NAMES:
        assert topics.get(site.prefix + dead_letter_topic(service)) == 1, service
    fed = [t for t in topics if ".federation.catalogue." in t]
    assert len(fed) == 1


def test_buckets_exist(sites: dict[str, Site], alpha: str) -> None:
    client = _minio()
    for bucket in sites["a"].buckets.values():
        assert client.bucket_exists(bucket), bucket


async def test_mongodb_indexes(sites: dict[str, Site], alpha: str) -> None:
    found = await _indexes(sites["a"].database)
    for collection, specs in builders.INDEXES.items():
        assert {tuple(s) for s in specs} <= found.get(collection, set()), collection


# -- rollout status ------------------------------------------------------------------------------


def test_ready_once_every_deployment_is_available(
    cluster: Cluster, sites: dict[str, Site], alpha: str
) -> None:
    ns = sites["a"].namespace
    _mark_available(cluster, ns, alpha)

    def ready() -> bool:
        c = cluster.condition(ns, alpha, "Ready")
        return bool(c and c["status"] == "True")

    wait_for("alpha Ready=True", ready, 60)
    ready_cond = cluster.condition(ns, alpha, "Ready")
    assert ready_cond is not None and ready_cond["reason"] == "AllServicesAvailable"
    progressing = cluster.condition(ns, alpha, "Progressing")
    assert progressing is not None and progressing["status"] == "False"
    assert progressing["reason"] == "RolloutComplete"


# -- drift ---------------------------------------------------------------------------------------


def test_a_deleted_deployment_is_recreated(
    cluster: Cluster, sites: dict[str, Site], alpha: str
) -> None:
    ns = sites["a"].namespace
    name = f"{alpha}-deid"
    old_uid = cluster.apps.read_namespaced_deployment(name, ns).metadata.uid
    cluster.apps.delete_namespaced_deployment(name, ns)

    def recreated() -> bool:
        try:
            dep = cluster.apps.read_namespaced_deployment(name, ns)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return bool(dep.metadata.uid != old_uid)

    wait_for("the deleted Deployment to come back", recreated, 60)

    # a recreated Deployment has no available pods: the node reports it
    def not_ready() -> bool:
        c = cluster.condition(ns, alpha, "Ready")
        return bool(c and c["status"] == "False" and name in c["message"])

    wait_for("alpha Ready=False naming the new Deployment", not_ready, 60)


def test_edits_to_owned_objects_are_reverted(
    cluster: Cluster, sites: dict[str, Site], alpha: str
) -> None:
    ns = sites["a"].namespace
    dep_name, cm_name, svc_name = f"{alpha}-access", f"{alpha}-access-config", f"{alpha}-metadata"
    image = (
        cluster.apps.read_namespaced_deployment(dep_name, ns).spec.template.spec.containers[0].image
    )
    cluster.apps.patch_namespaced_deployment(
        dep_name,
        ns,
        {
            "spec": {
                "template": {
                    "spec": {"containers": [{"name": "access", "image": "attacker/image:1"}]}
                }
            }
        },
    )
    cluster.core.patch_namespaced_config_map(cm_name, ns, {"data": {"TESSERA_SITE": "elsewhere"}})
    cluster.core.delete_namespaced_service(svc_name, ns)

    def restored() -> bool:
        dep = cluster.apps.read_namespaced_deployment(dep_name, ns)
        cm = cluster.core.read_namespaced_config_map(cm_name, ns)
        try:
            cluster.core.read_namespaced_service(svc_name, ns)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return (
            dep.spec.template.spec.containers[0].image == image
            and cm.data["TESSERA_SITE"] != "elsewhere"
        )

    wait_for("the edited Deployment, ConfigMap and deleted Service to be restored", restored, 60)


# -- spec changes --------------------------------------------------------------------------------


async def test_a_spec_change_rolls_out(
    cluster: Cluster, sites: dict[str, Site], alpha: str
) -> None:
    site = sites["a"]
    ns = site.namespace
    before = cluster.apps.read_namespaced_deployment(f"{alpha}-tiling", ns)
    cluster.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        "tesseranodes",
        alpha,
        {
            "spec": {
                "image": "tessera/services:test-2",
                "services": {"tiling": {"replicas": 2, "maxReplicas": 5}},
                "kafka": {"partitions": 3},
            }
        },
    )

    def images() -> dict[str, str]:
        return {
            service: cluster.apps.read_namespaced_deployment(f"{alpha}-{service}", ns)
            .spec.template.spec.containers[0]
            .image
            for service in SERVICE_NAMES
        }

    def rolled() -> bool:
        # The operator applies the Deployments one after another, so the tiling one being new
        # says nothing yet about the others: wait until every service runs the new image.
        dep = cluster.apps.read_namespaced_deployment(f"{alpha}-tiling", ns)
        hpa = cluster.autoscaling.read_namespaced_horizontal_pod_autoscaler(f"{alpha}-tiling", ns)
        return (
            dep.spec.replicas == 2
            and set(images().values()) == {"tessera/services:test-2"}
            and (hpa.spec.min_replicas, hpa.spec.max_replicas) == (2, 5)
        )

    wait_for("every Deployment and the tiling HPA to follow the spec", rolled, 60)
    after = cluster.apps.read_namespaced_deployment(f"{alpha}-tiling", ns)
    assert after.metadata.generation > before.metadata.generation
    assert images() == dict.fromkeys(SERVICE_NAMES, "tessera/services:test-2")

    def observed() -> bool:
        status = (cluster.node(ns, alpha) or {}).get("status") or {}
        return (
            status.get("observedGeneration") == 2
            and status.get("infrastructure", {}).get("generation") == 2
        )

    wait_for("the status to report generation 2", observed, 60)
    topics = await _topics(site.prefix)
    for topic in ALL_TOPICS:  # partitions raised on the real broker
        assert topics[site.prefix + topic] == 3, topic
    progressing = cluster.condition(ns, alpha, "Progressing")
    assert progressing is not None and progressing["status"] == "True"  # new pods not available


# -- federation ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def beta(cluster: Cluster, sites: dict[str, Site], operator: Operator, alpha: str) -> Iterator[str]:
    site_a, site_b = sites["a"], sites["b"]
    _apply_node(
        cluster,
        node_manifest("beta", site_b, peers=[{"name": alpha, "namespace": site_a.namespace}]),
    )
    yield "beta"
    _delete_node(cluster, site_b.namespace, "beta")


def _peers(cluster: Cluster, namespace: str, node: str) -> list[dict[str, Any]]:
    try:
        cm = cluster.core.read_namespaced_config_map(f"{node}-federation", namespace)
    except ApiException:
        return []
    return list(json.loads(cm.data["TESSERA_FEDERATION__PEERS"]))


def test_two_nodes_naming_each_other_are_federated(
    cluster: Cluster, sites: dict[str, Site], alpha: str, beta: str
) -> None:
    a, b = sites["a"], sites["b"]
    peers_a = wait_for(
        "alpha to list beta as a peer", lambda: _peers(cluster, a.namespace, alpha), 90
    )
    peers_b = wait_for(
        "beta to list alpha as a peer", lambda: _peers(cluster, b.namespace, beta), 90
    )
    assert [(p["node"], p["namespace"]) for p in peers_a] == [(beta, b.namespace)]
    assert [(p["node"], p["namespace"]) for p in peers_b] == [(alpha, a.namespace)]
    assert (
        peers_a[0]["metadataEndpoint"] == f"{beta}-metadata.{b.namespace}.svc.cluster.local:50051"
    )
    # each subscribes to the topic the other publishes its de-identified catalogue on
    cm_a = cluster.core.read_namespaced_config_map(f"{alpha}-federation", a.namespace).data
    cm_b = cluster.core.read_namespaced_config_map(f"{beta}-federation", b.namespace).data
    assert cm_a["TESSERA_FEDERATION__SUBSCRIBE_TOPICS"] == cm_b["TESSERA_FEDERATION__PUBLISH_TOPIC"]
    assert cm_b["TESSERA_FEDERATION__SUBSCRIBE_TOPICS"] == cm_a["TESSERA_FEDERATION__PUBLISH_TOPIC"]
    assert cm_a["TESSERA_FEDERATION__RECORDS"] == "deidentified-catalogue"

    def federated(ns: str, node: str) -> bool:
        c = cluster.condition(ns, node, "Federated")
        return bool(c and c["status"] == "True")

    wait_for("alpha Federated=True", lambda: federated(a.namespace, alpha), 60)
    wait_for("beta Federated=True", lambda: federated(b.namespace, beta), 60)
    # the peer's pods may reach this node's metadata service
    pol = cluster.networking.read_namespaced_network_policy(f"{alpha}-metadata", a.namespace)
    sources = [
        f.namespace_selector.match_labels
        for rule in pol.spec.ingress
        for f in (rule._from or [])
        if f.namespace_selector is not None and f.namespace_selector.match_labels
    ]
    assert {"kubernetes.io/metadata.name": b.namespace} in sources


# -- ModelDeployment -----------------------------------------------------------------------------


def test_a_model_deployment(cluster: Cluster, sites: dict[str, Site], alpha: str) -> None:
    site = sites["a"]
    ns = site.namespace
    data = b"not a real model, only an object under the prefix"
    _minio().put_object(
        site.buckets["models"], "tissue-detector/7/model.onnx", io.BytesIO(data), len(data)
    )
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": "tissue", "namespace": ns},
        "spec": {
            "node": alpha,
            "modelName": "tissue-detector",
            "version": "7",
            "storage": {"bucket": site.buckets["models"], "prefix": "tissue-detector/7/"},
            "replicas": 1,
        },
    }
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "modeldeployments", body)
    dep = wait_for(
        "the model's Deployment",
        lambda: cluster.apps.read_namespaced_deployment("tissue-model", ns),
        60,
    )
    env = {e.name: e.value for e in dep.spec.template.spec.containers[0].env}
    assert env["TESSERA_SERVING__MODEL_VERSION"] == "7"
    assert dep.metadata.owner_references[0].kind == "ModelDeployment"

    def status() -> dict[str, Any] | None:
        obj = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, ns, "modeldeployments", "tissue"
        )
        st = obj.get("status") or {}
        return st if st.get("conditions") else None

    st = wait_for("the ModelDeployment's status", status, 60)
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Degraded"]["status"] == "False", conds["Degraded"]
    assert st["modelObjects"] == 1
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "modeldeployments", "tissue")

    def gone() -> bool:
        try:
            cluster.apps.read_namespaced_deployment("tissue-model", ns)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for("the model's Deployment to be deleted with it", gone, 60)


# -- deletion ------------------------------------------------------------------------------------


async def test_deleting_a_node_cleans_up(
    cluster: Cluster, sites: dict[str, Site], alpha: str, beta: str
) -> None:
    b = sites["b"]
    wait_for("beta's objects", lambda: _all_present(cluster, b.namespace, beta), 90)
    assert await _topics(b.prefix)
    _delete_node(cluster, b.namespace, beta)
    wait_for(
        "beta to be gone (finalizer done)", lambda: cluster.node(b.namespace, beta) is None, 90
    )
    left = _owned_names(cluster, b.namespace, beta)
    assert all(not names for names in left.values()), left
    # cleanupPolicy Delete: its topics, buckets and database are gone from the real servers
    # (Kafka deletes topics asynchronously: poll its metadata for a while)
    for _ in range(120):
        if await _topics(b.prefix) == {}:
            break
        await asyncio.sleep(0.5)
    assert await _topics(b.prefix) == {}
    client = _minio()
    assert not any(client.bucket_exists(x) for x in b.buckets.values())
    assert b.database not in await _databases()

    # alpha no longer has a mutual peer
    def alone() -> bool:
        c = cluster.condition(sites["a"].namespace, alpha, "Federated")
        return bool(c and c["status"] == "False")

    wait_for("alpha Federated=False after its peer left", alone, 60)


# -- degraded and recovering ---------------------------------------------------------------------


def _gamma(site: Site, *, kafka: str, s3_secret: str) -> dict[str, Any]:
    """A third node beside alpha, with its own topic prefix, buckets and database."""
    body = node_manifest("gamma", site)
    spec = body["spec"]
    spec["kafka"]["bootstrapServers"] = kafka
    spec["kafka"]["topicPrefix"] = site.prefix + "g."
    spec["s3"]["buckets"] = {k: v.replace(f"-{k}", f"-g-{k}") for k, v in site.buckets.items()}
    spec["s3"]["accessKey"]["name"] = s3_secret
    spec["mongo"]["database"] = site.database + "_g"
    return body


def _degraded_reason(cluster: Cluster, ns: str) -> str | None:
    c = cluster.condition(ns, "gamma", "Degraded")
    return c["reason"] if c and c["status"] == "True" else None


async def test_degraded_with_a_reason_then_recovered(
    cluster: Cluster, sites: dict[str, Site], alpha: str
) -> None:
    site = sites["a"]
    ns = site.namespace
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    _apply_node(cluster, _gamma(site, kafka=dead, s3_secret="no-such-secret"))
    try:
        reason = wait_for("gamma Degraded=True", lambda: _degraded_reason(cluster, ns), 90)
        assert reason == "SecretMissing"
        ready = cluster.condition(ns, "gamma", "Ready")
        assert ready is not None and (ready["status"], ready["reason"]) == ("False", "Degraded")
        # the objects are applied all the same; only the servers wait for the Secret
        wait_for("gamma's objects", lambda: _all_present(cluster, ns, "gamma"), 60)

        def patch(spec: dict[str, Any]) -> None:
            cluster.custom.patch_namespaced_custom_object(
                GROUP, VERSION, ns, "tesseranodes", "gamma", {"spec": spec}
            )

        patch({"s3": {"accessKey": {"name": "s3", "key": "access"}}})
        reason = wait_for(
            "gamma Degraded=KafkaUnavailable",
            lambda: (r := _degraded_reason(cluster, ns)) == "KafkaUnavailable" and r,
            120,
        )
        assert "Kafka" in (cluster.condition(ns, "gamma", "Degraded") or {})["message"]
        patch({"kafka": {"bootstrapServers": KAFKA}})

        def recovered() -> bool:
            c = cluster.condition(ns, "gamma", "Degraded")
            return bool(c and c["status"] == "False" and c["observedGeneration"] == 3)

        wait_for("gamma Degraded=False once Kafka is reachable", recovered, 120)
        topics = await _topics(site.prefix + "g.")
        assert len(topics) == len(ALL_TOPICS) + len(SERVICE_NAMES) + 1
    finally:
        _delete_node(cluster, ns, "gamma")
        wait_for("gamma to be gone", lambda: cluster.node(ns, "gamma") is None, 90)
    for _ in range(120):
        if await _topics(site.prefix + "g.") == {}:
            break
        await asyncio.sleep(0.5)
    assert await _topics(site.prefix + "g.") == {}
