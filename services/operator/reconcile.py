"""The reconcilers: read the custom resource, call the pure builders, apply the result, reconcile
the servers, report conditions. Transport-free except through `KubeApi` and `InfraReconciler`,
which the kopf handlers hand in."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from services.operator import builders
from services.operator.builders import Manifest, Owner, PeerInfo
from services.operator.infra import Endpoints, InfraReconciler, InfraReport
from services.operator.kube import OWNED_KINDS, KubeApi, KubeError
from services.operator.schema import (
    SERVICE_NAMES,
    ModelDeploymentSpec,
    TesseraNodeSpec,
)

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SecretMissing(Exception):
    pass


class KeyedLocks:
    """One lock per custom resource: a reconcile and the deletion cleanup of the same object never
    interleave (without it, a reconcile that read the object just before its deletion could
    re-apply a Deployment the cleanup had just deleted, and with no garbage collector assumed
    nothing would ever remove it)."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def __call__(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        # a waiter still holding the old lock re-reads the object inside it and finds it gone
        self._locks.pop((namespace, name), None)


class NodeReconciler:
    def __init__(self, kube: KubeApi, infra: InfraReconciler) -> None:
        self._kube = kube
        self._infra = infra
        self._lock = KeyedLocks()
        # generation whose infrastructure was reconciled without problems, per node uid
        self._infra_done: dict[str, int] = {}

    async def _secret_value(self, namespace: str, name: str, key: str) -> str:
        secret = await self._kube.get("Secret", namespace, name)
        data = (secret or {}).get("data") or {}
        if key not in data:
            raise SecretMissing(f"Secret {name} has no key {key}")
        return base64.b64decode(data[key]).decode()

    async def endpoints(self, namespace: str, spec: TesseraNodeSpec) -> Endpoints:
        return Endpoints(
            kafka_bootstrap=spec.kafka.bootstrap_servers,
            replication_factor=spec.kafka.replication_factor,
            s3_endpoint=spec.s3.endpoint,
            s3_access_key=await self._secret_value(
                namespace, spec.s3.access_key.name, spec.s3.access_key.key
            ),
            s3_secret_key=await self._secret_value(
                namespace, spec.s3.secret_key.name, spec.s3.secret_key.key
            ),
            s3_secure=spec.s3.secure,
            s3_region=spec.s3.region,
            mongo_uri=await self._secret_value(namespace, spec.mongo.uri.name, spec.mongo.uri.key),
            mongo_database=spec.mongo.database,
        )

    async def peers(self, namespace: str, name: str, spec: TesseraNodeSpec) -> list[PeerInfo]:
        found: list[PeerInfo] = []
        for ref in spec.federation.peers:
            body = await self._kube.get("TesseraNode", ref.namespace, ref.name)
            if body is None:
                continue
            try:
                peer = TesseraNodeSpec.model_validate(body.get("spec") or {})
            except ValidationError:
                continue
            names_us = peer.federation.enabled and any(
                p.name == name and p.namespace == namespace for p in peer.federation.peers
            )
            found.append(
                PeerInfo(ref.name, ref.namespace, peer.site, peer.kafka.topic_prefix, names_us)
            )
        return found

    async def _current_replicas(self, namespace: str, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for dep in await self._kube.list("Deployment", namespace, {builders.NODE_LABEL: name}):
            component = dep["metadata"].get("labels", {}).get("app.kubernetes.io/component")
            if component in SERVICE_NAMES and "replicas" in dep.get("spec", {}):
                out[component] = int(dep["spec"]["replicas"])
        return out

    async def _apply_all(
        self, namespace: str, name: str, desired: list[Manifest]
    ) -> list[dict[str, Any]]:
        applied: list[dict[str, Any]] = []
        for manifest in desired:
            applied.append(await self._kube.apply(manifest))
        # what this node owns but no longer wants (an HPA of a service scaled to zero, ...)
        wanted = {(m["kind"], m["metadata"]["name"]) for m in desired}
        for kind in OWNED_KINDS:
            for obj in await self._kube.list(kind, namespace, {builders.NODE_LABEL: name}):
                if builders.MODEL_LABEL in obj["metadata"].get("labels", {}):
                    continue  # belongs to a ModelDeployment
                if (kind, obj["metadata"]["name"]) not in wanted:
                    await self._kube.delete(kind, namespace, obj["metadata"]["name"])
        return applied

    async def reconcile(
        self, namespace: str, name: str, *, infra: bool = True
    ) -> dict[str, Any] | None:
        """Brings the node's objects (and, with `infra`, its servers) to the spec and writes the
        status. Returns the status written, or None if the node no longer exists."""
        async with self._lock(namespace, name):
            body = await self._kube.get("TesseraNode", namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            return await self._reconcile(body, infra=infra)

    async def _reconcile(self, body: Mapping[str, Any], *, infra: bool) -> dict[str, Any]:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        generation = int(meta.get("generation", 1))
        previous = list((body.get("status") or {}).get("conditions") or [])
        old_status = dict(body.get("status") or {})
        problems: dict[str, str] = {}
        status: dict[str, Any] = {"observedGeneration": generation}
        rollouts: list[builders.RolloutState] = []
        peers: list[PeerInfo] = []
        wanted_peers = 0
        try:
            spec = TesseraNodeSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            problems["InvalidSpec"] = f"spec does not validate ({exc.error_count()} errors)"
            spec = None
        if spec is not None:
            wanted_peers = len(spec.federation.peers) if spec.federation.enabled else 0
            owner = Owner("TesseraNode", name, namespace, meta["uid"])
            report: InfraReport | None = None
            do_infra = infra or self._infra_done.get(meta["uid"]) != generation
            if do_infra:
                try:
                    ep = await self.endpoints(namespace, spec)
                    report = await self._infra.reconcile(
                        ep, builders.topic_plan(spec), spec.s3.buckets.all()
                    )
                    problems.update(report.problems)
                except SecretMissing as exc:
                    problems["SecretMissing"] = str(exc)
                except KubeError as exc:
                    problems["SecretMissing"] = f"cannot read Secrets ({exc.status})"
                if report is not None and not report.problems:
                    self._infra_done[meta["uid"]] = generation
                    status["infrastructure"] = {
                        "topics": len(report.topics),
                        "buckets": report.buckets,
                        "indexes": report.indexes,
                        "generation": generation,
                    }
                elif "infrastructure" in old_status:
                    status["infrastructure"] = old_status["infrastructure"]
            elif "infrastructure" in old_status:
                status["infrastructure"] = old_status["infrastructure"]
            try:
                peers = await self.peers(namespace, name, spec)
                desired = builders.build_node_objects(
                    owner,
                    spec,
                    peers=peers,
                    current_replicas=await self._current_replicas(namespace, name),
                )
                applied = await self._apply_all(namespace, name, desired)
                rollouts = [
                    builders.rollout_state(o) for o in applied if o.get("kind") == "Deployment"
                ]
            except KubeError as exc:
                problems["ApplyFailed"] = (
                    f"applying the node's objects failed ({exc.status}: {exc.reason[:200]})"
                )
            status["federation"] = {
                "publishTopic": builders.federation_topic(spec.kafka.topic_prefix, spec.site),
                "peers": [
                    {"name": p.name, "namespace": p.namespace, "site": p.site, "mutual": p.names_us}
                    for p in peers
                ],
            }
        status["conditions"] = builders.node_conditions(
            generation=generation,
            now=_now(),
            previous=previous,
            problems=problems,
            rollouts=rollouts,
            peers_wanted=wanted_peers,
            peers_mutual=sum(1 for p in peers if p.names_us),
        )
        await self._kube.patch_status("TesseraNode", namespace, name, status)
        return status

    async def cleanup(self, body: Mapping[str, Any]) -> None:
        """On deletion (the finalizer): delete the owned objects (no garbage collector is
        assumed), then with cleanupPolicy Delete the topics, buckets and database."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        async with self._lock(namespace, name):
            for kind in OWNED_KINDS:
                for obj in await self._kube.list(kind, namespace, {builders.NODE_LABEL: name}):
                    if builders.MODEL_LABEL in obj["metadata"].get("labels", {}):
                        continue
                    await self._kube.delete(kind, namespace, obj["metadata"]["name"])
            try:
                spec = TesseraNodeSpec.model_validate(body.get("spec") or {})
            except ValidationError:
                return
            if spec.cleanup_policy == "Delete":
                ep = await self.endpoints(namespace, spec)
                await self._infra.delete_topics(ep, [t.name for t in builders.topic_plan(spec)])
                await self._infra.delete_buckets(ep, spec.s3.buckets.all())
                await self._infra.drop_database(ep)
            self._infra_done.pop(meta.get("uid", ""), None)
            self._lock.forget(namespace, name)


class ModelReconciler:
    def __init__(self, kube: KubeApi, infra: InfraReconciler, nodes: NodeReconciler) -> None:
        self._kube = kube
        self._infra = infra
        self._nodes = nodes
        self._lock = KeyedLocks()

    async def reconcile(self, namespace: str, name: str) -> dict[str, Any] | None:
        async with self._lock(namespace, name):
            body = await self._kube.get("ModelDeployment", namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            return await self._reconcile(body)

    async def _reconcile(self, body: Mapping[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        generation = int(meta.get("generation", 1))
        previous = list((body.get("status") or {}).get("conditions") or [])
        problems: dict[str, str] = {}
        rollouts: list[builders.RolloutState] = []
        objects_found = 0
        try:
            spec = ModelDeploymentSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            problems["InvalidSpec"] = f"spec does not validate ({exc.error_count()} errors)"
            spec = None
        if spec is not None:
            node_body = await self._kube.get("TesseraNode", namespace, spec.node)
            if node_body is None:
                problems["NodeNotFound"] = (
                    f"TesseraNode {spec.node} does not exist in this namespace"
                )
            else:
                node = TesseraNodeSpec.model_validate(node_body.get("spec") or {})
                try:
                    ep = await self._nodes.endpoints(namespace, node)
                    objects_found = await self._infra.object_count(
                        ep, spec.storage.bucket, spec.storage.prefix
                    )
                    if objects_found == 0:
                        problems["ModelNotFound"] = "no object under the model's storage prefix"
                except SecretMissing as exc:
                    problems["SecretMissing"] = str(exc)
                except Exception as exc:  # noqa: BLE001 - S3 away: report it, retry later
                    problems["ObjectStoreUnavailable"] = (
                        f"cannot list the model ({type(exc).__name__})"
                    )
                owner = Owner("ModelDeployment", name, namespace, meta["uid"])
                try:
                    applied = [
                        await self._kube.apply(m)
                        for m in builders.build_model_objects(owner, spec, spec.node, node)
                    ]
                    rollouts = [
                        builders.rollout_state(o) for o in applied if o.get("kind") == "Deployment"
                    ]
                except KubeError as exc:
                    problems["ApplyFailed"] = f"applying the model's objects failed ({exc.status})"
        conds = builders.node_conditions(
            generation=generation,
            now=_now(),
            previous=previous,
            problems=problems,
            rollouts=rollouts,
            peers_wanted=0,
            peers_mutual=0,
        )[:3]
        status = {
            "observedGeneration": generation,
            "conditions": conds,
            "modelObjects": objects_found,
        }
        await self._kube.patch_status("ModelDeployment", namespace, name, status)
        return status

    async def cleanup(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        async with self._lock(namespace, name):
            for kind in ("Deployment", "Service"):
                await self._kube.delete(kind, namespace, builders.model_object_name(name))
            self._lock.forget(namespace, name)
