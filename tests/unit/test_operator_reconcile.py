"""The model reconciler against an in-memory Kubernetes API: a reconcile still in flight when the
ModelDeployment is deleted must not re-create what the deletion cleanup removed (there is no
garbage collector to catch it afterwards)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any, cast

from services.operator import builders
from services.operator.infra import Endpoints, InfraReconciler
from services.operator.kube import KubeApi
from services.operator.reconcile import ModelReconciler, NodeReconciler
from tests.unit.test_operator_builders import node_spec


class MemoryKube:
    """The four calls the reconcilers make, over a dict of objects keyed by kind/namespace/name."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}

    def put(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = copy.deepcopy(dict(obj))

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        self.put(manifest)
        return copy.deepcopy(dict(manifest))

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        await asyncio.sleep(0)
        return self.objects.pop((kind, namespace, name), None) is not None

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        obj = self.objects.get((kind, namespace, name))
        if obj is not None:
            obj["status"] = dict(status)


class SlowInfra:
    """Listing the model's objects waits until the test lets it go."""

    def __init__(self) -> None:
        self.listing = asyncio.Event()
        self.release = asyncio.Event()

    async def object_count(self, ep: Endpoints, bucket: str, prefix: str) -> int:
        self.listing.set()
        await self.release.wait()
        return 1


class FixedEndpoints(NodeReconciler):
    async def endpoints(self, namespace: str, spec: Any) -> Endpoints:
        return Endpoints(
            kafka_bootstrap="kafka:9092",
            replication_factor=1,
            s3_endpoint="s3:7070",
            s3_access_key="a",
            s3_secret_key="s",
            s3_secure=False,
            s3_region="us-east-1",
            mongo_uri="mongodb://mongo",
            mongo_database="tessera_a",
        )


NS = "site-a"


def _world() -> tuple[MemoryKube, SlowInfra, ModelReconciler]:
    kube = MemoryKube()
    kube.put(
        {
            "kind": "TesseraNode",
            "metadata": {"name": "alpha", "namespace": NS, "uid": "node-uid"},
            "spec": node_spec().model_dump(by_alias=True, mode="json"),
        }
    )
    kube.put(
        {
            "kind": "ModelDeployment",
            "metadata": {"name": "tissue", "namespace": NS, "uid": "model-uid", "generation": 1},
            "spec": {
                "node": "alpha",
                "modelName": "tissue-detector",
                "version": "7",
                "storage": {"bucket": "models", "prefix": "tissue-detector/7/"},
                "replicas": 1,
            },
        }
    )
    infra = SlowInfra()
    api = cast(KubeApi, kube)
    nodes = FixedEndpoints(api, cast(InfraReconciler, infra))
    return kube, infra, ModelReconciler(api, cast(InfraReconciler, infra), nodes)


def _model_objects(kube: MemoryKube) -> list[tuple[str, str, str]]:
    name = builders.model_object_name("tissue")
    return [k for k in kube.objects if k[2] == name]


async def test_a_reconcile_applies_the_models_objects() -> None:
    kube, infra, models = _world()
    infra.release.set()
    status = await models.reconcile(NS, "tissue")
    assert status is not None and status["modelObjects"] == 1
    assert {k[0] for k in _model_objects(kube)} == {"Deployment", "Service"}


async def test_a_reconcile_in_flight_does_not_outlive_the_deletion() -> None:
    kube, infra, models = _world()
    infra.release.set()
    await models.reconcile(NS, "tissue")  # the objects exist
    infra.release.clear()
    infra.listing.clear()
    in_flight = asyncio.create_task(models.reconcile(NS, "tissue"))
    await infra.listing.wait()  # it has read the object and is listing the model's storage
    # the user deletes it: the API server sets deletionTimestamp, kopf calls the cleanup
    body = kube.objects[("ModelDeployment", NS, "tissue")]
    body["metadata"]["deletionTimestamp"] = "2026-12-03T18:00:00Z"
    cleanup = asyncio.create_task(models.cleanup(copy.deepcopy(body)))
    await asyncio.sleep(0.01)
    infra.release.set()
    await asyncio.gather(in_flight, cleanup)
    assert _model_objects(kube) == []
    # and a reconcile nudged afterwards (an owned object's delete event) leaves it so
    assert await models.reconcile(NS, "tissue") is None
    assert _model_objects(kube) == []
