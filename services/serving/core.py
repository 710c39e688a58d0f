"""Model serving: a registry of versioned models loaded from object storage, slide-level
inference triggered by "tiled" events, and tensor-level inference for the Open Inference
Protocol servicer. Transport-free."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image

from services.serving.model.runtime import InferenceInputError, TissueDetector, mask_png
from services.shared.access import AccessChecker, Action
from services.shared.auth import Principal
from services.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from services.shared.events import (
    TOPIC_INFERENCE_COMPLETED,
    event_id_for,
    new_envelope,
    publish_stage_failure,
)
from services.shared.outbox import Outbox
from services.shared.ports.documents import Collection
from services.shared.ports.objects import ObjectStore
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2

log = logging.getLogger(__name__)

MAX_INPUT_SIDE = 4096


@dataclass
class LoadedModel:
    name: str
    version: str
    sha256: str
    bucket: str
    key: str
    detector: TissueDetector
    card: dict[str, Any]


def model_keys(name: str, version: str) -> tuple[str, str]:
    return f"{name}/{version}/model.onnx", f"{name}/{version}/model.json"


class ModelRegistry:
    def __init__(self, objects: ObjectStore, bucket: str) -> None:
        self._objects = objects
        self._bucket = bucket
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self.default: tuple[str, str] | None = None

    async def load(self, name: str, version: str) -> LoadedModel:
        onnx_key, card_key = model_keys(name, version)
        if await self._objects.stat(self._bucket, onnx_key) is None:
            raise FailedPrecondition(
                f"model {name} version {version} is not in bucket {self._bucket}; "
                "publish it first (make model)",
                "MODEL_MISSING",
            )
        data = await self._objects.get_bytes(self._bucket, onnx_key)
        card = json.loads(await self._objects.get_bytes(self._bucket, card_key))
        digest = hashlib.sha256(data).hexdigest()
        if card.get("sha256") and card["sha256"] != digest:
            raise FailedPrecondition("model bytes do not match their card", "MODEL_CORRUPT")
        detector = await asyncio.to_thread(TissueDetector, data)
        model = LoadedModel(name, version, digest, self._bucket, onnx_key, detector, card)
        self._models[(name, version)] = model
        if self.default is None:
            self.default = (name, version)
        return model

    def get(self, name: str = "", version: str = "") -> LoadedModel:
        if not name:
            if self.default is None:
                raise NotFound("no model loaded", "NO_MODEL")
            name = self.default[0]
        if not version:
            versions = sorted(v for (n, v) in self._models if n == name)
            if not versions:
                raise NotFound(f"unknown model {name}", "UNKNOWN_MODEL")
            version = versions[-1]
        model = self._models.get((name, version))
        if model is None:
            raise NotFound(f"unknown model {name} version {version}", "UNKNOWN_MODEL")
        return model

    def all(self) -> list[LoadedModel]:
        return list(self._models.values())

    @property
    def ready(self) -> bool:
        return bool(self._models)


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


_NUMPY = {"FP32": np.float32, "UINT8": np.uint8, "FP64": np.float64, "INT64": np.int64}


def decode_tensor(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input {name}: unsupported datatype {datatype}", "BAD_DATATYPE")
    if any(d <= 0 for d in shape) or len(shape) > 8:
        raise InvalidArgument(f"input {name}: invalid shape", "BAD_SHAPE")
    count = int(np.prod(shape))
    if count * np.dtype(dtype).itemsize != len(raw):
        raise InvalidArgument(f"input {name}: byte size does not match shape", "BAD_SHAPE")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class InferenceService:
    def __init__(
        self,
        *,
        registry: ModelRegistry,
        objects: ObjectStore,
        results: Collection,
        slides: Collection,
        outbox: Outbox,
        access: AccessChecker,
        results_bucket: str,
    ) -> None:
        self.registry = registry
        self._objects = objects
        self._results = results
        self._slides = slides
        self._outbox = outbox
        self._access = access
        self._bucket = results_bucket

    async def ensure_ready(self) -> None:
        await self._objects.ensure_bucket(self._bucket)

    # -- tensors (Open Inference Protocol) ------------------------------------------------

    async def infer_tensors(
        self, name: str, version: str, inputs: dict[str, np.ndarray]
    ) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        model = self.registry.get(name, version)
        meta = model.detector.metadata()
        expected = {t["name"]: t for t in meta["inputs"]}
        if set(inputs) != set(expected):
            raise InvalidArgument(f"inputs must be exactly {sorted(expected)}", "BAD_INPUTS")
        for tname, arr in inputs.items():
            spec = expected[tname]
            if arr.dtype != _NUMPY[spec["datatype"]]:
                raise InvalidArgument(f"input {tname} must be {spec['datatype']}", "BAD_DATATYPE")
            want = spec["shape"]
            if len(arr.shape) != len(want) or any(
                w not in (-1, a) for w, a in zip(want, arr.shape, strict=True)
            ):
                raise InvalidArgument(f"input {tname} must have shape {want}", "BAD_SHAPE")
            if max(arr.shape[-2:]) > MAX_INPUT_SIDE:
                raise InvalidArgument(
                    f"input {tname} larger than {MAX_INPUT_SIDE} px", "INPUT_TOO_LARGE"
                )
        try:
            outputs = await asyncio.to_thread(model.detector.raw_infer, inputs)
        except InferenceInputError as exc:
            raise InvalidArgument(str(exc), "BAD_INPUTS") from None
        return model, outputs

    # -- slides ---------------------------------------------------------------------------

    async def handle_tiled(self, env: events_pb2.EventEnvelope) -> None:
        p = env.slide_tiled.pyramid
        await self._slides.update(
            {"_id": env.slide_id},
            set_fields={
                "dataset_id": env.dataset_id,
                "bucket": p.bucket,
                "thumbnail_key": p.thumbnail_key,
            },
            upsert=True,
        )
        await self._run(env.slide_id, env.dataset_id, p.bucket, p.thumbnail_key, "", "")

    async def on_failure(self, env: events_pb2.EventEnvelope, reason: str, detail: str) -> None:
        await publish_stage_failure(
            self._outbox, "inference", "inference-outcome", env, reason, detail
        )

    async def infer_slide(
        self, caller: Principal, slide_id: str, name: str, version: str
    ) -> dict[str, Any]:
        doc = await self._slides.get(slide_id)
        if doc is None:
            raise NotFound("slide unknown or not tiled yet", "NOT_TILED")
        await self._access.require(
            caller.subject, Action.ACTION_INFER, doc["dataset_id"], f"slide/{slide_id}/infer"
        )
        return await self._run(
            slide_id, doc["dataset_id"], doc["bucket"], doc["thumbnail_key"], name, version
        )

    async def _run(
        self,
        slide_id: str,
        dataset_id: str,
        bucket: str,
        thumb_key: str,
        name: str,
        version: str,
    ) -> dict[str, Any]:
        model = self.registry.get(name, version)
        result_id = f"{slide_id}:{model.name}:{model.version}"
        existing = await self._results.get(result_id)
        if existing is None:
            image = await self._objects.get_bytes(bucket, thumb_key)
            result = await asyncio.to_thread(_infer_image, model.detector, image)
            mask_key = f"slides/{slide_id}/inference/{model.name}/{model.version}/mask.png"
            await self._objects.put_bytes(self._bucket, mask_key, result[1], "image/png")
            existing = {
                "_id": result_id,
                "slide_id": slide_id,
                "dataset_id": dataset_id,
                "model_name": model.name,
                "model_version": model.version,
                "tissue_fraction": result[0],
                "mask_bucket": self._bucket,
                "mask_key": mask_key,
                "completed_at": datetime.now(UTC),
            }
            await self._results.update({"_id": result_id}, set_fields=existing, upsert=True)
            log.info("inference completed", extra={"slide_id": slide_id, "model": model.name})
        await self._announce(existing)
        return existing

    async def _announce(self, r: dict[str, Any]) -> None:
        res = common_pb2.InferenceResult(
            model_name=r["model_name"],
            model_version=r["model_version"],
            tissue_fraction=r["tissue_fraction"],
            mask_bucket=r["mask_bucket"],
            mask_key=r["mask_key"],
        )
        at = r["completed_at"]
        res.completed_at.FromDatetime(at if at.tzinfo else at.replace(tzinfo=UTC))
        env = new_envelope(
            payload_field="inference_completed",
            payload=events_pb2.InferenceCompleted(result=res),
            slide_id=r["slide_id"],
            dataset_id=r["dataset_id"],
            event_id=event_id_for(
                r["slide_id"], f"inference/{r['model_name']}/{r['model_version']}"
            ),
        )
        await self._outbox.publish(TOPIC_INFERENCE_COMPLETED, env)


def _infer_image(detector: TissueDetector, image_bytes: bytes) -> tuple[float, bytes]:
    with Image.open(io.BytesIO(image_bytes)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    result = detector.infer(rgb)
    return float(result.fraction), mask_png(result.mask)
