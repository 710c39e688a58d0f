"""JPEG stream surgery for lossless tile copies: TIFF tile + JPEGTables -> standalone JFIF,
colour-space marker, structural validation, and (scaled) decoding / encoding with Pillow.

TIFF JPEG (compression 7) tiles usually omit their quantisation and Huffman tables, which are
stored once in the IFD's JPEGTables tag (a stream of ``SOI, DQT/DHT..., EOI``). A standalone
file is ``SOI`` + the tables' segments + the tile after its own ``SOI``; no entropy-coded byte
changes, so the pixels are exactly the scanner's.

Colour space: a TIFF with PhotometricInterpretation RGB stores JPEG without the YCbCr
transform (Aperio does this). Without a marker saying so, a decoder assumes YCbCr for three
components, so such tiles get an Adobe APP14 segment with transform 0 (no transform) unless
the stream already carries an APP14. YCbCr tiles need nothing (the default interpretation).

:func:`check_structure` walks the marker segments and the entropy-coded data (every ``0xFF``
must be a stuffed byte, a restart marker, or the final EOI) so a truncated tile, an early EOI
or spliced-in garbage markers are caught without decoding. Decoding errors are caught by the
callers; bit flips that libjpeg only warns about are not detectable here.
"""

from __future__ import annotations

import io
import struct
from typing import Final

from PIL import Image

SOI: Final = b"\xff\xd8"
EOI: Final = b"\xff\xd9"
# APP14 "Adobe", version 100, flags 0/0, transform 0 (RGB stored as is).
ADOBE_RGB: Final = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

PHOTOMETRIC_RGB: Final = 2
PHOTOMETRIC_YCBCR: Final = 6

_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_BASELINE_SOF: Final = frozenset({0xC0, 0xC1})
_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0..7: no length
# Segments allowed between scans of a (multi-scan) stream.
_BETWEEN_SCANS: Final = frozenset({0xC4, 0xDB, 0xDD, 0xDA, 0xFE, *range(0xE0, 0xF0)})


class JpegStructureError(ValueError):
    """The JPEG stream is malformed (truncated, stray markers, bad segment lengths)."""


class FrameInfo:
    """Facts from a JPEG stream's SOF segment."""

    __slots__ = ("baseline", "components", "has_adobe", "height", "precision", "width")

    def __init__(
        self,
        *,
        width: int,
        height: int,
        components: int,
        precision: int,
        baseline: bool,
        has_adobe: bool,
    ) -> None:
        self.width = width
        self.height = height
        self.components = components
        self.precision = precision
        self.baseline = baseline
        self.has_adobe = has_adobe


def _segments_end(data: bytes, pos: int, *, tables_only: bool) -> tuple[int, dict[int, bytes]]:
    """Walk length-prefixed segments from ``pos``; stop at SOS (return its payload start) or
    EOI. Returns (position after the SOS header or of the EOI, {marker: first payload})."""
    seen: dict[int, bytes] = {}
    n = len(data)
    while True:
        if pos + 2 > n or data[pos] != 0xFF:
            raise JpegStructureError("marker expected")
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 2 > n:
            raise JpegStructureError("truncated marker")
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos, seen
        if marker in _STANDALONE or marker == 0xD8:
            raise JpegStructureError("unexpected marker")
        if pos + 4 > n:
            raise JpegStructureError("truncated segment")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > n:
            raise JpegStructureError("bad segment length")
        seen.setdefault(marker, data[pos + 4 : end])
        if marker == 0xDA:
            if tables_only:
                raise JpegStructureError("scan in a tables stream")
            return end, seen
        pos = end


def _skip_entropy(data: bytes, pos: int) -> int:
    """Position of the first marker after entropy-coded data starting at ``pos``."""
    n = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            raise JpegStructureError("entropy-coded data runs to the end (no EOI)")
        nxt = data[pos + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
            pos += 2
            continue
        if nxt == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        return pos


def check_structure(data: bytes) -> FrameInfo:
    """Validate a complete JPEG stream (SOI ... EOI, nothing after) and return its frame
    facts. Raises :class:`JpegStructureError`."""
    if not data.startswith(SOI):
        raise JpegStructureError("no SOI")
    pos, seen = _segments_end(data, 2, tables_only=False)
    if 0xDA not in seen:
        raise JpegStructureError("no scan")
    while True:
        pos = _skip_entropy(data, pos)
        marker = data[pos + 1]
        if marker == 0xD9:
            if pos + 2 != len(data):
                raise JpegStructureError("data after EOI")
            break
        if marker not in _BETWEEN_SCANS:
            raise JpegStructureError("stray marker in entropy-coded data")
        pos, more = _segments_end(data, pos, tables_only=False)
        for key, value in more.items():
            seen.setdefault(key, value)
    sof_marker = next((m for m in seen if m in _SOF_MARKERS), None)
    if sof_marker is None:
        raise JpegStructureError("no frame header")
    sof = seen[sof_marker]
    if len(sof) < 6:
        raise JpegStructureError("short frame header")
    precision, height, width, components = struct.unpack_from(">BHHB", sof, 0)
    if width == 0 or height == 0 or components == 0:
        raise JpegStructureError("empty frame")
    app14 = seen.get(0xEE)
    return FrameInfo(
        width=width,
        height=height,
        components=components,
        precision=precision,
        baseline=sof_marker in _BASELINE_SOF,
        has_adobe=app14 is not None and app14.startswith(b"Adobe"),
    )


def tables_payload(tables: bytes | None) -> bytes:
    """The segments of a JPEGTables stream without its SOI/EOI (b"" for no tables)."""
    if not tables:
        return b""
    if not tables.startswith(SOI):
        raise JpegStructureError("JPEGTables without SOI")
    end, _ = _segments_end(tables, 2, tables_only=True)
    return tables[2:end]


def standalone(tile: bytes, tables_segments: bytes, photometric: int) -> bytes:
    """A self-contained JFIF stream from a TIFF JPEG tile: ``SOI`` [+ Adobe APP14 for RGB]
    + the shared tables + the tile's own segments. Entropy-coded data are untouched.
    ``tables_segments`` comes from :func:`tables_payload`."""
    if not tile.startswith(SOI):
        raise JpegStructureError("tile without SOI")
    marker = ADOBE_RGB if photometric == PHOTOMETRIC_RGB and not _has_app14(tile) else b""
    return SOI + marker + tables_segments + tile[2:]


def _has_app14(tile: bytes) -> bool:
    try:
        _, seen = _segments_end(tile, 2, tables_only=False)
    except JpegStructureError:
        return False
    app14 = seen.get(0xEE)
    return app14 is not None and app14.startswith(b"Adobe")


def decode(data: bytes, scale: int = 1) -> Image.Image:
    """Decode a standalone JPEG to RGB, reduced by ``scale`` (1, 2, 4 or 8) in the DCT domain
    (libjpeg scaled IDCT: cheaper than decoding in full and resizing). Raises ``OSError`` /
    ``ValueError`` / ``SyntaxError`` on undecodable data."""
    opened = Image.open(io.BytesIO(data))
    if opened.format != "JPEG":
        raise JpegStructureError("not a JPEG stream")
    if scale > 1:
        w, h = opened.size
        opened.draft("RGB", (-(-w // scale), -(-h // scale)))
    opened.load()
    if opened.mode != "RGB":
        return opened.convert("RGB")
    return opened


def encode(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG, 4:2:0, no ICC/EXIF: Pillow's defaults, as the rest of the engine."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, icc_profile=None)
    return buffer.getvalue()
