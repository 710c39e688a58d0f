"""Fitting of the tissue detector's linear decision from calibration images (numpy only).

Per-pixel features, both in 0..1:

* ``saturation = max(R, G, B) - min(R, G, B)`` (stained tissue is coloured, glass is grey),
* ``darkness = 1 - mean(R, G, B)`` (tissue absorbs light, glass is bright).

The decision is ``w_s * saturation + w_d * darkness > threshold``. It is fitted without labels
by alternating two classic steps until the labelling stops changing:

1. Otsu's method on the 1-D projection ``w . f`` picks the threshold that maximises the
   between-class variance (background vs. tissue);
2. Fisher's linear discriminant on the two classes Otsu produced picks the new direction ``w``
   (``w ~ Sw^-1 (mu_tissue - mu_background)``, normalised).

The start direction is the diagonal (equal weights). Every image contributes the same number of
evenly spaced pixels, so a large image does not outweigh a small one. Deterministic: no random
sampling, results rounded to 6 decimals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

HISTOGRAM_BINS: Final = 256
DEFAULT_PIXELS_PER_IMAGE: Final = 250_000
_ROUND: Final = 6


class CalibrationError(ValueError):
    """Calibration data unusable (empty, wrong dtype/shape, or without two classes)."""


@dataclass(frozen=True)
class LinearFit:
    w_saturation: float
    w_darkness: float
    threshold: float
    iterations: int
    converged: bool
    pixels: int
    tissue_share: float
    background_mean: tuple[float, float]
    tissue_mean: tuple[float, float]
    between_class_variance: float
    separability: float  # between-class / total variance of the projection (0..1)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["background_mean"] = list(self.background_mean)
        data["tissue_mean"] = list(self.tissue_mean)
        return data


def check_rgb(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise CalibrationError("images must be uint8 numpy arrays")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise CalibrationError("images must be H x W x 3 RGB")


def pixel_features(image: np.ndarray) -> np.ndarray:
    """(N, 2) float64 array of (saturation, darkness) for every pixel of an RGB uint8 image."""
    check_rgb(image)
    rgb = image.reshape(-1, 3).astype(np.float64) / 255.0
    saturation = rgb.max(axis=1) - rgb.min(axis=1)
    darkness = 1.0 - rgb.mean(axis=1)
    return np.stack([saturation, darkness], axis=1)


def sample_features(
    images: Sequence[np.ndarray], pixels_per_image: int = DEFAULT_PIXELS_PER_IMAGE
) -> np.ndarray:
    """Features of up to ``pixels_per_image`` evenly spaced pixels of each image, stacked."""
    if not images:
        raise CalibrationError("no calibration images")
    if pixels_per_image < 1:
        raise CalibrationError("pixels_per_image must be >= 1")
    parts = []
    for image in images:
        features = pixel_features(image)
        count = min(len(features), pixels_per_image)
        index = np.linspace(0, len(features) - 1, count).round().astype(np.int64)
        parts.append(features[index])
    return np.concatenate(parts, axis=0)


def otsu_threshold(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> tuple[float, float]:
    """Otsu's threshold of a 1-D sample: returns (threshold, between-class variance), with the
    classes ``values <= threshold`` and ``values > threshold``."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        raise CalibrationError("Otsu needs at least two values")
    low, high = float(values.min()), float(values.max())
    if not high > low:
        raise CalibrationError("calibration data has no contrast")
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    prob = counts.astype(np.float64) / counts.sum()
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight0 = np.cumsum(prob)
    weight1 = 1.0 - weight0
    cumulative_mean = np.cumsum(prob * centres)
    total_mean = cumulative_mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight0 - cumulative_mean) ** 2 / (weight0 * weight1)
    between[~np.isfinite(between)] = -1.0
    between[-1] = -1.0  # the last split leaves class 1 empty
    best = int(np.argmax(between))
    peak = float(between[best])
    if peak <= 0:
        raise CalibrationError("calibration data has a single class")
    # Across empty bins the criterion is flat; take the middle of the flat run, not its start.
    last = best
    while last + 1 < len(between) and between[last + 1] >= peak * (1 - 1e-12):
        last += 1
    return float((edges[best + 1] + edges[last + 1]) / 2.0), peak


def _fisher_direction(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    background, tissue = features[~labels], features[labels]
    if len(background) < 2 or len(tissue) < 2:
        raise CalibrationError("calibration data has a single class")
    scatter = np.cov(background.T, bias=True) * len(background)
    scatter += np.cov(tissue.T, bias=True) * len(tissue)
    scatter /= len(features)
    scatter += np.eye(2) * 1e-9
    direction = np.linalg.solve(scatter, tissue.mean(axis=0) - background.mean(axis=0))
    norm = float(np.linalg.norm(direction))
    if not np.isfinite(norm) or norm == 0.0:
        raise CalibrationError("degenerate calibration data")
    return np.asarray(direction / norm, dtype=np.float64)


def fit_linear_otsu(features: np.ndarray, max_iterations: int = 50) -> LinearFit:
    """Alternate Otsu (threshold) and Fisher LDA (direction) on (N, 2) features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != 2 or len(features) < 16:
        raise CalibrationError("need an (N>=16, 2) feature array")
    direction = np.array([1.0, 1.0]) / np.sqrt(2.0)
    projection = features @ direction
    threshold, between = otsu_threshold(projection)
    labels = projection > threshold
    converged = False
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 - used after the loop
        direction = _fisher_direction(features, labels)
        projection = features @ direction
        threshold, between = otsu_threshold(projection)
        new_labels = projection > threshold
        changed = int(np.count_nonzero(new_labels != labels))
        labels = new_labels
        if changed == 0:
            converged = True
            break
    if not labels.any() or labels.all():
        raise CalibrationError("calibration data has a single class")
    total_variance = float(projection.var())
    return LinearFit(
        w_saturation=round(float(direction[0]), _ROUND),
        w_darkness=round(float(direction[1]), _ROUND),
        threshold=round(threshold, _ROUND),
        iterations=iterations,
        converged=converged,
        pixels=len(features),
        tissue_share=round(float(labels.mean()), _ROUND),
        background_mean=_rounded_pair(features[~labels].mean(axis=0)),
        tissue_mean=_rounded_pair(features[labels].mean(axis=0)),
        between_class_variance=round(between, _ROUND + 2),
        separability=round(between / total_variance, _ROUND) if total_variance > 0 else 0.0,
    )


def _rounded_pair(values: np.ndarray) -> tuple[float, float]:
    return round(float(values[0]), _ROUND), round(float(values[1]), _ROUND)
