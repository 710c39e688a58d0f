"""Pure builders: a TesseraNode / ModelDeployment spec in, Kubernetes manifests (dicts) out.

Nothing here talks to a cluster or a server; the reconciler applies what these functions return
(server-side apply), so every field a builder sets is owned by the operator and put back when
someone edits it. Object names contain only the node's name and the service name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.operator.schema import (
    API_VERSION,
    SERVICE_NAMES,
    ModelDeploymentSpec,
    ServiceSpec,
    TesseraNodeSpec,
)
from services.shared.events import ALL_TOPICS, dead_letter_topic

Manifest = dict[str, Any]

MANAGED_BY = "tessera-operator"
NODE_LABEL = "tessera.io/node"
MODEL_LABEL = "tessera.io/model-deployment"
CONFIG_HASH = "tessera.io/config-hash"

GRPC_PORT = 50051
METRICS_PORT = 9090
TILING_HTTP_PORT = 8180
RUN_AS = 10001

# Services clients call directly; deid only consumes events (its gRPC port serves health).
PUBLIC_SERVICES = frozenset({"access", "ingestion", "tiling", "metadata", "serving"})
# Services that derive pseudonyms and so get the site's pseudonym key.
PSEUDONYM_SERVICES = frozenset({"ingestion", "deid", "metadata"})
# Scratch folders (an emptyDir each; the root filesystem is read-only).
WORK_DIRS: Mapping[str, Mapping[str, str]] = {
    "ingestion": {"TESSERA_INGESTION__SPOOL_DIR": "/var/lib/tessera/work/spool"},
    "deid": {"TESSERA_DEID__WORK_DIR": "/var/lib/tessera/work/deid"},
    "tiling": {"TESSERA_TILING__WORK_DIR": "/var/lib/tessera/work/tiling"},
}

# MongoDB indexes the services rely on (each service also ensures its own at start; the
# operator creates them ahead so a new node's database is ready before the first pod starts).
INDEXES: Mapping[str, tuple[tuple[tuple[str, int], ...], ...]] = {
    "catalogue_slides": tuple(
        ((f, 1),)
        for f in (
            "dataset_id",
            "clinical.stain",
            "clinical.organ",
            "clinical.species",
            "status",
            "clinical.case_id",
            "created_at",
        )
    ),
    "grants": ((("dataset_id", 1), ("subject", 1)), (("subject", 1),)),
    "audit": ((("subject", 1),), (("resource", 1),)),
    "uploads": ((("slide_id", 1),),),
    **{
        f"{s}_outbox": ((("sent", 1),),)
        for s in ("access", "deid", "ingestion", "serving", "tiling")
    },
}


# -- names and labels ---------------------------------------------------------------------


def object_name(node: str, service: str) -> str:
    return f"{node}-{service}"


def config_name(node: str, service: str) -> str:
    return f"{node}-{service}-config"


def federation_config_name(node: str) -> str:
    return f"{node}-federation"


def node_labels(node: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/part-of": "tessera",
        "app.kubernetes.io/instance": node,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        NODE_LABEL: node,
    }


def service_labels(node: str, service: str) -> dict[str, str]:
    return {
        **node_labels(node),
        "app.kubernetes.io/name": f"tessera-{service}",
        "app.kubernetes.io/component": service,
    }


def selector_labels(node: str, service: str) -> dict[str, str]:
    return {NODE_LABEL: node, "app.kubernetes.io/component": service}


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns the built objects."""

    kind: str
    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def _metadata(owner: Owner, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner.reference()],
    }


def config_hash(data: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()[:16]


# -- Kafka, buckets --------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int


def federation_topic(prefix: str, site: str) -> str:
    return f"{prefix}tessera.federation.catalogue.{site}.v1"


def topic_plan(spec: TesseraNodeSpec) -> tuple[TopicPlan, ...]:
    """Every topic the node needs: the event topics, one dead-letter topic per service and the
    topic this node publishes its de-identified catalogue records on for its peers."""
    k = spec.kafka
    topics = [TopicPlan(k.topic_prefix + t, k.partitions) for t in ALL_TOPICS]
    topics += [
        TopicPlan(k.topic_prefix + dead_letter_topic(s), k.dead_letter_partitions)
        for s in SERVICE_NAMES
    ]
    if spec.federation.enabled:
        topics.append(TopicPlan(federation_topic(k.topic_prefix, spec.site), k.partitions))
    return tuple(topics)


# -- federation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerInfo:
    """A peer TesseraNode as the reconciler found it in the cluster."""

    name: str
    namespace: str
    site: str
    topic_prefix: str
    names_us: bool  # the peer lists this node among its own peers


def metadata_endpoint(node: str, namespace: str) -> str:
    return f"{object_name(node, 'metadata')}.{namespace}.svc.cluster.local:{GRPC_PORT}"


def federation_entries(spec: TesseraNodeSpec, peers: Sequence[PeerInfo]) -> dict[str, str]:
    """ConfigMap data for exchanging de-identified catalogue records (never images): the topic
    this node publishes on, and per mutual peer its topic and its metadata gRPC endpoint."""
    mutual = [p for p in peers if p.names_us] if spec.federation.enabled else []
    peer_docs = [
        {
            "site": p.site,
            "node": p.name,
            "namespace": p.namespace,
            "catalogueTopic": federation_topic(p.topic_prefix, p.site),
            "metadataEndpoint": metadata_endpoint(p.name, p.namespace),
        }
        for p in sorted(mutual, key=lambda p: (p.namespace, p.name))
    ]
    return {
        "TESSERA_FEDERATION__ENABLED": "true" if spec.federation.enabled else "false",
        "TESSERA_FEDERATION__RECORDS": "deidentified-catalogue",
        "TESSERA_FEDERATION__PUBLISH_TOPIC": federation_topic(spec.kafka.topic_prefix, spec.site),
        "TESSERA_FEDERATION__SUBSCRIBE_TOPICS": ",".join(d["catalogueTopic"] for d in peer_docs),
        "TESSERA_FEDERATION__PEERS": json.dumps(peer_docs, sort_keys=True),
    }


def build_federation_configmap(
    owner: Owner, spec: TesseraNodeSpec, peers: Sequence[PeerInfo]
) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, federation_config_name(owner.name), node_labels(owner.name)),
        "data": federation_entries(spec, peers),
    }


# -- per service -----------------------------------------------------------------------------


def service_config(owner: Owner, spec: TesseraNodeSpec, service: str) -> dict[str, str]:
    """The non-secret environment of one service (the ConfigMap's data)."""
    node = owner.name
    b = spec.s3.buckets
    data = {
        "TESSERA_SITE": spec.site,
        "TESSERA_GRPC__HOST": "0.0.0.0",
        "TESSERA_GRPC__PORT": str(GRPC_PORT),
        "TESSERA_METRICS__HOST": "0.0.0.0",
        "TESSERA_METRICS__PORT": str(METRICS_PORT),
        "TESSERA_AUTH__PUBLIC_KEY_FILE": "/etc/tessera/auth/public.pem",
        "TESSERA_AUTH__SERVICE_TOKEN_FILE": f"/etc/tessera/token/{service}.jwt",
        "TESSERA_KAFKA__BOOTSTRAP_SERVERS": spec.kafka.bootstrap_servers,
        "TESSERA_KAFKA__PARTITIONS": str(spec.kafka.partitions),
        "TESSERA_KAFKA__TOPIC_PREFIX": spec.kafka.topic_prefix,
        "TESSERA_S3__ENDPOINT": spec.s3.endpoint,
        "TESSERA_S3__SECURE": "true" if spec.s3.secure else "false",
        "TESSERA_S3__REGION": spec.s3.region,
        "TESSERA_MONGO__DATABASE": spec.mongo.database,
        "TESSERA_BUCKETS__QUARANTINE": b.quarantine,
        "TESSERA_BUCKETS__DEIDENTIFIED": b.deidentified,
        "TESSERA_BUCKETS__TILES": b.tiles,
        "TESSERA_BUCKETS__MODELS": b.models,
        "TESSERA_BUCKETS__RESULTS": b.results,
        "TESSERA_ENDPOINTS__ACCESS": f"{object_name(node, 'access')}:{GRPC_PORT}",
        "TESSERA_ENDPOINTS__METADATA": f"{object_name(node, 'metadata')}:{GRPC_PORT}",
        "TESSERA_ENDPOINTS__TILING": f"{object_name(node, 'tiling')}:{GRPC_PORT}",
        "TESSERA_TELEMETRY__TRACES_EXPORTER": "none",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    data.update(WORK_DIRS.get(service, {}))
    if service == "tiling":
        data["TESSERA_TILING__HTTP_HOST"] = "0.0.0.0"
        data["TESSERA_TILING__HTTP_PORT"] = str(TILING_HTTP_PORT)
    return data


def build_configmap(owner: Owner, spec: TesseraNodeSpec, service: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            owner, config_name(owner.name, service), service_labels(owner.name, service)
        ),
        "data": service_config(owner, spec, service),
    }


def _secret_env(name: str, ref_name: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref_name, "key": key}}}


def _secret_envs(spec: TesseraNodeSpec, service: str) -> list[dict[str, Any]]:
    env = [
        _secret_env("TESSERA_S3__ACCESS_KEY", spec.s3.access_key.name, spec.s3.access_key.key),
        _secret_env("TESSERA_S3__SECRET_KEY", spec.s3.secret_key.name, spec.s3.secret_key.key),
        _secret_env("TESSERA_MONGO__URI", spec.mongo.uri.name, spec.mongo.uri.key),
    ]
    if service in PSEUDONYM_SERVICES:
        ref = spec.auth.pseudonym_key
        env.append(_secret_env(f"TESSERA_{service.upper()}__PSEUDONYM_KEY", ref.name, ref.key))
    return env


def _probe(kind: str) -> dict[str, Any]:
    timing = {
        "startup": {"periodSeconds": 2, "failureThreshold": 60},
        "readiness": {"periodSeconds": 5, "failureThreshold": 3},
        "liveness": {"periodSeconds": 10, "failureThreshold": 3},
    }[kind]
    return {"grpc": {"port": GRPC_PORT}, "timeoutSeconds": 2, **timing}


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def desired_replicas(svc: ServiceSpec, current: int | None) -> int:
    """The Deployment's replica count. With an HPA, a current count inside the HPA's range is
    kept (the HPA set it); otherwise the spec's count (the HPA minimum) is used."""
    if svc.replicas == 0:
        return 0
    high = max(svc.max_replicas, svc.replicas)
    if current is not None and svc.replicas <= current <= high:
        return current
    return svc.replicas


def _resources(svc: ServiceSpec) -> dict[str, Any]:
    r = svc.resources
    return {
        "requests": {"cpu": r.requests.cpu, "memory": r.requests.memory},
        "limits": {"cpu": r.limits.cpu, "memory": r.limits.memory},
    }


def build_deployment(
    owner: Owner,
    spec: TesseraNodeSpec,
    service: str,
    *,
    current_replicas: int | None = None,
    extra_config: Mapping[str, str] | None = None,
) -> Manifest:
    node = owner.name
    svc = spec.services.of(service)
    config = service_config(owner, spec, service)
    if extra_config:
        config = {**config, **extra_config}
    ports = [
        {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
    ]
    if service == "tiling":
        ports.append({"name": "http", "containerPort": TILING_HTTP_PORT, "protocol": "TCP"})
    env_from: list[dict[str, Any]] = [{"configMapRef": {"name": config_name(node, service)}}]
    if service == "metadata":
        env_from.append({"configMapRef": {"name": federation_config_name(node)}})
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {
            "name": "auth",
            "secret": {
                "secretName": spec.auth.public_key.name,
                "items": [{"key": spec.auth.public_key.key, "path": "public.pem"}],
            },
        },
        {
            "name": "token",
            "secret": {
                "secretName": spec.auth.service_tokens_secret,
                "items": [{"key": f"{service}.jwt", "path": f"{service}.jwt"}],
            },
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
        {"name": "auth", "mountPath": "/etc/tessera/auth", "readOnly": True},
        {"name": "token", "mountPath": "/etc/tessera/token", "readOnly": True},
    ]
    if service in WORK_DIRS:
        volumes.append({"name": "work", "emptyDir": {"sizeLimit": "20Gi"}})
        mounts.append({"name": "work", "mountPath": "/var/lib/tessera/work"})
    container = {
        "name": service,
        "image": svc.image or spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-m", f"services.{service}"],
        "ports": ports,
        "envFrom": env_from,
        "env": _secret_envs(spec, service),
        "resources": _resources(svc),
        "securityContext": container_security_context(),
        "startupProbe": _probe("startup"),
        "readinessProbe": _probe("readiness"),
        "livenessProbe": _probe("liveness"),
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, object_name(node, service), service_labels(node, service)),
        "spec": {
            "replicas": desired_replicas(svc, current_replicas),
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(node, service)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": service_labels(node, service),
                    "annotations": {
                        CONFIG_HASH: config_hash(config),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    # the services drain for TESSERA_GRPC__DRAIN_GRACE_S (10 s) on SIGTERM
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def build_service(owner: Owner, service: str) -> Manifest:
    node = owner.name
    ports = [
        {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"},
    ]
    if service == "tiling":
        ports.append({"name": "http", "port": TILING_HTTP_PORT, "targetPort": "http"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, object_name(node, service), service_labels(node, service)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(node, service),
            "ports": [{**p, "protocol": "TCP"} for p in ports],
        },
    }


def build_pdb(owner: Owner, service: str) -> Manifest:
    node = owner.name
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, object_name(node, service), service_labels(node, service)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(node, service)},
        },
    }


def build_hpa(owner: Owner, spec: TesseraNodeSpec, service: str) -> Manifest | None:
    """None when the service is scaled to zero (an HPA cannot hold a Deployment at zero)."""
    svc = spec.services.of(service)
    if svc.replicas == 0:
        return None
    node = owner.name
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(owner, object_name(node, service), service_labels(node, service)),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": object_name(node, service),
            },
            "minReplicas": svc.replicas,
            "maxReplicas": max(svc.max_replicas, svc.replicas),
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": svc.target_cpu_utilization,
                        },
                    },
                }
            ],
        },
    }


def build_network_policy(owner: Owner, service: str, peers: Sequence[PeerInfo] = ()) -> Manifest:
    """Ingress to one service: gRPC from this node's pods (from anywhere for the services
    clients call; metadata also from mutual peers' namespaces), metrics from any namespace,
    tiles over HTTP from anywhere."""
    node = owner.name
    same_node = {"podSelector": {"matchLabels": {NODE_LABEL: node}}}
    grpc_rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": GRPC_PORT}]}
    if service not in PUBLIC_SERVICES:
        sources: list[dict[str, Any]] = [same_node]
        grpc_rule["from"] = sources
    rules: list[dict[str, Any]] = [
        grpc_rule,
        {
            "from": [{"namespaceSelector": {}}],
            "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
        },
    ]
    if service == "metadata":
        mutual = sorted({p.namespace for p in peers if p.names_us})
        if mutual:
            rules.append(
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": ns}
                            },
                            "podSelector": {
                                "matchLabels": {"app.kubernetes.io/part-of": "tessera"}
                            },
                        }
                        for ns in mutual
                    ],
                    "ports": [{"protocol": "TCP", "port": GRPC_PORT}],
                }
            )
    if service == "tiling":
        rules.append({"ports": [{"protocol": "TCP", "port": TILING_HTTP_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(owner, object_name(node, service), service_labels(node, service)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(node, service)},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }


def build_node_objects(
    owner: Owner,
    spec: TesseraNodeSpec,
    *,
    peers: Sequence[PeerInfo] = (),
    current_replicas: Mapping[str, int] | None = None,
) -> list[Manifest]:
    """Every object a TesseraNode owns, in apply order (config before what reads it)."""
    current = current_replicas or {}
    fed = build_federation_configmap(owner, spec, peers)
    out: list[Manifest] = [fed]
    for service in SERVICE_NAMES:
        extra = fed["data"] if service == "metadata" else None
        out.append(build_configmap(owner, spec, service))
        out.append(
            build_deployment(
                owner, spec, service, current_replicas=current.get(service), extra_config=extra
            )
        )
        out.append(build_service(owner, service))
        out.append(build_pdb(owner, service))
        hpa = build_hpa(owner, spec, service)
        if hpa is not None:
            out.append(hpa)
        out.append(build_network_policy(owner, service, peers))
    return out


# -- ModelDeployment -------------------------------------------------------------------------


def model_object_name(name: str) -> str:
    return f"{name}-model"


def build_model_objects(
    owner: Owner, spec: ModelDeploymentSpec, node_name: str, node: TesseraNodeSpec
) -> list[Manifest]:
    """A serving Deployment (and Service) dedicated to one model version, configured like the
    node's own serving service but pinned to the model's name and version."""
    labels = {
        **service_labels(node_name, "serving"),
        "app.kubernetes.io/component": "model",
        MODEL_LABEL: owner.name,
    }
    selector = {MODEL_LABEL: owner.name, NODE_LABEL: node_name}
    node_owner = Owner("TesseraNode", node_name, owner.namespace, owner.uid)
    base = build_deployment(node_owner, node, "serving")
    pod = base["spec"]["template"]
    container = pod["spec"]["containers"][0]
    container["env"] = [
        *container["env"],
        {"name": "TESSERA_SERVING__MODEL_NAME", "value": spec.model_name},
        {"name": "TESSERA_SERVING__MODEL_VERSION", "value": spec.version},
        {"name": "TESSERA_BUCKETS__MODELS", "value": spec.storage.bucket},
        {"name": "TESSERA_SERVING__MODEL_PREFIX", "value": spec.storage.prefix},
    ]
    r = spec.resources
    container["resources"] = {
        "requests": {"cpu": r.requests.cpu, "memory": r.requests.memory},
        "limits": {"cpu": r.limits.cpu, "memory": r.limits.memory},
    }
    pod["metadata"]["labels"] = labels
    name = model_object_name(owner.name)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name, labels),
        "spec": {
            **base["spec"],
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            "template": pod,
        },
    }
    service = build_service(owner, "serving")
    service["metadata"] = _metadata(owner, name, labels)
    service["spec"]["selector"] = selector
    return [deployment, service]


# -- status ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutState:
    """What a Deployment's status says about its rollout."""

    name: str
    desired: int
    updated: int
    available: int
    observed_current: bool  # status.observedGeneration >= metadata.generation

    @property
    def complete(self) -> bool:
        return (
            self.observed_current
            and self.updated >= self.desired
            and self.available >= self.desired
        )


def rollout_state(deployment: Mapping[str, Any]) -> RolloutState:
    meta = deployment.get("metadata", {})
    spec = deployment.get("spec", {})
    status = deployment.get("status") or {}
    return RolloutState(
        name=meta.get("name", ""),
        desired=int(spec.get("replicas", 1)),
        updated=int(status.get("updatedReplicas", 0)),
        available=int(status.get("availableReplicas", 0)),
        observed_current=int(status.get("observedGeneration", 0)) >= int(meta.get("generation", 1)),
    )


def condition(
    ctype: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """One status condition; lastTransitionTime only moves when the status changes."""
    value = "True" if status else "False"
    since = now
    for old in previous:
        if (
            old.get("type") == ctype
            and old.get("status") == value
            and old.get("lastTransitionTime")
        ):
            since = str(old["lastTransitionTime"])
    return {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def node_conditions(
    *,
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]],
    problems: Mapping[str, str],
    rollouts: Sequence[RolloutState],
    peers_wanted: int,
    peers_mutual: int,
) -> list[dict[str, Any]]:
    """Ready / Progressing / Degraded (+ Federated) from what a reconcile found.

    `problems` maps a reason (InvalidSpec, KafkaUnavailable, ObjectStoreUnavailable,
    DocumentStoreUnavailable, SecretMissing, ApplyFailed) to a message without identifying data.
    """
    pending = [r.name for r in rollouts if not r.complete]
    if problems:
        reason = sorted(problems)[0]
        degraded = condition(
            "Degraded",
            True,
            reason,
            "; ".join(problems[k] for k in sorted(problems)),
            generation,
            now,
            previous,
        )
    else:
        degraded = condition(
            "Degraded", False, "AsExpected", "all reconciled", generation, now, previous
        )
    if pending:
        progressing = condition(
            "Progressing",
            True,
            "RollingOut",
            f"{len(pending)} of {len(rollouts)} deployments not available: {', '.join(pending)}",
            generation,
            now,
            previous,
        )
    else:
        progressing = condition(
            "Progressing",
            False,
            "RolloutComplete",
            "every deployment is available",
            generation,
            now,
            previous,
        )
    if problems:
        ready = condition(
            "Ready", False, "Degraded", degraded["message"], generation, now, previous
        )
    elif pending:
        ready = condition(
            "Ready",
            False,
            "DeploymentsUnavailable",
            progressing["message"],
            generation,
            now,
            previous,
        )
    else:
        ready = condition(
            "Ready",
            True,
            "AllServicesAvailable",
            f"{len(rollouts)} deployments available; topics, buckets and indexes reconciled",
            generation,
            now,
            previous,
        )
    if peers_wanted == 0:
        fed = condition(
            "Federated", False, "NoPeers", "no federation peers", generation, now, previous
        )
    elif peers_mutual == peers_wanted:
        fed = condition(
            "Federated",
            True,
            "PeersConnected",
            f"{peers_mutual} mutual peers configured",
            generation,
            now,
            previous,
        )
    else:
        fed = condition(
            "Federated",
            False,
            "PeersPending",
            f"{peers_mutual} of {peers_wanted} peers exist and name this node",
            generation,
            now,
            previous,
        )
    return [ready, progressing, degraded, fed]
