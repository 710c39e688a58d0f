"""Tag rules shared by the TIFF-based formats and the TIFF rewrite driver.

Every tag of every kept IFD goes through exactly one rule: kept (after type/count checks),
removed (counted, and its value remembered as identifying where it is), handled by a
format-specific rule, or - for anything no rule knows - the slide is rejected with
``UNKNOWN_TIFF_TAG`` (fail closed) and held for review unless a data steward's rule
(``DeidPolicy.approved_rules``, key ``tiff:<code>``) keeps or removes the tag.
"""

from __future__ import annotations

import os
import re
import secrets
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from services.deid.engine import streams
from services.deid.engine.model import (
    CORRUPT_IMAGE_DATA,
    MALFORMED_FILE,
    UNEXPECTED_TAG_VALUE,
    UNKNOWN_TIFF_TAG,
    UNSUPPORTED_COMPRESSION,
    UNSUPPORTED_STRUCTURE,
    DeidPolicy,
    DeidRejected,
    Tally,
)
from services.shared.wsi import codestream, tiff
from services.shared.wsi.sniff import TIFF_COMPRESSIONS
from services.shared.wsi.tiff import (
    OutIfd,
    OutTag,
    TiffError,
    TiffIfd,
    TiffStructure,
    TiffTag,
    WriteResult,
    tag_name,
)

NUMERIC_TYPES = tiff.INTEGER_TYPES | {tiff.RATIONAL, tiff.SRATIONAL, tiff.FLOAT, tiff.DOUBLE}

# Baseline/extension tags describing the image; kept verbatim. Value = max count allowed.
KEEP_NUMERIC: dict[int, int] = {
    254: 1, 255: 1, 256: 1, 257: 1, 258: 16, 259: 1, 262: 1, 263: 1, 266: 1, 274: 1, 277: 1,
    278: 1, 280: 16, 281: 16, 282: 1, 283: 1, 284: 1, 286: 1, 287: 1, 290: 1, 291: 65536,
    296: 1, 301: 3 * 65536, 317: 1, 318: 2, 319: 6, 320: 3 * 65536, 321: 2, 322: 1, 323: 1,
    338: 16, 339: 16, 340: 16, 341: 16, 529: 3, 530: 2, 531: 1, 532: 6, 32997: 1, 32998: 1,
}  # fmt: skip
JPEG_TABLES = 347
ICC_PROFILE = 34675
DEVICE_TEXT = frozenset({271, 272})  # Make, Model: device type, not device identity
IMAGE_DATA = tiff.DATA_OFFSET_TAGS | {tiff.NDPI_OFFSET_HIGH_BYTES, tiff.NDPI_BYTECOUNT_HIGH_BYTES}

# Known tags that are dropped. Value: whether the (text) value identifies someone/something.
COMMON_REMOVE: dict[int, bool] = {
    269: True,  # DocumentName
    285: True,  # PageName
    297: False,  # PageNumber
    305: False,  # Software
    306: True,  # DateTime
    315: True,  # Artist
    316: True,  # HostComputer
    33432: False,  # Copyright
    700: False,  # XMP
    33723: False,  # IPTC
    34377: False,  # Photoshop
    34665: False,  # EXIF IFD (its text values are collected separately)
    34853: False,  # GPS IFD
    40965: False,  # Interoperability IFD
    37724: False,  # ImageSourceData
    42016: True,  # ImageUniqueID
    42112: False,  # GDAL_METADATA
    50838: False,  # ImageJ metadata byte counts
    50839: False,  # ImageJ metadata
    288: False,  # FreeOffsets
    289: False,  # FreeByteCounts
    32781: True,  # ImageID (OPI)
    **{code: False for code in range(512, 522)},  # old-style JPEG fields
}

_DEVICE_TEXT = re.compile(r"^[A-Za-z0-9 ._\-()/+,:]{1,64}$")

TagHandler = Callable[[TiffTag, Tally], OutTag | None]


@dataclass(frozen=True)
class FormatTagRules:
    """Format-specific extensions of the common rules."""

    special: Mapping[int, TagHandler] = field(default_factory=dict)
    keep_numeric: Mapping[int, int | None] = field(default_factory=dict)  # None: unbounded
    remove: Mapping[int, tuple[str, bool]] = field(default_factory=dict)  # category, identifying

    def allowed_output_tags(self) -> frozenset[int]:
        return (
            frozenset(KEEP_NUMERIC)
            | {JPEG_TABLES, ICC_PROFILE}
            | DEVICE_TEXT
            | set(self.keep_numeric)
            | set(self.special)
            | tiff.DATA_OFFSET_TAGS
        )


def device_text_ok(tag: TiffTag) -> bool:
    return tag.dtype == tiff.ASCII and bool(_DEVICE_TEXT.match(tag.text()))


def check_jpeg_tables(data: bytes) -> bool:
    """JPEGTables may only hold SOI, DQT, DHT (and DRI) segments and EOI: no text."""
    if data[:2] != b"\xff\xd8":
        return False
    pos = 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xD9:
            return not data[pos + 2 :].strip(b"\x00")
        if marker == 0xFF:
            pos += 1
            continue
        if marker not in (0xDB, 0xC4, 0xDD) or pos + 4 > len(data):
            return False
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            return False
        pos += 2 + length
    return False


def check_icc_profile(data: bytes) -> bool:
    if len(data) < 128:
        return False
    (size,) = struct.unpack_from(">I", data, 0)
    return size <= len(data) and data[36:40] == b"acsp"


def clean_ifd_tags(ifd: TiffIfd, where: str, tally: Tally, rules: FormatTagRules) -> list[OutTag]:
    """Apply the rules to every tag of a kept IFD; returns the tags to write."""
    out: list[OutTag] = []
    for code, tag in ifd.tags.items():
        if code in IMAGE_DATA:
            continue  # rewritten by the writer
        handler = rules.special.get(code)
        if handler is not None:
            kept = handler(tag, tally)
            if kept is not None:
                out.append(kept)
            continue
        if code in KEEP_NUMERIC or code in rules.keep_numeric:
            limit = KEEP_NUMERIC.get(code, rules.keep_numeric.get(code))
            if tag.dtype not in NUMERIC_TYPES:
                raise DeidRejected(
                    UNEXPECTED_TAG_VALUE,
                    f"{tag_name(code)} (tag {code}) in {where} has a non-numeric type",
                )
            if limit is not None and tag.count > limit:
                raise DeidRejected(
                    UNEXPECTED_TAG_VALUE,
                    f"{tag_name(code)} (tag {code}) in {where} has too many values",
                )
            out.append(OutTag.copy(tag))
            continue
        if code == JPEG_TABLES:
            if not check_jpeg_tables(tag.data):
                raise DeidRejected(
                    UNEXPECTED_TAG_VALUE,
                    f"JPEGTables (tag 347) in {where} holds more than quantisation/Huffman tables",
                )
            out.append(OutTag.copy(tag))
            continue
        if code == ICC_PROFILE:
            if not check_icc_profile(tag.data):
                raise DeidRejected(
                    UNEXPECTED_TAG_VALUE,
                    f"InterColorProfile (tag 34675) in {where} is not an ICC profile",
                )
            clean, texts = codestream.icc_profile_texts(tag.data)
            if clean:
                out.append(OutTag.copy(tag))
            else:
                # free text (or tags we cannot read) in the profile: drop the profile. This
                # loses colour management for display, never pixel values.
                tally.remove("tiff_tag.InterColorProfile", *texts)
            continue
        if code in DEVICE_TEXT:
            if device_text_ok(tag):
                out.append(OutTag.copy(tag))
            else:
                tally.remove(f"tiff_tag.{tag_name(code)}", tag.text())
            continue
        if code in rules.remove:
            category, identifying = rules.remove[code]
            tally.remove(category, *([_tag_text(tag)] if identifying else []))
            continue
        if code in COMMON_REMOVE:
            tally.remove(
                f"tiff_tag.{tag_name(code)}", *([_tag_text(tag)] if COMMON_REMOVE[code] else [])
            )
            for kid in ifd.children.get(code, []):
                _collect_child_text(kid, tally)
            continue
        if code == tiff.SUB_IFDS:
            raise DeidRejected(UNSUPPORTED_STRUCTURE, f"SubIFDs (tag 330) in {where}")
        # No rule knows it: a steward's rule decides, else the slide is held for review.
        if tally.unknown("tiff", str(code), UNKNOWN_TIFF_TAG, f"{tag_name(code)} in {where}"):
            out.append(OutTag.copy(tag))
        else:
            tally.remove(f"tiff_tag.{tag_name(code)}", _tag_text(tag))
    return out


def _tag_text(tag: TiffTag) -> str | None:
    if tag.dtype in (tiff.ASCII, tiff.BYTE, tiff.UNDEFINED) and len(tag.data) <= 4096:
        return tag.text()
    return None


def _collect_child_text(ifd: TiffIfd, tally: Tally) -> None:
    for tag in ifd.tags.values():
        if tag.dtype == tiff.ASCII:
            tally.identifying(tag.text())
        elif tag.code == 37510 and tag.data[:8] in (b"ASCII\x00\x00\x00", b"UNICODE\x00"):
            tally.identifying(tag.data[8:])  # EXIF UserComment
    for kids in ifd.children.values():
        for kid in kids:
            _collect_child_text(kid, tally)


def check_level_compression(ifd: TiffIfd, where: str) -> None:
    comp = ifd.compression
    if comp not in TIFF_COMPRESSIONS:
        raise DeidRejected(UNSUPPORTED_COMPRESSION, f"TIFF compression {comp} in {where}")


def level_segments(ifd: TiffIfd, st: TiffStructure, where: str) -> list[tuple[int, int]]:
    try:
        segs = tiff.check_segments(ifd, st.file_size)
    except TiffError as exc:
        reason = "TRUNCATED_FILE" if exc.reason == "TRUNCATED" else MALFORMED_FILE
        raise DeidRejected(reason, f"{where}: {exc.reason}") from exc
    if not any(cnt for _o, cnt in segs):
        raise DeidRejected(CORRUPT_IMAGE_DATA, f"{where} has no image data")
    return segs


def aspect_matches(a: TiffIfd, b: TiffIfd) -> bool:
    """True when two IFDs show the same picture at different scales (allowing rounding)."""
    if min(a.width, a.height, b.width, b.height) <= 0:
        return False
    # compare b's height with a's aspect applied to b's width, tolerating +-1 px rounding
    expected = b.width * a.height / a.width
    return abs(expected - b.height) <= max(2.0, 0.02 * b.height)


def _write_file(
    src: Path,
    tmp: Path,
    out_ifds: Sequence[OutIfd],
    st: TiffStructure,
    policy: DeidPolicy,
    cancel: threading.Event | None = None,
) -> WriteResult:
    with open(src, "rb") as fsrc, open(tmp, "wb") as fdst:
        result = tiff.write_tiff(
            fsrc,
            fdst,
            out_ifds,
            byteorder=st.byteorder,
            flavor=st.flavor,
            buffer_size=policy.buffer_size,
            cancel=cancel,
        )
        fdst.flush()
        if policy.fsync:
            os.fsync(fdst.fileno())
    return result


def write_atomically(
    src: Path, dst: Path, out_ifds: Sequence[OutIfd], st: TiffStructure, policy: DeidPolicy
) -> WriteResult:
    """Write the new TIFF to a temporary file beside ``dst`` and rename it into place (a
    :class:`BackgroundWrite` waited for at once)."""
    return BackgroundWrite(src, dst, out_ifds, st, policy).commit()


class BackgroundWrite:
    """The new TIFF written by a background thread to a temporary file beside ``dst``, renamed
    into place by :meth:`commit`. De-identification starts it before the tile headers are
    scanned: in the usual case no header needs an edit, the layout is already final and the
    kernel copies the image data while the scan runs (the scan is Python/numpy work on the
    header pages, the copy is kernel work; 2 cores do both at once). If the scan finds edits,
    :meth:`cancel` stops the copy within one chunk and removes the partial file; the caller
    writes again with the edits. Nothing reaches ``dst`` before :meth:`commit`."""

    def __init__(
        self,
        src: Path,
        dst: Path,
        out_ifds: Sequence[OutIfd],
        st: TiffStructure,
        policy: DeidPolicy,
    ) -> None:
        self._dst = dst
        self._tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.partial")
        self._cancel = threading.Event()
        self._result: WriteResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(src, out_ifds, st, policy), name="deid-write", daemon=True
        )
        self._thread.start()

    def _run(
        self, src: Path, out_ifds: Sequence[OutIfd], st: TiffStructure, policy: DeidPolicy
    ) -> None:
        try:
            self._result = _write_file(src, self._tmp, out_ifds, st, policy, self._cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by commit()
            self._error = exc

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join()
        with suppress(FileNotFoundError):
            self._tmp.unlink()

    def commit(self) -> WriteResult:
        self._thread.join()
        try:
            if self._error is not None:
                if isinstance(self._error, TiffError):
                    raise DeidRejected(
                        MALFORMED_FILE, f"writing failed: {self._error.reason}"
                    ) from self._error
                raise self._error
            assert self._result is not None
            os.replace(self._tmp, self._dst)
            return self._result
        finally:
            with suppress(FileNotFoundError):
                self._tmp.unlink()


_HEAD_READ = 4096
_HEAD_MAX = 1 << 20


def clean_codestream_heads(
    fh: BinaryIO, ifd: TiffIfd, segments: Sequence[tuple[int, int]], where: str, tally: Tally
) -> dict[int, tuple[bytes, int]]:
    """Drop text-carrying marker segments (JPEG COM/APPn, JPEG 2000 COM) from the header of
    every JPEG / JPEG 2000 tile or strip of ``ifd``; returns the writer's segment edits.

    Only header bytes (up to the first SOS/SOT) are read and rewritten; the entropy-coded
    data is copied verbatim by the writer, so every tile decodes to the same pixels. The
    headers are read through mapped windows and tiles sharing a header byte for byte are
    parsed once (:func:`streams.scan_heads`), so only the header pages of the file are
    touched. Vendor/encoder signature comments (codestream.vendor_comment) are kept."""
    comp = ifd.compression
    if comp not in codestream.JPEG_COMPRESSIONS and comp not in codestream.J2K_COMPRESSIONS:
        return {}
    if not segments:
        return {}
    arr = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
    try:
        heads = streams.scan_heads(
            fh.fileno(),
            os.fstat(fh.fileno()).st_size,
            arr[:, 0],
            arr[:, 1],
            head_read=_HEAD_READ,
            head_max=_HEAD_MAX,
        )
    except streams.HeadError as exc:
        if exc.problem == "incomplete":
            raise DeidRejected(
                CORRUPT_IMAGE_DATA, f"{where}: tile {exc.index} header is too long"
            ) from exc
        raise DeidRejected(
            CORRUPT_IMAGE_DATA, f"{where}: tile {exc.index} has a malformed header ({exc.detail})"
        ) from exc
    edits: dict[int, tuple[bytes, int]] = {}
    rewritten: dict[int, tuple[bytes, int]] = {}
    places: set[tuple[int, int]] = set()
    for k, (scan, head) in sorted(heads.drops.items()):
        result = rewritten.get(id(scan))
        if result is None:
            result = rewritten[id(scan)] = codestream.rewrite_head(head, scan)
        edits[k] = result
        place = segments[k]
        if place in places:
            continue  # the same bytes referenced twice: removed (and counted) once
        places.add(place)
        for kind, text in zip(scan.kinds, scan.texts, strict=True):
            tally.remove(f"codestream_segment.{kind}", text if len(text) <= 4096 else None)
    return edits
