"""Ventana / Roche BIF rules (iScan, DP 200/600).

**Assumptions** (no real BIF was available; the rules follow the publicly documented layout as
OpenSlide describes it):

* pyramid levels are tiled IFDs whose ImageDescription is ``level=<n> mag=<m> quality=<q>``;
* the label is an IFD described ``Label Image`` (or ``Label_Image``/``Label``); the slide
  overview is ``Thumbnail``; ``Probability`` (a tissue-probability map of the overview) also
  shows the whole glass slide;
* XMP (tag 700) holds an ``iScan`` element whose attributes carry scanner and slide
  information (``BarCode1D``, ``BarCode2D``, ``ScanDate``, ``ScanTime``, ``UnitNumber``,
  ``UserName`` ...) and, on level 0, an ``EncodeInfo`` tree (AOI and tile-joint geometry that
  readers need to place the tiles).

Rules: level IFDs are kept (description re-validated), label/overview/probability IFDs dropped,
any other description rejects the slide. XMP is rebuilt: ``iScan`` keeps geometry and optics
attributes and its ``AOI<n>`` rectangles, loses the identifying ones; ``EncodeInfo`` keeps its
known structural elements with short numeric/enum attribute values; anything else rejects the
slide naming the element or attribute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.deid.engine.model import (
    UNEXPECTED_IFD,
    UNEXPECTED_TAG_VALUE,
    DeidRejected,
    Tally,
    printable_name,
)
from services.deid.engine.tiff_common import FormatTagRules
from services.shared.wsi import tiff
from services.shared.wsi.safexml import XmlNode, XmlRejected, parse_xml, render
from services.shared.wsi.tiff import OutTag, TiffIfd, TiffStructure, TiffTag

UNKNOWN_BIF_ELEMENT = "UNKNOWN_BIF_ELEMENT"
UNKNOWN_BIF_ATTRIBUTE = "UNKNOWN_BIF_ATTRIBUTE"
MALFORMED_BIF_XMP = "MALFORMED_BIF_XMP"
XMP = 700

LEVEL = re.compile(r"^level=\d{1,2} mag=\d{1,3}(?:\.\d+)? quality=\d{1,3}$")
ASSOCIATED = {
    "label image": "label",
    "label_image": "label",
    "label": "label",
    "thumbnail": "macro",
    "probability": "macro",
    "probability image": "macro",
}
_VALUE = re.compile(r"^[A-Za-z0-9 .\-_+]{0,64}$")
ISCAN_KEEP = frozenset(
    {
        "Magnification",
        "ScanRes",
        "Z-layers",
        "Z-spacing",
        "FocusMode",
        "ScannerModel",
        "BuildVersion",
        "ScanMode",
        "SpectralProfile",
    }
)
ISCAN_REMOVE_IDENTIFYING = frozenset(
    {
        "BarCode1D",
        "BarCode2D",
        "ScanDate",
        "ScanTime",
        "UnitNumber",
        "UserName",
        "BuildDate",
        "SlideAnnotation",
        "ScannerSerialNumber",
        "SlideID",
    }
)
ISCAN_REMOVE_OTHER = frozenset({"ShowLabel", "LaserPower", "IlluminationTime"})
_ATTR_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9\-_]{0,63}$")
_AOI = re.compile(r"^AOI\d{1,3}$")
AOI_ATTRS = frozenset({"Left", "Top", "Right", "Bottom", "OriginX", "OriginY"})
ENCODE_ELEMENTS = frozenset(
    {
        "EncodeInfo",
        "SlideInfo",
        "AoiInfo",
        "ImageInfo",
        "TileJointInfo",
        "Frame",
        "SlideStitchInfo",
        "AoiOrigin",
    }
)


def ifd_kind(ifd: TiffIfd) -> str:
    """'level', 'label', 'macro' or 'unknown'."""
    desc = (ifd.description or "").strip()
    if LEVEL.match(desc):
        return "level"
    return ASSOCIATED.get(desc.lower(), "unknown")


def _unknown_element(parent: str, child: XmlNode, tally: Tally) -> None:
    """An XMP element no rule knows (no namespace, a plain name): held for review under
    ``bif:<parent>/<name>``, never its content; a steward's "remove" rule drops the whole
    element (its texts searched for in the output by the verifier); elements are never
    kept by a rule (the rebuilt XMP only holds what the cleaner knows)."""
    if child.ns or not _ATTR_NAME.match(child.name):
        raise DeidRejected(UNKNOWN_BIF_ELEMENT, f"BIF XMP element {printable_name(child.name)!r}")
    key = f"{parent}/{child.name}"
    tally.unknown_removable("bif", key, UNKNOWN_BIF_ELEMENT, "BIF XMP element")
    tally.remove("bif.unknown_element")
    tally.dropped_text(*child.texts())


def _clean_iscan(node: XmlNode, tally: Tally) -> XmlNode:
    attrs: dict[str, str] = {}
    for key, value in node.attrs.items():
        if key in ISCAN_KEEP:
            if not _VALUE.match(value):
                raise DeidRejected(UNEXPECTED_TAG_VALUE, f"BIF iScan attribute {key!r}")
            attrs[key] = value
        elif key in ISCAN_REMOVE_IDENTIFYING:
            tally.remove(f"bif.iScan.{key}", value)
        elif key in ISCAN_REMOVE_OTHER:
            tally.remove(f"bif.iScan.{key}")
        elif tally.unknown("bif", key, UNKNOWN_BIF_ATTRIBUTE, "BIF iScan attribute"):
            attrs[key] = value  # a data steward's rule keeps it
        else:  # a steward's rule removes it, or it is held for review
            tally.remove(f"bif.iScan.{key}", value)
    out = XmlNode("", "iScan", attrs)
    for child in node.children:
        if not _AOI.match(child.name):
            _unknown_element("iScan", child, tally)
            continue
        out.children.append(_structural(child, tally, AOI_ATTRS))
    return out


def _structural(node: XmlNode, tally: Tally, allowed: frozenset[str] | None = None) -> XmlNode:
    """Numeric/enum-only elements (EncodeInfo geometry, AOI rectangles)."""
    if node.ns or node.text.strip():
        shown = printable_name(node.name)
        raise DeidRejected(UNKNOWN_BIF_ELEMENT, f"BIF element {shown!r} holds text")
    for key, value in node.attrs.items():
        if (allowed is not None and key not in allowed) or not _ATTR_NAME.match(key):
            raise DeidRejected(UNKNOWN_BIF_ATTRIBUTE, f"BIF attribute {printable_name(key)!r}")
        if not _VALUE.match(value):
            raise DeidRejected(UNEXPECTED_TAG_VALUE, f"BIF attribute {printable_name(key)!r}")
    out = XmlNode("", node.name, dict(node.attrs))
    for child in node.children:
        if child.name == "iScan":  # older layout: /EncodeInfo/SlideInfo/iScan
            out.children.append(_clean_iscan(child, tally))
            continue
        if child.ns or (child.name not in ENCODE_ELEMENTS and not _AOI.match(child.name)):
            _unknown_element(node.name, child, tally)
            continue
        out.children.append(
            _structural(child, tally, AOI_ATTRS if _AOI.match(child.name) else None)
        )
    return out


def _clean_node(node: XmlNode, tally: Tally) -> XmlNode:
    if node.ns:
        raise DeidRejected(UNKNOWN_BIF_ELEMENT, f"BIF XMP element {printable_name(node.name)!r}")
    if node.name == "iScan":
        return _clean_iscan(node, tally)
    if node.name == "EncodeInfo":
        return _structural(node, tally)
    if node.name == "Metadata" and not node.attrs and not node.text.strip():
        kids = []
        for child in node.children:
            if child.name in ("iScan", "EncodeInfo", "Metadata"):
                kids.append(_clean_node(child, tally))
            else:
                _unknown_element("Metadata", child, tally)
        return XmlNode("", "Metadata", {}, kids)
    raise DeidRejected(UNKNOWN_BIF_ELEMENT, f"BIF XMP element {printable_name(node.name)!r}")


def clean_xmp_tree(tag: TiffTag, tally: Tally) -> XmlNode:
    try:
        root = parse_xml(tag.text())
    except XmlRejected as exc:
        raise DeidRejected(MALFORMED_BIF_XMP, f"BIF XMP: {exc.reason}") from exc
    return _clean_node(root, tally)


def xmp_tag(tree: XmlNode) -> OutTag:
    xml = '<?xml version="1.0" encoding="utf-8"?>' + render(tree, step="").replace("\n", "")
    raw = xml.encode("utf-8")
    return OutTag(XMP, tiff.BYTE, len(raw), raw)


def _find(tree: XmlNode, name: str) -> XmlNode | None:
    return next((n for n in tree.iter() if n.name == name), None)


def verify_xmp(text: str, kept: frozenset[str] = frozenset()) -> str | None:
    """None when the XMP holds only safe content; ``kept``: iScan attributes a data steward's
    rule keeps."""
    try:
        root = parse_xml(text)
    except XmlRejected:
        return "BIF XMP does not parse"
    for node in root.iter():
        if node.name == "iScan":
            if set(node.attrs) - ISCAN_KEEP - kept:
                return "BIF iScan attribute outside the keep-list"
        elif node.name not in ENCODE_ELEMENTS | {"Metadata"} and not _AOI.match(node.name):
            return f"BIF XMP element {printable_name(node.name)!r}"
    return None


def _level_description(tag: TiffTag, tally: Tally) -> OutTag | None:
    del tally
    if tag.dtype != tiff.ASCII or not LEVEL.match(tag.text().strip()):
        raise DeidRejected(UNEXPECTED_TAG_VALUE, "BIF level ImageDescription")
    return OutTag.ascii(tiff.IMAGE_DESCRIPTION, tag.text().strip())


def _xmp_of(ifd: TiffIfd, tally: Tally) -> XmlNode | None:
    tag = ifd.get(XMP)
    if tag is None:
        return None
    if tag.dtype not in (tiff.BYTE, tiff.UNDEFINED, tiff.ASCII):
        raise DeidRejected(UNEXPECTED_TAG_VALUE, "BIF XMP (tag 700) type")
    return clean_xmp_tree(tag, tally)


def _xmp_placeholder(tag: TiffTag, tally: Tally) -> OutTag | None:
    del tag, tally
    return None  # the cleaned XMP of the IFD (Selection.xmp) is added by the driver


RULES = FormatTagRules(special={tiff.IMAGE_DESCRIPTION: _level_description, XMP: _xmp_placeholder})


def output_tags() -> frozenset[int]:
    return RULES.allowed_output_tags()


@dataclass(frozen=True)
class Selection:
    ifds: list[TiffIfd]
    levels: list[TiffIfd]
    xmp: dict[int, OutTag]  # IFD offset -> cleaned XMP tag to write


def select_ifds(st: TiffStructure, tally: Tally) -> Selection:
    kept: list[TiffIfd] = []
    xmps: dict[int, XmlNode | None] = {}
    iscan: XmlNode | None = None
    for ifd in st.ifds:
        kind = ifd_kind(ifd)
        tree = _xmp_of(ifd, tally)  # cleaned either way: the values are remembered
        if kind == "level" and ifd.is_tiled:
            kept.append(ifd)
            xmps[ifd.offset] = tree
        elif kind in ("label", "macro"):
            tally.remove(f"associated_image.{kind}")
            found = _find(tree, "iScan") if tree is not None else None
            iscan = iscan or found
        else:
            raise DeidRejected(UNEXPECTED_IFD, f"IFD {ifd.index} is not a known BIF image")
    if not kept:
        raise DeidRejected(UNEXPECTED_IFD, "no BIF pyramid level")
    first = xmps.get(kept[0].offset)
    if iscan is not None and (first is None or _find(first, "iScan") is None):
        # the scanner description lived on a dropped IFD: carry its cleaned form to level 0
        # (readers detect BIF by an iScan element in the first IFD's XMP)
        if first is None:
            first = XmlNode("", "Metadata", {}, [iscan])
        else:
            parent = _find(first, "SlideInfo") if first.name == "EncodeInfo" else first
            if parent is None or parent.name not in ("SlideInfo", "Metadata"):
                first = XmlNode("", "Metadata", {}, [iscan, first])
            else:
                parent.children.insert(0, iscan)
        xmps[kept[0].offset] = first
    out = {off: xmp_tag(tree) for off, tree in xmps.items() if tree is not None}
    return Selection(kept, kept, out)
