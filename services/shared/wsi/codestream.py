"""Header marker segments of JPEG and JPEG 2000 codestreams (tiles/strips), without decoding.

Text can ride inside a compressed tile: JPEG COM (FFFE) and APPn (FFE0-FFEF) segments and
JPEG 2000 COM (FF64) segments of the main header. None of them takes part in decoding the
pixels (apart from APP0 JFIF / APP14 Adobe, which tell a decoder the colour transform), so
removing them from the header - and copying the entropy-coded data that follows unchanged - is
lossless: the tile decodes to the same pixels.

:func:`scan_header` walks the marker segments from SOI/SOC up to the first SOS (JPEG) or SOT
(JPEG 2000) and returns the segments to drop; :func:`rewrite_head` builds the new header.
Comments that are a known encoder/vendor signature (no free text) are kept, so scanner output
stays byte-identical where nothing is hidden.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

JPEG_COMPRESSIONS = frozenset({7})
J2K_COMPRESSIONS = frozenset({33003, 33005, 34712})

_SOI = b"\xff\xd8"
_SOC = b"\xff\x4f"
_SOS = 0xDA
_EOI = 0xD9
_SOT = 0x90
_J2K_COM = 0x64

# Encoder signatures written into every tile/strip by known scanners and codecs.
_JPEG_VENDOR_COMMENTS = (
    re.compile(rb"^Hamamatsu JPEG Library, version \[[0-9.]{1,32}\]\x00?$"),
    re.compile(rb"^Hamamatsu NanoZoomer Digital Pathology\x00?$"),
    re.compile(
        rb"^Intel\(R\) IPP JPEG encoder \[[0-9.]{1,16}\] - [A-Z][a-z]{2} [ 0-9][0-9] [0-9]{4}\x00?$"
    ),
    re.compile(rb"^Compressed by DicomObjects: [0-9.]{1,16}\x00?$"),
    re.compile(rb"^\x00*$"),  # empty
)
_J2K_VENDOR_COMMENTS = (
    re.compile(rb"^\x00[\x00\x01]\x00*$"),  # empty
    re.compile(rb"^\x00\x01Kakadu-v[0-9.]{1,16}\x00?$"),
    re.compile(
        rb"^\x00\x01Kdu-Layer-Info: log_2\{Delta-D\(MSE\)/\[2\^16\*Delta-L\(bytes\)\]\}, "
        rb"L\(bytes\)\n(?: *-?[0-9]{1,4}\.[0-9], *[0-9]\.[0-9]e[+-][0-9]{3}\n){1,64}\x00?$"
    ),
)


class CodestreamError(Exception):
    """The header is not a well-formed JPEG / JPEG 2000 marker sequence."""


@dataclass(frozen=True)
class HeaderScan:
    drops: tuple[tuple[int, int], ...]  # (start, end) of segments to remove, ascending
    texts: tuple[bytes, ...]  # payloads of the dropped segments (for the forbidden list)
    kinds: tuple[str, ...]  # "comment" / "app1" ... per dropped segment
    header_end: int  # offset of the first SOS/SOT marker (entropy data / tile-parts follow)


def vendor_comment(payload: bytes, j2k: bool) -> bool:
    pats = _J2K_VENDOR_COMMENTS if j2k else _JPEG_VENDOR_COMMENTS
    return any(p.match(payload) for p in pats)


def _app_needed(marker: int, payload: bytes) -> bool:
    """APP0 JFIF without thumbnail, APP14 Adobe (colour transform): kept."""
    if marker == 0xE0:
        return len(payload) == 14 and payload[:5] == b"JFIF\x00"
    if marker == 0xEE:
        return len(payload) == 12 and payload[:5] == b"Adobe"
    return False


def scan_header(buf: bytes) -> HeaderScan | None:
    """Scan a codestream head. None: ``buf`` ends before the header does (read more)."""
    if buf[:2] == _SOI:
        j2k = False
    elif buf[:2] == _SOC:
        j2k = True
    else:
        raise CodestreamError("no SOI/SOC marker")
    drops: list[tuple[int, int]] = []
    texts: list[bytes] = []
    kinds: list[str] = []
    pos = 2
    while True:
        if pos + 2 > len(buf):
            return None
        if buf[pos] != 0xFF:
            raise CodestreamError("marker expected")
        marker = buf[pos + 1]
        if marker == 0xFF and not j2k:  # fill byte
            pos += 1
            continue
        if (not j2k and marker in (_SOS, _EOI)) or (j2k and marker == _SOT):
            return HeaderScan(tuple(drops), tuple(texts), tuple(kinds), pos)
        if not j2k and (marker == 0x01 or 0xD0 <= marker <= 0xD8):
            raise CodestreamError("unexpected stand-alone marker in the header")
        if pos + 4 > len(buf):
            return None
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if length < 2:
            raise CodestreamError("bad segment length")
        end = pos + 2 + length
        if end > len(buf):
            return None
        payload = buf[pos + 4 : end]
        if j2k:
            if marker == _J2K_COM and not vendor_comment(payload, True):
                drops.append((pos, end))
                texts.append(payload[2:])
                kinds.append("comment")
        elif marker == 0xFE:
            if not vendor_comment(payload, False):
                drops.append((pos, end))
                texts.append(payload)
                kinds.append("comment")
        elif 0xE0 <= marker <= 0xEF and not _app_needed(marker, payload):
            drops.append((pos, end))
            texts.append(payload)
            kinds.append(f"app{marker - 0xE0}")
        pos = end


def rewrite_head(buf: bytes, scan: HeaderScan) -> tuple[bytes, int]:
    """(new head, skip): the cleaned stream is ``new head + original[skip:]``."""
    skip = scan.drops[-1][1]
    parts: list[bytes] = []
    pos = 0
    for start, end in scan.drops:
        parts.append(buf[pos:start])
        pos = end
    return b"".join(parts), skip


# --- ICC profiles ------------------------------------------------------------------------------
# Tag types holding numbers only (colorimetry, curves, look-up tables, signatures).
_ICC_NUMERIC_TYPES = frozenset(
    {b"XYZ ", b"curv", b"para", b"sf32", b"uf32", b"mft1", b"mft2", b"mAB ", b"mBA ", b"chrm",
     b"view", b"meas", b"sig ", b"clro", b"vcgt", b"ndin", b"ui08", b"ui16", b"ui32", b"ui64"}
)  # fmt: skip
_ICC_TEXT_TYPES = frozenset({b"desc", b"text", b"mluc"})
# Description / copyright / device texts of standard and vendor profiles (no free text).
_ICC_KNOWN_TEXTS = tuple(
    re.compile(p)
    for p in (
        r"sRGB IEC61966-2[.-]1",
        r"sRGB built-in",
        r"sRGB",
        r"IEC 61966-2[.-]1 Default RGB colou?r space - sRGB",
        r"IEC http://www\.iec\.ch",
        r"Reference Viewing Condition in IEC ?61966-2[.-]1",
        r"Copyright \(c\) 19\d\d Hewlett-Packard Company",
        r"No copyright, use freely",
        r"Public Domain",
        r"Copyright International Color Consortium(?:, \d{4})?",
        r"Adobe RGB \(1998\)",
        r"Copyright \d{4} Adobe Systems Incorporated",
        r"Display P3",
        r"Copyright Apple Inc\., \d{4}",
        r"ScanScope v\d",
        r"",
    )
)


def _icc_strings(data: bytes, off: int, size: int) -> list[str] | None:
    body = data[off : off + size]
    kind = body[:4]
    try:
        if kind == b"text":
            return [body[8:].rstrip(b"\x00").decode("ascii")]
        if kind == b"desc":
            (n,) = struct.unpack_from(">I", body, 8)
            return [body[12 : 12 + n].rstrip(b"\x00").decode("ascii")]  # Unicode/Mac: same
        if kind == b"mluc":
            count, rec = struct.unpack_from(">II", body, 8)
            out = []
            for i in range(count):
                _lang, length, at = struct.unpack_from(">4sII", body, 16 + i * rec)
                out.append(body[at : at + length].decode("utf-16-be").rstrip("\x00"))
            return out
    except (struct.error, UnicodeDecodeError, ValueError):
        return None
    return None


def icc_profile_texts(data: bytes) -> tuple[bool, list[str]]:
    """(clean, texts): clean when every tag of the profile is numeric or a known standard /
    vendor text; ``texts`` are the unknown text values (for the forbidden list when dropped)."""
    texts: list[str] = []
    try:
        (count,) = struct.unpack_from(">I", data, 128)
        if count > 256:
            return False, texts
        clean = True
        for i in range(count):
            _sig, off, size = struct.unpack_from(">4sII", data, 132 + 12 * i)
            if off + size > len(data) or size < 8:
                return False, texts
            kind = data[off : off + 4]
            if kind in _ICC_NUMERIC_TYPES:
                continue
            if kind not in _ICC_TEXT_TYPES:
                clean = False
                continue
            strings = _icc_strings(data, off, size)
            if strings is None:
                clean = False
                continue
            unknown = [
                t for t in strings if not any(p.fullmatch(t.strip()) for p in _ICC_KNOWN_TEXTS)
            ]
            if unknown:
                texts.extend(unknown)
                clean = False
    except struct.error:
        return False, texts
    return clean, texts


def frame_text_problem(fh: BinaryIO, fragments: Sequence[tuple[int, int]]) -> int | None:
    """Index of the first encapsulated DICOM fragment whose JPEG / JPEG-LS / JPEG 2000 header
    carries a COM/APPn segment outside the known encoder signatures (None: all clean).
    Fragments that do not start a codestream (continuations, other codecs) are skipped."""
    for k, (off, length) in enumerate(fragments):
        fh.seek(off)
        head = fh.read(min(length, 1 << 16))
        if head[:2] not in (_SOI, _SOC):
            continue
        try:
            scan = scan_header(head)
        except CodestreamError:
            continue  # not a codestream header after all: decoding checks judge it
        if scan is None or scan.drops:
            return k
    return None
