"""DICOM WSI archive export: read back by OpenSlide and by wsidicom, frames copied losslessly
from JPEG sources, re-encoded (JPEG / JPEG 2000 lossless) otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.encaps import generate_frames
from wsidicom import WsiDicom

from services.tiling.engine import export_dicom
from services.tiling.engine.dicom_export import JPEG2000_LOSSLESS, JPEG_BASELINE

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"
CMU = SLIDES / "aperio" / "CMU-1-Small-Region.svs"
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"sample slide missing: {path}")
    return path


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _write_two_level_svs(path: Path, width: int, height: int) -> None:
    with tifffile.TiffFile(_need(CMU)) as tf:
        page = tf.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        fh = tf.filehandle
        raw = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(off)
            raw.append(fh.read(cnt))
        tables = page.jpegtables
    rng = np.random.default_rng(9)
    header = "Aperio Image Library v12.0.5 \r\n"
    with tifffile.TiffWriter(path) as tw:
        for ds in (1, 4):
            w, h = width // ds, height // ds
            picks = rng.integers(0, len(raw), size=-(-w // 240) * -(-h // 240)).tolist()
            tw.write(
                (raw[i] for i in picks),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(240, 240),
                compression="jpeg",
                photometric="rgb",
                subsampling=(1, 1),
                compressionargs={"outcolorspace": "RGB"},
                jpegtables=tables,
                description=f"{header}{width}x{height} (240x240) -> {w}x{h} JPEG/RGB|MPP = 0.5",
                metadata=None,
            )


@pytest.fixture(scope="module")
def cmu_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dicom-cmu")
    series = export_dicom(_need(CMU), out, "slide-0001")
    assert series.lossless
    assert [lv.transfer_syntax for lv in series.levels] == [JPEG_BASELINE]
    return out


def test_openslide_reads_the_series_with_the_source_dimensions(cmu_series: Path) -> None:
    with openslide.OpenSlide(str(cmu_series / "level-0.dcm")) as dcm:
        assert dcm.properties["openslide.vendor"] == "dicom"
        with openslide.OpenSlide(str(CMU)) as src:
            assert dcm.level_dimensions == src.level_dimensions
            for loc in [(0, 0), (960, 1200), (2000, 2700)]:
                a = dcm.read_region(loc, 0, (220, 267))
                b = src.read_region(loc, 0, (220, 267))
                assert np.array_equal(_rgb(a), _rgb(b))


def test_wsidicom_reads_the_series_and_level0_frames_are_the_source_pixels(
    cmu_series: Path,
) -> None:
    with WsiDicom.open(cmu_series) as wsi, openslide.OpenSlide(str(CMU)) as src:
        assert [(lv.size.width, lv.size.height) for lv in wsi.levels] == [(2220, 2967)]
        for col, row in [(0, 0), (4, 5), (8, 11)]:
            tile = _rgb(wsi.read_tile(0, (col, row)))
            h, w = tile.shape[:2]
            expected = _rgb(src.read_region((col * 240, row * 240), 0, (w, h)))
            assert np.array_equal(tile, expected)


def test_frames_are_the_source_tiles_with_tables_spliced(cmu_series: Path) -> None:
    ds = pydicom.dcmread(cmu_series / "level-0.dcm")
    assert ds.file_meta.TransferSyntaxUID == JPEG_BASELINE
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.6"
    assert ds.DimensionOrganizationType == "TILED_FULL"
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.PatientName == "" and ds.PatientID == ""
    with tifffile.TiffFile(CMU) as tf:
        page = tf.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        fh = tf.filehandle
        raw = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(off)
            raw.append(fh.read(cnt))
        tables = page.jpegtables
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert len(frames) == len(raw) == int(ds.NumberOfFrames)
    for frame, tile in zip(frames, raw, strict=True):
        expected = b"\xff\xd8" + ADOBE_RGB + tables[2:-2] + tile[2:]
        assert frame.rstrip(b"\x00") == expected.rstrip(b"\x00")


def test_every_level_of_a_pyramid_is_one_instance_of_one_series(tmp_path: Path) -> None:
    path = tmp_path / "two-level.svs"
    _write_two_level_svs(path, 2400, 1930)
    out = tmp_path / "dicom"
    series = export_dicom(path, out, "slide-0002")
    assert [(lv.width, lv.height) for lv in series.levels] == [(2400, 1930), (600, 482)]
    datasets = [pydicom.dcmread(lv.path, stop_before_pixels=True) for lv in series.levels]
    assert len({d.SeriesInstanceUID for d in datasets}) == 1
    assert len({d.SOPInstanceUID for d in datasets}) == 2
    assert datasets[0].ImageType[2] == datasets[1].ImageType[2] == "VOLUME"
    spacing0 = [float(v) for v in datasets[0].SharedFunctionalGroupsSequence[0]
                .PixelMeasuresSequence[0].PixelSpacing]  # fmt: skip
    assert spacing0 == pytest.approx([0.0005, 0.0005])
    with WsiDicom.open(out) as wsi:
        assert [(lv.size.width, lv.size.height) for lv in wsi.levels] == [(2400, 1930), (600, 482)]
    with openslide.OpenSlide(str(out / "level-1.dcm")) as dcm:
        assert dcm.level_dimensions == ((2400, 1930), (600, 482))
        with openslide.OpenSlide(str(path)) as src:
            a = dcm.read_region((480, 480), 1, (240, 240))
            b = src.read_region((480, 480), 1, (240, 240))
            assert np.array_equal(_rgb(a), _rgb(b))
    # same slide id, same UIDs: a re-run replaces the series instead of adding one
    again = export_dicom(path, tmp_path / "again", "slide-0002")
    assert again.series_uid == series.series_uid


def test_non_jpeg_source_is_reencoded_jpeg2000_lossless(tmp_path: Path) -> None:
    src_path = _need(SLIDES / "generic-tiff" / "boxes.tiff")
    series = export_dicom(src_path, tmp_path, "slide-0003", codec="jpeg2000")
    assert series.lossless
    assert {lv.transfer_syntax for lv in series.levels} == {JPEG2000_LOSSLESS}
    with openslide.OpenSlide(str(src_path)) as src:
        with openslide.OpenSlide(str(series.levels[0].path)) as dcm:
            assert dcm.level_dimensions[0] == src.level_dimensions[0]
            w, h = src.level_dimensions[0]
            assert np.array_equal(
                _rgb(dcm.read_region((0, 0), 0, (w, h))), _rgb(src.read_region((0, 0), 0, (w, h)))
            )
        with WsiDicom.open(tmp_path) as wsi:
            tile = _rgb(wsi.read_tile(0, (0, 0)))
            h, w = tile.shape[:2]
            assert np.array_equal(tile, _rgb(src.read_region((0, 0), 0, (w, h))))


def test_ndpi_is_reencoded_as_jpeg_readable_by_both(tmp_path: Path) -> None:
    src_path = _need(SLIDES / "hamamatsu" / "test3-DAPI-2-(387).ndpi")
    series = export_dicom(src_path, tmp_path, "slide-0004", codec="jpeg")
    assert not series.lossless
    with openslide.OpenSlide(str(src_path)) as src:
        with openslide.OpenSlide(str(series.levels[0].path)) as dcm:
            assert dcm.level_dimensions[0] == src.level_dimensions[0]
            a = _rgb(dcm.read_region((512, 512), 0, (256, 256))).astype(int)
            b = _rgb(src.read_region((512, 512), 0, (256, 256))).astype(int)
            assert np.abs(a - b).mean() < 3  # JPEG quality 95
        with WsiDicom.open(tmp_path) as wsi:
            assert (wsi.levels[0].size.width, wsi.levels[0].size.height) == src.dimensions
