"""Hamamatsu NDPI rules.

IFDs: pyramid levels have SourceLens (65421) > 0; the macro photograph (-1, shows the label)
and the "map" (-2) are dropped; any other value stops the slide.

Decisions on NDPI tags (documented in the report to the lead):

* kept: format flag, source lens, X/Y/Z offsets from slide centre, tissue index, McuStarts
  (+ high bytes; strip-relative so still valid), channel/filter-set name (65434, validated
  text), exposure ratio and RGB multipliers, capture mode, JPEG quality, refocus interval, focus
  offset, blank lines, wavelength, exposure time, default gamma; Make/Model/Software (device
  *type* and software version - the DICOM Basic Profile keeps Manufacturer, Model and Software
  Versions too); the device *serial* is removed.
* removed as identifying: 65427 Reference (slide label text), 65442 scanner serial number,
  DateTime.
* removed as unnecessary: 65428 auth code, 65433/65443 (undocumented), 65439/65440 focus
  points, 65448 firmware version, 65450 label-obscured flag, 65453 lamp age, 65455-65458
  focus/scan/write time and auto-focus flag.
* 65449 property map: key by key - only ``Product`` and ``Objective.Lens.Magnificant`` are
  kept; dates (Created/Updated), serial numbers (NDP.S/N, Macro.S/N) and the shading section
  (which carries Date and SerialNumber) are removed; calibration keys are removed; unknown keys
  reject the slide (or are dropped, per policy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.deid.engine.model import (
    UNEXPECTED_TAG_VALUE,
    UNKNOWN_NDPI_IFD,
    UNKNOWN_NDPI_PROPERTY,
    DeidPolicy,
    DeidRejected,
    Tally,
)
from services.deid.engine.tiff_common import FormatTagRules, TagHandler, device_text_ok
from services.shared.wsi import tiff
from services.shared.wsi.tiff import OutTag, TiffError, TiffIfd, TiffStructure, TiffTag

NDPI_KEEP: dict[int, int | None] = {
    65420: 1, 65421: 1, 65422: 1, 65423: 1, 65424: 1, 65425: 1, 65426: None, 65432: None,
    65435: 1, 65436: 1, 65437: 1, 65438: 1, 65441: 1, 65444: 1, 65445: 1, 65446: 1, 65447: 1,
    65451: 1, 65454: 1, 65500: 1,
}  # fmt: skip
NDPI_REMOVE: dict[int, tuple[str, bool]] = {
    65427: ("ndpi_tag.reference", True),
    65442: ("ndpi_tag.serial", True),
    65428: ("ndpi_tag.auth_code", False),
    65433: ("ndpi_tag.unknown_65433", False),
    65439: ("ndpi_tag.focus_points", False),
    65440: ("ndpi_tag.focus_point_regions", False),
    65443: ("ndpi_tag.unknown_65443", False),
    65448: ("ndpi_tag.firmware_version", False),
    65450: ("ndpi_tag.label_obscured", False),
    65453: ("ndpi_tag.lamp_age", False),
    65455: ("ndpi_tag.focus_time", False),
    65456: ("ndpi_tag.scan_time", False),
    65457: ("ndpi_tag.write_time", False),
    65458: ("ndpi_tag.fully_auto_focus", False),
}
PROPERTY_MAP = 65449
CHANNEL_NAME = 65434

_CHANNEL = re.compile(r"^[A-Za-z0-9 ()._/+\-]{0,64}$")
_NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?$")
_DEVICE = re.compile(r"^[A-Za-z0-9 ._\-()/+]{1,64}$")

PROPERTY_KEEP: dict[str, re.Pattern[str]] = {
    "Product": _DEVICE,
    "Objective.Lens.Magnificant": _NUMBER,
}
PROPERTY_REMOVE_IDENTIFYING = frozenset({"Created", "Updated", "NDP.S/N", "Macro.S/N"})
_PROPERTY_REMOVE_OTHER = re.compile(
    r"^(?:"
    r"(?:roi|slant|focalplane|exposure|ccd|valid|stage|lane|cube|target|calibration|system)"
    r"\.[A-Za-z0-9_.\[\]]+"
    r"|PSHV(?:\.[A-Za-z0-9_.]+)?"
    r"|(?:AHEX|YRNP|zCoarse|zFine|MHLN)\[\d+\](?:\.[A-Za-z0-9_]+)?"
    r"|slide\.tickness|coarse\.focus\.pitch|fine\.focus\.pitch|variable\.exposuretime"
    r"|colorfilterID"
    r")$"
)
SHADING_SECTION = "NDP Shading Data"
_SHADING_IDENTIFYING = frozenset({"Date", "SerialNumber"})


def filter_property_map(text: str, tally: Tally, policy: DeidPolicy) -> str | None:
    """Filter the NDPI property map; returns the kept text (None if nothing is kept)."""
    kept: list[str] = []
    for line in re.split(r"\r\n|\n", text):
        if not line.strip():
            continue
        if line.startswith(";"):
            _drop_section(line, tally, policy)
            continue
        if "=" not in line:
            raise DeidRejected(UNKNOWN_NDPI_PROPERTY, "property map line without '='")
        key, value = line.split("=", 1)
        key = key.strip()
        if key in PROPERTY_KEEP:
            if not PROPERTY_KEEP[key].match(value.strip()):
                raise DeidRejected(UNEXPECTED_TAG_VALUE, f"NDPI property {key!r}")
            kept.append(f"{key}={value.strip()}")
        elif key in PROPERTY_REMOVE_IDENTIFYING:
            tally.remove(f"ndpi_property.{key}", value)
        elif _PROPERTY_REMOVE_OTHER.match(key):
            tally.remove("ndpi_property.calibration")
        elif policy.ndpi_unknown_property == "drop":
            tally.remove("ndpi_property.unknown")
        elif tally.unknown("ndpi", key, UNKNOWN_NDPI_PROPERTY, "NDPI property map (65449)"):
            kept.append(f"{key}={value.strip()}")  # a data steward's rule keeps it
        else:
            tally.remove("ndpi_property.unknown", value)  # steward's rule, or held for review
    if not kept:
        return None
    return "\r\n".join(kept) + "\r\n"


def _drop_section(line: str, tally: Tally, policy: DeidPolicy) -> None:
    parts = [p for p in re.split(r"\r;|\r", line[1:]) if p]
    name = parts[0].strip() if parts else ""
    if name != SHADING_SECTION and policy.ndpi_unknown_property != "drop":
        raise DeidRejected(UNKNOWN_NDPI_PROPERTY, "unknown NDPI property section")
    for part in parts[1:]:
        key, _, value = part.lstrip(";").partition("=")
        if key.strip() in _SHADING_IDENTIFYING:
            tally.identifying(value)
    tally.remove(
        "ndpi_property_section.shading"
        if name == SHADING_SECTION
        else "ndpi_property_section.unknown"
    )


def _property_handler_factory(policy: DeidPolicy) -> TagHandler:
    def handler(tag: TiffTag, tally: Tally) -> OutTag | None:
        if tag.dtype != tiff.ASCII:
            raise DeidRejected(UNEXPECTED_TAG_VALUE, "NDPI property map is not ASCII")
        text = filter_property_map(tag.text(), tally, policy)
        tally.removed["ndpi_tag.property_map_filtered"] += 1
        return None if text is None else OutTag.ascii(PROPERTY_MAP, text)

    return handler


def _channel_handler(tag: TiffTag, tally: Tally) -> OutTag | None:
    del tally
    if tag.dtype != tiff.ASCII or not _CHANNEL.match(tag.text()):
        raise DeidRejected(UNEXPECTED_TAG_VALUE, "NDPI channel name (tag 65434)")
    return OutTag.copy(tag)


def _device_handler(tag: TiffTag, tally: Tally) -> OutTag | None:
    if device_text_ok(tag):
        return OutTag.copy(tag)
    tally.remove(f"tiff_tag.{tag.name}", tag.text())
    return None


def rules(policy: DeidPolicy) -> FormatTagRules:
    return FormatTagRules(
        special={
            PROPERTY_MAP: _property_handler_factory(policy),
            CHANNEL_NAME: _channel_handler,
            305: _device_handler,
        },
        keep_numeric=NDPI_KEEP,
        remove=NDPI_REMOVE,
    )


def output_tags() -> frozenset[int]:
    return rules(DeidPolicy()).allowed_output_tags()


def source_lens(ifd: TiffIfd) -> float | None:
    tag = ifd.get(tiff.NDPI_SOURCE_LENS)
    if tag is None:
        return None
    try:
        values = tag.floats()
    except TiffError:
        return None
    return values[0] if values else None


@dataclass(frozen=True)
class Selection:
    ifds: list[TiffIfd]
    levels: list[TiffIfd]


def select_ifds(st: TiffStructure, tally: Tally) -> Selection:
    kept: list[TiffIfd] = []
    for ifd in st.ifds:
        lens = source_lens(ifd)
        if lens is None:
            raise DeidRejected(UNKNOWN_NDPI_IFD, f"IFD {ifd.index} has no SourceLens (65421)")
        if lens > 0:
            kept.append(ifd)
        elif lens == -1:
            tally.remove("associated_image.macro")
        elif lens == -2:
            tally.remove("associated_image.map")
        else:
            raise DeidRejected(UNKNOWN_NDPI_IFD, f"IFD {ifd.index} has an unknown SourceLens")
    levels = [i for i in kept if not i.int_value(65424, 0)]
    return Selection(kept, levels)
