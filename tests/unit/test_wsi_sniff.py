"""Format sniffing and cheap structural inspection of uploads."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pydicom
import pytest

from services.shared.wsi import tiff
from services.shared.wsi.sniff import (
    InvalidSlide,
    SlideFormat,
    SlideLimits,
    inspect_slide,
    jpeg_header_info,
    sniff,
    sniff_file,
)

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"


@pytest.fixture(scope="module", autouse=True)
def _slides_present() -> None:
    if not SLIDES.is_dir():
        pytest.fail(f"sample slides missing: {SLIDES}")


def slide(name: str) -> Path:
    p = SLIDES / name
    if not p.is_file():
        pytest.fail(f"sample slide missing: {p}")
    return p


CAMELYON_J2K = "dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm"
EXPECTED_FORMATS = {
    "aperio/CMU-1-Small-Region.svs": SlideFormat.APERIO_SVS,
    "aperio/small.svs": SlideFormat.APERIO_SVS,
    "aperio/tcga-cr-7395-01a-01-ts1.svs": SlideFormat.APERIO_SVS,
    "broken/unreadable.svs": SlideFormat.APERIO_SVS,
    "broken/unopenable.tiff": SlideFormat.GENERIC_TIFF,
    "hamamatsu/test3-DAPI-2-(387).ndpi": SlideFormat.HAMAMATSU_NDPI,
    "hamamatsu/test3-TRITC 2 (560).ndpi": SlideFormat.HAMAMATSU_NDPI,
    "generic-tiff/boxes.tiff": SlideFormat.GENERIC_TIFF,
    "generic-tiff/yb10kx5k.zstd.tiff": SlideFormat.GENERIC_TIFF,
    "ome-tiff/4D-series.ome.tiff": SlideFormat.OME_TIFF,
    "perkinelmer-qptiff/small_vectra.qptiff": SlideFormat.QPTIFF,
    "olympus-vsi/vsi-ets-test-jpg2k.vsi": SlideFormat.OLYMPUS_VSI,
    "olympus-vsi/_vsi-ets-test-jpg2k_/stack1/frame_t_0.ets": SlideFormat.UNKNOWN,
    CAMELYON_J2K: SlideFormat.DICOM_WSI,
    "dicom/camelyon-jpeg/multi_frame_jpeg_camelyon_challenge_image.dcm": SlideFormat.DICOM_WSI,
    "dicom/highdicom-sm/sm_image.dcm": SlideFormat.DICOM_WSI,
    "dicom/label-barcode/test_wsi2.dcm": SlideFormat.DICOM_WSI,
    "dicom/BPAEC/5_0": SlideFormat.DICOM_WSI,
    "dicom/BPAEC/readme.txt": SlideFormat.UNKNOWN,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FORMATS))
def test_sniff_file(name: str) -> None:
    assert sniff_file(slide(name)) is EXPECTED_FORMATS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_FORMATS))
def test_sniff_head(name: str) -> None:
    path = slide(name)
    head = path.read_bytes()[: 64 << 10]
    got = sniff(head, path.name)
    if name.startswith("ome-tiff"):
        # the big-endian OME-XML lives beyond the first 64 KiB: only a generic TIFF is visible
        assert got in (SlideFormat.OME_TIFF, SlideFormat.GENERIC_TIFF)
    else:
        assert got is EXPECTED_FORMATS[name]


def test_sniff_ndpi_head_without_extension_is_not_misread() -> None:
    # the first NDPI IFD sits at the end of the file; without the .ndpi hint the head alone
    # can only say "some TIFF" - sniff_file, with random access, finds the NDPI tag
    path = slide("hamamatsu/test3-DAPI-2-(387).ndpi")
    assert sniff(path.read_bytes()[:4096], "upload.bin") is SlideFormat.GENERIC_TIFF
    assert sniff_file(path) is SlideFormat.HAMAMATSU_NDPI


def test_sniff_non_slides() -> None:
    assert sniff(b"", "") is SlideFormat.UNKNOWN
    assert sniff(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "x.png") is SlideFormat.UNKNOWN
    assert sniff(b"\xff\xd8\xff\xe0" + b"\x00" * 100, "x.jpg") is SlideFormat.UNKNOWN
    assert sniff(b"ZISRAWFILE" + b"\x00" * 100, "x.czi") is SlideFormat.ZEISS_CZI
    assert sniff(b"anything", "slide.mrxs") is SlideFormat.MIRAX


def test_sniff_dicom_other_sop_class(tmp_path: Path) -> None:
    ds = pydicom.dcmread(slide("dicom/highdicom-sm/sm_image.dcm"))
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    out = tmp_path / "ct.dcm"
    ds.save_as(out)
    assert sniff_file(out) is SlideFormat.DICOM_OTHER
    assert sniff(out.read_bytes(), "ct.dcm") is SlideFormat.DICOM_OTHER
    with pytest.raises(InvalidSlide) as e:
        inspect_slide(out)
    assert e.value.reason == "UNSUPPORTED_FORMAT"


# --- inspection of good slides ---------------------------------------------------------------
def test_inspect_aperio() -> None:
    info = inspect_slide(slide("aperio/CMU-1-Small-Region.svs"), SlideFormat.APERIO_SVS)
    assert (info.width, info.height) == (2220, 2967)
    assert info.level_count == 1
    assert (info.tile_width, info.tile_height) == (240, 240)
    assert info.compression == "jpeg"
    assert info.mpp_x == pytest.approx(0.499) and info.mpp_y == pytest.approx(0.499)
    assert info.objective_power == 20.0


def test_inspect_aperio_jp2k_two_levels() -> None:
    info = inspect_slide(slide("aperio/tcga-cr-7395-01a-01-ts1.svs"))
    assert info.level_dimensions == ((4443, 3567), (2221, 1783))
    assert info.compression == "aperio_jp2k_rgb"


def test_inspect_ndpi() -> None:
    info = inspect_slide(slide("hamamatsu/test3-DAPI-2-(387).ndpi"))
    assert info.format is SlideFormat.HAMAMATSU_NDPI
    assert info.level_dimensions == ((3968, 4864), (1984, 2432), (992, 1216), (496, 608))
    assert (info.tile_width, info.tile_height) == (3968, 8)  # one restart interval per MCU row
    assert info.objective_power == 40.0
    assert info.mpp_x == pytest.approx(10000 / 43826)


def test_inspect_generic() -> None:
    info = inspect_slide(slide("generic-tiff/yb10kx5k.zstd.tiff"))
    assert info.level_dimensions[0] == (10000, 5000) and info.level_count == 5
    assert info.compression == "zstd" and info.tile_width == 1024
    boxes = inspect_slide(slide("generic-tiff/boxes.tiff"))
    assert boxes.level_count == 4 and boxes.compression == "deflate"


def test_inspect_dicom() -> None:
    info = inspect_slide(
        slide("dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm")
    )
    assert (info.width, info.height) == (1696, 812)
    assert (info.tile_width, info.tile_height) == (256, 256)
    assert info.compression == "jpeg2000_lossless"
    assert info.mpp_x == pytest.approx(28.969) and info.mpp_y == pytest.approx(28.968)
    native = inspect_slide(slide("dicom/highdicom-sm/sm_image.dcm"))
    assert native.compression == "explicit_vr_little_endian" and native.width == 50


# --- rejections ----------------------------------------------------------------------------
def reason(path: Path, fmt: SlideFormat | None = None, limits: SlideLimits | None = None) -> str:
    with pytest.raises(InvalidSlide) as e:
        inspect_slide(path, fmt, limits)
    return e.value.reason


def test_unsupported_compression() -> None:
    path = slide("broken/unopenable.tiff")
    with pytest.raises(InvalidSlide) as e:
        inspect_slide(path)
    assert e.value.reason == "UNSUPPORTED_COMPRESSION"
    assert "52479" in e.value.message  # our vocabulary (a compression code), not file content


def test_not_a_slide_and_unsupported_formats(tmp_path: Path) -> None:
    txt = tmp_path / "notes.svs"
    txt.write_text("this is not a slide")
    assert reason(txt) == "NOT_A_SLIDE"
    # OME-TIFF and QPTIFF are de-identified by the engine now (ingestion still gates them)
    assert inspect_slide(slide("perkinelmer-qptiff/small_vectra.qptiff")).width == 1920
    assert inspect_slide(slide("ome-tiff/4D-series.ome.tiff")).level_count == 1
    assert reason(slide("olympus-vsi/vsi-ets-test-jpg2k.vsi")) == "UNSUPPORTED_FORMAT"


def test_format_mismatch() -> None:
    assert reason(slide("aperio/small.svs"), SlideFormat.DICOM_WSI) == "FORMAT_MISMATCH"


def test_truncated_tiff(tmp_path: Path) -> None:
    data = slide("aperio/CMU-1-Small-Region.svs").read_bytes()
    # cut inside the tile data of level 0 but after the first IFD (which is at the start)
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[:600_000])
    assert reason(cut) == "TRUNCATED_FILE"


def test_truncated_ndpi(tmp_path: Path) -> None:
    data = slide("hamamatsu/test3-DAPI-2-(387).ndpi").read_bytes()
    cut = tmp_path / "cut.ndpi"
    cut.write_bytes(data[: len(data) - 100])
    assert reason(cut) in ("TRUNCATED_FILE", "MALFORMED_FILE")


def test_truncated_dicom(tmp_path: Path) -> None:
    data = slide("dicom/camelyon-jpeg/multi_frame_jpeg_camelyon_challenge_image.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 5000])
    assert reason(cut) == "TRUNCATED_FILE"


def _tiled_tiff(width: int, height: int, tile: int = 16, compression: int = 1) -> bytes:
    ntiles = -(-width // tile) * -(-height // tile)
    bo = "<"
    entries: list[tuple[int, int, int, bytes]] = [
        (256, tiff.LONG, 1, struct.pack(bo + "I", width)),
        (257, tiff.LONG, 1, struct.pack(bo + "I", height)),
        (259, tiff.SHORT, 1, struct.pack(bo + "H", compression) + b"\x00\x00"),
        (322, tiff.SHORT, 1, struct.pack(bo + "H", tile) + b"\x00\x00"),
        (323, tiff.SHORT, 1, struct.pack(bo + "H", tile) + b"\x00\x00"),
    ]
    body = bytearray(b"II*\x00\x00\x00\x00\x00")
    tile_at = len(body)
    body += b"\x00" * 16
    offsets = struct.pack(f"<{ntiles}I", *([tile_at] * ntiles))
    counts = struct.pack(f"<{ntiles}I", *([16] * ntiles))
    extra: list[tuple[int, int, int, bytes]] = []
    for code, data in ((324, offsets), (325, counts)):
        if len(data) <= 4:
            extra.append((code, tiff.LONG, ntiles, data.ljust(4, b"\x00")))
        else:
            at = len(body)
            body += data
            extra.append((code, tiff.LONG, ntiles, struct.pack("<I", at)))
    all_entries = sorted(entries + extra)
    ifd_at = len(body)
    body += struct.pack("<H", len(all_entries))
    for code, dtype, count, field in all_entries:
        body += struct.pack("<HHI", code, dtype, count) + field
    body += b"\x00\x00\x00\x00"
    struct.pack_into("<I", body, 4, ifd_at)
    return bytes(body)


def test_absurd_dimensions(tmp_path: Path) -> None:
    huge = tmp_path / "huge.tif"
    huge.write_bytes(_tiled_tiff(600_000, 16, tile=4096))
    assert reason(huge) == "ABSURD_DIMENSIONS"
    ok = tmp_path / "ok.tif"
    ok.write_bytes(_tiled_tiff(64, 64))
    assert inspect_slide(ok).width == 64
    # the total-pixel and side limits are configurable
    assert reason(ok, limits=SlideLimits(max_total_pixels=1000)) == "ABSURD_DIMENSIONS"
    assert reason(ok, limits=SlideLimits(max_side=32)) == "ABSURD_DIMENSIONS"
    assert (
        reason(
            slide("aperio/CMU-1-Small-Region.svs"), limits=SlideLimits(max_total_pixels=1_000_000)
        )
        == "ABSURD_DIMENSIONS"
    )


def test_tile_count_mismatch(tmp_path: Path) -> None:
    data = bytearray(_tiled_tiff(64, 64))
    # claim a larger image than the tile arrays cover
    st = tiff.read_tiff(bytes(data))
    ifd = st.ifds[0]
    pos = ifd.offset + 2
    for i in range(len(ifd.tags)):
        code = struct.unpack_from("<H", data, pos + 12 * i)[0]
        if code == 256:
            struct.pack_into("<I", data, pos + 12 * i + 8, 640)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(data))
    assert reason(bad) == "MALFORMED_FILE"


def test_no_pyramid_level(tmp_path: Path) -> None:
    # a stripped (non-tiled) TIFF is not a whole-slide pyramid
    strips = tmp_path / "flat.tif"
    body = bytearray(b"II*\x00\x08\x00\x00\x00")
    entries = [(256, 3, 1, 4), (257, 3, 1, 4), (259, 3, 1, 1), (273, 4, 1, 0), (279, 4, 1, 16)]
    body += struct.pack("<H", len(entries))
    data_at = 8 + 2 + 12 * len(entries) + 4
    for code, dtype, count, val in entries:
        v = data_at if code == 273 else val
        body += struct.pack("<HHI", code, dtype, count) + (
            struct.pack("<HH", v, 0) if dtype == 3 else struct.pack("<I", v)
        )
    body += b"\x00" * 4 + b"\x00" * 16
    strips.write_bytes(bytes(body))
    assert reason(strips) == "NO_PYRAMID_LEVEL"


def test_dicom_associated_and_nonconformant() -> None:
    assert reason(slide("dicom/label-barcode/test_wsi2.dcm")) == "ASSOCIATED_IMAGE_ONLY"
    assert reason(slide("dicom/BPAEC/2")) == "ASSOCIATED_IMAGE_ONLY"
    assert reason(slide("dicom/pathml-nonconformant/small_dicom.dcm")) == "NO_PYRAMID_LEVEL"


def test_hostile_tiff_maps_to_malformed(tmp_path: Path) -> None:
    body = bytearray(_tiled_tiff(64, 64))
    st = tiff.read_tiff(bytes(body))
    ifd_at = st.ifds[0].offset
    n = len(st.ifds[0].tags)
    struct.pack_into("<I", body, ifd_at + 2 + 12 * n, ifd_at)  # next IFD -> itself
    loop = tmp_path / "loop.tif"
    loop.write_bytes(bytes(body))
    assert reason(loop) == "MALFORMED_FILE"


def test_messages_never_contain_file_content(tmp_path: Path) -> None:
    """Errors name reasons, tags and limits - never values from the file or its name."""
    secrets = ["CMU-1", "CPAPERIOCS", "b414003d", "1004486", "JOHN-DOE"]
    cases: list[Path] = []
    data = slide("aperio/CMU-1-Small-Region.svs").read_bytes()
    p = tmp_path / "JOHN-DOE-CMU-1.svs"
    p.write_bytes(data[:600_000])
    cases.append(p)
    q = tmp_path / "JOHN-DOE-2.svs"
    q.write_bytes(data)
    cases.append(q)
    r = tmp_path / "JOHN-DOE-3.tiff"
    shutil.copy(slide("broken/unopenable.tiff"), r)
    cases.append(r)
    for path in cases:
        for limits in (None, SlideLimits(max_total_pixels=10)):
            try:
                inspect_slide(path, None, limits)
            except InvalidSlide as e:
                for s in secrets:
                    assert s not in str(e)
                    assert s not in e.message


def test_jpeg_header_info() -> None:
    st = tiff.read_tiff(slide("hamamatsu/test3-DAPI-2-(387).ndpi"))
    ((off, _cnt),) = st.ifds[0].segments()
    with open(slide("hamamatsu/test3-DAPI-2-(387).ndpi"), "rb") as fh:
        fh.seek(off)
        head = fh.read(4096)
    info = jpeg_header_info(head)
    assert info is not None
    assert (info.width, info.height, info.components) == (3968, 4864, 3)
    assert info.restart_interval > 0
    assert jpeg_header_info(b"not a jpeg") is None
    assert jpeg_header_info(b"\xff\xd8\xff\xc0\x00") is None  # truncated segment
