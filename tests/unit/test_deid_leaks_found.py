"""Regression tests for identifying values that once survived de-identification (found with
the planted-value fixtures): JPEG comment segments inside tiles, a tiled label that looked like
a pyramid level, DICOM free text in kept attributes. Each builds one slide with one planted
value in one place and accepts either a clean rejection (fail closed) or an output without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.deid.engine import DeidRejected, deidentify, verify
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi.sniff import InvalidSlide
from services.shared.wsi.tiff import TiffError
from tests.fixtures import wsigen

P = Pseudonymizer(b"leak-test-key-0123456789abcdef-xyz", "siteL")


def assert_value_gone(fx: wsigen.Fixture, value: bytes, tmp_path: Path) -> None:
    assert value in fx.path.read_bytes(), "fixture does not carry the value"
    out = tmp_path / ("out-" + fx.path.name)
    try:
        report = deidentify(fx.path, out, fx.fmt, P)
        verify(out, fx.fmt, report.identifying_values)
    except (DeidRejected, InvalidSlide, TiffError):
        return  # failing closed is an acceptable fix
    at = out.read_bytes().find(value)
    assert at < 0, f"the planted value survived de-identification (output offset {at})"


def rng() -> np.random.Generator:
    return np.random.default_rng(4242)


# --- bytes inside kept tiles ---------------------------------------------------------------------
def test_svs_jpeg_comment_segment_in_tiles_is_copied(tmp_path: Path) -> None:
    """Tiles are copied byte for byte, including JPEG COM (and APPn) segments, which can
    carry text (e.g. a barcode). Stripping COM/APPn from a tile is lossless for the pixels."""
    fx = wsigen.aperio_svs(
        tmp_path, rng(), name="leak_tile_com", tile_comment=b"barcode PLANT-c0ffee12"
    )
    assert_value_gone(fx, b"PLANT-c0ffee12", tmp_path)


# --- generic TIFF: associated images that look like levels ---------------------------------------
def test_generic_tiff_tiled_label_with_level_aspect_is_kept(tmp_path: Path) -> None:
    """generic_tiff.select_ifds keeps every tiled IFD whose aspect ratio matches level 0, so a
    tiled label (here 256x192 next to a 1024x768 level 0; the patient name is rendered in its
    pixels) is kept as if it were a pyramid level."""
    fx, _pages = wsigen.generic_tiff(tmp_path, rng(), name="leak_tiled_label", tiled_label=True)
    assert_value_gone(fx, fx.associated["label"], tmp_path)


# --- DICOM: free text in kept attributes ------------------------------------------------
def _opd(ds: Any, pl: wsigen.Planter) -> None:
    ds.OpticalPathSequence[0].OpticalPathDescription = "PLANT-0b71ca1e"


def _code_meaning(ds: Any, pl: wsigen.Planter) -> None:
    seq = ds.SpecimenDescriptionSequence[0].PrimaryAnatomicStructureSequence
    seq[0].CodeMeaning = "Lung of PLANT-c0de0001"


def _dim_label(ds: Any, pl: wsigen.Planter) -> None:
    ds.DimensionDescriptionLabel = "PLANT-d1ab3100"


def _image_type(ds: Any, pl: wsigen.Planter) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "PLANTXYZ"]


@pytest.mark.parametrize(
    ("edit", "value"),
    [
        pytest.param(_opd, b"PLANT-0b71ca1e", id="OpticalPathDescription"),
        pytest.param(_code_meaning, b"PLANT-c0de0001", id="CodeMeaning"),
        pytest.param(_dim_label, b"PLANT-d1ab3100", id="DimensionDescriptionLabel"),
        pytest.param(_image_type, b"PLANTXYZ", id="ImageType-value-4"),
    ],
)
def test_dicom_kept_free_text(
    edit: Callable[[Any, wsigen.Planter], None], value: bytes, tmp_path: Path
) -> None:
    """dicom_rules._KEEP keeps these attributes verbatim; they are free text (LO/ST/CS)."""
    fx = wsigen.dicom_wsm(tmp_path, rng(), name="leak_dicom", edit=edit)
    assert_value_gone(fx, value, tmp_path)
