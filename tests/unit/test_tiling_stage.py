"""The tiling stage end to end over in-memory adapters: lossless pyramid of an SVS with a
corrupt tile (placeholder + failed positions in the catalogue event), DICOM series stored next
to the pyramid and announced, the switches."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
import tifffile
from PIL import Image

from services.shared.access import StaticAccessChecker
from services.shared.adapters.memory import (
    InMemoryBus,
    InMemoryDocumentStore,
    InMemoryObjectStore,
)
from services.shared.events import ALL_TOPICS, TOPIC_SLIDE_TILED, EventEmitter, new_envelope
from services.shared.outbox import Outbox
from services.tiling.core import TilingStage
from services.tiling.engine import DziGeometry
from tessera.access.v1.access_pb2 import Action
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"
CMU = SLIDES / "aperio" / "CMU-1-Small-Region.svs"


def _corrupt_svs(tmp_path: Path) -> bytes:
    if not CMU.is_file():
        pytest.fail(f"sample slide missing: {CMU}")
    path = tmp_path / "corrupt.svs"
    shutil.copyfile(CMU, path)
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        across = -(-page.imagewidth // page.tilewidth)
        offset = page.dataoffsets[5 * across + 4]
    with path.open("r+b") as handle:
        handle.seek(offset + 200)
        handle.write(b"\xff\xd9" * 50)
    return path.read_bytes()


async def _stage(tmp_path: Path, data: bytes, **options: object):
    docs = InMemoryDocumentStore()
    bus = InMemoryBus()
    await bus.ensure_topics(list(ALL_TOPICS))
    publisher = bus.publisher()
    await publisher.start()
    objects = InMemoryObjectStore()
    checker = StaticAccessChecker({("alice", "ds-1"): {Action.ACTION_READ_PIXELS}}, {"ds-1"})
    stage = TilingStage(
        objects=objects,
        pyramids=docs.collection("pyramids"),
        outbox=Outbox(docs.collection("tiling_outbox"), EventEmitter("tiling", publisher)),
        access=checker,
        tiles_bucket="tiles",
        work_dir=tmp_path / "work",
        **options,  # type: ignore[arg-type]
    )
    await stage.ensure_ready()
    await objects.ensure_bucket("deid")
    await objects.put_bytes("deid", "slides/s-1.svs", data)
    env = new_envelope(
        payload_field="slide_deidentified",
        payload=events_pb2.SlideDeidentified(
            bucket="deid",
            key="slides/s-1.svs",
            size_bytes=len(data),
            geometry=common_pb2.SlideGeometry(width=2220, height=2967, mpp_x=0.499, mpp_y=0.499),
        ),
        slide_id="s-1",
        dataset_id="ds-1",
    )
    await stage.handle_deidentified(env)
    tiled = [events_pb2.EventEnvelope.FromString(m.value) for m in bus.messages(TOPIC_SLIDE_TILED)]
    return stage, objects, docs, tiled


async def test_corrupt_tile_is_a_placeholder_listed_in_the_event_and_record(
    tmp_path: Path,
) -> None:
    _, objects, docs, tiled = await _stage(tmp_path, _corrupt_svs(tmp_path))
    assert len(tiled) == 1
    pyramid = tiled[0].slide_tiled.pyramid
    assert (pyramid.tile_size, pyramid.overlap) == (240, 0)  # the source's tiles, copied
    g = DziGeometry(2220, 2967, 240, 0)
    top = g.max_level
    assert f"{top}/4_5" in pyramid.failed_tiles
    assert f"{top - 1}/2_2" in pyramid.failed_tiles
    assert f"{top}/0_0" not in pyramid.failed_tiles
    assert pyramid.tile_count == g.tile_count
    doc = await docs.collection("pyramids").get("s-1")
    assert doc is not None and doc["state"] == "TILED"
    assert doc["failed_tiles"] == list(pyramid.failed_tiles)
    keys = await objects.list_keys("tiles", "slides/s-1/dzi/slide_files/")
    assert len(keys) == g.tile_count
    data = await objects.get_bytes("tiles", f"slides/s-1/dzi/slide_files/{top}/4_5.jpeg")
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert (np.abs(grey - 224) <= 2).all()
    # the DICOM series is stored next to the pyramid and announced
    assert pyramid.dicom_series_prefix == "slides/s-1/dicom/"
    assert doc["dicom_series_prefix"] == pyramid.dicom_series_prefix
    dicom_keys = await objects.list_keys("tiles", pyramid.dicom_series_prefix)
    assert dicom_keys == ["slides/s-1/dicom/level-0.dcm"]
    out = tmp_path / "dicom"
    out.mkdir()
    target = out / "level-0.dcm"
    target.write_bytes(await objects.get_bytes("tiles", dicom_keys[0]))
    ds = pydicom.dcmread(target, stop_before_pixels=True)
    assert (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == (2220, 2967)
    assert ds.ContainerIdentifier == "s-1"
    with openslide.OpenSlide(str(target)) as dcm, openslide.OpenSlide(str(CMU)) as src:
        assert dcm.dimensions == src.dimensions
        a = np.asarray(dcm.read_region((0, 0), 0, (240, 240)).convert("RGB"))
        b = np.asarray(src.read_region((0, 0), 0, (240, 240)).convert("RGB"))
        assert np.array_equal(a, b)


async def test_switches_keep_the_configured_geometry_and_skip_the_archive(
    tmp_path: Path,
) -> None:
    if not CMU.is_file():
        pytest.fail(f"sample slide missing: {CMU}")
    _, objects, _, tiled = await _stage(
        tmp_path, CMU.read_bytes(), lossless_copy=False, dicom_export=False
    )
    pyramid = tiled[0].slide_tiled.pyramid
    assert (pyramid.tile_size, pyramid.overlap) == (254, 1)
    assert list(pyramid.failed_tiles) == []
    assert pyramid.dicom_series_prefix == ""
    assert await objects.list_keys("tiles", "slides/s-1/dicom/") == []
