"""Multi-file slides end to end on the real stack: `tessera upload` bundles the real boxes
DICOM series (a directory of 2 instances) and a generated MRXS slide (the .mrxs file, its
folder taken along); both go through ingestion, de-identification, tiling and the catalogue
to READY; the stored de-identified bundle holds no identifying value and opens in OpenSlide."""

from __future__ import annotations

import asyncio
import io
import json
import os
import uuid
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import openslide
import pytest

from services.cli import main as cli
from services.cli.client import TesseraClient
from tessera.common.v1 import common_pb2
from tessera.tiling.v1 import tiling_pb2
from tests.fixtures import wsigen

from .conftest import SLIDES, token

pytestmark = pytest.mark.e2e
BOXES = SLIDES / "dicom" / "boxes"
BOXES_IDENTIFYING = [b"CPAPERIOCS", b"PixelMed", b"Bangor, PA", b"20091229", b"Filename=CMU-1"]
CASE = "E2E-CASE-BUNDLE-7790"


def _upload(path: Path, dataset: str, admin: str) -> dict[str, object]:
    """`tessera upload PATH --wait --json`, in process (the CLI builds the bundle)."""
    args = ["upload", str(path), "--dataset", dataset, "--stain", "H&E", "--case-id", CASE]
    buf = io.StringIO()
    old = os.environ.get("TESSERA_TOKEN")
    os.environ["TESSERA_TOKEN"] = admin
    try:
        with redirect_stdout(buf):
            code = cli.main([*args, "--wait", "--timeout", "300", "--json"])
    finally:
        if old is None:
            os.environ.pop("TESSERA_TOKEN", None)
        else:
            os.environ["TESSERA_TOKEN"] = old
    out: dict[str, object] = json.loads(buf.getvalue())
    assert code == 0, out
    return out


async def _fetch_and_open(admin: str, slide_id: str, tmp: Path) -> tuple[bytes, Path]:
    out = tmp / "deidentified.zip"
    async with TesseraClient(admin) as c:
        await c.fetch(slide_id, out)
        d = await c.tiling.GetDeepZoomDescriptor(
            tiling_pb2.GetDeepZoomDescriptorRequest(slide_id=slide_id)
        )
        assert d.descriptor_xml or d.http_url
        t = await c.tiling.GetTile(
            tiling_pb2.GetTileRequest(slide_id=slide_id, level=0, col=0, row=0)
        )
        assert t.data
    with zipfile.ZipFile(out) as zf:
        zf.extractall(tmp / "x")
    return out.read_bytes(), tmp / "x"


@pytest.fixture(scope="module")
def dataset() -> tuple[str, str]:
    admin = token("e2e-bundles", ("admin",))
    name = f"e2e-bundles-{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        async with TesseraClient(admin) as c:
            await c.create_dataset(name, "e2e bundles", "multi-file slides")

    asyncio.run(create())
    return name, admin


def test_boxes_dicom_series_reaches_ready(dataset: tuple[str, str], tmp_path: Path) -> None:
    name, admin = dataset
    res = _upload(BOXES, name, admin)
    slide = res["slide"]
    assert isinstance(slide, dict)
    assert slide["status"] == "SLIDE_STATUS_READY"
    assert slide["format"] == "SLIDE_FORMAT_DICOM_WSI"
    data, root = asyncio.run(_fetch_and_open(admin, str(res["slide_id"]), tmp_path))
    for value in [*BOXES_IDENTIFYING, CASE.encode()]:
        assert value not in data, value
    names = sorted(p.name for p in root.iterdir())
    assert names == ["instance-0000.dcm", "instance-0001.dcm"]
    s = openslide.OpenSlide(str(root / names[0]))
    try:
        assert s.level_dimensions == ((16, 16),)
        assert set(s.associated_images) == {"thumbnail"}
    finally:
        s.close()


def test_generated_mrxs_reaches_ready(dataset: tuple[str, str], tmp_path: Path) -> None:
    name, admin = dataset
    fx = wsigen.mrxs_slide(tmp_path / "in", np.random.default_rng(77))
    assert fx.source is not None
    res = _upload(fx.source, name, admin)
    slide = res["slide"]
    assert isinstance(slide, dict)
    assert slide["status"] == "SLIDE_STATUS_READY", slide
    assert slide["format"] == common_pb2.SlideFormat.Name(common_pb2.SLIDE_FORMAT_MRXS)
    geometry = slide["geometry"]
    assert isinstance(geometry, dict)
    assert (geometry["width"], geometry["height"]) == (1024, 1024)
    data, root = asyncio.run(_fetch_and_open(admin, str(res["slide_id"]), tmp_path))
    leaks = [w for w, v in fx.planted.items() if v in data]
    assert leaks == []
    for kind, blob in fx.associated.items():
        assert blob[200:4000] not in data, kind
    s = openslide.OpenSlide(str(root / "slide.mrxs"))
    try:
        assert s.properties["openslide.vendor"] == "mirax"
        assert dict(s.associated_images) == {}
        got = np.asarray(s.read_region((0, 0), 0, (1024, 1024)).convert("RGB"))
        assert fx.level0 is not None and np.array_equal(got, fx.level0)
    finally:
        s.close()
