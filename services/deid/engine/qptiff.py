"""PerkinElmer / Akoya QPTIFF rules (Vectra, Polaris, PhenoImager).

Every page carries an XML ``PerkinElmer-QPI-ImageDescription``; its ``ImageType`` says what the
page is. ``FullResolution`` pages (one per channel) and ``ReducedResolution`` pages (pyramid
levels of newer scanners - assumption, no such sample here) are kept with their strips
verbatim; ``Thumbnail``, ``Overview`` (a photograph of the whole glass slide, label included)
and ``Label`` pages are dropped. Any other ``ImageType`` rejects the slide.

Per-page XML, element by element (direct children of the root):

* kept (text validated): DescriptionVersion, AcquisitionSoftware, ImageType,
  IsUnmixedComponent, ExposureTime, SignalUnits, Name (channel), Color, Objective,
  CameraName (camera model), Biomarker; ``Responsivity/Filter`` keeps Name, Response and
  FilterID (the filter names needed to interpret a channel);
* removed as identifying: Identifier (acquisition GUID), SlideID, Barcode, ComputerName, the
  calibration ``Responsivity/Filter/Date`` and the whole ``ScanProfile`` (its profile ``Name``
  is typically a study or person name; the rest is acquisition configuration);
* removed as unnecessary: ValidationCode (a checksum over the original description);
* anything else rejects the slide, naming the element.

TIFF tags: Software is kept when it is exactly ``PerkinElmer-QPI`` (readers recognise the
format by it); DateTime and the other common tags are removed by the common rules.
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
from services.shared.wsi.safexml import XmlNode, XmlRejected, escape_text, parse_xml
from services.shared.wsi.tiff import OutTag, TiffIfd, TiffStructure, TiffTag

UNKNOWN_QPTIFF_ELEMENT = "UNKNOWN_QPTIFF_ELEMENT"
MALFORMED_QPTIFF_XML = "MALFORMED_QPTIFF_XML"
ROOT = "PerkinElmer-QPI-ImageDescription"
SOFTWARE = "PerkinElmer-QPI"

LEVEL_TYPES = frozenset({"FullResolution", "ReducedResolution"})
ASSOCIATED_TYPES = {"Thumbnail": "thumbnail", "Overview": "macro", "Label": "label"}

KEEP = frozenset(
    {
        "DescriptionVersion",
        "AcquisitionSoftware",
        "ImageType",
        "IsUnmixedComponent",
        "ExposureTime",
        "SignalUnits",
        "Name",
        "Color",
        "Objective",
        "CameraName",
        "Biomarker",
    }
)
REMOVE_IDENTIFYING = frozenset({"Identifier", "SlideID", "Barcode", "ComputerName"})
REMOVE_OTHER = frozenset({"ValidationCode"})
FILTER_KEEP = frozenset({"Name", "Response", "FilterID"})
_TEXT = re.compile(r"^[A-Za-z0-9 .,:;/+\-_()#%]{0,256}$")


def parse_page(ifd: TiffIfd) -> XmlNode:
    tag = ifd.get(tiff.IMAGE_DESCRIPTION)
    if tag is None or tag.dtype != tiff.ASCII:
        raise DeidRejected(MALFORMED_QPTIFF_XML, f"IFD {ifd.index} has no XML description")
    try:
        root = parse_xml(tag.text())
    except XmlRejected as exc:
        raise DeidRejected(MALFORMED_QPTIFF_XML, f"IFD {ifd.index}: {exc.reason}") from exc
    if root.name != ROOT or root.ns:
        raise DeidRejected(MALFORMED_QPTIFF_XML, f"IFD {ifd.index}: unexpected root element")
    return root


def image_type(root: XmlNode) -> str:
    for child in root.children:
        if child.name == "ImageType":
            return child.text.strip()
    return ""


def _kept_text(node: XmlNode, where: str) -> str:
    if node.children or node.attrs:
        raise DeidRejected(UNKNOWN_QPTIFF_ELEMENT, f"{where}: {node.name} has structure")
    text = node.text.strip()
    if not _TEXT.match(text):
        raise DeidRejected(UNEXPECTED_TAG_VALUE, f"{where}: QPTIFF element {node.name!r}")
    return text


def clean_page_xml(root: XmlNode, where: str, tally: Tally) -> str:
    lines = ['<?xml version="1.0" encoding="utf-8"?>', f"<{ROOT}>"]
    for child in root.children:
        name = child.name
        if child.ns:
            raise DeidRejected(UNKNOWN_QPTIFF_ELEMENT, f"{where}: namespaced element")
        if name in KEEP:
            lines.append(f"  <{name}>{escape_text(_kept_text(child, where))}</{name}>")
        elif name in REMOVE_IDENTIFYING:
            tally.remove(f"qptiff.{name}", child.text.strip())
        elif name in REMOVE_OTHER:
            tally.remove(f"qptiff.{name}")
        elif name == "ScanProfile":
            # the profile's own name (ScanProfile/root/Name); nested Names are filter and
            # band names, which are kept elsewhere as channel names
            for top in child.children:
                for node in top.children:
                    if node.name == "Name" and node.text.strip():
                        tally.identifying(node.text.strip())
            tally.remove("qptiff.ScanProfile")
        elif name == "Responsivity":
            lines.extend(_responsivity(child, where, tally))
        elif tally.unknown("qptiff", name, UNKNOWN_QPTIFF_ELEMENT, f"{where}: QPTIFF element"):
            # a data steward's rule keeps it: plain text only, never nested structure
            lines.append(f"  <{name}>{escape_text(_kept_text(child, where))}</{name}>")
        else:  # a steward's rule removes it, or it is held for review
            tally.remove(f"qptiff.{name}", *(n.text.strip() for n in child.iter()))
    lines.append(f"</{ROOT}>")
    return "\n".join(lines)


def _responsivity(node: XmlNode, where: str, tally: Tally) -> list[str]:
    if node.attrs or node.text.strip():
        raise DeidRejected(UNKNOWN_QPTIFF_ELEMENT, f"{where}: Responsivity has structure")
    out = ["  <Responsivity>"]
    for flt in node.children:
        if flt.name != "Filter" or flt.attrs or flt.text.strip():
            shown = printable_name(flt.name)
            raise DeidRejected(UNKNOWN_QPTIFF_ELEMENT, f"{where}: Responsivity element {shown!r}")
        out.append("    <Filter>")
        for item in flt.children:
            if item.name in FILTER_KEEP:
                text = escape_text(_kept_text(item, where))
                out.append(f"      <{item.name}>{text}</{item.name}>")
            elif item.name == "Date":
                tally.remove("qptiff.calibration_date", item.text.strip())
            else:
                raise DeidRejected(
                    UNKNOWN_QPTIFF_ELEMENT, f"{where}: Filter element {printable_name(item.name)!r}"
                )
        out.append("    </Filter>")
    out.append("  </Responsivity>")
    return out


def _software_handler(tag: TiffTag, tally: Tally) -> OutTag | None:
    if tag.dtype == tiff.ASCII and tag.text() == SOFTWARE:
        return OutTag.copy(tag)
    tally.remove("tiff_tag.Software")
    return None


def rules(xml: str) -> FormatTagRules:
    def description(tag: TiffTag, tally: Tally) -> OutTag | None:
        del tag, tally
        return OutTag.ascii(tiff.IMAGE_DESCRIPTION, xml)

    return FormatTagRules(special={tiff.IMAGE_DESCRIPTION: description, 305: _software_handler})


def output_tags() -> frozenset[int]:
    return rules("").allowed_output_tags()


@dataclass(frozen=True)
class Selection:
    ifds: list[TiffIfd]
    levels: list[TiffIfd]
    xml: dict[int, str]  # IFD offset -> cleaned description


def select_ifds(st: TiffStructure, tally: Tally) -> Selection:
    kept: list[TiffIfd] = []
    xml: dict[int, str] = {}
    for ifd in st.ifds:
        root = parse_page(ifd)
        kind = image_type(root)
        if kind in LEVEL_TYPES:
            xml[ifd.offset] = clean_page_xml(root, f"IFD {ifd.index}", tally)
            kept.append(ifd)
        elif kind in ASSOCIATED_TYPES:
            tally.remove(f"associated_image.{ASSOCIATED_TYPES[kind]}")
        else:
            raise DeidRejected(UNEXPECTED_IFD, f"IFD {ifd.index} has an unknown QPTIFF ImageType")
    if not kept or image_type(parse_page(kept[0])) != "FullResolution":
        raise DeidRejected(UNEXPECTED_IFD, "the first QPTIFF page is not a full-resolution image")
    return Selection(kept, level_ifds(kept), xml)


def level_ifds(pages: list[TiffIfd]) -> list[TiffIfd]:
    """One IFD per distinct size (the first channel of every pyramid level)."""
    seen: set[tuple[int, int]] = set()
    out: list[TiffIfd] = []
    for ifd in pages:
        if (ifd.width, ifd.height) not in seen:
            seen.add((ifd.width, ifd.height))
            out.append(ifd)
    return out


def verify_page_xml(text: str, kept: frozenset[str] = frozenset()) -> str | None:
    """None when the page's XML holds only safe content; ``kept``: element names a data
    steward's rule keeps."""
    try:
        root = parse_xml(text)
    except XmlRejected:
        return "QPTIFF description does not parse"
    if root.name != ROOT:
        return "QPTIFF description root"
    if image_type(root) not in LEVEL_TYPES:
        return "QPTIFF page is not a full- or reduced-resolution image"
    for child in root.children:
        if child.name == "Responsivity":
            for flt in child.children:
                if flt.name != "Filter" or {i.name for i in flt.children} - FILTER_KEEP:
                    return "QPTIFF Responsivity holds more than filter names"
        elif (child.name not in KEEP and child.name not in kept) or child.children:
            return f"QPTIFF element {printable_name(child.name)!r}"
    return None
