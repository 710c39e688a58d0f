"""Publish the tissue-detector artifact to the models bucket (`make up` runs this).

Builds the model from the sample slides with `build.py` (cached locally), then uploads
`<name>/<version>/model.onnx` and `model.json`. Publishing is idempotent: a version already in
the bucket is left as it is, because a published version must never change.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from services.serving.model.build import (
    DEFAULT_SLIDES_DIR,
    build_tissue_model,
    calibration_images_from,
    discover_slides,
)
from services.shared.ports.objects import ObjectStore

MODEL_NAME = "tissue-detector"


async def publish_model(
    store: ObjectStore,
    bucket: str,
    cache_dir: Path,
    *,
    version: str = "1",
    slides_dir: Path = DEFAULT_SLIDES_DIR,
) -> dict[str, Any]:
    prefix = f"{MODEL_NAME}/{version}/"
    await store.ensure_bucket(bucket)
    if await store.stat(bucket, prefix + "model.json") is not None:
        card: dict[str, Any] = json.loads(await store.get_bytes(bucket, prefix + "model.json"))
        return card
    out = cache_dir / MODEL_NAME / version
    if not (out / "model.json").exists():

        def build() -> None:
            images = calibration_images_from(discover_slides(slides_dir))
            build_tissue_model(out, images, version=version)

        await asyncio.to_thread(build)
    card = json.loads((out / "model.json").read_text())
    await store.put_file(bucket, prefix + "model.onnx", out / "model.onnx")
    await store.put_file(bucket, prefix + "model.json", out / "model.json", "application/json")
    return card
