"""Philips TIFF rules (IntelliSite "DPUfsImport" export).

**Assumptions** (no real Philips TIFF was available; the rules follow the publicly documented
structure as OpenSlide describes it and as Philips' own exports are commonly reported):

* the first IFD's ImageDescription is an XML ``DataObject ObjectType="DPUfsImport"`` whose
  ``Attribute`` children (``Name``, ``Group``, ``Element``, ``PMSVR``) hold ``DICOM_*`` and
  ``PIM_DP_*``/``PIIM_*`` values; ``PIM_DP_SCANNED_IMAGES`` holds an ``Array`` of
  ``DataObject ObjectType="DPScannedImage"``, one per image (``PIM_DP_IMAGE_TYPE`` WSI,
  LABELIMAGE or MACROIMAGE), label/macro possibly inline as base64 in ``PIM_DP_IMAGE_DATA``;
  the WSI image's ``PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE`` lists the levels;
* pyramid levels are tiled IFDs; label and macro are separate (stripped) IFDs whose
  ImageDescription starts with ``Label`` / ``Macro``.

Rules: tiled IFDs without a Label/Macro description are levels; Label/Macro IFDs and any other
stripped IFD are dropped. In the XML, the LABELIMAGE/MACROIMAGE scanned-image objects are dropped
whole; attributes are kept (values validated), removed as identifying (serial number,
acquisition date/time, calibration date/time, barcode, source file, operator, rack/slot,
derivation description, inline image data) or removed as unnecessary; any other attribute name
or DataObject type rejects the slide naming it. Descriptions of the other levels are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.deid.engine.model import UNEXPECTED_TAG_VALUE, DeidRejected, Tally, printable_name
from services.deid.engine.tiff_common import FormatTagRules, device_text_ok
from services.shared.wsi import tiff
from services.shared.wsi.safexml import XmlNode, XmlRejected, parse_xml, render
from services.shared.wsi.tiff import OutTag, TiffIfd, TiffStructure, TiffTag

UNKNOWN_PHILIPS_ATTRIBUTE = "UNKNOWN_PHILIPS_ATTRIBUTE"
MALFORMED_PHILIPS_XML = "MALFORMED_PHILIPS_XML"

_VALUE = re.compile(r'^[A-Za-z0-9 ."\-_:+/,()\[\]]{0,256}$')
KEEP = frozenset(
    {
        "DICOM_MANUFACTURER",
        "DICOM_MANUFACTURERS_MODEL_NAME",
        "DICOM_SOFTWARE_VERSIONS",
        "DICOM_BITS_ALLOCATED",
        "DICOM_BITS_STORED",
        "DICOM_HIGH_BIT",
        "DICOM_PIXEL_REPRESENTATION",
        "DICOM_SAMPLES_PER_PIXEL",
        "DICOM_PHOTOMETRIC_INTERPRETATION",
        "DICOM_PLANAR_CONFIGURATION",
        "DICOM_LOSSY_IMAGE_COMPRESSION",
        "DICOM_LOSSY_IMAGE_COMPRESSION_METHOD",
        "DICOM_LOSSY_IMAGE_COMPRESSION_RATIO",
        "DICOM_PIXEL_SPACING",
        "PIM_DP_UFS_INTERFACE_VERSION",
        "PIM_DP_IMAGE_TYPE",
        "PIM_DP_IMAGE_ROWS",
        "PIM_DP_IMAGE_COLUMNS",
        "PIIM_PIXEL_DATA_REPRESENTATION_NUMBER",
        "PIIM_PIXEL_DATA_REPRESENTATION_COLUMNS",
        "PIIM_PIXEL_DATA_REPRESENTATION_ROWS",
        "PIIM_DP_PIXEL_DATA_REPRESENTATION_POSITION",
    }
)
CONTAINERS = frozenset({"PIM_DP_SCANNED_IMAGES", "PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE"})
REMOVE_IDENTIFYING = frozenset(
    {
        "DICOM_DEVICE_SERIAL_NUMBER",
        "DICOM_ACQUISITION_DATETIME",
        "DICOM_DATE_OF_LAST_CALIBRATION",
        "DICOM_TIME_OF_LAST_CALIBRATION",
        "DICOM_DERIVATION_DESCRIPTION",
        "DICOM_INSTITUTION_NAME",
        "DICOM_STATION_NAME",
        "PIM_DP_UFS_BARCODE",
        "PIM_DP_SOURCE_FILE",
        "PIIM_DP_SCANNER_OPERATOR_ID",
        "PIIM_DP_SCANNER_RACK_NUMBER",
        "PIIM_DP_SCANNER_SLOT_NUMBER",
    }
)
REMOVE_OTHER = frozenset(
    {
        "PIM_DP_IMAGE_DATA",  # base64 pixels of label/macro (or a thumbnail)
        "PIIM_DP_SCANNER_CALIBRATION_STATUS",
        "PIM_DP_SCANNER_RACK_PRIORITY",
        "DICOM_ICCPROFILE",
    }
)
OBJECT_TYPES = frozenset({"DPUfsImport", "DPScannedImage", "PixelDataRepresentation"})
ASSOCIATED_IMAGE_TYPES = {"LABELIMAGE": "label", "MACROIMAGE": "macro"}
_ATTR_ATTRS = frozenset({"Name", "Group", "Element", "PMSVR"})
_ASSOC_DESC = re.compile(r"^\s*(Label|Macro)\b", re.IGNORECASE)
_DATE_ATTR = re.compile(r"^\"?(\d{4})\d{4}")


def associated_kind(ifd: TiffIfd) -> str | None:
    m = _ASSOC_DESC.match(ifd.description or "")
    return m.group(1).lower() if m else None


def _image_type(obj: XmlNode) -> str:
    for attr in obj.children:
        if attr.name == "Attribute" and attr.attrs.get("Name") == "PIM_DP_IMAGE_TYPE":
            return attr.text.strip()
    return ""


def _clean_object(obj: XmlNode, tally: Tally) -> XmlNode:
    if obj.name != "DataObject" or set(obj.attrs) != {"ObjectType"}:
        raise DeidRejected(MALFORMED_PHILIPS_XML, f"element {printable_name(obj.name)!r}")
    kind = obj.attrs["ObjectType"]
    if kind not in OBJECT_TYPES:
        raise DeidRejected(UNKNOWN_PHILIPS_ATTRIBUTE, f"DataObject type {printable_name(kind)!r}")
    if obj.text.strip():
        raise DeidRejected(MALFORMED_PHILIPS_XML, "text inside a DataObject")
    out = XmlNode("", "DataObject", {"ObjectType": kind})
    for attr in obj.children:
        if attr.name != "Attribute" or set(attr.attrs) - _ATTR_ATTRS or "Name" not in attr.attrs:
            raise DeidRejected(MALFORMED_PHILIPS_XML, f"element {printable_name(attr.name)!r}")
        name = attr.attrs["Name"]
        head = {k: v for k, v in attr.attrs.items() if k != "Name"}
        for v in head.values():
            if not re.match(r"^[A-Za-z0-9x]{0,32}$", v):
                shown = printable_name(name)
                raise DeidRejected(UNEXPECTED_TAG_VALUE, f"Philips attribute {shown!r}")
        if name in CONTAINERS:
            arrays = attr.children
            if len(arrays) != 1 or arrays[0].name != "Array" or arrays[0].attrs:
                raise DeidRejected(MALFORMED_PHILIPS_XML, f"{printable_name(name)} is not an array")
            new_array = XmlNode("", "Array", {})
            for item in arrays[0].children:
                image_type = _image_type(item)
                if image_type in ASSOCIATED_IMAGE_TYPES:
                    tally.remove(f"associated_image.philips_{ASSOCIATED_IMAGE_TYPES[image_type]}")
                    for sub in item.iter():
                        if sub.attrs.get("Name") in REMOVE_IDENTIFYING:
                            tally.identifying(sub.text.strip())
                    continue
                new_array.children.append(_clean_object(item, tally))
            out.children.append(XmlNode("", "Attribute", dict(attr.attrs), [new_array]))
        elif name in KEEP:
            if attr.children or not _VALUE.match(attr.text.strip()):
                raise DeidRejected(UNEXPECTED_TAG_VALUE, f"Philips attribute {name!r}")
            out.children.append(XmlNode("", "Attribute", dict(attr.attrs), [], attr.text.strip()))
        elif name in REMOVE_IDENTIFYING:
            tally.remove(f"philips.{name}", attr.text.strip())
        elif name in REMOVE_OTHER:
            tally.remove(f"philips.{name}")
        elif tally.unknown("philips", name, UNKNOWN_PHILIPS_ATTRIBUTE, "Philips XML attribute"):
            # a data steward's rule keeps it: a plain value only, never nested structure
            if attr.children:
                shown = printable_name(name)
                raise DeidRejected(
                    UNKNOWN_PHILIPS_ATTRIBUTE, f"Philips attribute {shown!r} has structure"
                )
            out.children.append(XmlNode("", "Attribute", dict(attr.attrs), [], attr.text.strip()))
        else:  # a steward's rule removes it, or it is held for review
            tally.remove(f"philips.{name}", *(n.text.strip() for n in attr.iter()))
    return out


def clean_description(text: str, tally: Tally) -> str:
    try:
        root = parse_xml(text)
    except XmlRejected as exc:
        raise DeidRejected(MALFORMED_PHILIPS_XML, f"Philips XML: {exc.reason}") from exc
    if root.ns or root.attrs.get("ObjectType") != "DPUfsImport":
        raise DeidRejected(MALFORMED_PHILIPS_XML, "root is not a DPUfsImport DataObject")
    clean = _clean_object(root, tally)
    return '<?xml version="1.0" encoding="UTF-8" ?>\n' + render(clean)


def verify_description(text: str, kept: frozenset[str] = frozenset()) -> str | None:
    """None when the XML holds only safe content; ``kept``: attribute names a data steward's
    rule keeps."""
    try:
        root = parse_xml(text)
    except XmlRejected:
        return "Philips XML does not parse"
    for node in root.iter():
        if node.name == "Attribute":
            name = node.attrs.get("Name", "")
            if name not in KEEP and name not in CONTAINERS and name not in kept:
                return f"Philips attribute {printable_name(name)!r} is not on the keep-list"
        elif node.name == "DataObject":
            if node.attrs.get("ObjectType") not in OBJECT_TYPES:
                return "Philips DataObject type"
            if _image_type(node) in ASSOCIATED_IMAGE_TYPES:
                return "Philips label/macro scanned image in the XML"
        elif node.name != "Array":
            return f"Philips element {printable_name(node.name)!r}"
    return None


def _software(tag: TiffTag, tally: Tally) -> OutTag | None:
    if device_text_ok(tag) and tag.text().startswith("Philips"):
        return OutTag.copy(tag)
    tally.remove("tiff_tag.Software", tag.text())
    return None


def _drop_description(tag: TiffTag, tally: Tally) -> OutTag | None:
    text = tag.text()
    if text.strip():
        tally.remove("tiff_tag.ImageDescription", text if len(text) <= 4096 else None)
    return None


OTHER_RULES = FormatTagRules(special={tiff.IMAGE_DESCRIPTION: _drop_description, 305: _software})


def first_rules(xml: str) -> FormatTagRules:
    def description(tag: TiffTag, tally: Tally) -> OutTag | None:
        del tag, tally
        return OutTag.ascii(tiff.IMAGE_DESCRIPTION, xml)

    return FormatTagRules(special={tiff.IMAGE_DESCRIPTION: description, 305: _software})


def output_tags() -> frozenset[int]:
    return OTHER_RULES.allowed_output_tags()


@dataclass(frozen=True)
class Selection:
    ifds: list[TiffIfd]
    levels: list[TiffIfd]
    xml: str


def select_ifds(st: TiffStructure, tally: Tally) -> Selection:
    first = st.ifds[0]
    if not first.is_tiled or associated_kind(first):
        raise DeidRejected(MALFORMED_PHILIPS_XML, "IFD 0 is not a tiled pyramid level")
    tag = first.get(tiff.IMAGE_DESCRIPTION)
    if tag is None or tag.dtype != tiff.ASCII:
        raise DeidRejected(MALFORMED_PHILIPS_XML, "IFD 0 has no XML description")
    xml = clean_description(tag.text(), tally)
    kept: list[TiffIfd] = []
    for ifd in st.ifds:
        kind = associated_kind(ifd) if ifd is not first else None
        if kind:
            tally.remove(f"associated_image.{kind}")
        elif not ifd.is_tiled:
            tally.remove("associated_image.unidentified")
        else:
            kept.append(ifd)
    return Selection(kept, kept, xml)
