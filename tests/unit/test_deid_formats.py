"""De-identification of OME-TIFF, QPTIFF, Philips TIFF and Ventana BIF, and hostile inputs."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
import tifffile

from services.deid.engine import (
    DeidNeedsReview,
    DeidPolicy,
    DeidRejected,
    deidentify,
    deidentify_and_verify,
    verify,
)
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import tiff
from services.shared.wsi.safexml import XmlRejected, parse_xml
from services.shared.wsi.sniff import InvalidSlide, SlideFormat, inspect_slide, sniff_file
from services.shared.wsi.tiff import TiffError, read_tiff
from tests.fixtures import wsigen as F

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"
P = Pseudonymizer(b"k" * 32, "siteA")


def slide(name: str) -> Path:
    p = SLIDES / name
    if not p.is_file():
        pytest.fail(f"sample slide missing: {p}")
    return p


def segments_bytes(path: Path) -> list[bytes]:
    """Raw compressed bytes of every tile/strip of every IFD (SubIFDs included), in order."""
    st = read_tiff(path)
    data = path.read_bytes()
    return [data[o : o + c] for ifd in st.all_ifds() for o, c in ifd.segments()]


# --- safe XML ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("xml", "reason"),
    [
        ('<!DOCTYPE a [<!ENTITY x "boom">]><a>&x;</a>', "XML_DTD"),
        ('<!DOCTYPE a SYSTEM "file:///etc/passwd"><a/>', "XML_DTD"),
        ("<a>&undefined;</a>", "XML_MALFORMED"),
        ("<a><b></a>", "XML_MALFORMED"),
        ("<a>" * 100 + "</a>" * 100, "XML_TOO_DEEP"),
        ("", "XML_MALFORMED"),
    ],
)
def test_safe_xml_refuses_dtd_entities_and_garbage(xml: str, reason: str) -> None:
    with pytest.raises(XmlRejected) as e:
        parse_xml(xml)
    assert e.value.reason == reason


def test_safe_xml_ignores_false_encoding_declaration() -> None:
    root = parse_xml('<?xml version="1.0" encoding="utf-16"?><r a="1">t\u00e9</r>')
    assert (root.name, root.attrs, root.text) == ("r", {"a": "1"}, "t\u00e9")


# --- OME-TIFF ----------------------------------------------------------------------------------
def test_ome_real_sample(tmp_path: Path) -> None:
    src = slide("ome-tiff/4D-series.ome.tiff")
    dst = tmp_path / "o.ome.tiff"
    original_uuid = b"c8a261cc-6798-4e58-885a-dcee460619f9"
    report = deidentify_and_verify(src, dst, SlideFormat.OME_TIFF, P)
    out = dst.read_bytes()
    assert b"4D-series" not in out and original_uuid not in out and b"Bio-Formats" not in out
    assert b"ImageJ=" not in out  # descriptions of the other pages
    assert report.pseudonymized["ome.image_name"] == 1
    assert sniff_file(dst) is SlideFormat.OME_TIFF
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(dst) as b:
        assert len(b.pages) == 35
        assert b.series[0].shape == a.series[0].shape == (7, 5, 167, 439)
        assert np.array_equal(a.series[0].asarray(), b.series[0].asarray())
    assert segments_bytes(src) == segments_bytes(dst)


OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def ome_doc(image_extra: str = "", root_extra: str = "", channel: str = "", uid: str = "") -> str:
    uid = uid or f"urn:uuid:{uuid.uuid4()}"
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="{OME_NS}" UUID="{uid}" '
        'Creator="ScannerSoft 1.2">'
        '<Experimenter ID="Experimenter:0" FirstName="Alice" LastName="Pathologist" '
        'Email="alice.pathologist@hospital.example" Institution="Saint Example Hospital"/>'
        '<Image ID="Image:0" Name="S21-12345 patient Doe">'
        "<AcquisitionDate>2021-03-17T10:11:12</AcquisitionDate>"
        '<ExperimenterRef ID="Experimenter:0"/>'
        "<Description>biopsy of John Doe, MRN 99887766</Description>"
        f"{image_extra}"
        '<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="512" SizeY="512" '
        'SizeC="3" SizeZ="1" SizeT="1" Interleaved="true" PhysicalSizeX="0.25" '
        'PhysicalSizeXUnit="\u00b5m" PhysicalSizeY="0.25" PhysicalSizeYUnit="\u00b5m">'
        f'<Channel ID="Channel:0:0" SamplesPerPixel="3"{channel}><LightPath/></Channel>'
        f'<TiffData IFD="0" PlaneCount="1"><UUID FileName="S21-12345_patient.ome.tiff">{uid}'
        "</UUID></TiffData></Pixels></Image>"
        f"{root_extra}"
        '<StructuredAnnotations><CommentAnnotation ID="Annotation:0">'
        "<Value>slide of Mr Johnathan Doe</Value></CommentAnnotation></StructuredAnnotations>"
        "</OME>"
    )


PLANTED_OME = [
    b"Alice",
    b"Pathologist",
    b"alice.pathologist@hospital.example",
    b"Saint Example Hospital",
    b"S21-12345",
    b"2021-03-17",
    b"John Doe",
    b"99887766",
    b"Johnathan Doe",
    b"ScannerSoft",
]


def test_ome_pyramid_with_subifds_and_planted_metadata(tmp_path: Path) -> None:
    src = F.make_ome_pyramid(tmp_path / "in.ome.tiff", xml=ome_doc())
    dst = tmp_path / "out.ome.tiff"
    report = deidentify_and_verify(src, dst, SlideFormat.OME_TIFF, P)
    assert report.level_dimensions == [(512, 512), (256, 256), (128, 128)]
    out = dst.read_bytes()
    for value in PLANTED_OME:
        assert value not in out, value
    assert report.removed["ome.Experimenter"] == 1
    assert report.removed["ome.StructuredAnnotations"] == 1
    assert report.removed["ome.acquisition_date"] == 1
    st = read_tiff(dst)
    assert [k.width for k in st.ifds[0].children[tiff.SUB_IFDS]] == [256, 128]
    assert segments_bytes(src) == segments_bytes(dst)  # pyramid kept byte for byte
    with tifffile.TiffFile(dst) as t:
        levels = t.series[0].levels
        assert [lv.shape for lv in levels] == [(512, 512, 3), (256, 256, 3), (128, 128, 3)]
        with tifffile.TiffFile(src) as s:
            assert np.array_equal(levels[2].asarray(), s.series[0].levels[2].asarray())
        xml = t.pages[0].description
    assert 'Name="image-0"' in xml and 'PhysicalSizeX="0.25"' in xml and "\u00b5m" in xml


def test_ome_year_policy_keeps_only_the_year(tmp_path: Path) -> None:
    src = F.make_ome_pyramid(tmp_path / "in.ome.tiff", xml=ome_doc())
    dst = tmp_path / "out.ome.tiff"
    deidentify_and_verify(src, dst, SlideFormat.OME_TIFF, P, DeidPolicy(date_policy="year"))
    with tifffile.TiffFile(dst) as t:
        assert "<AcquisitionDate>2021-01-01T00:00:00</AcquisitionDate>" in t.pages[0].description


def test_ome_tifffile_metadata_and_label_image_dropped(tmp_path: Path) -> None:
    src = F.make_ome_pyramid(tmp_path / "in.ome.tiff", with_label=True)
    # tifffile names the second series "Image:1"; make it a converter-style label image
    st = read_tiff(src)
    xml = st.ifds[0].description or ""
    assert xml.count("<Image ") == 2
    xml = xml.replace('Name="Image1"', 'Name="label"', 1)
    crafted = tmp_path / "label.ome.tiff"
    _rewrite_description(src, crafted, xml)
    dst = tmp_path / "out.ome.tiff"
    report = deidentify_and_verify(crafted, dst, SlideFormat.OME_TIFF, P)
    assert report.removed["associated_image.ome_label"] == 1
    out = read_tiff(dst)
    assert len(out.ifds) == 1 and (out.ifds[0].width, out.ifds[0].height) == (512, 512)


def _rewrite_description(src: Path, dst: Path, xml: str) -> None:
    from services.shared.wsi.tiff import OutIfd, OutTag, write_tiff

    st = read_tiff(src)

    def conv(ifd: tiff.TiffIfd, first: bool) -> OutIfd:
        tags = [
            OutTag.copy(t)
            for c, t in ifd.tags.items()
            if c not in tiff.DATA_OFFSET_TAGS | {tiff.SUB_IFDS, 270}
        ]
        if first:
            tags.append(OutTag.ascii(270, xml))
        kids = [conv(k, False) for k in ifd.children.get(tiff.SUB_IFDS, [])]
        return OutIfd(sorted(tags, key=lambda t: t.code), ifd.segments(), ifd.is_tiled, kids)

    with open(src, "rb") as fs, open(dst, "wb") as fd:
        outs = [conv(i, n == 0) for n, i in enumerate(st.ifds)]
        write_tiff(fs, fd, outs, byteorder=st.byteorder, flavor=st.flavor)


def test_ome_binary_only_rejected_naming_it(tmp_path: Path) -> None:
    src = F.make_ome_pyramid(tmp_path / "in.ome.tiff", xml=ome_doc(root_extra="<BinaryOnly/>"))
    with pytest.raises(DeidRejected) as e:
        deidentify(src, tmp_path / "o.ome.tiff", SlideFormat.OME_TIFF, P)
    assert e.value.reason == "UNSUPPORTED_STRUCTURE"
    assert "BinaryOnly" in e.value.detail


@pytest.mark.parametrize(
    ("kwargs", "key", "reason", "value"),
    [
        (
            {"image_extra": "<Secret>case of Jane Roe-4471</Secret>"},
            "ome:Image/Secret",
            "UNKNOWN_OME_ELEMENT",
            b"Jane Roe-4471",
        ),
        (
            {"root_extra": '<Screening Reader="Dr Q. Examplewoman"/>'},
            "ome:OME/Screening",
            "UNKNOWN_OME_ELEMENT",
            b"Examplewoman",
        ),
        (
            {"channel": ' PatientName="Doe^Janet-9931"'},
            "ome:Channel[PatientName]",
            "UNKNOWN_OME_ATTRIBUTE",
            b"Doe^Janet-9931",
        ),
    ],
)
def test_ome_unknown_content_is_held_for_review_then_removed_by_rule(
    tmp_path: Path, kwargs: dict[str, str], key: str, reason: str, value: bytes
) -> None:
    src = F.make_ome_pyramid(tmp_path / "in.ome.tiff", xml=ome_doc(**kwargs))
    dst = tmp_path / "o.ome.tiff"
    with pytest.raises(DeidNeedsReview) as e:
        deidentify(src, dst, SlideFormat.OME_TIFF, P)
    assert [i.key for i in e.value.items] == [key]
    assert e.value.reason == reason
    assert value.decode() not in str(e.value) and not dst.exists()
    remove = DeidPolicy(approved_rules=((key, "remove"),))
    report = deidentify_and_verify(src, dst, SlideFormat.OME_TIFF, P, remove)
    data = dst.read_bytes()
    assert value not in data and key.split("/")[-1].split("[")[-1].rstrip("]").encode() not in data
    # the verifier searched the output for the dropped text
    assert any(value in v for v in report.identifying_values)
    assert sum(n for k, n in report.removed.items() if k.startswith("ome.unknown_")) == 1
    with pytest.raises(DeidRejected) as r:  # OME-XML content is never kept by a rule
        deidentify(src, dst, SlideFormat.OME_TIFF, P, DeidPolicy(approved_rules=((key, "keep"),)))
    assert r.value.reason == reason and "only remove" in r.value.detail


def test_ome_foreign_namespace_element_still_rejected(tmp_path: Path) -> None:
    extra = '<x:Secret xmlns:x="urn:example:vendor">Jane Roe</x:Secret>'
    src = F.make_ome_pyramid(tmp_path / "in.ome.tiff", xml=ome_doc(image_extra=extra))
    with pytest.raises(DeidRejected) as e:
        deidentify(src, tmp_path / "o.ome.tiff", SlideFormat.OME_TIFF, P)
    assert e.value.reason == "UNKNOWN_OME_ELEMENT" and "Jane Roe" not in str(e.value)
    assert "Doe" not in str(e.value) and "Alice" not in str(e.value)
    assert not (tmp_path / "o.ome.tiff").exists()


def test_ome_hostile_xml_rejected(tmp_path: Path) -> None:
    bomb = ome_doc().replace(
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<?xml version="1.0"?><!DOCTYPE OME [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;">]>',
    )
    for n, xml in enumerate(
        [bomb, ome_doc().replace("</OME>", ""), ome_doc(uid="urn:uuid:" + "0" * 36)]
    ):
        src = F.make_ome_pyramid(tmp_path / f"in{n}.ome.tiff", xml=xml)
        if n == 2:  # a TiffData UUID that is not the document's own: multi-file OME-TIFF
            raw = src.read_bytes().replace(b"0" * 36 + b"</UUID>", b"1" * 36 + b"</UUID>")
            src.write_bytes(raw)
        with pytest.raises(DeidRejected) as e:
            deidentify(src, tmp_path / "o.ome.tiff", SlideFormat.OME_TIFF, P)
        assert e.value.reason in ("MALFORMED_OME_XML", "UNSUPPORTED_STRUCTURE")


# --- QPTIFF ------------------------------------------------------------------------------------
QPTIFF_VALUES = [
    b"RTM61_1",
    b"WIN-518AEG3GFG2",
    b"688b0669-3edf-4fcf-957a-47b06bacfa36",
    b"2020-09-22",
    b"albert_einstein_3channel_fluor",
    b"2020:10:30",
]


def test_qptiff_real_sample(tmp_path: Path) -> None:
    src = slide("perkinelmer-qptiff/small_vectra.qptiff")
    dst = tmp_path / "o.qptiff"
    report = deidentify_and_verify(src, dst, SlideFormat.QPTIFF, P)
    out = dst.read_bytes()
    for value in QPTIFF_VALUES:
        assert value not in out, value
    assert report.removed["associated_image.macro"] == 1  # the Overview page
    assert report.removed["associated_image.label"] == 1
    assert report.removed["associated_image.thumbnail"] == 1
    st = read_tiff(dst)
    assert len(st.ifds) == 3 and all(i.width == 1920 for i in st.ifds)
    # channel and filter names needed to interpret the image are kept
    names = [i.description or "" for i in st.ifds]
    for ch, flt in (("DAPI", "Semrock:FF01-453"), ("FITC", "ET510LP"), ("Cy3", "HQ572LP")):
        assert any(f"<Name>{ch}</Name>" in d and flt in d for d in names)
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(dst) as b:
        for i in range(3):
            assert np.array_equal(a.pages[i].asarray(), b.pages[i].asarray())
    src_segs = [s for i in read_tiff(src).ifds[:3] for s in i.segments()]
    raw = src.read_bytes()
    assert [raw[o : o + c] for o, c in src_segs] == segments_bytes(dst)  # strips verbatim


def test_qptiff_unknown_element_is_held_then_ruled(tmp_path: Path) -> None:
    src = slide("perkinelmer-qptiff/small_vectra.qptiff")
    raw = src.read_bytes()
    # same length, so every offset stays valid: <Barcode /> becomes an unknown element
    crafted = tmp_path / "c.qptiff"
    crafted.write_bytes(raw.replace(b"<Barcode />", b"<Pt>Q7</Pt>"))
    dst = tmp_path / "o.qptiff"
    with pytest.raises(DeidNeedsReview) as e:
        deidentify(crafted, dst, SlideFormat.QPTIFF, P)
    assert {i.key for i in e.value.items} == {"qptiff:Pt"}
    assert e.value.reason == "UNKNOWN_QPTIFF_ELEMENT" and "Q7" not in str(e.value)
    assert not dst.exists()
    keep = DeidPolicy(approved_rules=(("qptiff:Pt", "keep"),))
    deidentify_and_verify(crafted, dst, SlideFormat.QPTIFF, P, keep)
    assert b"<Pt>Q7</Pt>" in dst.read_bytes()
    # the verifier accepts the kept element only under the rule that keeps it
    with pytest.raises(DeidRejected, match="Pt"):
        verify(dst, SlideFormat.QPTIFF, [], DeidPolicy())
    remove = DeidPolicy(approved_rules=(("qptiff:Pt", "remove"),))
    report = deidentify_and_verify(crafted, dst, SlideFormat.QPTIFF, P, remove)
    assert b"<Pt>" not in dst.read_bytes() and report.removed["qptiff.Pt"] >= 1


def test_qptiff_unknown_element_with_structure_is_never_kept(tmp_path: Path) -> None:
    src = slide("perkinelmer-qptiff/small_vectra.qptiff")
    crafted = tmp_path / "c.qptiff"
    crafted.write_bytes(src.read_bytes().replace(b"<Barcode />", b"<P><Q/></P>"))
    keep = DeidPolicy(approved_rules=(("qptiff:P", "keep"),))
    with pytest.raises(DeidRejected) as e:
        deidentify(crafted, tmp_path / "o.qptiff", SlideFormat.QPTIFF, P, keep)
    assert e.value.reason == "UNKNOWN_QPTIFF_ELEMENT" and "has structure" in e.value.detail


# --- Philips TIFF (synthetic) ------------------------------------------------------------------
def test_philips_synthetic(tmp_path: Path) -> None:
    src = F.make_philips(tmp_path / "in.tiff")
    assert sniff_file(src) is SlideFormat.PHILIPS_TIFF
    with openslide.OpenSlide(str(src)) as s:  # the fixture is a Philips slide for OpenSlide
        assert set(s.associated_images) == {"label", "macro"}
    dst = tmp_path / "out.tiff"
    report = deidentify_and_verify(src, dst, SlideFormat.PHILIPS_TIFF, P)
    out = dst.read_bytes()
    for value in F.PLANTED_PHILIPS.values():
        assert value.encode() not in out, value
    assert report.levels_kept == 3
    assert report.removed["associated_image.label"] == 1
    assert report.removed["associated_image.macro"] == 1
    assert report.removed["associated_image.philips_label"] == 1  # the base64 copy in the XML
    with openslide.OpenSlide(str(dst)) as s:
        assert s.properties["openslide.vendor"] == "philips"
        assert not s.associated_images and "openslide.barcode" not in s.properties
        assert s.level_dimensions == ((512, 512), (256, 256), (128, 128))
    src_levels = [s for i in read_tiff(src).ifds[:3] for s in i.segments()]
    raw = src.read_bytes()
    assert [raw[o : o + c] for o, c in src_levels] == segments_bytes(dst)


def test_philips_unknown_attribute_rejected(tmp_path: Path) -> None:
    extra = F._attr("PIM_DP_PATIENT_NAME", "Doe^John")
    src = F.make_philips(tmp_path / "in.tiff", extra)
    with pytest.raises(DeidRejected) as e:
        deidentify(src, tmp_path / "o.tiff", SlideFormat.PHILIPS_TIFF, P)
    assert e.value.reason == "UNKNOWN_PHILIPS_ATTRIBUTE"
    assert "PIM_DP_PATIENT_NAME" in e.value.detail and "Doe" not in e.value.detail


# --- Ventana BIF (synthetic) -------------------------------------------------------------------
def test_bif_synthetic(tmp_path: Path) -> None:
    src = F.make_bif(tmp_path / "in.bif")
    assert sniff_file(src) is SlideFormat.VENTANA_BIF
    dst = tmp_path / "out.bif"
    report = deidentify_and_verify(src, dst, SlideFormat.VENTANA_BIF, P)
    out = dst.read_bytes()
    for value in F.PLANTED_BIF.values():
        assert value.encode() not in out, value
    assert report.levels_kept == 2
    assert report.removed["associated_image.label"] == 1
    assert report.removed["associated_image.macro"] == 2  # Thumbnail and Probability
    st = read_tiff(dst)
    assert [i.description for i in st.ifds] == [
        "level=0 mag=40 quality=95",
        "level=1 mag=20 quality=95",
    ]
    xmp = st.ifds[0].tags[700].data
    assert b'<iScan Magnification="40" ScanRes="0.25"' in xmp and b"TileJointInfo" in xmp
    assert sniff_file(dst) is SlideFormat.VENTANA_BIF
    src_levels = [s for i in read_tiff(src).ifds[3:] for s in i.segments()]
    raw = src.read_bytes()
    assert [raw[o : o + c] for o, c in src_levels] == segments_bytes(dst)


def test_bif_unknown_iscan_attribute_rejected(tmp_path: Path) -> None:
    src = F.make_bif(tmp_path / "in.bif", 'PatientName="Doe^John"')
    with pytest.raises(DeidRejected) as e:
        deidentify(src, tmp_path / "o.bif", SlideFormat.VENTANA_BIF, P)
    assert e.value.reason == "UNKNOWN_BIF_ATTRIBUTE"
    assert "PatientName" in e.value.detail and "Doe" not in e.value.detail


# --- hostile inputs ----------------------------------------------------------------------------
def test_zero_byte_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(InvalidSlide) as e:
        inspect_slide(empty)
    assert e.value.reason == "NOT_A_SLIDE"
    with pytest.raises(DeidRejected):
        deidentify(empty, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    with pytest.raises(TiffError) as t:
        read_tiff(b"")
    assert t.value.reason == "NOT_TIFF"


def test_truncated_inside_an_ifd(tmp_path: Path) -> None:
    src = slide("aperio/small.svs")
    st = read_tiff(src)
    ifd = st.ifds[-1]
    cut = tmp_path / "cut.svs"
    cut.write_bytes(src.read_bytes()[: ifd.offset + 2 + 12 * 3])  # inside the entry table
    with pytest.raises(TiffError) as t:
        read_tiff(cut)
    assert t.value.reason == "TRUNCATED"
    with pytest.raises(InvalidSlide) as e:
        inspect_slide(cut)
    assert e.value.reason == "TRUNCATED_FILE"
    with pytest.raises(DeidRejected) as d:
        deidentify(cut, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    assert d.value.reason == "TRUNCATED_FILE"


def test_subifd_list_and_chain_is_not_a_loop_but_a_real_loop_is() -> None:
    # two SubIFDs listed in tag 330 *and* chained by their next pointers (as tifffile writes)
    def ifd(n_next: int, extra: list[tuple[int, int, int, int]]) -> bytes:
        entries = [(256, 3, 1, 1), (257, 3, 1, 1), *extra]
        out = struct.pack("<H", len(entries))
        for code, typ, count, value in sorted(entries):
            out += struct.pack("<HHII", code, typ, count, value)
        return out + struct.pack("<I", n_next)

    size = 2 + 12 * 2 + 4  # a child IFD with two entries
    base = 8
    kid1, kid2 = base, base + size
    parent_at = kid2 + size
    values_at = parent_at + 2 + 12 * 3 + 4
    chained = (
        b"II*\x00"
        + struct.pack("<I", parent_at)
        + ifd(kid2, [])
        + ifd(0, [])
        + ifd(0, [(330, 13, 2, values_at)])
        + struct.pack("<II", kid1, kid2)
    )
    st = read_tiff(chained)
    assert len(st.ifds[0].children[330]) == 2
    looped = chained[:8] + ifd(kid1, []) + chained[8 + size :]  # kid1 -> kid1
    st2 = read_tiff(looped)  # the self-pointer is ignored once kid1 is read; nothing repeats
    assert len(st2.ifds[0].children[330]) == 2
    loop3 = chained[:8] + ifd(parent_at, []) + chained[8 + size :]  # kid1 -> parent
    with pytest.raises(TiffError) as e:
        read_tiff(loop3)
    assert e.value.reason == "IFD_LOOP"


def test_svs_non_ascii_utf8_description(tmp_path: Path) -> None:
    from tests.unit.test_deid_engine import rewrite

    src = slide("aperio/small.svs")
    raw = read_tiff(src).ifds[0].tags[270].data.rstrip(b"\x00")
    mangled = raw.replace(b"User = b414003d", "User = Jürgen Müller b414003d".encode())
    crafted = tmp_path / "utf8.svs"

    def edit(i: int, tags: dict[int, tiff.OutTag]) -> None:
        if i == 0:
            tags[270] = tiff.OutTag(270, tiff.ASCII, len(mangled) + 1, mangled + b"\x00")

    rewrite(src, crafted, edit)
    dst = tmp_path / "o.svs"
    deidentify_and_verify(crafted, dst, SlideFormat.APERIO_SVS, P)
    out = dst.read_bytes()
    assert "Müller".encode() not in out and "Müller".encode("latin-1") not in out


def test_svs_without_label_and_macro_keeps_every_level(tmp_path: Path) -> None:
    src = slide("aperio/tcga-cr-7395-01a-01-ts1.svs")  # label and macro already removed
    report = deidentify_and_verify(src, tmp_path / "o.svs", SlideFormat.APERIO_SVS, P)
    assert report.levels_kept == 2
    assert report.level_dimensions == [(4443, 3567), (2221, 1783)]
    assert not any(k.startswith("associated_image.") for k in report.removed)


def _dicom_variant(tmp_path: Path, edit: object) -> Path:
    ds = pydicom.dcmread(slide("dicom/highdicom-sm/sm_image.dcm"))
    edit(ds)  # type: ignore[operator]
    out = tmp_path / "v.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_dicom_empty_sequences(tmp_path: Path) -> None:
    def edit(ds: pydicom.Dataset) -> None:
        ds.ReferencedSeriesSequence = pydicom.Sequence([])
        ds.OtherPatientIDsSequence = pydicom.Sequence([])
        if "SpecimenDescriptionSequence" in ds:
            ds.SpecimenDescriptionSequence[0].SpecimenPreparationSequence = pydicom.Sequence([])

    src = _dicom_variant(tmp_path, edit)
    dst = tmp_path / "o.dcm"
    deidentify_and_verify(src, dst, SlideFormat.DICOM_WSI, P)
    assert b"AA01" not in dst.read_bytes()


def test_dicom_private_creator_without_private_data(tmp_path: Path) -> None:
    def edit(ds: pydicom.Dataset) -> None:
        ds.add_new(0x00090010, "LO", "ACME PRIVATE")

    src = _dicom_variant(tmp_path, edit)
    dst = tmp_path / "o.dcm"
    deidentify_and_verify(src, dst, SlideFormat.DICOM_WSI, P)
    assert b"ACME PRIVATE" not in dst.read_bytes()


_FUZZ_FILES = [
    ("aperio/small.svs", SlideFormat.APERIO_SVS),
    ("generic-tiff/boxes.tiff", SlideFormat.GENERIC_TIFF),
    ("perkinelmer-qptiff/small_vectra.qptiff", SlideFormat.QPTIFF),
    ("ome-tiff/4D-series.ome.tiff", SlideFormat.OME_TIFF),
    ("dicom/highdicom-sm/sm_image.dcm", SlideFormat.DICOM_WSI),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "fmt"), _FUZZ_FILES)
def test_mangled_inputs_fail_cleanly(tmp_path: Path, name: str, fmt: SlideFormat) -> None:
    """Truncations and flipped metadata bytes: only our own error types, never a crash."""
    data = slide(name).read_bytes()
    rng = np.random.default_rng(7)
    meta_end = min(len(data), 4096)
    variants = [data[:n] for n in (0, 7, 8, 15, 64, 200, len(data) // 2, len(data) - 1)]
    for _ in range(24):
        buf = bytearray(data)
        for pos in rng.integers(0, meta_end, 4):
            buf[int(pos)] ^= int(rng.integers(1, 256))
        variants.append(bytes(buf))
    for n, blob in enumerate(variants):
        src = tmp_path / f"v{n}{Path(name).suffix}"
        src.write_bytes(blob)
        dst = tmp_path / f"o{n}{Path(name).suffix}"
        try:
            deidentify_and_verify(src, dst, fmt, P)
        except (DeidRejected, InvalidSlide):
            assert not dst.exists()


# --- date policy -------------------------------------------------------------------------------
def test_year_policy_dicom(tmp_path: Path) -> None:
    src = slide("dicom/highdicom-sm/sm_image.dcm")
    dst = tmp_path / "o.dcm"
    deidentify_and_verify(src, dst, SlideFormat.DICOM_WSI, P, DeidPolicy(date_policy="year"))
    ds = pydicom.dcmread(dst, stop_before_pixels=True)
    assert ds.StudyDate == "20190101"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert b"20190604" not in dst.read_bytes()
    default = tmp_path / "d.dcm"
    deidentify_and_verify(src, default, SlideFormat.DICOM_WSI, P)
    assert pydicom.dcmread(default, stop_before_pixels=True).StudyDate == ""


def test_year_policy_tiff_datetime(tmp_path: Path) -> None:
    src = slide("hamamatsu/test3-DAPI-2-(387).ndpi")
    dst = tmp_path / "o.ndpi"
    policy = DeidPolicy(date_policy="year")
    deidentify_and_verify(src, dst, SlideFormat.HAMAMATSU_NDPI, P, policy)
    st = read_tiff(dst)
    assert {i.tags[306].text() for i in st.ifds} == {"2017:01:01 00:00:00"}
    assert b"2017:02:07" not in dst.read_bytes()


# --- macro policy ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("aperio/CMU-1-Small-Region.svs", SlideFormat.APERIO_SVS),
        ("hamamatsu/test3-DAPI-2-(387).ndpi", SlideFormat.HAMAMATSU_NDPI),
    ],
)
def test_blank_label_keeps_macro_with_black_label_band(
    tmp_path: Path, name: str, fmt: SlideFormat
) -> None:
    from services.deid.engine import verify
    from services.deid.engine.macro import band_width

    src = slide(name)
    dst = tmp_path / ("o" + src.suffix)
    policy = DeidPolicy(macro_policy="blank_label")
    report = deidentify_and_verify(src, dst, fmt, P, policy)
    assert report.removed["macro.label_band_blanked"] == 1
    with openslide.OpenSlide(str(src)) as a, openslide.OpenSlide(str(dst)) as b:
        assert "macro" in b.associated_images and "label" not in b.associated_images
        before = np.asarray(a.associated_images["macro"].convert("RGB")).astype(int)
        after = np.asarray(b.associated_images["macro"].convert("RGB")).astype(int)
        assert before.shape == after.shape
        w = band_width(after.shape[1], policy)
        assert after[:, :w].max() == 0
        # the tissue end is still the same picture (JPEG re-encoded once)
        assert np.abs(after[:, w + 16 :] - before[:, w + 16 :]).mean() < 4
        for i in range(len(a.level_dimensions)):  # pyramid untouched
            region = (0, 0), i, (64, 64)
            assert np.array_equal(
                np.asarray(a.read_region(*region)), np.asarray(b.read_region(*region))
            )
    # an output blanked less than the policy asks is caught by the verifier
    narrow = tmp_path / ("n" + src.suffix)
    deidentify(
        src, narrow, fmt, P, DeidPolicy(macro_policy="blank_label", macro_label_fraction=0.1)
    )
    with pytest.raises(DeidRejected) as e:
        verify(narrow, fmt, [], DeidPolicy(macro_policy="blank_label", macro_label_fraction=0.6))
    assert e.value.reason == "VERIFICATION_FAILED"
    # with the default policy a kept macro is a failure
    with pytest.raises(DeidRejected):
        verify(dst, fmt, [], DeidPolicy())


def test_macro_policy_validation() -> None:
    with pytest.raises(ValueError, match="macro_policy"):
        DeidPolicy(macro_policy="keep")
    with pytest.raises(ValueError, match="macro_label_fraction"):
        DeidPolicy(macro_label_fraction=0.0)
    assert DeidPolicy(date_policy="year").date_policy == "year"


def test_blank_label_philips_synthetic(tmp_path: Path) -> None:
    src = F.make_philips(tmp_path / "in.tiff")
    dst = tmp_path / "out.tiff"
    policy = DeidPolicy(macro_policy="blank_label")
    deidentify_and_verify(src, dst, SlideFormat.PHILIPS_TIFF, P, policy)
    with openslide.OpenSlide(str(dst)) as s:
        assert set(s.associated_images) == {"macro"}
        img = np.asarray(s.associated_images["macro"].convert("RGB"))
        assert img[:, :200].max() == 0 and img[:, 300:].mean() > 50


def test_inspect_new_formats(tmp_path: Path) -> None:
    ome = inspect_slide(F.make_ome_pyramid(tmp_path / "p.ome.tiff"))
    assert ome.format is SlideFormat.OME_TIFF
    assert ome.level_dimensions == ((512, 512), (256, 256), (128, 128))
    philips = inspect_slide(F.make_philips(tmp_path / "p.tiff"))
    assert philips.format is SlideFormat.PHILIPS_TIFF and philips.level_count == 3
    bif = inspect_slide(F.make_bif(tmp_path / "b.bif"))
    assert bif.format is SlideFormat.VENTANA_BIF and bif.level_count == 2
    qp = inspect_slide(slide("perkinelmer-qptiff/small_vectra.qptiff"))
    assert qp.level_dimensions == ((1920, 1440),) and qp.compression == "lzw"
