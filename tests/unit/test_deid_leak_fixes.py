"""Regression tests for the fixes of the leaks in test_deid_leaks_found.py: the chosen fix of
each leak (strip / drop / reject) and that real pyramids and pixels are unaffected."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from services.deid.engine import DeidRejected, deidentify, deidentify_and_verify, verify
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import codestream
from services.shared.wsi.sniff import SlideFormat, generic_pyramid
from services.shared.wsi.tiff import read_tiff
from tests.fixtures import wsigen

P = Pseudonymizer(b"leak-fix-key-0123456789abcdef-xyz", "siteF")
SLIDES = Path("/work/shared/slides")


def rng() -> np.random.Generator:
    return np.random.default_rng(777)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


# --- JPEG COM / APPn inside tiles ----------------------------------------------------------------
def test_codestream_strip_is_lossless() -> None:
    arr = wsigen.tissue(rng(), 64, 48)
    plain = wsigen.jpeg(arr)
    dirty = (
        plain[:2]
        + segment(0xFE, b"barcode PLANT-11112222")
        + segment(0xE1, b"Exif\x00\x00PLANT-33334444")
        + segment(0xED, b"Photoshop 3.0\x00PLANT-55556666")
        + plain[2:]
    )
    scan = codestream.scan_header(dirty)
    assert scan is not None and len(scan.drops) == 3
    head, skip = codestream.rewrite_head(dirty, scan)
    cleaned = head + dirty[skip:]
    assert b"PLANT-" not in cleaned
    assert cleaned == plain  # APP0 JFIF kept, entropy data untouched
    assert np.array_equal(decode(cleaned), decode(dirty))


def test_vendor_comments_are_kept() -> None:
    arr = wsigen.tissue(rng(), 32, 32)
    plain = wsigen.jpeg(arr)
    data = plain[:2] + segment(0xFE, b"Hamamatsu NanoZoomer Digital Pathology\x00") + plain[2:]
    scan = codestream.scan_header(data)
    assert scan is not None and not scan.drops


def test_svs_tile_comment_stripped_pixels_identical(tmp_path: Path) -> None:
    comment = b"barcode PLANT-c0ffee12"
    fx = wsigen.aperio_svs(tmp_path, rng(), name="com", tile_comment=comment)
    out = tmp_path / "out.svs"
    report = deidentify_and_verify(fx.path, out, fx.fmt, P)
    assert report.removed["codestream_segment.comment"] == len(fx.level_segments[0])
    # the copy started before the headers were scanned was cancelled and removed
    assert not list(tmp_path.glob(".out.svs.*")), "partial output left behind"
    data = out.read_bytes()
    assert b"PLANT-c0ffee12" not in data
    lv0 = read_tiff(out).ifds[0]
    for (off, cnt), src in zip(lv0.segments(), fx.level_segments[0], strict=True):
        got = data[off : off + cnt]
        cut = 2 + 4 + len(comment)
        assert got == src[:2] + src[cut:]  # only the COM segment is gone
        assert np.array_equal(decode(got), decode(src))
    # the other levels were clean: byte-identical
    for ifd, segs in zip(read_tiff(out).ifds[2:4], fx.level_segments[1:], strict=True):
        assert [data[o : o + c] for o, c in ifd.segments()] == segs


def test_verify_finds_comment_left_in_a_tile(tmp_path: Path) -> None:
    fx = wsigen.aperio_svs(tmp_path, rng(), name="clean")
    out = tmp_path / "out.svs"
    deidentify_and_verify(fx.path, out, fx.fmt, P)
    data = bytearray(out.read_bytes())
    off, _cnt = read_tiff(out).ifds[0].segments()[1]
    assert data[off + 2 : off + 6] == b"\xff\xe0\x00\x10"  # APP0 JFIF, 18 bytes
    data[off + 2 : off + 20] = segment(0xFE, b"PLANT-0123456x")  # same length
    bad = tmp_path / "bad.svs"
    bad.write_bytes(bytes(data))
    with pytest.raises(DeidRejected) as e:
        verify(bad, fx.fmt, [])
    assert e.value.reason == "VERIFICATION_FAILED" and "comment" in e.value.detail


# --- generic TIFF pyramid -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "levels"),
    [("generic-tiff/boxes.tiff", 4), ("generic-tiff/yb10kx5k.zstd.tiff", 5)],
)
def test_real_generic_pyramids_keep_every_level(name: str, levels: int, tmp_path: Path) -> None:
    src = SLIDES / name
    if not src.exists():
        pytest.fail(f"sample slide missing: {src}")
    st = read_tiff(src)
    pyr = generic_pyramid(st)
    assert len(pyr.levels) == levels and not pyr.others
    out = tmp_path / ("o-" + src.name)
    report = deidentify_and_verify(src, out, SlideFormat.GENERIC_TIFF, P)
    assert report.levels_kept == levels
    assert "associated_image.unknown" not in report.removed
    dims = [(i.width, i.height) for i in read_tiff(out).ifds]
    assert dims == [(i.width, i.height) for i in st.ifds if i.is_tiled]


def test_tiled_label_dropped_levels_kept(tmp_path: Path) -> None:
    fx, _pages = wsigen.generic_tiff(tmp_path, rng(), name="tl", tiled_label=True)
    out = tmp_path / "out.tiff"
    report = deidentify_and_verify(fx.path, out, fx.fmt, P)
    assert report.removed["associated_image.unknown"] == 1
    assert report.levels_kept == 2
    data = out.read_bytes()
    st = read_tiff(out)
    for ifd, segs in zip(st.ifds, fx.level_segments, strict=True):
        assert [data[o : o + c] for o, c in ifd.segments()] == segs
    assert fx.associated["label"] not in data


# --- Aperio description -------------------------------------------------------------------------
def test_svs_unknown_header_rejected_naming_the_line(tmp_path: Path) -> None:
    fx = wsigen.aperio_svs(tmp_path, rng(), name="hdr", header="Aperio Secret Scanner v1.0 ")
    with pytest.raises(DeidRejected) as e:
        deidentify(fx.path, tmp_path / "o.svs", fx.fmt, P)
    assert e.value.reason == "UNEXPECTED_SVS_VALUE" and "header line" in e.value.detail
    assert "Secret" not in str(e.value)


@pytest.mark.parametrize(
    "header", ["Aperio Image Library v12.0.15 ", "Aperio Image Library vFS90 01"]
)
def test_svs_known_headers_accepted(header: str, tmp_path: Path) -> None:
    fx = wsigen.aperio_svs(tmp_path, rng(), name="okhdr", header=header)
    deidentify_and_verify(fx.path, tmp_path / "o.svs", fx.fmt, P)


def test_svs_icc_field_known_name_kept_other_removed(tmp_path: Path) -> None:
    fx = wsigen.aperio_svs(tmp_path, rng(), name="icc1", extra_fields=[("ICC Profile", "AT2")])
    out = tmp_path / "o1.svs"
    deidentify_and_verify(fx.path, out, fx.fmt, P)
    assert "ICC Profile = AT2" in (read_tiff(out).ifds[0].description or "")
    fx = wsigen.aperio_svs(tmp_path, rng(), name="icc2", extra_fields=[("ICC Profile", "Dr X")])
    out = tmp_path / "o2.svs"
    report = deidentify_and_verify(fx.path, out, fx.fmt, P)
    assert report.removed["svs_field.ICC Profile"] == 2  # level 0 and the thumbnail
    assert "ICC Profile" not in (read_tiff(out).ifds[0].description or "")


# --- embedded ICC profile -----------------------------------------------------------------------
def _icc_with_description(text: str) -> bytes:
    desc = b"desc" + b"\x00" * 4 + struct.pack(">I", len(text) + 1) + text.encode() + b"\x00" * 80
    xyz = b"XYZ " + b"\x00" * 16
    tags = [(b"desc", desc), (b"wtpt", xyz)]
    table = struct.pack(">I", len(tags))
    body = b""
    at = 128 + 4 + 12 * len(tags)
    for sig, data in tags:
        table += struct.pack(">4sII", sig, at + len(body), len(data))
        body += data
    total = 128 + len(table) + len(body)
    header = bytearray(128)
    struct.pack_into(">I", header, 0, total)
    header[36:40] = b"acsp"
    return bytes(header) + table + body


def test_icc_profile_texts() -> None:
    assert codestream.icc_profile_texts(_icc_with_description("sRGB IEC61966-2.1"))[0]
    clean, texts = codestream.icc_profile_texts(_icc_with_description("calibrated for Dr X"))
    assert not clean and texts == ["calibrated for Dr X"]


def test_real_icc_profiles_kept(tmp_path: Path) -> None:
    src = SLIDES / "aperio/tcga-cr-7395-01a-01-ts1.svs"
    if not src.exists():
        pytest.fail(f"sample slide missing: {src}")
    out = tmp_path / "o.svs"
    deidentify_and_verify(src, out, SlideFormat.APERIO_SVS, P)
    assert 34675 in read_tiff(out).ifds[0].tags


# --- DICOM --------------------------------------------------------------------------------------
def _run_dicom(tmp_path: Path, edit: Any) -> tuple[Any, Any]:
    fx = wsigen.dicom_wsm(tmp_path, rng(), name="dfix", edit=edit)
    out = tmp_path / "o.dcm"
    report = deidentify_and_verify(fx.path, out, fx.fmt, P)
    return pydicom.dcmread(out, stop_before_pixels=True), report


def test_dicom_code_meaning_regenerated(tmp_path: Path) -> None:
    def edit(ds: Any, pl: wsigen.Planter) -> None:
        ds.SpecimenDescriptionSequence[0].PrimaryAnatomicStructureSequence[
            0
        ].CodeMeaning = "Lung of Mr X"

    ds, report = _run_dicom(tmp_path, edit)
    code = ds.SpecimenDescriptionSequence[0].PrimaryAnatomicStructureSequence[0]
    assert code.CodeMeaning == "Lung structure (body structure)"
    assert report.removed["dicom_attribute.CodeMeaning"] >= 1
    # a meaning that is the dictionary text (or its head) is kept as written
    assert ds.ContainerTypeCodeSequence[0].CodeMeaning == "Microscope slide"


def test_dicom_free_text_removed(tmp_path: Path) -> None:
    def edit(ds: Any, pl: wsigen.Planter) -> None:
        ds.OpticalPathSequence[0].OpticalPathDescription = "slide of Mr X"
        ds.DimensionDescriptionLabel = "Mr X"

    ds, report = _run_dicom(tmp_path, edit)
    assert "OpticalPathDescription" not in ds.OpticalPathSequence[0]
    assert "DimensionDescriptionLabel" not in ds
    assert report.removed["dicom_attribute.OpticalPathDescription"] == 1


def test_dicom_value_outside_vocabulary_rejected(tmp_path: Path) -> None:
    def edit(ds: Any, pl: wsigen.Planter) -> None:
        ds.FocusMethod = "SMITH"

    fx = wsigen.dicom_wsm(tmp_path, rng(), name="dvoc", edit=edit)
    with pytest.raises(DeidRejected) as e:
        deidentify(fx.path, tmp_path / "o.dcm", fx.fmt, P)
    assert e.value.reason == "UNEXPECTED_DICOM_VALUE" and "FocusMethod" in e.value.detail
    assert "SMITH" not in str(e.value)


def test_dicom_frame_comment_rejected(tmp_path: Path) -> None:
    """Frames are copied verbatim: a COM segment outside the encoder signatures rejects."""
    from pydicom.encaps import encapsulate, generate_frames

    def edit(ds: Any, pl: wsigen.Planter) -> None:
        frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
        frames[3] = wsigen.with_comment(frames[3], b"barcode PLANT-f7a3e0c1")
        ds.PixelData = encapsulate(frames)

    fx = wsigen.dicom_wsm(tmp_path, rng(), name="dcom", edit=edit)
    assert b"PLANT-f7a3e0c1" in fx.path.read_bytes()
    with pytest.raises(DeidRejected) as e:
        deidentify(fx.path, tmp_path / "o.dcm", fx.fmt, P)
    assert e.value.reason == "UNEXPECTED_DICOM_VALUE" and "PLANT" not in str(e.value)
    assert not (tmp_path / "o.dcm").exists()


def test_ndpi_strip_comment_stripped_mcu_starts_shifted(tmp_path: Path) -> None:
    """An NDPI strip with a COM segment holding text: the segment is removed, McuStarts move
    back by its length, and the level decodes to the same pixels as the source."""
    import tifffile

    from services.shared.wsi import tiff
    from services.shared.wsi.tiff import OutIfd, OutTag, write_tiff

    src = SLIDES / "hamamatsu/test3-DAPI-2-(387).ndpi"
    if not src.exists():
        pytest.fail(f"sample slide missing: {src}")
    com = segment(0xFE, b"slide of PLANT-9d8c7b6a")
    st = read_tiff(src)
    outs = []
    for ifd in st.ifds:
        tags = {c: OutTag.copy(t) for c, t in ifd.tags.items() if c not in tiff.DATA_OFFSET_TAGS}
        edits: dict[int, tuple[bytes, int]] = {}
        if tiff.NDPI_MCU_STARTS in ifd.tags:
            starts = [v + len(com) for v in ifd.tags[tiff.NDPI_MCU_STARTS].ints()]
            tags[tiff.NDPI_MCU_STARTS] = OutTag.ints(tiff.NDPI_MCU_STARTS, tiff.LONG, starts, "<")
            edits = {0: (b"\xff\xd8" + com, 2)}  # insert the COM right after SOI
        outs.append(
            OutIfd([tags[c] for c in sorted(tags)], ifd.segments(), ifd.is_tiled, [], None, edits)
        )
    crafted = tmp_path / "com.ndpi"
    with open(src, "rb") as fs, open(crafted, "wb") as fd:
        write_tiff(fs, fd, outs, byteorder=st.byteorder, flavor=st.flavor)
    assert b"PLANT-9d8c7b6a" in crafted.read_bytes()
    dst = tmp_path / "o.ndpi"
    report = deidentify_and_verify(crafted, dst, SlideFormat.HAMAMATSU_NDPI, P)
    assert report.removed["codestream_segment.comment"] == 4
    assert b"PLANT-9d8c7b6a" not in dst.read_bytes()
    a, b = read_tiff(src), read_tiff(dst)
    assert (
        b.ifds[1].tags[tiff.NDPI_MCU_STARTS].ints() == a.ifds[1].tags[tiff.NDPI_MCU_STARTS].ints()
    )
    raw_a, raw_b = src.read_bytes(), dst.read_bytes()
    for ia, ib in zip(a.ifds[:4], b.ifds, strict=False):
        [(oa, ca)], [(ob, cb)] = ia.segments(), ib.segments()
        assert raw_a[oa : oa + ca] == raw_b[ob : ob + cb]  # back to the scanner's bytes
    with tifffile.TiffFile(src) as ta, tifffile.TiffFile(dst, is_ndpi=True) as tb:
        pa, pb = ta.pages[1], tb.pages[1]
        assert isinstance(pa, tifffile.TiffPage) and isinstance(pb, tifffile.TiffPage)
        assert np.array_equal(pa.asarray(), pb.asarray())
