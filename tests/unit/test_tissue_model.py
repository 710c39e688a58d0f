"""Unit tests of the tissue-detection model: build (fit + ONNX graph) and runtime."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from services.serving.model import (
    FRACTION_OUTPUT,
    INPUT_NAME,
    MASK_OUTPUT,
    InferenceInputError,
    ModelLoadError,
    TissueDetector,
    mask_png,
)
from services.serving.model.build import (
    ModelArtifact,
    brightfield_check,
    build_tissue_model,
    calibration_images_from,
    main,
)
from services.serving.model.fitting import (
    CalibrationError,
    fit_linear_otsu,
    otsu_threshold,
)
from services.tiling.engine import read_low_res_rgb

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"
CALIBRATION = [
    "aperio/CMU-1-Small-Region.svs",
    "aperio/tcga-cr-7395-01a-01-ts1.svs",
    "dicom/camelyon-jpeg/multi_frame_jpeg_camelyon_challenge_image.dcm",
    "dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm",
]


def slide_path(rel: str) -> Path:
    if not SLIDES.is_dir():
        pytest.fail(f"sample slides folder missing: {SLIDES}")
    path = SLIDES / rel
    if not path.is_file():
        pytest.fail(f"sample slide missing: {path}")
    return path


@pytest.fixture(scope="module")
def calibration() -> list[np.ndarray]:
    images = calibration_images_from([slide_path(rel) for rel in CALIBRATION], max_side=1024)
    assert len(images) == len(CALIBRATION)
    return images


@pytest.fixture(scope="module")
def artifact(
    calibration: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> ModelArtifact:
    return build_tissue_model(tmp_path_factory.mktemp("model"), calibration)


@pytest.fixture(scope="module")
def detector(artifact: ModelArtifact) -> TissueDetector:
    return TissueDetector(artifact.onnx_path.read_bytes())


def synthetic_slide(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """White glass with noise and an H&E-coloured elliptical blob; returns (rgb, truth)."""
    rng = np.random.default_rng(seed)
    h, w = 600, 800
    yy, xx = np.mgrid[0:h, 0:w]
    truth = ((xx - 430) / 260.0) ** 2 + ((yy - 280) / 190.0) ** 2 <= 1.0
    image = np.full((h, w, 3), 246.0)
    pink = np.array([228.0, 150.0, 196.0])
    purple = np.array([140.0, 84.0, 168.0])
    mix = (np.sin(xx / 23.0) * np.cos(yy / 17.0) + 1.0) / 2.0  # eosin/haematoxylin texture
    stain = pink * (1 - mix[..., None]) + purple * mix[..., None]
    image[truth] = stain[truth]
    image += rng.normal(0.0, 6.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def test_model_passes_the_onnx_checker(artifact: ModelArtifact) -> None:
    model = onnx.load(str(artifact.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    data = artifact.onnx_path.read_bytes()
    card = json.loads(artifact.json_path.read_text())
    assert card["sha256"] == hashlib.sha256(data).hexdigest() == artifact.sha256
    assert card["name"] == "tissue-detector"
    assert card["version"] == "1"
    assert card["parameters"]["threshold"] == artifact.params.threshold
    assert card["calibration"]["images"] == len(CALIBRATION)
    text = artifact.json_path.read_text().lower()
    for fragment in ("cmu", "tcga", "camelyon", ".svs", ".dcm", "/work", "slides"):
        assert fragment not in text


def test_fitted_parameters_are_sane(artifact: ModelArtifact) -> None:
    params, fit = artifact.params, artifact.fit
    assert params.w_saturation > 0 and params.w_darkness > 0
    assert params.w_saturation**2 + params.w_darkness**2 == pytest.approx(1.0, abs=1e-5)
    assert 0.05 < params.threshold < 0.6
    assert fit.converged
    assert fit.tissue_mean[0] > fit.background_mean[0]
    assert fit.tissue_mean[1] > fit.background_mean[1]
    assert fit.separability > 0.7


def test_synthetic_blob_fraction_and_mask(detector: TissueDetector) -> None:
    image, truth = synthetic_slide()
    result = detector.infer(image)
    assert result.mask.shape == truth.shape
    assert result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {0, 1}
    assert result.fraction == pytest.approx(float(truth.mean()), abs=0.03)
    assert result.fraction == pytest.approx(float(result.mask.mean()), abs=1e-4)
    agreement = float(np.mean(result.mask.astype(bool) == truth))
    assert agreement > 0.98
    intersection = np.logical_and(result.mask, truth).sum()
    union = np.logical_or(result.mask, truth).sum()
    assert intersection / union > 0.95


def test_white_image_has_no_tissue(detector: TissueDetector) -> None:
    white = np.full((300, 400, 3), 255, dtype=np.uint8)
    assert detector.infer(white).fraction == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(3)
    noisy = np.clip(245 + rng.normal(0, 6, (300, 400, 3)), 0, 255).astype(np.uint8)
    assert detector.infer(noisy).fraction < 0.01


def test_real_slide_fraction(detector: TissueDetector) -> None:
    rgb = read_low_res_rgb(slide_path("aperio/CMU-1-Small-Region.svs"))
    result = detector.infer(rgb)
    assert 0.05 < result.fraction < 0.95
    assert result.mask.shape == rgb.shape[:2]


def test_metadata_is_consistent_with_the_graph(
    detector: TissueDetector, artifact: ModelArtifact
) -> None:
    meta = detector.metadata()
    assert meta["name"] == "tissue-detector"
    assert meta["versions"] == ["1"]
    graph = onnx.load(str(artifact.onnx_path)).graph
    kserve = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.UINT8: "UINT8"}

    def described(values: list[onnx.ValueInfoProto]) -> list[dict[str, object]]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            out.append({"name": value.name, "datatype": kserve[tensor.elem_type], "shape": dims})
        return out

    assert meta["inputs"] == described(list(graph.input))
    assert meta["outputs"] == described(list(graph.output))
    assert meta["inputs"] == [{"name": INPUT_NAME, "datatype": "FP32", "shape": [1, 3, -1, -1]}]
    card = json.loads(artifact.json_path.read_text())
    strip = [{k: t[k] for k in ("name", "datatype", "shape")} for t in card["outputs"]]
    assert strip == meta["outputs"]


def test_raw_infer_validates_and_returns_kserve_shapes(detector: TissueDetector) -> None:
    tensor = np.random.default_rng(0).random((1, 3, 40, 56), dtype=np.float32)
    out = detector.raw_infer({INPUT_NAME: tensor})
    assert out[MASK_OUTPUT].shape == (1, 1, 40, 56)
    assert out[MASK_OUTPUT].dtype == np.uint8
    assert out[FRACTION_OUTPUT].shape == (1,)
    assert out[FRACTION_OUTPUT].dtype == np.float32
    only = detector.raw_infer({INPUT_NAME: tensor}, [FRACTION_OUTPUT])
    assert list(only) == [FRACTION_OUTPUT]
    bad_inputs = [
        {},
        {"other": tensor},
        {INPUT_NAME: tensor, "other": tensor},
        {INPUT_NAME: tensor.astype(np.float64)},
        {INPUT_NAME: tensor[0]},
        {INPUT_NAME: np.zeros((1, 4, 8, 8), np.float32)},
        {INPUT_NAME: np.zeros((2, 3, 8, 8), np.float32)},
        {INPUT_NAME: np.zeros((1, 3, 0, 8), np.float32)},
    ]
    for inputs in bad_inputs:
        with pytest.raises(InferenceInputError):
            detector.raw_infer(inputs)
    with pytest.raises(InferenceInputError):
        detector.raw_infer({INPUT_NAME: tensor}, ["nope"])
    with pytest.raises(InferenceInputError):
        detector.infer(np.zeros((10, 10), np.uint8))
    with pytest.raises(ModelLoadError):
        TissueDetector(b"not an onnx model")


def test_mask_png(detector: TissueDetector) -> None:
    image, _ = synthetic_slide()
    result = detector.infer(image)
    png = Image.open(io.BytesIO(mask_png(result.mask)))
    assert png.format == "PNG"
    assert png.mode == "L"
    assert png.size == (image.shape[1], image.shape[0])
    decoded = np.asarray(png)
    assert set(np.unique(decoded)) <= {0, 255}
    assert np.array_equal(decoded > 0, result.mask > 0)
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(mask_png(result.mask[None, None])))), decoded
    )


def test_build_is_deterministic(calibration: list[np.ndarray], tmp_path: Path) -> None:
    first = build_tissue_model(
        tmp_path / "a", calibration, created=datetime(2026, 1, 1, tzinfo=UTC)
    )
    second = build_tissue_model(tmp_path / "b", list(calibration))
    assert first.sha256 == second.sha256
    assert first.onnx_path.read_bytes() == second.onnx_path.read_bytes()
    assert first.params == second.params
    third = build_tissue_model(tmp_path / "c", calibration, version="2")
    assert third.sha256 != first.sha256


def test_brightfield_filter_rejects_fluorescence_and_patterns() -> None:
    dapi = read_low_res_rgb(slide_path("hamamatsu/test3-DAPI-2-(387).ndpi"), 512)
    boxes = read_low_res_rgb(slide_path("generic-tiff/boxes.tiff"), 512)
    cmu = read_low_res_rgb(slide_path("aperio/CMU-1-Small-Region.svs"), 512)
    assert brightfield_check(dapi) is not None
    assert brightfield_check(boxes) is not None
    assert brightfield_check(cmu) is None
    images = calibration_images_from(
        [
            slide_path("hamamatsu/test3-DAPI-2-(387).ndpi"),
            slide_path("broken/unopenable.tiff"),
            slide_path("aperio/CMU-1-Small-Region.svs"),
            slide_path("aperio/CMU-1-Small-Region.svs"),
        ],
        max_side=256,
    )
    assert len(images) == 1  # fluorescence rejected, unopenable skipped, duplicate dropped


def test_otsu_and_fit_on_synthetic_features() -> None:
    rng = np.random.default_rng(1)
    low = rng.normal(0.1, 0.02, 5000)
    high = rng.normal(0.6, 0.05, 3000)
    threshold, between = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < threshold < high.min()
    assert threshold == pytest.approx((low.max() + high.min()) / 2, abs=0.01)
    assert between > 0
    features = np.concatenate(
        [rng.normal([0.02, 0.05], 0.01, (5000, 2)), rng.normal([0.3, 0.4], 0.05, (3000, 2))]
    )
    fit = fit_linear_otsu(features)
    assert fit.converged
    assert fit.tissue_share == pytest.approx(3000 / 8000, abs=0.01)
    with pytest.raises(CalibrationError):
        otsu_threshold(np.zeros(100))
    with pytest.raises(CalibrationError):
        fit_linear_otsu(np.zeros((100, 2)))


def test_cli_builds_the_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert (
        main(
            [
                "--out",
                str(out),
                "--slides",
                str(slide_path(CALIBRATION[0]).parents[1]),
                "--max-side",
                "512",
            ]
        )
        == 0
    )
    card = json.loads((out / "model.json").read_text())
    assert card["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert card["calibration"]["images"] >= 3
    summary = json.loads(capsys.readouterr().out)
    assert summary["sha256"] == card["sha256"]
