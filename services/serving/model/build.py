"""Build the tissue-detection model artifact: ``model.onnx`` + ``model.json``.

The decision parameters are fitted (Otsu + Fisher LDA, see :mod:`.fitting`) on low-resolution
images of real brightfield slides, then baked into an ONNX graph (see :mod:`.graph`). Nothing is
downloaded. CLI::

    python -m services.serving.model.build --out DIR [--slides DIR] [--version 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import openslide

from services.tiling.engine import SlideOpenError, SlideReadError, read_low_res_rgb

from .fitting import (
    DEFAULT_PIXELS_PER_IMAGE,
    LinearFit,
    check_rgb,
    fit_linear_otsu,
    sample_features,
)
from .graph import (
    FRACTION_OUTPUT,
    INPUT_NAME,
    IR_VERSION,
    MASK_OUTPUT,
    OPSET,
    DecisionParams,
    build_graph,
    serialize,
)
from .runtime import TissueDetector

log = logging.getLogger(__name__)

MODEL_NAME: Final = "tissue-detector"
MODEL_FILE: Final = "model.onnx"
METADATA_FILE: Final = "model.json"
DEFAULT_CALIBRATION_SIDE: Final = 1024
DEFAULT_SLIDES_DIR: Final = Path(__file__).resolve().parents[4] / "shared" / "slides"

INPUT_SPECS: Final = [
    {
        "name": INPUT_NAME,
        "datatype": "FP32",
        "shape": [1, 3, -1, -1],
        "description": "RGB scaled to 0..1, NCHW, any height and width",
    },
]
OUTPUT_SPECS: Final = [
    {
        "name": MASK_OUTPUT,
        "datatype": "UINT8",
        "shape": [1, 1, -1, -1],
        "description": "1 = tissue, 0 = background; same height and width as the input",
    },
    {
        "name": FRACTION_OUTPUT,
        "datatype": "FP32",
        "shape": [1],
        "description": "share of tissue pixels in the mask",
    },
]


@dataclass(frozen=True)
class ModelArtifact:
    directory: Path
    onnx_path: Path
    json_path: Path
    sha256: str
    params: DecisionParams
    fit: LinearFit
    metadata: dict[str, Any]  # the content of model.json


# ------------------------------------------------------------- calibration data
def brightfield_check(image: np.ndarray, min_side: int = 64) -> str | None:
    """None if ``image`` looks like a brightfield slide usable for calibration, else the reason.

    Rejected: tiny images, dark-background images (fluorescence), and images dominated by
    fully saturated primaries (synthetic test patterns, not stained tissue); brightfield glass
    must be visible somewhere (bright, grey pixels)."""
    check_rgb(image)
    if min(image.shape[0], image.shape[1]) < min_side:
        return "too small"
    rgb = image.reshape(-1, 3).astype(np.float32) / 255.0
    brightness = rgb.mean(axis=1)
    saturation = rgb.max(axis=1) - rgb.min(axis=1)
    if float(np.median(brightness)) < 0.5:
        return "dark background (fluorescence?)"
    if float(np.mean(saturation > 0.85)) > 0.05:
        return "pure colours (synthetic pattern?)"
    if float(np.mean((brightness > 0.85) & (saturation < 0.08))) < 0.02:
        return "no visible glass background"
    return None


def discover_slides(root: Path) -> list[Path]:
    """Files under ``root`` that OpenSlide recognises, sorted."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.suffix in {".md", ".txt"}:
            continue
        try:
            if openslide.OpenSlide.detect_format(str(path)) is not None:
                found.append(path)
        except (openslide.OpenSlideError, OSError):
            continue
    return found


def calibration_images_from(
    paths: Iterable[str | os.PathLike[str]],
    max_side: int = DEFAULT_CALIBRATION_SIDE,
    *,
    brightfield_only: bool = True,
    skip_unreadable: bool = True,
) -> list[np.ndarray]:
    """Low-resolution RGB images (longer side <= ``max_side``) of the given slides, read with
    OpenSlide. Unreadable slides are skipped (or raise if ``skip_unreadable`` is False); with
    ``brightfield_only``, images failing :func:`brightfield_check` are dropped. Identical images
    (e.g. two instances of one DICOM series) are kept once."""
    images: list[np.ndarray] = []
    seen: set[str] = set()
    skipped = rejected = 0
    for path in paths:
        try:
            image = read_low_res_rgb(path, max_side=max_side)
        except (SlideOpenError, SlideReadError):
            if not skip_unreadable:
                raise
            skipped += 1
            continue
        if brightfield_only and brightfield_check(image) is not None:
            rejected += 1
            continue
        digest = hashlib.sha256(image.tobytes() + repr(image.shape).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        images.append(image)
    log.info(
        "calibration images: %d used, %d unreadable, %d rejected", len(images), skipped, rejected
    )
    return images


# ------------------------------------------------------------------------ build
def fit_decision(
    calibration_images: Sequence[np.ndarray],
    pool_kernel: int = 5,
    pixels_per_image: int = DEFAULT_PIXELS_PER_IMAGE,
) -> tuple[DecisionParams, LinearFit]:
    features = sample_features(calibration_images, pixels_per_image)
    fit = fit_linear_otsu(features)
    params = DecisionParams(fit.w_saturation, fit.w_darkness, fit.threshold, pool_kernel)
    return params, fit


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_tissue_model(
    out_dir: Path,
    calibration_images: list[np.ndarray],
    *,
    version: str = "1",
    pool_kernel: int = 5,
    pixels_per_image: int = DEFAULT_PIXELS_PER_IMAGE,
    created: datetime | None = None,
) -> ModelArtifact:
    """Fit the decision on ``calibration_images`` (RGB uint8 H x W x 3), build and check the
    ONNX model, write ``model.onnx`` and ``model.json`` into ``out_dir``. The ONNX bytes depend
    only on the images and arguments (same inputs -> same sha256)."""
    if not version or not all(c.isalnum() or c in "._-" for c in version):
        raise ValueError("version must be a short alphanumeric string")
    params, fit = fit_decision(calibration_images, pool_kernel, pixels_per_image)
    model = build_graph(params, name=MODEL_NAME, version=version)
    onnx.checker.check_model(model, full_check=True)
    model_bytes = serialize(model)
    sha256 = hashlib.sha256(model_bytes).hexdigest()

    detector = TissueDetector(model_bytes)
    fractions = [round(detector.infer(image).fraction, 4) for image in calibration_images]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / MODEL_FILE
    json_path = out_dir / METADATA_FILE
    when = (created or datetime.now(UTC)).astimezone(UTC)
    metadata: dict[str, Any] = {
        "name": MODEL_NAME,
        "version": version,
        "created": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "format": "onnx",
        "file": MODEL_FILE,
        "sha256": sha256,
        "size_bytes": len(model_bytes),
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "platform": "onnxruntime_onnx",
        "inputs": INPUT_SPECS,
        "outputs": OUTPUT_SPECS,
        "parameters": {
            "features": {
                "saturation": "max(R,G,B) - min(R,G,B)",
                "darkness": "1 - mean(R,G,B)",
            },
            "decision": "AvgPool_k(w_saturation*saturation + w_darkness*darkness - threshold) > 0",
            "w_saturation": params.w_saturation,
            "w_darkness": params.w_darkness,
            "threshold": params.threshold,
            "pool_kernel": params.pool_kernel,
        },
        "calibration": {
            "method": "iterated Otsu threshold + Fisher linear discriminant (unsupervised)",
            "images": len(calibration_images),
            "image_sizes": [[int(i.shape[1]), int(i.shape[0])] for i in calibration_images],
            "pixels_per_image_max": pixels_per_image,
            "pixels": fit.pixels,
            "iterations": fit.iterations,
            "converged": fit.converged,
            "tissue_share": fit.tissue_share,
            "background_mean": dict(
                zip(("saturation", "darkness"), fit.background_mean, strict=True)
            ),
            "tissue_mean": dict(zip(("saturation", "darkness"), fit.tissue_mean, strict=True)),
            "between_class_variance": fit.between_class_variance,
            "separability": fit.separability,
            "image_tissue_fractions": fractions,
        },
    }
    _write_atomic(onnx_path, model_bytes)
    _write_atomic(json_path, (json.dumps(metadata, indent=2) + "\n").encode("utf-8"))
    return ModelArtifact(out_dir, onnx_path, json_path, sha256, params, fit, metadata)


# -------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.serving.model.build",
        description="Build the tissue-detector ONNX model from sample slides.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--slides",
        type=Path,
        default=DEFAULT_SLIDES_DIR,
        help="folder searched (recursively) for calibration slides",
    )
    parser.add_argument("--version", default="1")
    parser.add_argument("--max-side", type=int, default=DEFAULT_CALIBRATION_SIDE)
    parser.add_argument("--pool-kernel", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if not args.slides.is_dir():
        parser.error(f"slides folder not found: {args.slides}")
    slides = discover_slides(args.slides)
    images = calibration_images_from(slides, args.max_side)
    if not images:
        print("no usable brightfield calibration slides found", file=sys.stderr)
        return 2
    artifact = build_tissue_model(
        args.out, images, version=args.version, pool_kernel=args.pool_kernel
    )
    summary = {
        "model": str(artifact.onnx_path),
        "sha256": artifact.sha256,
        "parameters": artifact.metadata["parameters"],
        "calibration": artifact.metadata["calibration"],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
