"""kopf handlers, thin: each hands the event to a reconciler (services/operator/reconcile.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from services.operator import builders
from services.operator.infra import InfraReconciler
from services.operator.kube import Credentials, KubeApi
from services.operator.reconcile import ModelReconciler, NodeReconciler
from services.operator.schema import GROUP, VERSION
from services.operator.settings import OperatorSettings

log = logging.getLogger(__name__)

NODES = (GROUP, VERSION, "tesseranodes")
MODELS = (GROUP, VERSION, "modeldeployments")
OWNED = (
    ("apps", "v1", "deployments"),
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("networking.k8s.io", "v1", "networkpolicies"),
)
OURS = {"app.kubernetes.io/managed-by": builders.MANAGED_BY}
SETTINGS = OperatorSettings()  # read once; the timers' intervals are fixed at registration


class Nudger:
    """Coalesces reconcile requests per object: many events in a burst, one reconcile."""

    def __init__(self, delay_s: float) -> None:
        self._delay = delay_s
        self._pending: dict[tuple[str, str, str], asyncio.Task[None]] = {}

    def nudge(self, key: tuple[str, str, str], run: Any) -> None:
        if key in self._pending:
            return

        async def later() -> None:
            await asyncio.sleep(self._delay)
            self._pending.pop(key, None)
            try:
                await run()
            except Exception:  # the next event or the resync timer tries again
                log.exception("reconcile after an owned object's event failed")

        self._pending[key] = asyncio.get_running_loop().create_task(later())

    async def close(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    settings.persistence.finalizer = "tessera.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tessera.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="tessera.io")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    kube = KubeApi(Credentials.load(SETTINGS.kubeconfig))
    infra = InfraReconciler(SETTINGS.infra_timeout_s)
    memo.kube = kube
    memo.nodes = NodeReconciler(kube, infra)
    memo.models = ModelReconciler(kube, infra, memo.nodes)
    memo.nudger = Nudger(SETTINGS.debounce_s)


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    await memo.nudger.close()
    await memo.kube.close()


@kopf.on.probe(id="kubeApi")
async def kube_api_probe(memo: Any, **_: Any) -> bool:
    if not await memo.kube.healthy():
        raise kopf.PermanentError("the Kubernetes API server does not answer /readyz")
    return True


def _raise_if_degraded(status: dict[str, Any] | None) -> None:
    for cond in (status or {}).get("conditions", []):
        if cond["type"] == "Degraded" and cond["status"] == "True":
            if cond["reason"] == "InvalidSpec":
                raise kopf.PermanentError(cond["message"])
            raise kopf.TemporaryError(cond["message"], delay=10)


# -- TesseraNode -----------------------------------------------------------------------------


@kopf.on.resume(*NODES)
@kopf.on.create(*NODES)
@kopf.on.update(*NODES)
async def node_changed(name: str, namespace: str | None, spec: Any, memo: Any, **_: Any) -> None:
    status = await memo.nodes.reconcile(namespace, name, infra=True)
    # peers learn that this node names them (federation needs both sides)
    for peer in (spec or {}).get("federation", {}).get("peers", []):
        _nudge_node(memo, peer.get("namespace", ""), peer.get("name", ""))
    _raise_if_degraded(status)


@kopf.timer(*NODES, interval=SETTINGS.resync_s, initial_delay=SETTINGS.resync_s)
async def node_resync(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    await memo.nodes.reconcile(namespace, name, infra=True)


@kopf.on.delete(*NODES)
async def node_deleted(
    name: str, namespace: str | None, body: Any, spec: Any, memo: Any, **_: Any
) -> None:
    await memo.nodes.cleanup(dict(body))
    for peer in (spec or {}).get("federation", {}).get("peers", []):
        _nudge_node(memo, peer.get("namespace", ""), peer.get("name", ""))


def _nudge_node(memo: Any, namespace: str | None, name: str) -> None:
    if namespace and name:
        memo.nudger.nudge(
            ("node", namespace, name), lambda: memo.nodes.reconcile(namespace, name, infra=False)
        )


# -- ModelDeployment -------------------------------------------------------------------------


@kopf.on.resume(*MODELS)
@kopf.on.create(*MODELS)
@kopf.on.update(*MODELS)
async def model_changed(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    _raise_if_degraded(await memo.models.reconcile(namespace, name))


@kopf.timer(*MODELS, interval=SETTINGS.resync_s, initial_delay=SETTINGS.resync_s)
async def model_resync(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    await memo.models.reconcile(namespace, name)


@kopf.on.delete(*MODELS)
async def model_deleted(body: Any, memo: Any, **_: Any) -> None:
    await memo.models.cleanup(dict(body))


# -- owned objects: drift correction -----------------------------------------------------------


async def _owned_event(event: Any, namespace: str | None, labels: Any, memo: Any, **_: Any) -> None:
    if event.get("type") is None:
        return  # the initial listing; resume handlers and the timers cover it
    model = labels.get(builders.MODEL_LABEL)
    if model:
        memo.nudger.nudge(
            ("model", namespace, model), lambda: memo.models.reconcile(namespace, model)
        )
        return
    _nudge_node(memo, namespace, labels.get(builders.NODE_LABEL, ""))


for _group, _version, _plural in OWNED:
    _resource = (_group, _version, _plural) if _group else (_version, _plural)
    kopf.on.event(*_resource, id=f"owned-{_plural}", labels=OURS)(_owned_event)
