"""Slide format detection and cheap structural inspection for ingestion.

:func:`sniff` recognises the format from the first bytes of an upload (and its file name as a
hint). :func:`sniff_file` does the same with random access to the whole file, which matters for
NDPI whose first IFD sits at the end. :func:`inspect_slide` validates the structure (pyramid
levels, dimensions, compression, data ranges inside the file) without decoding pixels and
returns a :class:`SlideInfo`, or raises :class:`InvalidSlide` with a stable reason code.

Error messages never contain values read from the file (no tag values, no DICOM values, no
file names) - only tag names/numbers, reason codes and our own limits.
"""

from __future__ import annotations

import enum
import io
import itertools
import os
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from services.shared.wsi import bundle, tiff
from services.shared.wsi.tiff import TiffError, TiffIfd, TiffLimits, TiffStructure

WSM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


class SlideFormat(enum.StrEnum):
    APERIO_SVS = "aperio_svs"
    HAMAMATSU_NDPI = "hamamatsu_ndpi"
    GENERIC_TIFF = "generic_tiff"
    DICOM_WSI = "dicom_wsi"
    # recognised, not supported (yet)
    OME_TIFF = "ome_tiff"
    QPTIFF = "qptiff"
    OLYMPUS_VSI = "olympus_vsi"
    PHILIPS_TIFF = "philips_tiff"
    VENTANA_BIF = "ventana_bif"
    LEICA_SCN = "leica_scn"
    ZEISS_CZI = "zeiss_czi"
    MIRAX = "mirax"
    DICOM_OTHER = "dicom_other"
    UNKNOWN = "unknown"

    @property
    def supported(self) -> bool:
        return self in SUPPORTED_FORMATS

    @property
    def is_tiff(self) -> bool:
        return self in TIFF_FORMATS


SUPPORTED_FORMATS = frozenset(
    {
        SlideFormat.APERIO_SVS,
        SlideFormat.HAMAMATSU_NDPI,
        SlideFormat.GENERIC_TIFF,
        SlideFormat.DICOM_WSI,
        SlideFormat.OME_TIFF,
        SlideFormat.QPTIFF,
        SlideFormat.PHILIPS_TIFF,
        SlideFormat.VENTANA_BIF,
        SlideFormat.MIRAX,  # as a bundle (services/shared/wsi/bundle.py)
    }
)
TIFF_FORMATS = frozenset(
    {
        SlideFormat.APERIO_SVS,
        SlideFormat.HAMAMATSU_NDPI,
        SlideFormat.GENERIC_TIFF,
        SlideFormat.OME_TIFF,
        SlideFormat.QPTIFF,
        SlideFormat.OLYMPUS_VSI,
        SlideFormat.PHILIPS_TIFF,
        SlideFormat.VENTANA_BIF,
        SlideFormat.LEICA_SCN,
    }
)


class InvalidSlide(Exception):
    """The upload is not an acceptable slide. ``reason`` is a stable UPPER_SNAKE code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# reason codes
NOT_A_SLIDE = "NOT_A_SLIDE"
UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
FORMAT_MISMATCH = "FORMAT_MISMATCH"
MALFORMED_FILE = "MALFORMED_FILE"
TRUNCATED_FILE = "TRUNCATED_FILE"
UNSUPPORTED_COMPRESSION = "UNSUPPORTED_COMPRESSION"
ABSURD_DIMENSIONS = "ABSURD_DIMENSIONS"
NO_PYRAMID_LEVEL = "NO_PYRAMID_LEVEL"
ASSOCIATED_IMAGE_ONLY = "ASSOCIATED_IMAGE_ONLY"


@dataclass(frozen=True)
class SlideLimits:
    max_side: int = 500_000
    max_total_pixels: int = 50_000_000_000  # level 0, width * height
    max_levels: int = 64
    max_tile_side: int = 16_384
    tiff: TiffLimits = field(default_factory=TiffLimits)


@dataclass(frozen=True)
class LevelInfo:
    width: int
    height: int
    tile_width: int | None
    tile_height: int | None


@dataclass(frozen=True)
class SlideInfo:
    format: SlideFormat
    width: int
    height: int
    levels: tuple[LevelInfo, ...]
    tile_width: int | None
    tile_height: int | None
    compression: str
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    file_size: int

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.width, lv.height) for lv in self.levels)


# TIFF compression codes we can carry through and decode for verification.
TIFF_COMPRESSIONS: dict[int, str] = {
    1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate", 32773: "packbits",
    33003: "aperio_jp2k_ycbcr", 33005: "aperio_jp2k_rgb", 34712: "jpeg2000", 50000: "zstd",
    50001: "webp",
}  # fmt: skip

DICOM_TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "implicit_vr_little_endian",
    "1.2.840.10008.1.2.1": "explicit_vr_little_endian",
    "1.2.840.10008.1.2.4.50": "jpeg_baseline",
    "1.2.840.10008.1.2.4.51": "jpeg_extended",
    "1.2.840.10008.1.2.4.57": "jpeg_lossless",
    "1.2.840.10008.1.2.4.70": "jpeg_lossless_sv1",
    "1.2.840.10008.1.2.4.80": "jpeg_ls_lossless",
    "1.2.840.10008.1.2.4.81": "jpeg_ls_near_lossless",
    "1.2.840.10008.1.2.4.90": "jpeg2000_lossless",
    "1.2.840.10008.1.2.4.91": "jpeg2000",
    "1.2.840.10008.1.2.4.201": "htj2k_lossless",
    "1.2.840.10008.1.2.4.202": "htj2k_lossless_rpcl",
    "1.2.840.10008.1.2.4.203": "htj2k",
}

# --- sniffing ------------------------------------------------------------------------------
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def sniff(head: bytes, filename: str) -> SlideFormat:
    """Best-effort format from the first bytes of a file (>= 64 KiB recommended).

    ``filename`` is only a hint for formats whose decisive structure lies beyond ``head``
    (NDPI keeps its first IFD at the end of the file; VSI/MRXS are multi-file formats).
    """
    ext = Path(filename or "").suffix.lower()
    if len(head) >= 132 and head[128:132] == b"DICM":
        return _sniff_dicom_head(head)
    if head[:10] == b"ZISRAWFILE":
        return SlideFormat.ZEISS_CZI
    if ext == ".mrxs":
        return SlideFormat.MIRAX
    if head[:4] in _TIFF_MAGICS:
        try:
            st = tiff.read_tiff(head, first_only=True)
        except TiffError:
            return _tiff_by_extension(ext)
        return classify_tiff(st, ext)
    return SlideFormat.UNKNOWN


def sniff_file(path: str | os.PathLike[str]) -> SlideFormat:
    """Format of a file on disk, using random access where the head is not enough."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(1 << 16)
        if head[:4] in (bundle.ZIP_MAGIC, bundle.EMPTY_ZIP_MAGIC):
            return _sniff_bundle(p)
        if len(head) >= 132 and head[128:132] == b"DICM":
            fh.seek(0)
            return _sniff_dicom_file(fh)
        if head[:4] in _TIFF_MAGICS:
            fh.seek(0)
            try:
                st = tiff.read_tiff(fh, first_only=True)
            except TiffError:
                return sniff(head, p.name)
            return classify_tiff(st, p.suffix.lower())
    return sniff(head, p.name)


def _tiff_by_extension(ext: str) -> SlideFormat:
    return {
        ".svs": SlideFormat.APERIO_SVS,
        ".ndpi": SlideFormat.HAMAMATSU_NDPI,
        ".vsi": SlideFormat.OLYMPUS_VSI,
        ".qptiff": SlideFormat.QPTIFF,
        ".scn": SlideFormat.LEICA_SCN,
        ".bif": SlideFormat.VENTANA_BIF,
    }.get(ext, SlideFormat.GENERIC_TIFF)


def classify_tiff(st: TiffStructure, ext: str = "") -> SlideFormat:
    """Vendor flavour of a parsed TIFF, from the content of its first IFD."""
    ifd0 = st.ifds[0]
    if st.is_ndpi or tiff.NDPI_FORMAT_FLAG in ifd0:
        return SlideFormat.HAMAMATSU_NDPI
    desc_tag = ifd0.get(tiff.IMAGE_DESCRIPTION)
    desc = desc_tag.text() if desc_tag is not None and desc_tag.dtype == tiff.ASCII else ""
    if desc.startswith("Aperio"):
        return SlideFormat.APERIO_SVS
    software_tag = ifd0.get(305)
    software = software_tag.text() if software_tag is not None else ""
    xmp_tag = ifd0.get(700)
    xmp = xmp_tag.data if xmp_tag is not None else b""
    if b"iScan" in xmp:
        return SlideFormat.VENTANA_BIF
    if "PerkinElmer-QPI" in desc or software.startswith("PerkinElmer-QPI"):
        return SlideFormat.QPTIFF
    if ext == ".vsi" or 33560 in ifd0 or 33471 in ifd0:
        return SlideFormat.OLYMPUS_VSI
    if _OME_XML.search(desc):
        return SlideFormat.OME_TIFF
    if "leica-microsystems.com/scn" in desc:
        return SlideFormat.LEICA_SCN
    if "DPUfsImport" in desc or software.startswith("Philips"):
        return SlideFormat.PHILIPS_TIFF
    return SlideFormat.GENERIC_TIFF


_OME_XML = re.compile(r"<(?:\w+:)?OME[\s>]")


def _sniff_dicom_head(head: bytes) -> SlideFormat:
    try:
        return _sniff_dicom_file(io.BytesIO(head))
    except InvalidSlide:
        return (
            SlideFormat.DICOM_WSI
            if WSM_SOP_CLASS.encode() in head[:4096]
            else (SlideFormat.DICOM_OTHER)
        )


def _sniff_dicom_file(fh: BinaryIO) -> SlideFormat:
    meta = _read_dicom_meta(fh)
    sop = str(meta.get("MediaStorageSOPClassUID", ""))
    return SlideFormat.DICOM_WSI if sop == WSM_SOP_CLASS else SlideFormat.DICOM_OTHER


def _read_dicom_meta(fh: BinaryIO) -> Any:
    from pydicom import filereader

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            filereader.read_preamble(fh, False)
            return filereader._read_file_meta_info(fh)
    except Exception as exc:
        raise InvalidSlide(MALFORMED_FILE, "DICOM file meta information is unreadable") from exc


# --- inspection ----------------------------------------------------------------------------
def inspect_slide(
    path: str | os.PathLike[str], fmt: SlideFormat | None = None, limits: SlideLimits | None = None
) -> SlideInfo:
    """Validate the slide structure cheaply and describe it; raise :class:`InvalidSlide`."""
    limits = limits or SlideLimits()
    p = Path(path)
    if bundle.is_zip(p):
        return inspect_bundle(p, fmt, limits)
    try:
        detected = sniff_file(p)
    except OSError as exc:
        raise InvalidSlide(NOT_A_SLIDE, "file cannot be read") from exc
    if detected is SlideFormat.UNKNOWN:
        raise InvalidSlide(NOT_A_SLIDE, "not a recognised slide format")
    if fmt is not None and fmt is not detected:
        raise InvalidSlide(
            FORMAT_MISMATCH, f"declared format {fmt.value} but content is {detected.value}"
        )
    if not detected.supported:
        raise InvalidSlide(UNSUPPORTED_FORMAT, f"format {detected.value} is not supported")
    if detected is SlideFormat.DICOM_WSI:
        try:
            return _inspect_dicom(p, limits)
        except _dicom_decode_errors() as exc:
            # pydicom decodes elements lazily: a corrupt one (an unknown VR in Rows, found
            # by tests/fuzz) raises from the first attribute read
            raise InvalidSlide(MALFORMED_FILE, "DICOM attributes cannot be decoded") from exc
    try:
        return _inspect_tiff(p, detected, limits)
    except TiffError as exc:
        # A tag read during inspection is malformed (e.g. TileLength of a non-integer type;
        # found by tests/fuzz): the structure's fault, not an unexpected error.
        raise _tiff_invalid(exc) from exc


# --- bundles (multi-file slides in one ZIP) ----------------------------------------------------
def _sniff_bundle(path: Path) -> SlideFormat:
    try:
        kind = bundle.layout(path).kind
    except bundle.BundleError:
        return SlideFormat.UNKNOWN
    return SlideFormat.MIRAX if kind == bundle.KIND_MRXS else SlideFormat.DICOM_WSI


def _bundle_invalid(exc: bundle.BundleError) -> InvalidSlide:
    return InvalidSlide(exc.reason, exc.message)


def inspect_bundle(path: Path, fmt: SlideFormat | None, limits: SlideLimits) -> SlideInfo:
    """Validate a bundle (safe ZIP, one MRXS slide or one DICOM series) without keeping it
    unpacked: MRXS geometry comes from Slidedat.ini; DICOM instances are inspected one by
    one from a scratch copy next to the bundle. Bundle problems keep their own reason codes
    (UNSAFE_BUNDLE, BUNDLE_TOO_LARGE, MISSING_SLIDEDAT, MIXED_SERIES...)."""
    try:
        lay = bundle.layout(path)
        size = path.stat().st_size
        detected = SlideFormat.MIRAX if lay.kind == bundle.KIND_MRXS else SlideFormat.DICOM_WSI
        if fmt is not None and fmt is not detected:
            raise InvalidSlide(
                FORMAT_MISMATCH, f"declared format {fmt.value} but content is {detected.value}"
            )
        if lay.kind == bundle.KIND_MRXS:
            ini_member = next(m for m in lay.members if m.name == f"{lay.data_dir}/Slidedat.ini")
            ini = bundle.parse_ini(bundle.read_member(path, ini_member, bundle.SLIDEDAT_MAX_BYTES))
            geo = bundle.mrxs_geometry(ini)
            w, h = geo.level_dimensions[0]
            _check_dims(w, h, limits, "level 0")
            if w * h > limits.max_total_pixels:
                raise InvalidSlide(
                    ABSURD_DIMENSIONS, f"level 0 exceeds {limits.max_total_pixels} px"
                )
            levels = tuple(
                LevelInfo(a, b, geo.tile_width, geo.tile_height) for a, b in geo.level_dimensions
            )
            return SlideInfo(
                SlideFormat.MIRAX, w, h, levels, geo.tile_width, geo.tile_height, "jpeg",
                geo.mpp_x, geo.mpp_y, geo.objective_power, size,
            )  # fmt: skip
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".inspect-", dir=path.parent) as tmp:
            files = bundle.extract(path, Path(tmp), lay.members)
            return inspect_dicom_series(list(files.values()), limits, size)
    except bundle.BundleError as exc:
        raise _bundle_invalid(exc) from exc


MIXED_SERIES = "MIXED_SERIES"
_ASSOCIATED_FLAVORS = frozenset({"LABEL", "OVERVIEW", "LOCALIZER", "REGIONLOCALIZER"})


def dicom_flavor(ds: Any) -> str:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return image_type[2] if len(image_type) > 2 else ""


def inspect_dicom_series(files: list[Path], limits: SlideLimits, size: int) -> SlideInfo:
    series: set[tuple[str, str]] = set()
    volumes: list[SlideInfo] = []
    for f in files:
        try:
            hdr = read_dicom_header(f)
        except DicomStructureError as exc:
            reason = TRUNCATED_FILE if exc.reason == "TRUNCATED" else MALFORMED_FILE
            raise InvalidSlide(reason, f"DICOM series member: {exc.reason}") from exc
        ds = hdr.dataset
        if str(ds.get("SOPClassUID", "")) != WSM_SOP_CLASS:
            raise InvalidSlide(UNSUPPORTED_FORMAT, "a series member is not a whole-slide image")
        series.add((str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))))
        flavor = dicom_flavor(ds)
        if flavor in _ASSOCIATED_FLAVORS:
            continue  # dropped by de-identification
        info = _inspect_dicom(f, limits)
        if flavor == "VOLUME":
            volumes.append(info)
    if len(series) != 1 or not all(all(k) for k in series):
        raise InvalidSlide(MIXED_SERIES, "the bundle mixes instances of several series")
    if not volumes:
        raise InvalidSlide(NO_PYRAMID_LEVEL, "the series has no VOLUME instance")
    volumes.sort(key=lambda i: i.width * i.height, reverse=True)
    base = volumes[0]
    levels = tuple(v.levels[0] for v in volumes)
    return SlideInfo(
        SlideFormat.DICOM_WSI, base.width, base.height, levels, base.tile_width,
        base.tile_height, base.compression, base.mpp_x, base.mpp_y, base.objective_power, size,
    )  # fmt: skip


def load_tiff(path: Path, limits: SlideLimits) -> TiffStructure:
    try:
        return tiff.read_tiff(path, limits.tiff)
    except TiffError as exc:
        raise _tiff_invalid(exc) from exc


def _tiff_invalid(exc: TiffError) -> InvalidSlide:
    if exc.reason == "TRUNCATED":
        return InvalidSlide(TRUNCATED_FILE, f"TIFF structure: {exc.message}")
    if exc.reason == "NOT_TIFF":
        return InvalidSlide(NOT_A_SLIDE, exc.message)
    return InvalidSlide(MALFORMED_FILE, f"TIFF structure: {exc.reason}")


def _ndpi_lens(ifd: TiffIfd) -> float | None:
    tag = ifd.get(tiff.NDPI_SOURCE_LENS)
    if tag is None:
        return None
    try:
        return tag.floats()[0]
    except (TiffError, IndexError):
        return None


_ASSOC_WORD = re.compile(r"^\s*(label|macro)\b", re.IGNORECASE)


def svs_associated_kind(ifd: TiffIfd) -> str | None:
    """'label'/'macro' when an Aperio IFD is marked as such by description or subfile type."""
    desc = ifd.description or ""
    lines = desc.splitlines()
    if len(lines) > 1:
        m = _ASSOC_WORD.match(lines[1])
        if m:
            return m.group(1).lower()
    if ifd.new_subfile_type & 0x8:  # Aperio sets bit 3 ("macro") on the slide overview
        return "macro"
    return None


_QPTIFF_TYPE = re.compile(r"<ImageType>\s*([A-Za-z]+)\s*</ImageType>")
_PHILIPS_ASSOC = re.compile(r"^\s*(label|macro)\b", re.IGNORECASE)


def pyramid_ifds(st: TiffStructure, fmt: SlideFormat) -> list[TiffIfd]:
    """IFDs that are pyramid levels, as OpenSlide would see them."""
    if fmt is SlideFormat.APERIO_SVS:
        return [i for i in st.ifds if i.is_tiled and svs_associated_kind(i) is None]
    if fmt is SlideFormat.HAMAMATSU_NDPI:
        out = []
        for ifd in st.ifds:
            lens = _ndpi_lens(ifd)
            z = ifd.int_value(65424, 0)
            if lens is not None and lens > 0 and not z:
                out.append(ifd)
        return out
    if fmt is SlideFormat.OME_TIFF:
        # planes of the first image in the main chain; reduced resolutions are its SubIFDs
        base = st.ifds[0]
        kids = base.children.get(tiff.SUB_IFDS, [])
        return [base, *(k for k in kids if not k.new_subfile_type & 0x4)]
    if fmt is SlideFormat.VENTANA_BIF:
        return [i for i in st.ifds if i.is_tiled and (i.description or "").startswith("level=")]
    if fmt is SlideFormat.PHILIPS_TIFF:
        return [i for i in st.ifds if i.is_tiled and not _PHILIPS_ASSOC.match(i.description or "")]
    if fmt is SlideFormat.QPTIFF:
        seen: set[tuple[int, int]] = set()
        pages = []
        for ifd in st.ifds:
            m = _QPTIFF_TYPE.search(ifd.description or "")
            level = m is not None and m.group(1) in ("FullResolution", "ReducedResolution")
            if level and (ifd.width, ifd.height) not in seen:
                seen.add((ifd.width, ifd.height))
                pages.append(ifd)
        return pages
    return generic_pyramid(st).levels


_MIN_LEVEL_RATIO = 1.5


@dataclass(frozen=True)
class GenericPyramid:
    levels: list[TiffIfd]  # level 0 first, strictly decreasing
    masks: list[TiffIfd]  # transparency masks (NewSubfileType bit 2) of a level
    others: list[TiffIfd]  # tiled IFDs that are not levels (labels, overviews...): dropped


def _same_picture(a: TiffIfd, b: TiffIfd) -> bool:
    """b shows a's picture scaled by one factor in both directions (within rounding)."""
    if min(a.width, a.height, b.width, b.height) <= 0:
        return False
    expected = b.width * a.height / a.width
    return abs(expected - b.height) <= max(2.0, 0.02 * b.height)


def generic_pyramid(st: TiffStructure) -> GenericPyramid:
    """The pyramid of a generic tiled TIFF, told apart from tiled associated images.

    Level 0 is the first tiled IFD. A later tiled IFD is the next level only when it shows
    the same picture as level 0 and the previous level (consistent aspect, one scale factor
    for width and height), is at least 1.5x smaller than the previous level in both
    directions, and - when the file marks any reduced-resolution image (NewSubfileType bit 0)
    - is itself marked reduced and nothing else. Any other tiled IFD (a tiled label or macro
    that happens to share the aspect ratio) is not a level. Transparency masks directly after
    their level (same size, bit 2) are kept with it."""
    tiled = [i for i in st.ifds if i.is_tiled]
    if not tiled:
        return GenericPyramid([], [], [])
    base = tiled[0]
    marked = any(i.new_subfile_type & 0x1 for i in tiled[1:] if not i.new_subfile_type & 0x4)
    levels, masks, others = [base], [], []
    for ifd in tiled[1:]:
        prev = levels[-1]
        nst = ifd.new_subfile_type
        if nst & 0x4:
            if (ifd.width, ifd.height) == (prev.width, prev.height) and not nst & ~0x5:
                masks.append(ifd)
            else:
                others.append(ifd)
            continue
        is_level = (
            _same_picture(base, ifd)
            and _same_picture(prev, ifd)
            and prev.width >= _MIN_LEVEL_RATIO * ifd.width
            and prev.height >= _MIN_LEVEL_RATIO * ifd.height
            and (nst == 0x1 if marked else nst == 0)
        )
        (levels if is_level else others).append(ifd)
    return GenericPyramid(levels, masks, others)


def _check_dims(w: int, h: int, limits: SlideLimits, what: str) -> None:
    if w <= 0 or h <= 0:
        raise InvalidSlide(ABSURD_DIMENSIONS, f"{what} has zero width or height")
    if w > limits.max_side or h > limits.max_side:
        raise InvalidSlide(ABSURD_DIMENSIONS, f"{what} side exceeds {limits.max_side} px")


def _inspect_tiff(path: Path, fmt: SlideFormat, limits: SlideLimits) -> SlideInfo:
    st = load_tiff(path, limits)
    levels = pyramid_ifds(st, fmt)
    if not levels:
        raise InvalidSlide(NO_PYRAMID_LEVEL, "no pyramid level found")
    if len(levels) > limits.max_levels:
        raise InvalidSlide(ABSURD_DIMENSIONS, f"more than {limits.max_levels} levels")
    infos: list[LevelInfo] = []
    compression = ""
    for ifd in levels:
        try:
            w, h = ifd.width, ifd.height
            comp = ifd.compression
        except TiffError as exc:
            raise _tiff_invalid(exc) from exc
        _check_dims(w, h, limits, f"IFD {ifd.index}")
        if comp not in TIFF_COMPRESSIONS:
            raise InvalidSlide(
                UNSUPPORTED_COMPRESSION,
                f"IFD {ifd.index}: TIFF compression {comp} is not supported",
            )
        compression = compression or TIFF_COMPRESSIONS[comp]
        try:
            segs = tiff.check_segments(ifd, st.file_size)
        except TiffError as exc:
            raise _tiff_invalid(exc) from exc
        tile: tuple[int, int] | None = ifd.tile_size
        if tile is not None:
            tw, th = tile
            if not (0 < tw <= limits.max_tile_side and 0 < th <= limits.max_tile_side):
                raise InvalidSlide(ABSURD_DIMENSIONS, f"IFD {ifd.index}: tile size out of range")
            spp = ifd.int_value(tiff.SAMPLES_PER_PIXEL, 1) or 1
            planes = spp if ifd.int_value(tiff.PLANAR_CONFIGURATION, 1) == 2 else 1
            depth = ifd.int_value(tiff.IMAGE_DEPTH, 1) or 1
            expected = -(-w // tw) * -(-h // th) * planes * depth
            if len(segs) != expected:
                raise InvalidSlide(
                    MALFORMED_FILE,
                    f"IFD {ifd.index}: TileOffsets count does not match the image geometry",
                )
        elif fmt is SlideFormat.HAMAMATSU_NDPI:
            tile = _ndpi_tile(path, segs, comp)
        if not any(cnt for _o, cnt in segs):
            raise InvalidSlide(MALFORMED_FILE, f"IFD {ifd.index}: no image data")
        infos.append(LevelInfo(w, h, tile[0] if tile else None, tile[1] if tile else None))
    base = infos[0]
    if base.width * base.height > limits.max_total_pixels:
        raise InvalidSlide(ABSURD_DIMENSIONS, f"level 0 exceeds {limits.max_total_pixels} px")
    for prev, cur in itertools.pairwise(infos):
        if fmt is SlideFormat.GENERIC_TIFF and (cur.width > prev.width or cur.height > prev.height):
            raise InvalidSlide(MALFORMED_FILE, "pyramid levels are not in decreasing size")
    mpp_x, mpp_y, power = slide_resolution(st, fmt, levels[0])
    return SlideInfo(
        fmt,
        base.width,
        base.height,
        tuple(infos),
        base.tile_width,
        base.tile_height,
        compression,
        mpp_x,
        mpp_y,
        power,
        st.file_size,
    )


def _ndpi_tile(path: Path, segs: Sequence[tuple[int, int]], comp: int) -> tuple[int, int] | None:
    if comp != 7 or len(segs) != 1:
        return None
    off, cnt = segs[0]
    with open(path, "rb") as fh:
        fh.seek(off)
        head = fh.read(min(cnt, 1 << 16))
    info = jpeg_header_info(head)
    if info is None:
        raise InvalidSlide(MALFORMED_FILE, "NDPI strip does not start with a JPEG header")
    return info.restart_tile


_MPP_FIELD = re.compile(r"\|\s*MPP\s*=\s*([0-9.]+)")
_APPMAG_FIELD = re.compile(r"\|\s*AppMag\s*=\s*([0-9.]+)")


def slide_resolution(
    st: TiffStructure, fmt: SlideFormat, level0: TiffIfd
) -> tuple[float | None, float | None, float | None]:
    """(mpp_x, mpp_y, objective power) from vendor metadata or TIFF resolution tags."""
    power: float | None = None
    if fmt is SlideFormat.APERIO_SVS:
        desc = level0.description or ""
        m = _MPP_FIELD.search(desc)
        a = _APPMAG_FIELD.search(desc)
        power = _to_float(a.group(1)) if a else None
        if m:
            mpp = _to_float(m.group(1))
            return mpp, mpp, power
    if fmt is SlideFormat.HAMAMATSU_NDPI:
        lens = _ndpi_lens(level0)
        power = lens if lens and lens > 0 else None
    return (*tiff_mpp(level0), power)


def tiff_mpp(ifd: TiffIfd) -> tuple[float | None, float | None]:
    unit = ifd.int_value(tiff.RESOLUTION_UNIT, 2)
    per_unit_um = {2: 25400.0, 3: 10000.0}.get(unit or 2)
    if per_unit_um is None:
        return None, None
    out: list[float | None] = []
    for code in (tiff.X_RESOLUTION, tiff.Y_RESOLUTION):
        tag = ifd.get(code)
        try:
            res = tag.floats()[0] if tag is not None else None
        except (TiffError, IndexError):
            res = None
        out.append(round(per_unit_um / res, 9) if res and res > 0 and res == res else None)
    return out[0], out[1]


def _to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# --- JPEG header ---------------------------------------------------------------------------
@dataclass(frozen=True)
class JpegHeaderInfo:
    width: int
    height: int
    components: int
    mcu_width: int
    mcu_height: int
    restart_interval: int

    @property
    def restart_tile(self) -> tuple[int, int] | None:
        """Pixel size of one restart interval when it spans part of or one MCU row."""
        if self.restart_interval <= 0 or self.width <= 0:
            return None
        mcus_per_row = -(-self.width // self.mcu_width)
        if mcus_per_row % self.restart_interval == 0:
            return (self.restart_interval * self.mcu_width, self.mcu_height)
        return None


def jpeg_header_info(data: bytes) -> JpegHeaderInfo | None:
    """Parse JPEG markers up to SOS (bounded by ``data``); None when not a JPEG header."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    restart = 0
    sof: tuple[int, int, int, int, int] | None = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > n:
            return None
        body = data[pos + 4 : pos + 2 + length]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3) and len(body) >= 6:
            _p, h, w, nc = struct.unpack_from(">BHHB", body, 0)
            hmax = vmax = 1
            for c in range(nc):
                if 6 + 3 * c + 2 <= len(body):
                    hv = body[6 + 3 * c + 1]
                    hmax, vmax = max(hmax, hv >> 4), max(vmax, hv & 0x0F)
            sof = (w, h, nc, 8 * hmax, 8 * vmax)
        elif marker == 0xDD and len(body) >= 2:
            (restart,) = struct.unpack_from(">H", body, 0)
        elif marker == 0xDA:
            break
        pos += 2 + length
    if sof is None:
        return None
    return JpegHeaderInfo(sof[0], sof[1], sof[2], sof[3], sof[4], restart)


# --- DICOM -------------------------------------------------------------------------------
def _inspect_dicom(path: Path, limits: SlideLimits) -> SlideInfo:
    try:
        parsed = read_dicom_header(path)
    except DicomStructureError as exc:
        reason = TRUNCATED_FILE if exc.reason == "TRUNCATED" else MALFORMED_FILE
        raise InvalidSlide(reason, f"DICOM structure: {exc.reason}") from exc
    ds = parsed.dataset
    ts = parsed.transfer_syntax
    if ts not in DICOM_TRANSFER_SYNTAXES:
        raise InvalidSlide(UNSUPPORTED_COMPRESSION, "DICOM transfer syntax is not supported")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    flavor = image_type[2] if len(image_type) > 2 else ""
    if flavor in ("LABEL", "OVERVIEW"):
        raise InvalidSlide(
            ASSOCIATED_IMAGE_ONLY, f"the instance is a {flavor} image, not a pyramid level"
        )
    if flavor not in ("VOLUME", "THUMBNAIL"):
        raise InvalidSlide(NO_PYRAMID_LEVEL, "ImageType (0008,0008) does not mark a pyramid level")
    w = _dicom_int(ds, "TotalPixelMatrixColumns") or _dicom_int(ds, "Columns")
    h = _dicom_int(ds, "TotalPixelMatrixRows") or _dicom_int(ds, "Rows")
    tw, th = _dicom_int(ds, "Columns"), _dicom_int(ds, "Rows")
    frames = _dicom_int(ds, "NumberOfFrames") or 1
    if not (w and h and tw and th):
        raise InvalidSlide(MALFORMED_FILE, "image geometry attributes are missing")
    _check_dims(w, h, limits, "total pixel matrix")
    if not (0 < tw <= limits.max_tile_side and 0 < th <= limits.max_tile_side):
        raise InvalidSlide(ABSURD_DIMENSIONS, "tile (Rows/Columns) size out of range")
    if w * h > limits.max_total_pixels:
        raise InvalidSlide(ABSURD_DIMENSIONS, f"level exceeds {limits.max_total_pixels} px")
    if frames > (-(-w // tw)) * (-(-h // th)) * 4096:
        raise InvalidSlide(ABSURD_DIMENSIONS, "NumberOfFrames out of range")
    if parsed.pixel is None:
        raise InvalidSlide(NO_PYRAMID_LEVEL, "the instance holds no Pixel Data")
    if parsed.pixel.encapsulated:
        if len(parsed.pixel.fragments) < frames:
            raise InvalidSlide(TRUNCATED_FILE, "fewer pixel data fragments than frames")
    else:
        spp = _dicom_int(ds, "SamplesPerPixel") or 1
        bits = _dicom_int(ds, "BitsAllocated") or 8
        need = tw * th * spp * max(1, bits // 8) * frames
        if parsed.pixel.length < need:
            raise InvalidSlide(TRUNCATED_FILE, "native Pixel Data is shorter than the frames")
    mpp_x, mpp_y = dicom_pixel_spacing_um(ds)
    power = dicom_objective_power(ds)
    level = LevelInfo(w, h, tw, th)
    return SlideInfo(
        SlideFormat.DICOM_WSI,
        w,
        h,
        (level,),
        tw,
        th,
        DICOM_TRANSFER_SYNTAXES[ts],
        mpp_x,
        mpp_y,
        power,
        parsed.file_size,
    )


def _dicom_decode_errors() -> tuple[type[Exception], ...]:
    """What pydicom raises when an element's bytes cannot be decoded as its VR says."""
    from pydicom.errors import BytesLengthException

    return (
        BytesLengthException,  # a value length that is not a multiple of the VR's size
        NotImplementedError,  # an unknown VR
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OverflowError,
        struct.error,
    )


def _dicom_int(ds: Any, keyword: str) -> int | None:
    try:
        v = ds.get(keyword)
        return int(v) if v is not None and v != "" else None
    except (TypeError, ValueError):
        return None


def dicom_pixel_spacing_um(ds: Any) -> tuple[float | None, float | None]:
    """(mpp_x, mpp_y) from the shared functional groups' PixelSpacing (mm: row, column)."""
    try:
        sfg = ds.get("SharedFunctionalGroupsSequence")
        spacing = None
        if sfg:
            pms = sfg[0].get("PixelMeasuresSequence")
            if pms:
                spacing = pms[0].get("PixelSpacing")
        if spacing is None:
            spacing = ds.get("PixelSpacing")
        if spacing is None or len(spacing) != 2:
            return None, None
        return round(float(spacing[1]) * 1000.0, 9), round(float(spacing[0]) * 1000.0, 9)
    except (TypeError, ValueError, AttributeError, IndexError):
        return None, None


def dicom_objective_power(ds: Any) -> float | None:
    try:
        for item in ds.get("OpticalPathSequence") or []:
            v = item.get("ObjectiveLensPower")
            if v is not None and v != "":
                return float(v)
    except (TypeError, ValueError, AttributeError):
        return None
    return None


class DicomStructureError(Exception):
    """Malformed DICOM structure; ``reason`` is a stable code, never a value."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class PixelDataInfo:
    """Location of the (7FE0,0010) Pixel Data element in a DICOM file."""

    element_offset: int  # first byte of the element (its tag)
    header: bytes  # raw element header (tag, VR, length) as stored
    value_offset: int
    length: int  # bytes from value_offset to the end of the element (incl. delimiter)
    encapsulated: bool
    basic_offset_table: tuple[int, ...]
    fragments: tuple[tuple[int, int], ...]  # (offset, length) of each fragment's payload

    @property
    def end(self) -> int:
        return self.value_offset + self.length


@dataclass
class DicomHeader:
    dataset: Any  # pydicom Dataset read with stop_before_pixels
    transfer_syntax: str
    pixel: PixelDataInfo | None
    file_size: int

    @property
    def trailing_bytes(self) -> int:
        return self.file_size - (self.pixel.end if self.pixel else self.file_size)


_IMPLICIT_LE = "1.2.840.10008.1.2"
_MAX_FRAGMENTS = 1 << 24
_ITEM, _SEQ_DELIM = 0xE000, 0xE0DD


def read_dicom_header(
    path: str | os.PathLike[str], max_fragments: int = _MAX_FRAGMENTS
) -> DicomHeader:
    """Read everything before Pixel Data with pydicom and locate the pixel data fragments
    without reading them. Only little-endian transfer syntaxes are accepted."""
    import pydicom
    from pydicom import filereader

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                filereader.read_preamble(fh, False)
                meta = filereader._read_file_meta_info(fh)
        except Exception as exc:
            raise DicomStructureError("BAD_FILE_META") from exc
        ts = str(meta.get("TransferSyntaxUID", ""))
        if ts not in DICOM_TRANSFER_SYNTAXES:
            raise DicomStructureError("UNSUPPORTED_TRANSFER_SYNTAX")
        fh.seek(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
        except Exception as exc:
            raise DicomStructureError("BAD_DATASET") from exc
        pos = fh.tell()
        if pos >= size:
            return DicomHeader(ds, ts, None, size)
        pixel = _locate_pixel_data(fh, pos, size, ts == _IMPLICIT_LE, max_fragments)
    return DicomHeader(ds, ts, pixel, size)


def _locate_pixel_data(
    fh: BinaryIO, pos: int, size: int, implicit: bool, max_fragments: int
) -> PixelDataInfo:
    def read(at: int, n: int) -> bytes:
        if at + n > size:
            raise DicomStructureError("TRUNCATED", "pixel data runs past the end of the file")
        fh.seek(at)
        data = fh.read(n)
        if len(data) != n:
            raise DicomStructureError("TRUNCATED")
        return data

    head = read(pos, 8 if implicit else 12)
    group, elem = struct.unpack_from("<HH", head, 0)
    if (group, elem) != (0x7FE0, 0x0010):
        raise DicomStructureError("UNSUPPORTED_PIXEL_DATA", "no (7FE0,0010) Pixel Data element")
    if implicit:
        (length,) = struct.unpack_from("<I", head, 4)
    else:
        vr = head[4:6]
        if vr not in (b"OB", b"OW"):
            raise DicomStructureError("BAD_PIXEL_DATA", "Pixel Data has an unexpected VR")
        (length,) = struct.unpack_from("<I", head, 8)
    value_at = pos + len(head)
    if length != 0xFFFFFFFF:
        if value_at + length > size:
            raise DicomStructureError("TRUNCATED", "native pixel data runs past the end")
        return PixelDataInfo(pos, head, value_at, length, False, (), ())
    at = value_at
    bot: tuple[int, ...] = ()
    fragments: list[tuple[int, int]] = []
    first = True
    while True:
        item = read(at, 8)
        g, e, ln = struct.unpack("<HHI", item)
        at += 8
        if g != 0xFFFE:
            raise DicomStructureError("BAD_PIXEL_DATA", "malformed encapsulated pixel data")
        if e == _SEQ_DELIM:
            break
        if e != _ITEM or ln == 0xFFFFFFFF or at + ln > size:
            raise DicomStructureError(
                "TRUNCATED" if at + ln > size else "BAD_PIXEL_DATA",
                "malformed encapsulated pixel data item",
            )
        if first:
            if ln % 4:
                raise DicomStructureError("BAD_PIXEL_DATA", "basic offset table length")
            bot = struct.unpack(f"<{ln // 4}I", read(at, ln)) if ln else ()
            first = False
        else:
            fragments.append((at, ln))
            if len(fragments) > max_fragments:
                raise DicomStructureError("TOO_MANY_FRAGMENTS")
        at += ln
    return PixelDataInfo(pos, head, value_at, at - value_at, True, tuple(bot), tuple(fragments))
