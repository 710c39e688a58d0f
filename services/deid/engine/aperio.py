"""Aperio SVS rules: associated images and the ImageDescription key/value fields.

An Aperio description looks like::

    Aperio Image Library v11.2.1 \\r\\n
    46000x32914 [42673,5576 2220x2967] (240x240) JPEG/RGB Q=30;...|AppMag = 20|MPP = 0.4990|...

The header line is kept only when it is "Aperio <known product> v<version>" (OpenSlide
recognises Aperio by the "Aperio" prefix; anything else rejects the slide, naming the line, not
its value), the geometry summary is kept when every token of it is a number/size/region, "->",
"-", ";", a compression name from a closed set, Q=/R= or an embedded header of the same
grammar, and each ``key = value`` field is kept, removed, or - when no rule knows the key - the
slide is rejected. "ICC Profile" is kept only when it names a known profile, else removed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.deid.engine.model import (
    AMBIGUOUS_ASSOCIATED_IMAGE,
    UNEXPECTED_SVS_VALUE,
    UNKNOWN_SVS_FIELD,
    DeidPolicy,
    DeidRejected,
    Tally,
    printable_name,
)
from services.deid.engine.tiff_common import FormatTagRules, aspect_matches
from services.shared.wsi import tiff
from services.shared.wsi.sniff import svs_associated_kind
from services.shared.wsi.tiff import OutTag, TiffIfd, TiffStructure, TiffTag

_NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?$")

# Fields kept verbatim once their value passes the validator.
SVS_KEEP: dict[str, re.Pattern[str]] = {
    **{
        k: _NUMBER
        for k in (
            "AppMag",
            "MPP",
            "StripeWidth",
            "OriginalWidth",
            "OriginalHeight",
            "Originalheight",
            "Left",
            "Top",
            "LineCameraSkew",
            "LineAreaXOffset",
            "LineAreaYOffset",
            "Focus Offset",
            "Exposure Time",
            "Exposure Scale",
            "Filtered",
            "DisplayColor",
        )
    },
}
ICC_PROFILE_FIELD = "ICC Profile"
# Fields removed because they identify the slide, patient, operator, scanner or time.
SVS_REMOVE_IDENTIFYING = frozenset(
    {
        "Filename",
        "Date",
        "Time",
        "Time Zone",
        "User",
        "ScanScope ID",
        "ImageID",
        "Barcode",
        "Rack",
        "Slide",
        "DSR ID",
    }
)
# Fields removed because they are free text or not needed (not identifying by themselves).
SVS_REMOVE_OTHER = frozenset({"Parmset", "SessionMode"})

# Header line: "Aperio" + a known product name + a version, nothing else. OpenSlide only needs
# the "Aperio" prefix; a header outside this grammar rejects the slide (the line is named, never
# its value) so that a new scanner generation is looked at before it is let through.
_PRODUCT = r"(?:Image Library|Leica Biosystems GT ?450(?: DX)?|Image Format)"
_VERSION = r"v(?:\d{1,4}(?:\.\d{1,6}){0,4}|FS\d{1,4}(?: \d{1,4})?)"
_LIBRARY = rf"Aperio {_PRODUCT} {_VERSION}"
_HEADER = re.compile(rf"^{_LIBRARY}[ \t]*$")
LIBRARY_PATTERN = _LIBRARY
# Compression names Aperio writes in the geometry summary (closed set).
_COMPRESSIONS = r"(?:JPEG/RGB|JPEG/YUV|JPEG/YCC|J2K/KDU|J2K/YUV16|J2K/RGB|J2K/YCC|LZW/RGB|RAW/RGB)"
# Geometry summary: sizes, region, tile size, "->", compression, quality, and (in files written
# by ImageScope from another Aperio file) ";" + the source's header line and summary.
_SUMMARY = re.compile(
    r"(?:[ \t\r\n]+|;|->|-|" + _LIBRARY + r"|\d{1,7}x\d{1,7}\]?|\[\d{1,7},\d{1,7}"
    r"|\(\d{1,7}x\d{1,7}\)|" + _COMPRESSIONS + r"|[QR]=\d{1,3})*"
)
# Values of the "ICC Profile" field that are profile names of Aperio scanners; any other
# value is removed (the field is informational; the profile itself is tag 34675).
ICC_PROFILE_NAMES = frozenset(
    {
        "ScanScope v1",
        "ScanScope v2",
        "AT2",
        "AT2 v1",
        "CS2",
        "GT450",
        "GT 450",
        "GT450 DX",
        "sRGB",
        "sRGB IEC61966-2.1",
        "IEC 61966-2.1 Default RGB colour space - sRGB",
        "Adobe RGB (1998)",
    }
)


def header_ok(header: str) -> bool:
    return bool(_HEADER.match(header))


@dataclass(frozen=True)
class AperioDescription:
    header: str
    newline: str
    summary: str
    fields: tuple[tuple[str, str], ...]

    def render(self) -> str:
        parts = [self.summary, *(f"{k} = {v}" for k, v in self.fields)]
        return self.header + self.newline + "|".join(parts)


def parse_description(text: str) -> AperioDescription:
    """Split an Aperio description into header, summary and fields (structure only)."""
    nl_at = text.find("\n")
    if nl_at < 0:
        header, newline, rest = text, "", ""
    else:
        header = text[:nl_at]
        newline = "\n"
        if header.endswith("\r"):
            header, newline = header[:-1], "\r\n"
        rest = text[nl_at + 1 :]
    pieces = rest.split("|") if rest else [""]
    fields: list[tuple[str, str]] = []
    for piece in pieces[1:]:
        if "=" not in piece:
            raise DeidRejected(UNKNOWN_SVS_FIELD, "ImageDescription field without '='")
        key, value = piece.split("=", 1)
        fields.append((key.strip(), value.strip()))
    return AperioDescription(header, newline, pieces[0], tuple(fields))


def clean_description(text: str, tally: Tally) -> str:
    desc = parse_description(text)
    if not _HEADER.match(desc.header):
        raise DeidRejected(UNEXPECTED_SVS_VALUE, "ImageDescription header line")
    if not _SUMMARY.fullmatch(desc.summary):
        # reason code kept as before (UNKNOWN_SVS_FIELD; pinned by the engine tests)
        raise DeidRejected(UNKNOWN_SVS_FIELD, "ImageDescription geometry summary")
    kept: list[tuple[str, str]] = []
    for key, value in desc.fields:
        if key == ICC_PROFILE_FIELD:
            if value in ICC_PROFILE_NAMES:
                kept.append((key, value))
            else:
                tally.remove("svs_field.ICC Profile", value)
        elif key in SVS_KEEP:
            if not SVS_KEEP[key].match(value):
                raise DeidRejected(UNEXPECTED_SVS_VALUE, f"ImageDescription field {key!r}")
            kept.append((key, value))
        elif key in SVS_REMOVE_IDENTIFYING:
            tally.remove(f"svs_field.{key}", value)
        elif key in SVS_REMOVE_OTHER:
            tally.remove(f"svs_field.{key}")
        elif tally.unknown("svs", key, UNKNOWN_SVS_FIELD, "ImageDescription field"):
            kept.append((key, value))  # a data steward's rule keeps it
        else:
            tally.remove(f"svs_field.{key}", value)  # steward's rule, or held for review
    return AperioDescription(desc.header, desc.newline, desc.summary, tuple(kept)).render()


def verify_description(text: str, kept: frozenset[str] = frozenset()) -> str | None:
    """For the verifier: None when the description only holds safe content, else a reason.
    ``kept``: fields a data steward's rule keeps (any value)."""
    try:
        desc = parse_description(text)
    except DeidRejected:
        return "malformed ImageDescription"
    if not _HEADER.match(desc.header) or not _SUMMARY.fullmatch(desc.summary):
        return "ImageDescription header or summary"
    for key, value in desc.fields:
        if key == ICC_PROFILE_FIELD and value in ICC_PROFILE_NAMES:
            continue
        if key in kept and key not in SVS_KEEP:
            continue
        if key not in SVS_KEEP or not SVS_KEEP[key].match(value):
            return f"ImageDescription field {printable_name(key)!r}"
    return None


def _description_handler(tag: TiffTag, tally: Tally) -> OutTag | None:
    if tag.dtype != tiff.ASCII:
        raise DeidRejected(UNKNOWN_SVS_FIELD, "ImageDescription is not ASCII")
    return OutTag.ascii(tiff.IMAGE_DESCRIPTION, clean_description(tag.text(), tally))


RULES = FormatTagRules(special={tiff.IMAGE_DESCRIPTION: _description_handler})


@dataclass(frozen=True)
class Selection:
    ifds: list[TiffIfd]  # kept, in file order
    levels: list[TiffIfd]


def select_ifds(st: TiffStructure, policy: DeidPolicy, tally: Tally) -> Selection:
    """Keep every pyramid level (tiled IFDs), the thumbnail if it is certainly not the label,
    drop label and macro (by description and by subfile type / position)."""
    level0 = st.ifds[0]
    if not level0.is_tiled or svs_associated_kind(level0) is not None:
        raise DeidRejected(AMBIGUOUS_ASSOCIATED_IMAGE, "IFD 0 is not a tiled pyramid level")
    kept: list[TiffIfd] = []
    levels: list[TiffIfd] = []
    for ifd in st.ifds:
        kind = svs_associated_kind(ifd)
        if ifd.is_tiled:
            if kind is None:
                kept.append(ifd)
                levels.append(ifd)
            elif aspect_matches(level0, ifd):
                raise DeidRejected(
                    AMBIGUOUS_ASSOCIATED_IMAGE,
                    f"IFD {ifd.index} is tiled like a level but marked {kind}",
                )
            else:
                tally.remove(f"associated_image.{kind}")
            continue
        if kind is not None:
            tally.remove(f"associated_image.{kind}")
        elif (
            ifd.index == 1
            and policy.keep_svs_thumbnail
            and aspect_matches(level0, ifd)
            and not ifd.new_subfile_type & ~0x1
        ):
            kept.append(ifd)  # thumbnail
        else:
            tally.remove("associated_image.unidentified")
    return Selection(kept, levels)


def thumbnail_ok(ifds: Sequence[TiffIfd]) -> str | None:
    """Verifier check: stripped IFDs may only be a thumbnail at position 1."""
    for ifd in ifds:
        if not ifd.is_tiled and (ifd.index != 1 or not aspect_matches(ifds[0], ifd)):
            return f"IFD {ifd.index} is a stripped image that is not the thumbnail"
        if svs_associated_kind(ifd) is not None:
            return f"IFD {ifd.index} is marked as an associated image"
    return None
