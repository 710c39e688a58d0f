"""OME-TIFF rules: the OME-XML document in the first IFD's ImageDescription is rebuilt from an
allow-list of structural elements; SubIFD pyramids are carried through.

Kept (attributes validated against a short character class, every ID regenerated):

* ``OME`` root: a fresh ``UUID`` and a neutral ``Creator``;
* ``Image``: ``Name`` replaced by ``image-<n>`` (the original is remembered as identifying);
* ``Pixels``: dimensions, order, type, byte order, ``PhysicalSize*`` and ``TimeIncrement``;
* ``Channel`` geometry/optics (``Name`` and ``Fluor`` kept when they look like a channel
  label), an empty ``LightPath``;
* ``TiffData`` (``IFD`` renumbered when IFDs are dropped) with its ``UUID`` replaced by the new
  document UUID; the ``FileName`` attribute (the original file name) is dropped;
* ``Plane`` indices, timing, exposure and stage position; ``MetadataOnly``.

Dropped: ``Experimenter``, ``ExperimenterGroup``, ``Project``, ``Dataset``, ``Folder``,
``Experiment``, ``Plate``, ``Screen``, ``Instrument`` (serial and lot numbers), ``ROI``,
``StructuredAnnotations``, ``Rights`` and, inside ``Image``, ``AcquisitionDate`` (or reduced to
its year with ``date_policy="year"``), ``Description``, ``StageLabel``, ``ImagingEnvironment``,
``ObjectiveSettings`` and every ``*Ref``. An ``Image`` named ``label``/``macro``/``overview`` (as
written by slide converters) is dropped with all its IFDs. Any other element or attribute
rejects the slide naming it (never its value). Multi-file OME-TIFF (a ``TiffData`` UUID that
is not the document's own, ``BinaryOnly``) and ``BinData`` are rejected.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from services.deid.engine.model import (
    UNEXPECTED_TAG_VALUE,
    UNSUPPORTED_STRUCTURE,
    DeidPolicy,
    DeidRejected,
    Tally,
    printable_name,
)
from services.shared.wsi import tiff
from services.shared.wsi.safexml import XmlNode, XmlRejected, escape_attr, parse_xml
from services.shared.wsi.tiff import OutTag, TiffStructure, TiffTag

UNKNOWN_OME_ELEMENT = "UNKNOWN_OME_ELEMENT"
UNKNOWN_OME_ATTRIBUTE = "UNKNOWN_OME_ATTRIBUTE"
MALFORMED_OME_XML = "MALFORMED_OME_XML"

OME_NS = re.compile(r"^http://www\.openmicroscopy\.org/Schemas/OME/20\d\d-\d\d$")
CREATOR = "Tessera deid"
_VALUE = re.compile(r"^[A-Za-z0-9 .:+\-_/,()#%\u00b5\u00c5\u00b0]{0,128}$")
_INT = re.compile(r"^\d{1,9}$")
_ASSOCIATED_NAME = re.compile(r"^\s*(label|macro|overview)(\s+image)?\s*$", re.IGNORECASE)
_UUID = re.compile(r"^urn:uuid:[0-9a-fA-F\-]{36}$")
_YEAR = re.compile(r"^(\d{4})-\d\d-\d\d")

_ROOT_ATTRS = frozenset(
    {"UUID", "Creator", "{http://www.w3.org/2001/XMLSchema-instance}schemaLocation"}
)
# root children dropped as a whole; the attribute values named here are identifying
_ROOT_DROP = frozenset(
    {
        "Experimenter",
        "ExperimenterGroup",
        "Project",
        "Dataset",
        "Folder",
        "Experiment",
        "Plate",
        "Screen",
        "Instrument",
        "ROI",
        "StructuredAnnotations",
        "Rights",
    }
)
_IDENTIFYING_ATTRS = frozenset(
    {
        "FirstName",
        "LastName",
        "MiddleName",
        "Email",
        "Institution",
        "UserName",
        "Name",
        "SerialNumber",
        "LotNumber",
        "Description",
        "RightsHolder",
        "ExternalIdentifier",
    }
)
_IMAGE_DROP = frozenset(
    {
        "AcquisitionDate",
        "Description",
        "ExperimenterRef",
        "ExperimentRef",
        "ExperimenterGroupRef",
        "DatasetRef",
        "InstrumentRef",
        "ObjectiveSettings",
        "ImagingEnvironment",
        "StageLabel",
        "ROIRef",
        "MicrobeamManipulationRef",
        "AnnotationRef",
    }
)
_PIXELS_ATTRS = frozenset(
    {
        "DimensionOrder", "Type", "SignificantBits", "Interleaved", "BigEndian",
        "SizeX", "SizeY", "SizeZ", "SizeC", "SizeT",
        "PhysicalSizeX", "PhysicalSizeXUnit", "PhysicalSizeY", "PhysicalSizeYUnit",
        "PhysicalSizeZ", "PhysicalSizeZUnit", "TimeIncrement", "TimeIncrementUnit",
    }
)  # fmt: skip
_CHANNEL_ATTRS = frozenset(
    {
        "Name", "SamplesPerPixel", "IlluminationType", "PinholeSize", "PinholeSizeUnit",
        "AcquisitionMode", "ContrastMethod", "ExcitationWavelength", "ExcitationWavelengthUnit",
        "EmissionWavelength", "EmissionWavelengthUnit", "Fluor", "NDFilter",
        "PockelCellSetting", "Color",
    }
)  # fmt: skip
_CHANNEL_DROP = frozenset(
    {"LightSourceSettings", "DetectorSettings", "FilterSetRef", "AnnotationRef"}
)
_TIFFDATA_ATTRS = frozenset({"IFD", "FirstZ", "FirstT", "FirstC", "PlaneCount"})
_PLANE_ATTRS = frozenset(
    {
        "TheZ", "TheT", "TheC", "DeltaT", "DeltaTUnit", "ExposureTime", "ExposureTimeUnit",
        "PositionX", "PositionXUnit", "PositionY", "PositionYUnit", "PositionZ",
        "PositionZUnit",
    }
)  # fmt: skip


@dataclass(frozen=True)
class OmeResult:
    xml: str
    keep_ifds: list[int]  # main-chain IFD indices kept, in file order
    images: int


def _reject_unknown(kind: str, name: str, where: str) -> DeidRejected:
    safe = printable_name(name)
    code = UNKNOWN_OME_ELEMENT if kind == "element" else UNKNOWN_OME_ATTRIBUTE
    return DeidRejected(code, f"OME-XML {kind} {safe!r} in {where}")


def _unknown(
    doc: _Doc, kind: str, path: str, name: str, where: str, dropped: XmlNode | str
) -> None:
    """An element or attribute of the OME namespace that no rule knows: held for review
    under the key ``ome:<parent>/<element>`` or ``ome:<element>[<attribute>]`` (never its
    value), dropped with a steward's "remove" rule. OME-XML content is never kept by a
    rule: the rebuilt document only holds what the cleaner knows how to write."""
    code = UNKNOWN_OME_ELEMENT if kind == "element" else UNKNOWN_OME_ATTRIBUTE
    key = f"{path}/{name}" if kind == "element" else f"{path}[{name}]"
    doc.tally.unknown_removable("ome", key, code, f"OME-XML {kind} in {where}")
    doc.tally.remove(f"ome.unknown_{kind}")
    doc.tally.dropped_text(*([dropped] if isinstance(dropped, str) else dropped.texts()))


def _collect(node: XmlNode, tally: Tally) -> None:
    """Remember the identifying values of a dropped subtree."""
    for n in node.iter():
        for k, v in n.attrs.items():
            if k in _IDENTIFYING_ATTRS:
                tally.identifying(v)
        if n.name in ("Description", "Value", "AcquisitionDate") and n.text.strip():
            text = n.text.strip()
            if n.name != "Value" or (len(text) >= 8 and any(c.isalpha() for c in text)):
                tally.identifying(text)


def _check_attrs(
    node: XmlNode,
    allowed: frozenset[str],
    where: str,
    doc: _Doc | None = None,
    path: str = "",
) -> dict[str, str]:
    """The known attributes; an unknown one is held for review (with ``doc``) or rejects."""
    out: dict[str, str] = {}
    for k, v in node.attrs.items():
        if k == "ID":
            continue  # regenerated
        if k not in allowed:
            if doc is None:
                raise _reject_unknown("attribute", k, where)
            _unknown(doc, "attribute", path, k, where, v)
            continue
        out[k] = v
    return out


def _validated(attrs: dict[str, str], where: str, free_text: frozenset[str] = frozenset()) -> None:
    for k, v in list(attrs.items()):
        if not _VALUE.match(v):
            if k in free_text:
                continue  # handled by the caller
            raise DeidRejected(UNEXPECTED_TAG_VALUE, f"OME-XML attribute {k!r} in {where}")


def _no_text(node: XmlNode, where: str) -> None:
    if node.text.strip():
        raise DeidRejected(MALFORMED_OME_XML, f"unexpected text content in {where}")


class _Doc:
    def __init__(self, ns: str, policy: DeidPolicy, tally: Tally) -> None:
        self.ns = ns
        self.policy = policy
        self.tally = tally
        self.src_uuid: str | None = None
        self.new_uuid = f"urn:uuid:{uuid.uuid4()}"

    def local(self, node: XmlNode, where: str) -> str:
        if node.ns != self.ns:
            raise _reject_unknown("element", node.name, where)
        return node.name


def _tiffdata_ranges(image: XmlNode, n_ifds: int, doc: _Doc) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for px in image.children:
        if px.name != "Pixels":
            continue
        for td in px.children:
            if td.name != "TiffData":
                continue
            ifd, count = td.attrs.get("IFD"), td.attrs.get("PlaneCount")
            if ifd is None or not _INT.match(ifd) or (count is not None and not _INT.match(count)):
                raise DeidRejected(
                    UNSUPPORTED_STRUCTURE, "an associated OME Image has implicit TiffData"
                )
            first = int(ifd)
            n = int(count) if count is not None else 1
            if first + n > n_ifds:
                raise DeidRejected(MALFORMED_OME_XML, "TiffData refers to a missing IFD")
            out.append((first, first + n))
    del doc
    return out


def clean_ome_xml(text: str, n_ifds: int, tally: Tally, policy: DeidPolicy) -> OmeResult:
    """Rebuild the OME-XML; returns the new document and the main-chain IFDs to keep."""
    try:
        root = parse_xml(text)
    except XmlRejected as exc:
        raise DeidRejected(MALFORMED_OME_XML, f"OME-XML: {exc.reason}") from exc
    if root.name != "OME" or not OME_NS.match(root.ns):
        raise DeidRejected(MALFORMED_OME_XML, "the root element is not OME of a known schema")
    doc = _Doc(root.ns, policy, tally)
    for k, v in root.attrs.items():
        if k not in _ROOT_ATTRS:
            _unknown(doc, "attribute", "OME", k, "OME", v)
    doc.src_uuid = root.attrs.get("UUID")
    tally.identifying(doc.src_uuid)  # links the output to the original file
    if "Creator" in root.attrs:
        tally.remove("ome.creator")
    _no_text(root, "OME")
    images: list[XmlNode] = []
    dropped_ranges: list[tuple[int, int]] = []
    for child in root.children:
        name = doc.local(child, "OME")
        if name == "Image":
            if _ASSOCIATED_NAME.match(child.attrs.get("Name", "")):
                tally.remove("associated_image.ome_" + child.attrs["Name"].strip().lower())
                dropped_ranges.extend(_tiffdata_ranges(child, n_ifds, doc))
                _collect(child, tally)
                continue
            images.append(child)
        elif name in _ROOT_DROP:
            tally.remove(f"ome.{name}")
            _collect(child, tally)
        elif name == "BinaryOnly":
            raise DeidRejected(UNSUPPORTED_STRUCTURE, "multi-file OME-TIFF (BinaryOnly)")
        else:
            _unknown(doc, "element", "OME", name, "OME", child)
    if not images:
        raise DeidRejected(MALFORMED_OME_XML, "OME-XML describes no image")
    dropped = {i for a, b in dropped_ranges for i in range(a, b)}
    keep = [i for i in range(n_ifds) if i not in dropped]
    if not keep:
        raise DeidRejected(UNSUPPORTED_STRUCTURE, "every IFD belongs to an associated image")
    new_index = {old: new for new, old in enumerate(keep)}
    parts = [f'<OME xmlns="{escape_attr(doc.ns)}" UUID="{doc.new_uuid}" Creator="{CREATOR}">']
    for n, image in enumerate(images):
        parts.append(_render_image(image, n, doc, new_index, bool(dropped)))
    parts.append("</OME>")
    xml = '<?xml version="1.0" encoding="UTF-8"?>' + "".join(parts)
    return OmeResult(xml, keep, len(images))


def _render_image(
    image: XmlNode, k: int, doc: _Doc, new_index: dict[int, int], renumber: bool
) -> str:
    where = f"Image {k}"
    attrs = _check_attrs(image, frozenset({"Name"}), where, doc, "Image")
    if "Name" in attrs:
        doc.tally.pseudonymize("ome.image_name", attrs["Name"])
    _no_text(image, where)
    inner: list[str] = []
    acquisition: str | None = None
    pixels_seen = False
    for child in image.children:
        name = doc.local(child, where)
        if name == "Pixels":
            if pixels_seen:
                raise DeidRejected(MALFORMED_OME_XML, f"{where} has two Pixels elements")
            pixels_seen = True
            inner.append(_render_pixels(child, k, doc, new_index, renumber))
        elif name == "AcquisitionDate":
            m = _YEAR.match(child.text.strip())
            doc.tally.remove("ome.acquisition_date", child.text.strip())
            if doc.policy.date_policy == "year" and m:
                acquisition = f"{m.group(1)}-01-01T00:00:00"
        elif name in _IMAGE_DROP:
            doc.tally.remove(f"ome.image.{name}")
            _collect(child, doc.tally)
        else:
            _unknown(doc, "element", "Image", name, where, child)
    if not pixels_seen:
        raise DeidRejected(MALFORMED_OME_XML, f"{where} has no Pixels element")
    head = f'<Image ID="Image:{k}" Name="image-{k}">'
    if acquisition is not None:
        doc.tally.discard(acquisition)
        head += f"<AcquisitionDate>{acquisition}</AcquisitionDate>"
    return head + "".join(inner) + "</Image>"


def _attr_text(attrs: dict[str, str]) -> str:
    return "".join(f' {k}="{escape_attr(v)}"' for k, v in attrs.items())


def _render_pixels(
    px: XmlNode, k: int, doc: _Doc, new_index: dict[int, int], renumber: bool
) -> str:
    where = f"Image {k} Pixels"
    attrs = _check_attrs(px, _PIXELS_ATTRS, where, doc, "Pixels")
    _validated(attrs, where)
    _no_text(px, where)
    out: list[str] = [f'<Pixels ID="Pixels:{k}"{_attr_text(attrs)}>']
    channels = 0
    order = {"Channel": 0, "BinData": 1, "TiffData": 1, "MetadataOnly": 1, "Plane": 2}
    kids = sorted(px.children, key=lambda n: order.get(n.name, 3))
    for child in kids:
        name = doc.local(child, where)
        if name == "Channel":
            out.append(_render_channel(child, k, channels, doc))
            channels += 1
        elif name == "TiffData":
            out.append(_render_tiffdata(child, where, doc, new_index, renumber))
        elif name == "MetadataOnly":
            _no_text(child, where)
            out.append("<MetadataOnly/>")
        elif name == "Plane":
            out.append(_render_plane(child, where, doc))
        elif name == "BinData":
            raise DeidRejected(UNSUPPORTED_STRUCTURE, "OME BinData (pixels inside the XML)")
        else:
            _unknown(doc, "element", "Pixels", name, where, child)
    out.append("</Pixels>")
    return "".join(out)


def _render_channel(ch: XmlNode, k: int, c: int, doc: _Doc) -> str:
    where = f"Image {k} Channel {c}"
    attrs = _check_attrs(ch, _CHANNEL_ATTRS, where, doc, "Channel")
    _validated(attrs, where, frozenset({"Name", "Fluor"}))
    for key in ("Name", "Fluor"):
        if key in attrs and not _VALUE.match(attrs[key]):
            doc.tally.remove(f"ome.channel_{key.lower()}", attrs.pop(key))
    _no_text(ch, where)
    light_path = False
    for child in ch.children:
        name = doc.local(child, where)
        if name == "LightPath":
            light_path = True
            if child.children:
                doc.tally.remove("ome.light_path_refs")
        elif name in _CHANNEL_DROP:
            doc.tally.remove(f"ome.channel.{name}")
        else:
            _unknown(doc, "element", "Channel", name, where, child)
    body = "<LightPath/>" if light_path else ""
    return f'<Channel ID="Channel:{k}:{c}"{_attr_text(attrs)}>{body}</Channel>'


def _render_tiffdata(
    td: XmlNode, where: str, doc: _Doc, new_index: dict[int, int], renumber: bool
) -> str:
    attrs = _check_attrs(td, _TIFFDATA_ATTRS, f"{where} TiffData")
    for v in attrs.values():
        if not _INT.match(v):
            raise DeidRejected(UNEXPECTED_TAG_VALUE, f"OME-XML TiffData attribute in {where}")
    if renumber:
        if "IFD" not in attrs:
            raise DeidRejected(UNSUPPORTED_STRUCTURE, "implicit TiffData beside dropped IFDs")
        old = int(attrs["IFD"])
        n = int(attrs.get("PlaneCount", "1"))
        news = [new_index.get(i) for i in range(old, old + n)]
        if any(v is None for v in news) or news != list(range(news[0] or 0, (news[0] or 0) + n)):
            raise DeidRejected(UNSUPPORTED_STRUCTURE, "TiffData refers to a dropped IFD")
        attrs["IFD"] = str(news[0])
    _no_text(td, where)
    body = ""
    for child in td.children:
        name = doc.local(child, f"{where} TiffData")
        if name != "UUID":
            raise _reject_unknown("element", name, f"{where} TiffData")
        for key in child.attrs:
            if key != "FileName":
                raise _reject_unknown("attribute", key, f"{where} TiffData UUID")
        if "FileName" in child.attrs:
            doc.tally.remove("ome.tiffdata_filename", child.attrs["FileName"])
        value = child.text.strip()
        if not _UUID.match(value) or (doc.src_uuid is not None and value != doc.src_uuid):
            raise DeidRejected(UNSUPPORTED_STRUCTURE, "multi-file OME-TIFF (foreign TiffData UUID)")
        body = f"<UUID>{doc.new_uuid}</UUID>"
    return f"<TiffData{_attr_text(attrs)}>{body}</TiffData>"


def _render_plane(pl: XmlNode, where: str, doc: _Doc) -> str:
    attrs: dict[str, str] = {}
    for key, v in pl.attrs.items():
        if key == "HashSHA1":
            continue
        if key not in _PLANE_ATTRS:
            _unknown(doc, "attribute", "Plane", key, f"{where} Plane", v)
            continue
        attrs[key] = v
    _validated(attrs, f"{where} Plane")
    _no_text(pl, where)
    for child in pl.children:
        name = doc.local(child, f"{where} Plane")
        if name not in ("AnnotationRef", "HashSHA1"):
            _unknown(doc, "element", "Plane", name, f"{where} Plane", child)
            continue
        doc.tally.remove(f"ome.plane.{name}")
    return f"<Plane{_attr_text(attrs)}/>"


def verify_ome_xml(text: str) -> str | None:
    """For the verifier: None when the document only holds what the cleaner writes."""
    try:
        root = parse_xml(text)
    except XmlRejected:
        return "OME-XML does not parse"
    if root.name != "OME" or not OME_NS.match(root.ns):
        return "OME-XML root"
    if root.attrs.get("Creator") != CREATOR or set(root.attrs) - {"UUID", "Creator"}:
        return "OME root attributes"
    allowed: dict[str, frozenset[str]] = {
        "Image": frozenset({"ID", "Name"}),
        "AcquisitionDate": frozenset(),
        "Pixels": _PIXELS_ATTRS | {"ID"},
        "Channel": _CHANNEL_ATTRS | {"ID"},
        "LightPath": frozenset(),
        "TiffData": _TIFFDATA_ATTRS,
        "UUID": frozenset(),
        "MetadataOnly": frozenset(),
        "Plane": _PLANE_ATTRS,
    }
    for node in root.iter()[1:]:
        if node.ns != root.ns or node.name not in allowed:
            return f"OME-XML element {node.name[:64]!r}"
        if set(node.attrs) - allowed[node.name]:
            return f"OME-XML attributes of {node.name}"
        if node.name == "Image" and not re.match(r"^image-\d+$", node.attrs.get("Name", "")):
            return "OME Image name is not neutral"
        if node.name == "AcquisitionDate" and not re.match(r"^\d{4}-01-01T00:00:00$", node.text):
            return "OME AcquisitionDate holds more than a year"
        if node.name == "UUID" and node.text.strip() != root.attrs.get("UUID"):
            return "OME TiffData UUID"
    return None


TagFactory = Callable[[TiffTag, Tally], OutTag | None]


def description_handler(xml: str) -> TagFactory:
    def handler(tag: TiffTag, tally: Tally) -> OutTag | None:
        del tag, tally
        return OutTag.ascii(tiff.IMAGE_DESCRIPTION, xml)

    return handler


def drop_description(tag: TiffTag, tally: Tally) -> OutTag | None:
    text = tag.text()
    if text.strip():
        tally.remove("tiff_tag.ImageDescription", text if len(text) <= 4096 else None)
    return None


def drop_subifds(tag: TiffTag, tally: Tally) -> OutTag | None:
    del tag, tally
    return None  # rewritten by the writer from the kept children


def ome_text(st: TiffStructure) -> str:
    tag = st.ifds[0].get(tiff.IMAGE_DESCRIPTION)
    if tag is None or tag.dtype != tiff.ASCII:
        raise DeidRejected(MALFORMED_OME_XML, "IFD 0 has no ASCII ImageDescription")
    raw = tag.raw_text()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeidRejected(MALFORMED_OME_XML, "OME-XML is not UTF-8") from exc
