"""De-identification engine: behaviour on real slides and on crafted hostile variants."""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
import tifffile

from services.deid.engine import (
    DeidPolicy,
    DeidRejected,
    DeidReport,
    deidentify,
    deidentify_and_verify,
    verify,
)
from services.deid.engine.verify import search_forbidden
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import tiff
from services.shared.wsi.sniff import SlideFormat, read_dicom_header, sniff_file
from services.shared.wsi.tiff import OutIfd, OutTag, read_tiff, write_tiff

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"
KEY = b"k" * 32
P = Pseudonymizer(KEY, "siteA")


@pytest.fixture(scope="module", autouse=True)
def _slides_present() -> None:
    if not SLIDES.is_dir():
        pytest.fail(f"sample slides missing: {SLIDES}")


def slide(name: str) -> Path:
    p = SLIDES / name
    if not p.is_file():
        pytest.fail(f"sample slide missing: {p}")
    return p


CMU_VALUES = [
    "CMU-1",
    "12/29/09",
    "09:59:15",
    "b414003d-95c6-48b0-9369-8010ed517ba7",
    "CPAPERIOCS",
    "1004486",
]
# identifying content listed in SOURCES.md, per file
IDENTIFYING: dict[str, list[str]] = {
    "aperio/CMU-1-Small-Region.svs": CMU_VALUES,
    "aperio/small.svs": CMU_VALUES,
    "hamamatsu/test3-DAPI-2-(387).ndpi": [
        "2017:02:07 13:06:43",
        "950291",
        "950410",
        "2011/05/23",
        "2017/01/27",
    ],
    "hamamatsu/test3-TRITC 2 (560).ndpi": [
        "2017:02:07 13:07:45",
        "950291",
        "950410",
        "2011/05/23",
        "2017/01/27",
    ],
    "generic-tiff/boxes.tiff": [],
    "generic-tiff/yb10kx5k.zstd.tiff": ["conversion_date", "1611234821", "large_image_converter"],
    "dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm": [
        "GenLast",
        "Penelope",
        "Bruce",
        "PN-1-692-287-590-758-1",
        "16340811",
        "16730303",
        "GO-1692287590758",
        "GO-1692287590758-1-A-0",
        "Camelyon16",
        "Example Hospital",
        "ExampleHospital",
        "EPATHC-Encrinology Pathology Consult",
        "GO-1692287590758-1-A-0_tumor_102.tif",
        "8199076028955445",
        "039Y",
        "1.3.6.1.4.1.11129.5.7.999.18649109954048068.909.1692287590758018",
    ],
    "dicom/camelyon-jpeg/multi_frame_jpeg_camelyon_challenge_image.dcm": [
        "20230708",
        "Congo Red-Lung test",
        "GO-1692202754026-1-A-0_tumor_102.tif",
        "GO-1692202754026",
        "Kidney medial right tumor",
        "8191347071437311",
    ],
    "dicom/highdicom-sm/sm_image.dcm": [
        "Test^Patient",
        "Test^Physician",
        "AA01",
        "17890505",
        "S19-1_A_1_1",
        "S19-1_A",
        "S19-1",
        "20190604",
        "20190822",
        "20091229095915",
        "abcd",
        "20190604072000",
        "20190605082000",
        "20190605102000",
        "http://test.org/mrns",
        "http://test.org/specimens/2019",
    ],
}
# field names whose whole entry must be gone from the bytes (names may appear in the report)
FIELDS_ABSENT: dict[str, list[str]] = {
    "aperio/CMU-1-Small-Region.svs": ["Filename", "ScanScope ID", "User =", "Date =", "ImageID"],
    "hamamatsu/test3-DAPI-2-(387).ndpi": [
        "Created=",
        "Updated=",
        "NDP.S/N",
        "Macro.S/N",
        "roi.barcode.macro",
        "SerialNumber",
        "Shading",
    ],
}
OPENSLIDE_READABLE = [n for n in IDENTIFYING if not n.startswith("dicom/highdicom-sm-jpegls")]


def run(name: str, tmp_path: Path, policy: DeidPolicy | None = None) -> tuple[Path, DeidReport]:
    src = slide(name)
    dst = tmp_path / ("out" + (src.suffix or ".dcm"))
    fmt = sniff_file(src)
    report = deidentify(src, dst, fmt, P, policy)
    verify(dst, fmt, report.identifying_values, policy)
    return dst, report


# --- behaviour on the real samples -----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(IDENTIFYING))
def test_identifying_strings_absent(name: str, tmp_path: Path) -> None:
    dst, report = run(name, tmp_path)
    data = dst.read_bytes()
    for value in IDENTIFYING[name] + FIELDS_ABSENT.get(name, []):
        assert value.encode() not in data, value
        assert value.encode("utf-16-le") not in data, value
    # the report names categories only
    text = repr(report) + repr(report.public_dict())
    for value in IDENTIFYING[name]:
        assert value not in text


@pytest.mark.parametrize("name", sorted(OPENSLIDE_READABLE))
def test_openslide_same_vendor_no_label_same_pixels(name: str, tmp_path: Path) -> None:
    src = slide(name)
    dst, report = run(name, tmp_path)
    a, b = openslide.OpenSlide(str(src)), openslide.OpenSlide(str(dst))
    try:
        assert b.properties["openslide.vendor"] == a.properties["openslide.vendor"]
        assert not {"label", "macro"} & set(b.associated_images)
        assert b.level_count == a.level_count
        assert b.level_dimensions == a.level_dimensions
        w, h = a.dimensions
        region = (min(w, 2048), min(h, 2048))
        assert np.array_equal(
            np.asarray(a.read_region((0, 0), 0, region)),
            np.asarray(b.read_region((0, 0), 0, region)),
        )
        low = a.level_count - 1
        assert np.array_equal(
            np.asarray(a.read_region((0, 0), low, a.level_dimensions[low])),
            np.asarray(b.read_region((0, 0), low, b.level_dimensions[low])),
        )
        for key in ("openslide.mpp-x", "openslide.mpp-y", "openslide.objective-power"):
            assert b.properties.get(key) == a.properties.get(key)
        assert (report.width, report.height) == a.dimensions
    finally:
        a.close()
        b.close()


TIFF_NAMES = [n for n in IDENTIFYING if not n.startswith("dicom/")]


@pytest.mark.parametrize("name", sorted(TIFF_NAMES))
def test_compressed_tiles_are_identical(name: str, tmp_path: Path) -> None:
    src = slide(name)
    dst, report = run(name, tmp_path)
    a, b = read_tiff(src), read_tiff(dst)
    src_bytes, dst_bytes = src.read_bytes(), dst.read_bytes()
    by_size = {(i.width, i.height, i.is_tiled): i for i in a.ifds}
    for ib in b.ifds:
        ia = by_size[(ib.width, ib.height, ib.is_tiled)]
        for (oa, ca), (ob, cb) in zip(ia.segments(), ib.segments(), strict=True):
            assert src_bytes[oa : oa + ca] == dst_bytes[ob : ob + cb]
        if 347 in ia.tags:
            assert ib.tags[347].data == ia.tags[347].data  # JPEGTables kept
    assert report.levels_kept == len(report.level_dimensions) >= 1


@pytest.mark.parametrize(
    "name",
    [
        "dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm",
        "dicom/camelyon-jpeg/multi_frame_jpeg_camelyon_challenge_image.dcm",
        "dicom/highdicom-sm/sm_image.dcm",
        "dicom/highdicom-sm-jpegls/sm_image_jpegls.dcm",
        "dicom/boxes/boxes_0.dcm",
        "dicom/BPAEC/5_0",
    ],
)
def test_dicom_pixel_data_bytes_identical(name: str, tmp_path: Path) -> None:
    src = slide(name)
    dst, _ = run(name, tmp_path)
    ha, hb = read_dicom_header(src), read_dicom_header(dst)
    assert ha.pixel is not None and hb.pixel is not None
    assert hb.transfer_syntax == ha.transfer_syntax
    a, b = src.read_bytes(), dst.read_bytes()
    assert a[ha.pixel.element_offset : ha.pixel.end] == b[hb.pixel.element_offset : hb.pixel.end]
    assert hb.pixel.end == len(b)


def test_aperio_label_macro_dropped_thumbnail_kept(tmp_path: Path) -> None:
    src = slide("aperio/CMU-1-Small-Region.svs")
    dst, report = run("aperio/CMU-1-Small-Region.svs", tmp_path)
    assert report.removed["associated_image.label"] == 1
    assert report.removed["associated_image.macro"] == 1
    assert report.removed["svs_field.Filename"] == 2  # level 0 and thumbnail descriptions
    out = read_tiff(dst)
    assert len(out.ifds) == 2 and out.ifds[0].is_tiled and not out.ifds[1].is_tiled
    # the label's and macro's compressed bytes are gone from the file
    st = read_tiff(src)
    data, out_bytes = src.read_bytes(), dst.read_bytes()
    for ifd in st.ifds[2:]:
        off, cnt = ifd.segments()[len(ifd.segments()) // 2]
        assert data[off : off + cnt] not in out_bytes
    desc = out.ifds[0].description or ""
    assert desc.startswith("Aperio Image Library v11.2.1")
    for kept in (
        "AppMag = 20",
        "MPP = 0.4990",
        "StripeWidth = 2040",
        "OriginalWidth = 46920",
        "Left = 25.691574",
        "LineCameraSkew = -0.000424",
        "Focus Offset = 0.000000",
    ):
        assert kept in desc
    for gone in ("Filename", "Date", "Time", "User", "ScanScope ID", "ImageID", "Parmset"):
        assert f"|{gone} =" not in desc


def test_aperio_never_drops_a_level(tmp_path: Path) -> None:
    _dst, report = run("aperio/tcga-cr-7395-01a-01-ts1.svs", tmp_path)
    assert report.level_dimensions == [(4443, 3567), (2221, 1783)]
    assert not report.removed


def test_ndpi_rules(tmp_path: Path) -> None:
    dst, report = run("hamamatsu/test3-DAPI-2-(387).ndpi", tmp_path)
    assert report.removed["associated_image.macro"] == 1
    assert report.removed["associated_image.map"] == 1
    assert report.removed["ndpi_tag.serial"] == 4
    assert report.removed["tiff_tag.DateTime"] == 4
    assert report.levels_kept == 4 and report.objective_power == 40.0
    st = read_tiff(dst)
    assert st.flavor is tiff.TiffFlavor.NDPI
    for ifd in st.ifds:
        assert ifd.tags[tiff.NDPI_SOURCE_LENS].floats()[0] > 0
        assert 306 not in ifd.tags and 65442 not in ifd.tags and 65427 not in ifd.tags
        assert ifd.tags[271].text() == "Hamamatsu" and ifd.tags[272].text() == "C9600-12"
        props = ifd.tags[65449].text()
        assert props == "Product=C9600-12\r\nObjective.Lens.Magnificant=35.16\r\n"
        assert tiff.NDPI_MCU_STARTS in ifd.tags
    # McuStarts still point at restart markers: tifffile's MCU-row tiles decode identically
    src = slide("hamamatsu/test3-DAPI-2-(387).ndpi")
    with tifffile.TiffFile(src) as ta, tifffile.TiffFile(dst, is_ndpi=True) as tb:
        pa, pb = ta.pages[1], tb.pages[1]
        assert isinstance(pa, tifffile.TiffPage) and isinstance(pb, tifffile.TiffPage)
        assert np.array_equal(pa.asarray(), pb.asarray())


def test_generic_description_dropped(tmp_path: Path) -> None:
    dst, report = run("generic-tiff/yb10kx5k.zstd.tiff", tmp_path)
    assert report.removed == {"tiff_tag.ImageDescription": 1}
    st = read_tiff(dst)
    assert st.flavor is tiff.TiffFlavor.BIGTIFF
    assert all(270 not in i.tags for i in st.ifds)


def test_dicom_profile(tmp_path: Path) -> None:
    name = "dicom/camelyon-jpeg2000/multi_frame_jpeg2000_camelyon_challenge_image.dcm"
    src = slide(name)
    dst, report = run(name, tmp_path)
    a = pydicom.dcmread(src, stop_before_pixels=True)
    b = pydicom.dcmread(dst, stop_before_pixels=True)
    assert not any(e.tag.is_private for e in b.iterall())
    assert report.removed["dicom_private_tag"] == 4
    assert b.PatientIdentityRemoved == "YES"
    assert b.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert b.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"
    expected_patient = P.pseudonym("patient", "PN-1-692-287-590-758-1")
    assert b.PatientID == expected_patient and str(b.PatientName) == expected_patient
    assert b.ContainerIdentifier == P.pseudonym("container", "GO-1692287590758-1-A-0")
    spec = b.SpecimenDescriptionSequence[0]
    assert spec.SpecimenIdentifier == P.pseudonym("specimen", "GO-1692287590758-1-A")
    assert spec.SpecimenUID == P.uid(a.SpecimenDescriptionSequence[0].SpecimenUID)
    assert len(spec.SpecimenPreparationSequence) == 0  # PS3.15: Z
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert b.get(kw) == P.uid(a.get(kw))
    assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
    assert b.DimensionOrganizationSequence[0].DimensionOrganizationUID == P.uid(
        a.DimensionOrganizationSequence[0].DimensionOrganizationUID
    )
    for kw in (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "PatientBirthDate",
        "PatientSex",
    ):
        assert kw in b and not b.get(kw)
    for kw in (
        "SeriesDate",
        "InstitutionName",
        "StudyDescription",
        "IssuerOfAccessionNumberSequence",
        "BarcodeValue",
        "AdmittingDiagnosesCodeSequence",
        "PatientAge",
    ):
        assert kw not in b
        assert report.removed[f"dicom_attribute.{kw}"] == 1
    assert b.ContentDate == "19000101" and b.LongitudinalTemporalInformationModified == "REMOVED"
    assert report.pseudonymized["dicom_attribute.PatientID"] == 1


def test_dicom_pseudonyms_are_stable_and_keyed(tmp_path: Path) -> None:
    name = "dicom/highdicom-sm/sm_image.dcm"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    d1, _ = run(name, tmp_path / "a")
    src = slide(name)
    d2 = tmp_path / "b" / "x.dcm"
    deidentify(src, d2, SlideFormat.DICOM_WSI, P)
    d3 = tmp_path / "b" / "y.dcm"
    deidentify(src, d3, SlideFormat.DICOM_WSI, Pseudonymizer(b"z" * 32, "siteA"))
    x, y, z = (pydicom.dcmread(p, stop_before_pixels=True) for p in (d1, d2, d3))
    assert x.PatientID == y.PatientID != z.PatientID
    assert x.StudyInstanceUID == y.StudyInstanceUID != z.StudyInstanceUID
    assert x.DeviceSerialNumber == P.pseudonym("device", "abcd")


def test_dicom_filter_mode_keeps_coded_steps(tmp_path: Path) -> None:
    policy = DeidPolicy(dicom_specimen_preparation="filter")
    dst, report = run("dicom/highdicom-sm/sm_image.dcm", tmp_path, policy)
    b = pydicom.dcmread(dst, stop_before_pixels=True)
    steps = b.SpecimenDescriptionSequence[0].SpecimenPreparationSequence
    assert len(steps) == 3
    items = [it for s in steps for it in s.SpecimenPreparationStepContentItemSequence]
    kinds = {str(it.ValueType) for it in items}
    assert kinds <= {"CODE", "TEXT"}
    texts = [str(it.TextValue) for it in items if it.ValueType == "TEXT"]
    assert texts and all(t.startswith("siteA-spe-") for t in texts)
    codes = {str(it.ConceptCodeSequence[0].CodeMeaning) for it in items if it.ValueType == "CODE"}
    assert {"Hematoxylin stain", "Water soluble eosin stain", "Paraffin wax"} <= codes
    assert report.removed["dicom_content_item.DATETIME"] == 3
    data = dst.read_bytes()
    assert b"S19-1" not in data and b"2019060" not in data and b"test.org" not in data
    # the strict verifier (default policy) refuses a non-empty preparation sequence
    with pytest.raises(DeidRejected) as e:
        verify(dst, SlideFormat.DICOM_WSI, [])
    assert e.value.reason == "VERIFICATION_FAILED"


# --- rejections ------------------------------------------------------------------------------
def test_corrupt_tile_rejected(tmp_path: Path) -> None:
    src = slide("broken/unreadable.svs")
    dst = tmp_path / "out.svs"
    with pytest.raises(DeidRejected) as e:
        deidentify_and_verify(src, dst, SlideFormat.APERIO_SVS, P)
    assert e.value.reason == "CORRUPT_IMAGE_DATA"
    assert not dst.exists()
    assert not list(tmp_path.iterdir())  # no half-written or temporary file left


def test_unsupported_compression_rejected(tmp_path: Path) -> None:
    with pytest.raises(DeidRejected) as e:
        deidentify(slide("broken/unopenable.tiff"), tmp_path / "o.tif", SlideFormat.GENERIC_TIFF, P)
    assert e.value.reason == "UNSUPPORTED_COMPRESSION"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name",
    [
        "dicom/label-barcode/test_wsi2.dcm",
        "dicom/label-private-tags/wsi_private_tags.dcm",
        "dicom/BPAEC/2",
    ],
)
def test_label_only_dicom_rejected(name: str, tmp_path: Path) -> None:
    with pytest.raises(DeidRejected) as e:
        deidentify(slide(name), tmp_path / "o.dcm", SlideFormat.DICOM_WSI, P)
    assert e.value.reason == "ASSOCIATED_IMAGE_ONLY"
    assert "CBF-1234" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_nonconformant_dicom_rejected(tmp_path: Path) -> None:
    with pytest.raises(DeidRejected) as e:
        deidentify(
            slide("dicom/pathml-nonconformant/small_dicom.dcm"),
            tmp_path / "o.dcm",
            SlideFormat.DICOM_WSI,
            P,
        )
    assert e.value.reason == "NO_PYRAMID_LEVEL"


def test_unsupported_format_rejected(tmp_path: Path) -> None:
    with pytest.raises(DeidRejected) as e:
        deidentify(
            slide("olympus-vsi/vsi-ets-test-jpg2k.vsi"),
            tmp_path / "o.tif",
            SlideFormat.OLYMPUS_VSI,
            P,
        )
    assert e.value.reason == "UNSUPPORTED_FORMAT"
    with pytest.raises(DeidRejected) as e:
        deidentify(slide("aperio/small.svs"), tmp_path / "o.tif", SlideFormat.GENERIC_TIFF, P)
    assert e.value.reason == "FORMAT_MISMATCH"


# --- crafted TIFF variants -------------------------------------------------------------------
Edit = Callable[[int, dict[int, OutTag]], None]


def rewrite(src: Path, dst: Path, edit: Edit | None = None, drop: set[int] | None = None) -> None:
    """Copy a TIFF through our writer, letting ``edit`` change each IFD's tags."""
    st = read_tiff(src)
    outs = []
    for ifd in st.ifds:
        if drop and ifd.index in drop:
            continue
        tags = {c: OutTag.copy(t) for c, t in ifd.tags.items() if c not in tiff.DATA_OFFSET_TAGS}
        if edit:
            edit(ifd.index, tags)
        outs.append(OutIfd([tags[c] for c in sorted(tags)], ifd.segments(), ifd.is_tiled))
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        write_tiff(fs, fd, outs, byteorder=st.byteorder, flavor=st.flavor)


def test_svs_unknown_field_rejected_naming_key_only(tmp_path: Path) -> None:
    src = slide("aperio/small.svs")
    crafted = tmp_path / "crafted.svs"
    desc0 = read_tiff(src).ifds[0].description or ""

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        if i == 0:
            tags[270] = OutTag.ascii(270, desc0 + "|Patient Name = John Q. Secret")

    rewrite(src, crafted, edit)
    with pytest.raises(DeidRejected) as e:
        deidentify(crafted, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    assert e.value.reason == "UNKNOWN_SVS_FIELD"
    assert "Patient Name" in e.value.detail
    assert "John" not in str(e.value) and "Secret" not in str(e.value)
    assert not (tmp_path / "o.svs").exists()


def test_svs_unexpected_value_rejected(tmp_path: Path) -> None:
    src = slide("aperio/small.svs")
    crafted = tmp_path / "crafted.svs"
    desc0 = read_tiff(src).ifds[0].description or ""

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        if i == 0:
            tags[270] = OutTag.ascii(270, desc0.replace("AppMag = 20", "AppMag = Dr Who"))

    rewrite(src, crafted, edit)
    with pytest.raises(DeidRejected) as e:
        deidentify(crafted, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    assert e.value.reason == "UNEXPECTED_SVS_VALUE" and "AppMag" in e.value.detail
    assert "Who" not in str(e.value)


def test_svs_summary_with_free_text_rejected(tmp_path: Path) -> None:
    src = slide("aperio/small.svs")
    crafted = tmp_path / "crafted.svs"
    desc0 = read_tiff(src).ifds[0].description or ""

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        if i == 0:
            text = desc0.replace("JPEG/RGB Q=30;", "JPEG/RGB Q=30 Mr Smith;", 1)
            tags[270] = OutTag.ascii(270, text)

    rewrite(src, crafted, edit)
    with pytest.raises(DeidRejected) as e:
        deidentify(crafted, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    assert e.value.reason == "UNKNOWN_SVS_FIELD" and "Smith" not in str(e.value)


def test_svs_without_descriptions_drops_label_and_macro(tmp_path: Path) -> None:
    """Associated images are found by NewSubfileType / position when descriptions are gone."""
    src = slide("aperio/CMU-1-Small-Region.svs")
    crafted = tmp_path / "nodesc.svs"

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        if i >= 2:
            tags.pop(270, None)

    rewrite(src, crafted, edit)
    dst = tmp_path / "o.svs"
    report = deidentify(crafted, dst, SlideFormat.APERIO_SVS, P)
    verify(dst, SlideFormat.APERIO_SVS, report.identifying_values)
    assert report.removed["associated_image.macro"] == 1  # NewSubfileType 9
    assert report.removed["associated_image.unidentified"] == 1  # the label, by position
    assert len(read_tiff(dst).ifds) == 2


def test_svs_label_at_thumbnail_position_is_not_kept(tmp_path: Path) -> None:
    """A stripped IFD at position 1 whose shape does not match level 0 is not a thumbnail."""
    src = slide("aperio/CMU-1-Small-Region.svs")
    crafted = tmp_path / "labelfirst.svs"

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        if i >= 2:
            tags.pop(270, None)
            tags.pop(254, None)

    rewrite(src, crafted, edit, drop={1})  # label becomes IFD 1, macro IFD 2
    dst = tmp_path / "o.svs"
    report = deidentify(crafted, dst, SlideFormat.APERIO_SVS, P)
    assert report.removed["associated_image.unidentified"] == 2
    assert len(read_tiff(dst).ifds) == 1


def test_svs_tiled_image_marked_label_with_level_shape_is_ambiguous(tmp_path: Path) -> None:
    src = slide("aperio/tcga-cr-7395-01a-01-ts1.svs")
    crafted = tmp_path / "amb.svs"

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        if i == 2:
            tags[270] = OutTag.ascii(270, "Aperio Image Library v11.0.37\r\nlabel 2221x1783")

    rewrite(src, crafted, edit)
    with pytest.raises(DeidRejected) as e:
        deidentify(crafted, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    assert e.value.reason == "AMBIGUOUS_ASSOCIATED_IMAGE"


def _add_tags(tags: dict[int, OutTag], extra: dict[int, str]) -> None:
    for code, text in extra.items():
        tags[code] = OutTag.ascii(code, text)


def test_generic_unknown_tag_rejected(tmp_path: Path) -> None:
    src = slide("generic-tiff/boxes.tiff")
    crafted = tmp_path / "unk.tiff"
    rewrite(src, crafted, lambda i, t: _add_tags(t, {40001: "secret-operator-name"}))
    with pytest.raises(DeidRejected) as e:
        deidentify(crafted, tmp_path / "o.tiff", SlideFormat.GENERIC_TIFF, P)
    assert e.value.reason == "UNKNOWN_TIFF_TAG"
    assert "40001" in e.value.detail and "secret" not in str(e.value)


def test_generic_identifying_tags_removed(tmp_path: Path) -> None:
    src = slide("generic-tiff/boxes.tiff")
    crafted = tmp_path / "tags.tiff"
    extra = {
        306: "2024:01:02 03:04:05",
        315: "Dr. Jane Operator",
        316: "PATHLAB-PC-07",
        305: "ScanSoft 1.0",
        269: "case-4711-block-B",
        285: "page-of-case-4711",
        270: "Slide of patient Jane Doe",
        271: "ScanCorp",
        272: "Model-X",
    }

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        _add_tags(tags, extra)
        tags[700] = OutTag(700, tiff.BYTE, 30, b"<x:xmpmeta>Jane Doe</x:xmpmeta>"[:30])

    rewrite(src, crafted, edit)
    dst = tmp_path / "o.tiff"
    report = deidentify_and_verify(crafted, dst, SlideFormat.GENERIC_TIFF, P)
    data = dst.read_bytes()
    for gone in ("2024:01:02", "Jane", "PATHLAB", "ScanSoft", "4711"):
        assert gone.encode() not in data
    assert b"ScanCorp" in data and b"Model-X" in data  # device type is kept
    for name in (
        "DateTime",
        "Artist",
        "HostComputer",
        "Software",
        "DocumentName",
        "PageName",
        "ImageDescription",
        "XMP",
    ):
        assert report.removed[f"tiff_tag.{name}"] == 4


def test_generic_exif_and_gps_ifds_removed(tmp_path: Path) -> None:
    """EXIF/GPS sub-IFDs are dropped and their text values join the forbidden list."""
    src = slide("generic-tiff/boxes.tiff")
    crafted = tmp_path / "exif.tiff"

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        if i == 0:  # placeholders, patched below once the child IFDs exist
            tags[34665] = OutTag.ints(34665, tiff.LONG, [0], "<")
            tags[34853] = OutTag.ints(34853, tiff.LONG, [0], "<")

    rewrite(src, crafted, edit)
    body = bytearray(crafted.read_bytes())
    ifd0 = read_tiff(bytes(body)).ifds[0]
    exif_text = b"2023:05:06 07:08:09\x00"
    if len(body) % 2:
        body += b"\x00"
    text_at = len(body)
    body += exif_text
    exif_at = len(body)
    body += struct.pack("<H", 1) + struct.pack("<HHII", 36867, 2, len(exif_text), text_at)
    body += struct.pack("<I", 0)
    gps_at = len(body)
    body += struct.pack("<H", 1) + struct.pack("<HHI4s", 0, 1, 4, b"\x02\x02\x00\x00")
    body += struct.pack("<I", 0)
    for i, code in enumerate(sorted(ifd0.tags)):
        if code in (34665, 34853):
            struct.pack_into(
                "<I", body, ifd0.offset + 2 + 12 * i + 8, exif_at if code == 34665 else gps_at
            )
    crafted.write_bytes(bytes(body))
    parsed = read_tiff(crafted)
    assert 34665 in parsed.ifds[0].children and 34853 in parsed.ifds[0].children
    dst = tmp_path / "o.tiff"
    report = deidentify(crafted, dst, SlideFormat.GENERIC_TIFF, P)
    assert b"2023:05:06 07:08:09" in report.identifying_values
    verify(dst, SlideFormat.GENERIC_TIFF, report.identifying_values)
    assert report.removed["tiff_tag.ExifIFD"] == 1 and report.removed["tiff_tag.GPSIFD"] == 1
    assert b"2023:05:06" not in dst.read_bytes()
    assert len(read_tiff(dst).ifds) == 4


def test_jpegtables_with_comment_rejected(tmp_path: Path) -> None:
    src = slide("aperio/small.svs")
    crafted = tmp_path / "com.svs"
    tables = read_tiff(src).ifds[0].tags[347].data
    comment = b"\xff\xfe\x00\x0eJohn Smith\x00\x00"
    hacked = tables[:2] + comment + tables[2:]

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        if i == 0:
            tags[347] = OutTag(347, tiff.UNDEFINED, len(hacked), hacked)

    rewrite(src, crafted, edit)
    with pytest.raises(DeidRejected) as e:
        deidentify(crafted, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    assert e.value.reason == "UNEXPECTED_TAG_VALUE" and "John" not in str(e.value)


def test_ndpi_unknown_property_key(tmp_path: Path) -> None:
    src = slide("hamamatsu/test3-DAPI-2-(387).ndpi")
    crafted = tmp_path / "prop.ndpi"
    props = read_tiff(src).ifds[0].tags[65449].text()

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        tags[65449] = OutTag.ascii(65449, "patient.name=Jane Roe\r\n" + props)

    rewrite(src, crafted, edit)
    with pytest.raises(DeidRejected) as e:
        deidentify(crafted, tmp_path / "o.ndpi", SlideFormat.HAMAMATSU_NDPI, P)
    assert e.value.reason == "UNKNOWN_NDPI_PROPERTY"
    assert "patient.name" in e.value.detail and "Jane" not in str(e.value)
    dst = tmp_path / "o.ndpi"
    policy = DeidPolicy(ndpi_unknown_property="drop")
    report = deidentify_and_verify(crafted, dst, SlideFormat.HAMAMATSU_NDPI, P, policy)
    assert report.removed["ndpi_property.unknown"] == 4
    assert b"Jane Roe" not in dst.read_bytes()


def test_ndpi_unknown_source_lens_rejected(tmp_path: Path) -> None:
    src = slide("hamamatsu/test3-DAPI-2-(387).ndpi")
    crafted = tmp_path / "lens.ndpi"

    def edit(i: int, tags: dict[int, OutTag]) -> None:
        if i == 5:
            tags[65421] = OutTag(65421, tiff.FLOAT, 1, struct.pack("<f", -7.0))

    rewrite(src, crafted, edit)
    with pytest.raises(DeidRejected) as e:
        deidentify(crafted, tmp_path / "o.ndpi", SlideFormat.HAMAMATSU_NDPI, P)
    assert e.value.reason == "UNKNOWN_NDPI_IFD"


# --- the verifier catches what de-identification must never produce -------------------------
def test_verify_rejects_trailing_bytes(tmp_path: Path) -> None:
    dst, report = run("aperio/small.svs", tmp_path)
    with open(dst, "ab") as fh:
        fh.write(b"Filename = CMU-1")
    with pytest.raises(DeidRejected) as e:
        verify(dst, SlideFormat.APERIO_SVS, report.identifying_values)
    assert e.value.reason == "VERIFICATION_FAILED"


def test_large_image_data_keeps_its_page_alignment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of image data from RUN_ALIGN_MIN bytes on start at their source offset modulo
    RUN_ALIGN (the kernel copy is then a third faster); the zero padding this leaves is
    accepted by the verifier, a non-zero byte in it is not. Small thresholds stand in for the
    real ones (2 MiB alignment of runs from 64 MiB)."""
    monkeypatch.setattr(tiff, "RUN_ALIGN", 4096)
    monkeypatch.setattr(tiff, "RUN_ALIGN_MIN", 16 << 10)
    src = slide("aperio/CMU-1-Small-Region.svs")
    dst, report = run("aperio/CMU-1-Small-Region.svs", tmp_path)
    a, b = read_tiff(src), read_tiff(dst)
    big = 0
    assert len(b.ifds) == 2  # level 0 and the thumbnail; label and macro removed
    for ia, ib in zip(a.ifds[:2], b.ifds, strict=True):
        (oa, ca), (ob, _cb) = ia.segment_arrays(), ib.segment_arrays()
        if int(ca.sum()) >= 16 << 10:  # (the tiles of these levels lie in one run each)
            big += 1
            assert int(ob.min()) % 4096 == int(oa.min()) % 4096
    assert big >= 2
    verify(dst, SlideFormat.APERIO_SVS, report.identifying_values)
    with tifffile.TiffFile(src) as ta, tifffile.TiffFile(dst) as tb:
        assert np.array_equal(ta.pages[0].asarray(), tb.pages[0].asarray())
    # the padding: bytes no IFD, tag value or tile refers to
    used = np.zeros(dst.stat().st_size, dtype=bool)
    for s0, e0 in b.metadata_regions():
        used[s0:e0] = True
    for ifd in b.all_ifds():
        for off, cnt in ifd.segments():
            used[off : off + cnt] = True
    free = np.flatnonzero(~used)
    assert len(free) > 64
    data = bytearray(dst.read_bytes())
    assert not any(data[int(k)] for k in free)
    data[int(free[len(free) // 2])] = 0x41
    dst.write_bytes(bytes(data))
    with pytest.raises(DeidRejected) as e:
        verify(dst, SlideFormat.APERIO_SVS, report.identifying_values)
    assert e.value.reason == "VERIFICATION_FAILED" and "padding" in e.value.detail


def test_verify_rejects_trailing_bytes_dicom(tmp_path: Path) -> None:
    dst, report = run("dicom/highdicom-sm/sm_image.dcm", tmp_path)
    with open(dst, "ab") as fh:
        fh.write(b"\x00" * 16)
    with pytest.raises(DeidRejected) as e:
        verify(dst, SlideFormat.DICOM_WSI, report.identifying_values)
    assert e.value.reason == "VERIFICATION_FAILED"


def test_verify_finds_forbidden_values(tmp_path: Path) -> None:
    dst, _ = run("aperio/small.svs", tmp_path)
    with pytest.raises(DeidRejected) as e:
        verify(dst, SlideFormat.APERIO_SVS, [b"StripeWidth"])
    assert e.value.reason == "VERIFICATION_FAILED"
    assert "StripeWidth" not in str(e.value)  # never echoes the value


def test_forbidden_search_encodings_and_boundaries(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(
        b"\x00" * 100 + "Jane Roe".encode("utf-16-be") + b"\x00" * 100 + b"x201906041y"
    )
    policy = DeidPolicy(buffer_size=64 << 10)
    with pytest.raises(DeidRejected):  # UTF-16 BE in metadata
        search_forbidden(blob, [b"Jane Roe"], [(0, 120)], policy)
    with pytest.raises(DeidRejected):  # UTF-16 in the whole stream
        search_forbidden(blob, [b"Jane Roe"], [], policy)
    # a date embedded in a longer number is not that date
    search_forbidden(blob, [b"20190604"], [(0, blob.stat().st_size)], policy)
    blob.write_bytes(b"date 20190604;")
    with pytest.raises(DeidRejected):
        search_forbidden(blob, [b"20190604"], [(0, blob.stat().st_size)], policy)


def test_forbidden_search_across_chunk_boundary(tmp_path: Path) -> None:
    blob = tmp_path / "big.bin"
    chunk = 64 << 10
    blob.write_bytes(b"\x01" * (chunk - 5) + b"SECRET-VALUE-XYZ" + b"\x01" * chunk)
    with pytest.raises(DeidRejected):
        search_forbidden(blob, [b"SECRET-VALUE-XYZ"], [], DeidPolicy(buffer_size=chunk))


def test_verify_rejects_corrupted_tile(tmp_path: Path) -> None:
    dst, report = run("aperio/CMU-1-Small-Region.svs", tmp_path)
    st = read_tiff(dst)
    segs = st.ifds[0].segments()
    data = dst.read_bytes()
    # 1) a sampled tile (the first) with destroyed JPEG headers fails to decode
    off, _cnt = segs[0]
    broken = bytearray(data)
    broken[off + 2 : off + 40] = b"\xff" * 38
    bad = tmp_path / "bad.svs"
    bad.write_bytes(bytes(broken))
    with pytest.raises(DeidRejected) as e:
        verify(bad, SlideFormat.APERIO_SVS, report.identifying_values)
    assert e.value.reason == "CORRUPT_IMAGE_DATA"
    # 2) any tile that lost its end-of-image marker is caught by the all-tiles marker scan
    off, cnt = segs[7]
    broken = bytearray(data)
    broken[off + cnt - 2 : off + cnt] = b"\x12\x34"
    bad.write_bytes(bytes(broken))
    with pytest.raises(DeidRejected) as e:
        verify(bad, SlideFormat.APERIO_SVS, report.identifying_values)
    assert e.value.reason == "CORRUPT_IMAGE_DATA" and "tile 7" in e.value.detail
    # and a plain copy of an untouched input with a label is not "verified"
    with pytest.raises(DeidRejected) as e:
        verify(slide("aperio/CMU-1-Small-Region.svs"), SlideFormat.APERIO_SVS, [])
    assert e.value.reason == "VERIFICATION_FAILED"


def test_verify_rejects_private_dicom_tag(tmp_path: Path) -> None:
    dst, _ = run("dicom/highdicom-sm/sm_image.dcm", tmp_path)
    ds = pydicom.dcmread(dst)
    ds.add_new(0x00091010, "LO", "hidden")
    ds.private_block(0x0009, "ACME", create=True)
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    with pytest.raises(DeidRejected) as e:
        verify(bad, SlideFormat.DICOM_WSI, [])
    assert e.value.reason == "VERIFICATION_FAILED"
    # an untouched input fails verification too
    with pytest.raises(DeidRejected):
        verify(slide("dicom/highdicom-sm/sm_image.dcm"), SlideFormat.DICOM_WSI, [])


def test_output_written_atomically(tmp_path: Path) -> None:
    dst, _ = run("aperio/small.svs", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name]


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="date_policy"):
        DeidPolicy(date_policy="shift")
    with pytest.raises(ValueError, match="buffer_size"):
        DeidPolicy(buffer_size=10)


def test_report_public_dict_is_value_free(tmp_path: Path) -> None:
    _dst, report = run("aperio/CMU-1-Small-Region.svs", tmp_path)
    public = report.public_dict()
    assert "identifying_values" not in public
    assert public["format"] == "aperio_svs" and public["levels_kept"] == 1
    assert public["mpp_x"] == pytest.approx(0.499) and public["objective_power"] == 20.0
    assert set(report.identifying_values) >= {v.encode() for v in CMU_VALUES}


def test_deid_of_copy_with_spaces_in_name(tmp_path: Path) -> None:
    src = tmp_path / "a slide (copy).ndpi"
    shutil.copy(slide("hamamatsu/test3-TRITC 2 (560).ndpi"), src)
    dst = tmp_path / "out dir"
    dst.mkdir()
    report = deidentify_and_verify(src, dst / "x y.ndpi", SlideFormat.HAMAMATSU_NDPI, P)
    assert report.levels_kept == 4


@pytest.mark.parametrize(
    "name",
    [
        "hamamatsu/test3-DAPI-2-(387).ndpi",
        "aperio/CMU-1-Small-Region.svs",
        "dicom/highdicom-sm/sm_image.dcm",
    ],
)
def test_files_without_extension(name: str, tmp_path: Path) -> None:
    """The service stores spool files as plain 'in'/'out': detection is by content only."""
    src = tmp_path / "in"
    shutil.copy(slide(name), src)
    fmt = sniff_file(src)
    assert fmt is sniff_file(slide(name))
    report = deidentify_and_verify(src, tmp_path / "out", fmt, P)
    assert report.levels_kept >= 1


def test_dicom_unknown_public_attribute_removed_and_reported(tmp_path: Path) -> None:
    ds = pydicom.dcmread(slide("dicom/highdicom-sm/sm_image.dcm"))
    ds.BodyPartExamined = "BRAIN"  # public, but not on the keep-list
    ds.add_new(0x00181030, "LO", "Protocol of Dr House")  # ProtocolName: profile X
    crafted = tmp_path / "in.dcm"
    ds.save_as(crafted)
    dst = tmp_path / "out.dcm"
    report = deidentify_and_verify(crafted, dst, SlideFormat.DICOM_WSI, P)
    assert report.removed["dicom_unknown_attribute.BodyPartExamined"] == 1
    assert report.removed["dicom_attribute.ProtocolName"] == 1
    out = pydicom.dcmread(dst, stop_before_pixels=True)
    assert "BodyPartExamined" not in out and "ProtocolName" not in out
    assert b"Dr House" not in dst.read_bytes()


def test_dicom_nested_identifiers_in_other_sequences(tmp_path: Path) -> None:
    """Identifying attributes are handled wherever they are nested."""
    ds = pydicom.dcmread(slide("dicom/highdicom-sm/sm_image.dcm"))
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    ref.InstitutionName = "Nested General Hospital"
    ds.ReferencedImageSequence = pydicom.Sequence([ref])
    crafted = tmp_path / "in.dcm"
    ds.save_as(crafted)
    dst = tmp_path / "out.dcm"
    report = deidentify_and_verify(crafted, dst, SlideFormat.DICOM_WSI, P)
    out = pydicom.dcmread(dst, stop_before_pixels=True)
    item = out.ReferencedImageSequence[0]
    assert item.ReferencedSOPInstanceUID == P.uid("1.2.3.4.5.6.7.8.9")
    assert "InstitutionName" not in item
    assert report.removed["dicom_attribute.InstitutionName"] == 1
    assert (
        b"Nested General" not in dst.read_bytes() and b"1.2.3.4.5.6.7.8.9" not in dst.read_bytes()
    )


def test_truncated_dicom_rejected(tmp_path: Path) -> None:
    data = slide("dicom/camelyon-jpeg/multi_frame_jpeg_camelyon_challenge_image.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 3000])
    with pytest.raises(DeidRejected) as e:
        deidentify(cut, tmp_path / "o.dcm", SlideFormat.DICOM_WSI, P)
    assert e.value.reason == "TRUNCATED_FILE"
    assert not (tmp_path / "o.dcm").exists()


def test_truncated_svs_rejected(tmp_path: Path) -> None:
    data = slide("aperio/CMU-1-Small-Region.svs").read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[:600_000])
    with pytest.raises(DeidRejected) as e:
        deidentify(cut, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    assert e.value.reason == "TRUNCATED_FILE"


def test_svs_description_with_raw_bytes(tmp_path: Path) -> None:
    """Non-UTF-8 bytes in an ASCII tag: removed fields go, kept fields must validate."""
    src = slide("aperio/small.svs")
    raw_desc = read_tiff(src).ifds[0].tags[270].data.rstrip(b"\x00")
    for mangled, ok in (
        (raw_desc.replace(b"User = b414003d", b"User = \xff\xfeM\xfcller b414003d"), True),
        (raw_desc.replace(b"AppMag = 20", b"AppMag = 2\xff0"), False),
    ):
        crafted = tmp_path / "raw.svs"

        def edit(i: int, tags: dict[int, OutTag], data: bytes = mangled) -> None:
            if i == 0:
                tags[270] = OutTag(270, tiff.ASCII, len(data) + 1, data + b"\x00")

        rewrite(src, crafted, edit)
        dst = tmp_path / "o.svs"
        if ok:
            report = deidentify_and_verify(crafted, dst, SlideFormat.APERIO_SVS, P)
            assert report.removed["svs_field.User"] == 2
            assert b"\xff\xfe" not in dst.read_bytes()[:4096]
        else:
            with pytest.raises(DeidRejected) as e:
                deidentify(crafted, dst, SlideFormat.APERIO_SVS, P)
            assert e.value.reason == "UNEXPECTED_SVS_VALUE"
