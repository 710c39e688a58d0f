"""After-the-fact verification of a de-identified slide.

The output is re-read independently of the code that wrote it:

* TIFF formats: our own parser (structure, every tag against the format's output allow-list,
  vendor text re-validated, no label/macro, every byte of the file accounted for - no hidden
  gaps or trailing data), tifffile (same IFDs and tags; sample tiles of every IFD decoded),
  OpenSlide (same vendor, no label/macro associated image, a level-0 region decodes), and a
  scan of every JPEG / JPEG 2000 tile for COM/APPn text segments (headers parsed; the rest of
  each JPEG tile searched for such markers); generic TIFF: only a consistent pyramid remains.
* DICOM: pydicom (every element of every nested sequence against the keep-list, no private
  attributes, de-identification marks present, no data after Pixel Data), our own fragment
  walker, and sample frames decoded with imagecodecs.
* Both: the whole output byte stream is searched for every identifying value seen in the
  input (UTF-8, Latin-1, UTF-16 LE/BE; numbers/dates only when not part of a longer number).
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from services.deid.engine import (
    aperio,
    generic_tiff,
    hamamatsu,
    macro,
    ome_tiff,
    philips,
    qptiff,
    streams,
    ventana,
)
from services.deid.engine.dicom_deid import check_instance
from services.deid.engine.dicom_rules import (
    CONTENT_ITEM_TEXT,
    DATE_VRS,
    DUMMY_BY_VR,
    FREE_TEXT_VRS,
    OUTPUT_ALLOWED,
    RULES,
    SPECIMEN_ID_CONCEPTS,
    Act,
    canonical_code_meaning,
    value_allowed,
)
from services.deid.engine.model import (
    CORRUPT_IMAGE_DATA,
    UNSUPPORTED_FORMAT,
    VERIFICATION_FAILED,
    DeidPolicy,
    DeidRejected,
)
from services.deid.engine.tiff_common import check_icc_profile, check_jpeg_tables
from services.shared.wsi import bundle, codestream, tiff
from services.shared.wsi.sniff import (
    DicomHeader,
    DicomStructureError,
    SlideFormat,
    classify_tiff,
    generic_pyramid,
    read_dicom_header,
)
from services.shared.wsi.tiff import TiffError, TiffIfd, TiffStructure

# zero padding: word alignment of tag values, and the writer's alignment of large image runs
_MAX_GAP = tiff.RUN_ALIGN
_PSEUDONYM = re.compile(r"^[A-Za-z0-9_.\-]+-[a-z]{3}-[a-z2-7]{24}$")
_SAMPLES_PER_LEVEL = 3
_STREAM_MIN_PATTERN = 6
_SCAN_THREADS = min(2, os.cpu_count() or 1)  # the output is searched in this many parts
_OPENSLIDE_VENDOR = {
    SlideFormat.APERIO_SVS: "aperio",
    SlideFormat.HAMAMATSU_NDPI: "hamamatsu",
    SlideFormat.GENERIC_TIFF: "generic-tiff",
    SlideFormat.PHILIPS_TIFF: "philips",
}
# TIFF formats verified without OpenSlide: it does not read OME-TIFF/QPTIFF, and for BIF it
# needs region metadata we could not check against a real file (see ventana.py)
_TIFF_ONLY = frozenset({SlideFormat.OME_TIFF, SlideFormat.QPTIFF, SlideFormat.VENTANA_BIF})
_META_TAGS = frozenset(
    {0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013}
)


def _fail(detail: str) -> DeidRejected:
    return DeidRejected(VERIFICATION_FAILED, detail)


def verify(
    path: Path, fmt: SlideFormat, forbidden: Sequence[bytes], policy: DeidPolicy | None = None
) -> None:
    """Raise :class:`DeidRejected` unless ``path`` is a clean, readable de-identified slide."""
    policy = policy or DeidPolicy()
    path = Path(path)
    if fmt is SlideFormat.MIRAX or bundle.is_zip(path):
        _verify_bundle(path, fmt, forbidden, policy)
        return
    entropy: _Entropy | None = None
    if fmt is not SlideFormat.DICOM_WSI and fmt not in _OPENSLIDE_VENDOR and fmt not in _TIFF_ONLY:
        raise DeidRejected(UNSUPPORTED_FORMAT, f"cannot verify format {fmt.value}")
    search = _EarlySearch(path, forbidden, policy, markers=fmt is not SlideFormat.DICOM_WSI)
    try:
        if fmt is SlideFormat.DICOM_WSI:
            regions = _verify_dicom(path, policy)
        else:
            regions, entropy = _verify_tiff(path, fmt, policy)
        search.finish(regions, entropy)
    finally:
        search.join()  # a failed check leaves no search running on the file


# --- forbidden values and text markers: one pass over the output ----------------------------
_TEXT_MARKERS = tuple(bytes([0xFF, m]) for m in (*range(0xE0, 0xF0), 0xFE))  # APPn, COM
_MARKER_GAP = 1 << 20  # entropy ranges closer than this are searched as one range


@dataclass(frozen=True)
class _Entropy:
    """Entropy-coded data of every JPEG tile (after its header), sorted by start: in it a
    0xFF byte is only ever followed by 0x00 or a restart marker, so any APPn/COM marker
    there is a hidden segment."""

    starts: np.ndarray
    ends: np.ndarray
    ifds: np.ndarray
    tiles: np.ndarray
    reach: np.ndarray  # running maximum of ``ends``

    @classmethod
    def of(
        cls, starts: np.ndarray, ends: np.ndarray, ifds: np.ndarray, tiles: np.ndarray
    ) -> _Entropy:
        order = np.argsort(starts, kind="stable")
        ends = ends[order]
        reach = np.maximum.accumulate(ends) if len(ends) else ends
        return cls(starts[order], ends, ifds[order], tiles[order], reach)

    def holding(self, pos: int) -> int | None:
        """Index of a range holding both bytes of a marker at ``pos``, else None."""
        i = int(np.searchsorted(self.starts, pos, "right")) - 1
        if i < 0 or int(self.reach[i]) < pos + 2:
            return None
        if pos + 2 <= int(self.ends[i]):
            return i
        earlier = np.flatnonzero(self.ends[:i] >= pos + 2)  # overlapping tiles only
        return int(earlier[0]) if len(earlier) else None

    def ranges(self) -> list[tuple[int, int]]:
        if not len(self.starts):
            return []
        reach = self.reach
        cut = np.flatnonzero(self.starts[1:] > reach[:-1] + _MARKER_GAP) + 1
        first = np.concatenate(([0], cut))
        last = np.concatenate((cut - 1, [len(self.starts) - 1]))
        return list(zip(self.starts[first].tolist(), reach[last].tolist(), strict=True))


def search_forbidden(
    path: Path, forbidden: Iterable[bytes], metadata: Sequence[tuple[int, int]], policy: DeidPolicy
) -> None:
    """Fail if an identifying value occurs in the metadata regions (every pattern) or
    anywhere in the file (patterns of at least _STREAM_MIN_PATTERN bytes)."""
    _scan_output(path, forbidden, metadata, policy, None)


def _patterns(forbidden: Iterable[bytes], policy: DeidPolicy) -> tuple[list[bytes], list[bytes]]:
    """(every pattern, for the metadata regions; the longer ones, for the whole byte stream)."""
    values = [v for v in forbidden if len(v) >= policy.min_forbidden_length]
    variants = [p for v in values for p in streams.pattern_variants(v)]
    meta_patterns = streams.minimal_patterns(variants)
    stream_patterns = streams.minimal_patterns(p for p in variants if len(p) >= _STREAM_MIN_PATTERN)
    return meta_patterns, stream_patterns


def _scan_metadata(
    fh: BinaryIO, meta_patterns: list[bytes], metadata: Sequence[tuple[int, int]]
) -> None:
    if not meta_patterns:
        return
    meta_set = streams.PatternSet(meta_patterns)
    for start, end in _merge(metadata):
        fh.seek(start)
        data = fh.read(end - start)

        def meta_hit(index: int, at: int, data: bytes = data) -> bool:
            p = meta_patterns[index]
            return not streams.is_numeric_pattern(p) or streams.numeric_boundary_ok(
                lambda i: data[i] if i < len(data) else None, at, p
            )

        if meta_set.scan(data, meta_hit):
            raise _fail("an identifying value from the input is present in the output metadata")


def _value_hit(fd: int, p: bytes, at: int) -> bool:
    """A stream hit counts unless it is a number/date touched by another digit."""

    def byte_at(i: int) -> int | None:
        b = os.pread(fd, 1, i)
        return b[0] if b else None

    return not streams.is_numeric_pattern(p) or streams.numeric_boundary_ok(byte_at, at, p)


_VALUE_IN_BYTES = "an identifying value from the input is present in the output bytes"


def _marker_failure(entropy: _Entropy, at: int) -> str | None:
    k = entropy.holding(at)
    if k is None:
        return None  # in a header (judged by the header scan), metadata or between tiles
    return (
        f"IFD {int(entropy.ifds[k])}: tile {int(entropy.tiles[k])} carries a "
        "comment/APPn segment after its header"
    )


def _scan_output(
    path: Path,
    forbidden: Iterable[bytes],
    metadata: Sequence[tuple[int, int]],
    policy: DeidPolicy,
    entropy: _Entropy | None,
) -> None:
    """The whole output is read once (mapped windows, one multi-pattern pass): identifying
    values everywhere, and - where ``entropy`` is given - APPn/COM markers in the
    entropy-coded data of JPEG tiles. Numbers/dates only count when no digit touches them.
    (:class:`_EarlySearch` runs the same search while the structure is being checked; this
    is its sequential form.)"""
    meta_patterns, stream_patterns = _patterns(forbidden, policy)
    if not meta_patterns and entropy is None:
        return
    with open(path, "rb") as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        _scan_metadata(fh, meta_patterns, metadata)
        values_only = streams.PatternSet(stream_patterns)
        plan: list[tuple[int, int, streams.PatternSet]] = []
        if entropy is not None:
            with_markers = streams.PatternSet([*stream_patterns, *_TEXT_MARKERS])
            pos = 0
            for start, end in entropy.ranges():
                if start > pos:
                    plan.append((pos, start, values_only))
                plan.append((start, end, with_markers))
                pos = end
            if pos < size:
                plan.append((pos, size, values_only))
        else:
            plan.append((0, size, values_only))
        found: list[str] = []

        def hit(_ps: streams.PatternSet, index: int, at: int) -> bool:
            if index >= len(stream_patterns):  # a text marker: inside entropy-coded data?
                assert entropy is not None
                problem = _marker_failure(entropy, at)
                if problem is None:
                    return False
                found.append(problem)
                return True
            if not _value_hit(fd, stream_patterns[index], at):
                return False
            found.append(_VALUE_IN_BYTES)
            return True

        streams.scan_file(fd, plan, hit, window=policy.buffer_size, threads=_SCAN_THREADS)
    if found:
        raise _fail(found[0])


_EARLY_MARKER_HITS = 1 << 16  # more text markers than this: the sequential search decides


class _EarlySearch:
    """The whole-output search of :func:`_scan_output`, started in a background thread before
    the structure checks so that both run at once (the search is a Hyperscan pass over the
    whole file, which releases the GIL; the checks are mostly Python). It cannot know yet
    where the entropy-coded data lies, so it searches every byte for the text markers too
    and only records where they are; :meth:`finish` judges them once the header scan has
    found the entropy-coded ranges. In a clean file markers only occur in metadata and tile
    headers, a few per file; if more than _EARLY_MARKER_HITS turn up, the search stops and
    :meth:`finish` runs the sequential one instead (bounded memory either way)."""

    def __init__(
        self, path: Path, forbidden: Sequence[bytes], policy: DeidPolicy, *, markers: bool
    ) -> None:
        self._path, self._forbidden, self._policy = path, forbidden, policy
        self._meta_patterns, self._stream_patterns = _patterns(forbidden, policy)
        self._markers = markers
        self._value_found = False
        self._marker_hits: list[int] = []
        self._overflow = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self._stream_patterns or markers:
            self._thread = threading.Thread(target=self._run, name="verify-search", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        patterns = [*self._stream_patterns, *(_TEXT_MARKERS if self._markers else ())]
        n = len(self._stream_patterns)
        lock = threading.Lock()
        try:
            with open(self._path, "rb") as fh:
                fd = fh.fileno()
                size = os.fstat(fd).st_size

                def hit(_ps: streams.PatternSet, index: int, at: int) -> bool:
                    if index >= n:
                        with lock:
                            if len(self._marker_hits) >= _EARLY_MARKER_HITS:
                                self._overflow = True
                                return True
                            self._marker_hits.append(at)
                        return False
                    if not _value_hit(fd, self._stream_patterns[index], at):
                        return False
                    self._value_found = True
                    return True

                streams.scan_file(
                    fd,
                    [(0, size, streams.PatternSet(patterns))],
                    hit,
                    window=self._policy.buffer_size,
                    threads=_SCAN_THREADS,
                )
        except Exception as exc:  # noqa: BLE001 - finish() falls back to the sequential search
            self._error = exc

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def finish(self, metadata: Sequence[tuple[int, int]], entropy: _Entropy | None) -> None:
        """Raise like :func:`_scan_output` would for the same output."""
        self.join()
        if self._error is not None or self._overflow:
            _scan_output(self._path, self._forbidden, metadata, self._policy, entropy)
            return
        with open(self._path, "rb") as fh:
            _scan_metadata(fh, self._meta_patterns, metadata)
        if self._value_found:
            raise _fail(_VALUE_IN_BYTES)
        if entropy is not None:
            for at in sorted(self._marker_hits):
                problem = _marker_failure(entropy, at)
                if problem is not None:
                    raise _fail(problem)


# --- TIFF ------------------------------------------------------------------------------------
def _allowed_tags(fmt: SlideFormat) -> frozenset[int]:
    if fmt is SlideFormat.APERIO_SVS:
        return aperio.RULES.allowed_output_tags()
    if fmt is SlideFormat.HAMAMATSU_NDPI:
        return hamamatsu.output_tags()
    if fmt is SlideFormat.QPTIFF:
        return qptiff.output_tags()
    if fmt is SlideFormat.PHILIPS_TIFF:
        return philips.output_tags()
    if fmt is SlideFormat.VENTANA_BIF:
        return ventana.output_tags()
    if fmt is SlideFormat.OME_TIFF:
        return generic_tiff.RULES.allowed_output_tags() | {tiff.SUB_IFDS}
    return generic_tiff.RULES.allowed_output_tags() - {tiff.IMAGE_DESCRIPTION}


_YEAR_DATETIME = re.compile(r"^\d{4}:01:01 00:00:00$")


def _verify_tiff(
    path: Path, fmt: SlideFormat, policy: DeidPolicy
) -> tuple[list[tuple[int, int]], _Entropy]:
    try:
        st = tiff.read_tiff(path)
    except TiffError as exc:
        raise _fail(f"output TIFF structure: {exc.reason}") from exc
    if classify_tiff(st) is not fmt:
        raise _fail("output is no longer recognised as the input format")
    # tags a data steward's rule keeps (DeidPolicy.approved_rules) are allowed too
    allowed = _allowed_tags(fmt) | {int(c) for c in policy.kept("tiff")}
    if policy.date_policy == "year":
        allowed |= {306}
        for ifd in st.all_ifds():
            dt = ifd.get(306)
            if dt is not None and not _YEAR_DATETIME.match(dt.text()):
                raise _fail(f"IFD {ifd.index}: DateTime holds more than a year")
    keep_macro = policy.macro_policy == "blank_label"
    macros = {i.offset for i in macro.macro_ifds(st, fmt)} if keep_macro else set()
    for ifd in st.ifds:
        if ifd.offset in macros:
            problem = macro.check_blanked(path, ifd, st.is_ndpi, policy)
            if problem:
                raise _fail(problem)
        _check_ifd(ifd, fmt, allowed, macro_ok=ifd.offset in macros, policy=policy)
        for n, kid in enumerate(ifd.children.get(tiff.SUB_IFDS, [])):
            if kid.children or tiff.IMAGE_DESCRIPTION in kid.tags:
                raise _fail(f"IFD {ifd.index} SubIFD {n} carries metadata or children")
            _check_ifd(kid, fmt, allowed - {tiff.SUB_IFDS}, f" SubIFD {n}", policy=policy)
    if fmt is SlideFormat.GENERIC_TIFF:
        pyr = generic_pyramid(st)
        if pyr.others:
            raise _fail(f"IFD {pyr.others[0].index} is a tiled image outside the pyramid")
    if fmt is SlideFormat.APERIO_SVS:
        problem = aperio.thumbnail_ok([i for i in st.ifds if i.offset not in macros])
        if problem:
            raise _fail(problem)
    meta = _check_coverage(path, st)
    _check_with_tifffile(path, st, fmt)
    if fmt in _OPENSLIDE_VENDOR:
        _check_with_openslide(path, fmt, policy)
    return meta, _check_codestream_heads(path, st)


def _check_ifd(
    ifd: TiffIfd,
    fmt: SlideFormat,
    allowed: frozenset[int],
    sub: str = "",
    macro_ok: bool = False,
    policy: DeidPolicy | None = None,
) -> None:
    policy = policy or DeidPolicy()
    where = f"IFD {ifd.index}{sub}"
    if ifd.children and (fmt is not SlideFormat.OME_TIFF or set(ifd.children) != {tiff.SUB_IFDS}):
        raise _fail(f"{where} has child IFDs")
    for code, tag in ifd.tags.items():
        if code not in allowed:
            raise _fail(f"{where} carries {tiff.tag_name(code)} (tag {code})")
        if code == 347 and not check_jpeg_tables(tag.data):
            raise _fail(f"{where}: JPEGTables holds more than tables")
        if code == 34675 and not check_icc_profile(tag.data):
            raise _fail(f"{where}: InterColorProfile is not an ICC profile")
        if code == 34675 and not codestream.icc_profile_texts(tag.data)[0]:
            raise _fail(f"{where}: InterColorProfile holds text outside the known profiles")
    if fmt is SlideFormat.APERIO_SVS and macro_ok:
        desc = ifd.get(tiff.IMAGE_DESCRIPTION)
        if desc is None or not macro.SVS_MACRO_DESCRIPTION.match(desc.text()):
            raise _fail(f"{where}: macro description")
    elif fmt is SlideFormat.APERIO_SVS:
        desc = ifd.get(tiff.IMAGE_DESCRIPTION)
        if desc is not None:
            problem = aperio.verify_description(desc.text(), policy.kept("svs"))
            if problem:
                raise _fail(f"{where}: {problem}")
    elif fmt is SlideFormat.HAMAMATSU_NDPI:
        lens = hamamatsu.source_lens(ifd)
        if (lens is None or lens <= 0) and not (macro_ok and lens == -1):
            raise _fail(f"{where} is not a pyramid level (macro or map)")
        props = ifd.get(hamamatsu.PROPERTY_MAP)
        if props is not None:
            for line in props.text().splitlines():
                key = line.split("=", 1)[0].strip()
                known = key in hamamatsu.PROPERTY_KEEP or key in policy.kept("ndpi")
                if line.strip() and not known:
                    raise _fail(f"{where}: NDPI property map holds a key outside the keep-list")
    elif fmt is SlideFormat.OME_TIFF:
        desc = ifd.get(tiff.IMAGE_DESCRIPTION)
        if ifd.index == 0 and not sub:
            problem = ome_tiff.verify_ome_xml(desc.text()) if desc else "no OME-XML"
            if problem:
                raise _fail(f"{where}: {problem}")
        elif desc is not None:
            raise _fail(f"{where}: ImageDescription outside the first IFD")
    elif fmt is SlideFormat.PHILIPS_TIFF and macro_ok:
        desc = ifd.get(tiff.IMAGE_DESCRIPTION)
        if desc is None or desc.text() != "Macro":
            raise _fail(f"{where}: macro description")
    elif fmt is SlideFormat.PHILIPS_TIFF:
        desc = ifd.get(tiff.IMAGE_DESCRIPTION)
        if not ifd.is_tiled:
            raise _fail(f"{where} is a stripped (non-pyramid) image")
        if ifd.index == 0:
            problem = (
                philips.verify_description(desc.text(), policy.kept("philips"))
                if desc
                else "no Philips XML"
            )
            if problem:
                raise _fail(f"{where}: {problem}")
        elif desc is not None:
            raise _fail(f"{where}: ImageDescription outside the first IFD")
    elif fmt is SlideFormat.VENTANA_BIF:
        desc = ifd.get(tiff.IMAGE_DESCRIPTION)
        if not ifd.is_tiled or desc is None or not ventana.LEVEL.match(desc.text()):
            raise _fail(f"{where} is not a BIF pyramid level")
        xmp = ifd.get(ventana.XMP)
        problem = ventana.verify_xmp(xmp.text(), policy.kept("bif")) if xmp is not None else None
        if problem:
            raise _fail(f"{where}: {problem}")
    elif fmt is SlideFormat.QPTIFF:
        desc = ifd.get(tiff.IMAGE_DESCRIPTION)
        problem = (
            qptiff.verify_page_xml(desc.text(), policy.kept("qptiff"))
            if desc
            else "no QPTIFF description"
        )
        if problem:
            raise _fail(f"{where}: {problem}")
        sw = ifd.get(305)
        if sw is not None and sw.text() != qptiff.SOFTWARE:
            raise _fail(f"{where}: Software is not the QPTIFF marker")
    elif not ifd.is_tiled:
        raise _fail(f"{where} is a stripped (non-pyramid) image")


def _check_coverage(path: Path, st: TiffStructure) -> list[tuple[int, int]]:
    """Every byte must belong to the header, an IFD, a tag value or image data, except zero
    bytes of alignment padding (each gap read and checked, each under _MAX_GAP); nothing may
    follow the last referenced byte."""
    meta = _merge(st.metadata_regions())
    starts = [np.array([s for s, _e in meta], dtype=np.int64)]
    ends = [np.array([e for _s, e in meta], dtype=np.int64)]
    for ifd in st.all_ifds():
        offs, cnts = ifd.segment_arrays()
        used = cnts > 0
        if (cnts < 0).any() or (used & ((offs <= 0) | (offs + cnts > st.file_size))).any():
            raise _fail(f"IFD {ifd.index}: TRUNCATED")
        starts.append(offs[used])
        ends.append(offs[used] + cnts[used])
    s_all = np.concatenate(starts)
    order = np.argsort(s_all, kind="stable")
    s_all = s_all[order]
    reach = np.maximum.accumulate(np.concatenate(ends)[order]) if len(s_all) else s_all
    # gaps: before the first span, and wherever a span starts beyond all earlier ones
    gap_s = np.concatenate(([0], reach[:-1]))
    gap = np.flatnonzero(s_all > gap_s)
    if len(gap) and int((s_all[gap] - gap_s[gap]).max()) >= _MAX_GAP:
        raise _fail("the output holds unreferenced bytes")
    with open(path, "rb") as fh:
        for k in gap.tolist():
            a, b = int(gap_s[k]), int(s_all[k])
            if os.pread(fh.fileno(), b - a, a).strip(b"\x00"):
                raise _fail("the output holds non-zero padding")
    if (int(reach[-1]) if len(reach) else 0) != st.file_size:
        raise _fail("the output has trailing bytes after the last referenced region")
    return meta


_MARKERS = {
    7: (b"\xff\xd8", b"\xff\xd9"),
    33003: (b"\xff\x4f", b"\xff\xd9"),
    33005: (b"\xff\x4f", b"\xff\xd9"),
    34712: (b"\xff\x4f", b"\xff\xd9"),
}


def _incomplete_stream(index: int, k: int) -> DeidRejected:
    return DeidRejected(
        CORRUPT_IMAGE_DATA, f"IFD {index}: tile {k} is not a complete compressed stream"
    )


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _sample_indices(counts: Sequence[int]) -> list[int]:
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return []
    picks = {nonzero[0], nonzero[len(nonzero) // 2], nonzero[-1]}
    return sorted(picks)[:_SAMPLES_PER_LEVEL]


def _check_with_tifffile(path: Path, st: TiffStructure, fmt: SlideFormat) -> None:
    import tifffile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tf = tifffile.TiffFile(path, is_ndpi=fmt is SlideFormat.HAMAMATSU_NDPI)
    except Exception as exc:
        raise _fail(f"tifffile cannot open the output ({type(exc).__name__})") from exc
    with tf:
        try:
            pages = list(tf.pages)  # pages are parsed while iterating
        except Exception as exc:
            # e.g. TypeError from a malformed NDPI page (found by tests/fuzz): was retried
            raise _fail(f"tifffile cannot read the output's pages ({type(exc).__name__})") from exc
        if len(pages) != len(st.ifds):
            raise _fail("tifffile and the parser disagree on the number of IFDs")
        for page, ifd in zip(pages, st.ifds, strict=True):
            if not isinstance(page, tifffile.TiffPage):
                raise _fail(f"IFD {ifd.index}: tifffile returned a frame, not a page")
            _tifffile_page(tf, page, ifd, f"IFD {ifd.index}")
            kids = ifd.children.get(tiff.SUB_IFDS, [])
            if len(page.subifds or ()) != len(kids):
                raise _fail(f"IFD {ifd.index}: tifffile and the parser disagree on SubIFDs")
            for n, (off, kid) in enumerate(zip(page.subifds or (), kids, strict=True)):
                try:
                    tf.filehandle.seek(off)
                    sub = tifffile.TiffPage(tf, index=(page.index, n))
                except Exception as exc:
                    raise _fail(f"IFD {ifd.index}: tifffile cannot read SubIFD {n}") from exc
                _tifffile_page(tf, sub, kid, f"IFD {ifd.index} SubIFD {n}")


def _tifffile_page(tf: Any, page: Any, ifd: TiffIfd, where: str) -> None:
    codes = {t.code for t in page.tags}
    if codes != set(ifd.tags):
        raise _fail(f"{where}: tifffile and the parser disagree on the tags")
    fh = tf.filehandle
    for i in _sample_indices(page.databytecounts):
        offset, count = int(page.dataoffsets[i]), int(page.databytecounts[i])
        if offset < 0 or count < 0 or offset + count > fh.size:
            # e.g. a negative length tifffile derived from a mutated NDPI (found by tests/fuzz)
            raise _fail(f"{where}: tifffile reads tile {i} outside the file")
        fh.seek(offset)
        data = fh.read(count)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                segment, _idx, _shape = page.decode(
                    data, i, jpegtables=page.jpegtables, jpegheader=page.jpegheader
                )
        except Exception as exc:
            raise DeidRejected(CORRUPT_IMAGE_DATA, f"{where}: tile {i} does not decode") from exc
        if segment is None or not np.asarray(segment).size:
            raise DeidRejected(CORRUPT_IMAGE_DATA, f"{where}: tile {i} is empty")


def _check_with_openslide(path: Path, fmt: SlideFormat, policy: DeidPolicy) -> None:
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:
        raise DeidRejected(CORRUPT_IMAGE_DATA, "OpenSlide cannot open the output") from exc
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise _fail("OpenSlide does not recognise the output") from exc
    try:
        vendor = slide.properties.get("openslide.vendor")
        if vendor != _OPENSLIDE_VENDOR[fmt]:
            raise _fail("OpenSlide sees a different vendor format")
        assoc = set(slide.associated_images.keys())
        allowed = {"thumbnail", "macro"} if policy.macro_policy == "blank_label" else {"thumbnail"}
        if assoc - allowed:
            raise _fail("OpenSlide lists a label/macro associated image")
        if "macro" in assoc:
            img = np.asarray(slide.associated_images["macro"].convert("RGB"))
            band = img[:, : macro.band_width(img.shape[1], policy)]
            if int(band.max()) > 2:
                raise _fail("OpenSlide shows a macro whose label band is not blank")
        w, h = slide.level_dimensions[0]
        try:
            slide.read_region((0, 0), 0, (min(w, 512), min(h, 512)))
        except openslide.OpenSlideError as exc:
            raise DeidRejected(CORRUPT_IMAGE_DATA, "OpenSlide cannot decode level 0") from exc
    finally:
        slide.close()


# --- DICOM -----------------------------------------------------------------------------------
def _verify_dicom(path: Path, policy: DeidPolicy) -> list[tuple[int, int]]:
    try:
        hdr = read_dicom_header(path)
    except DicomStructureError as exc:
        raise _fail(f"output DICOM structure: {exc.reason}") from exc
    with open(path, "rb") as fh:
        if fh.read(128).strip(b"\x00"):
            raise _fail("the DICOM preamble is not empty")
    ds = hdr.dataset
    for elem in ds.file_meta:
        if int(elem.tag) not in _META_TAGS:
            raise _fail(f"File Meta element ({elem.tag.group:04X},{elem.tag.element:04X})")
    check_instance(ds)
    if str(ds.get("PatientIdentityRemoved", "")) != "YES":
        raise _fail("Patient Identity Removed (0012,0062) is not YES")
    _walk_dataset(ds, policy, "")
    if hdr.pixel is None:
        raise _fail("no Pixel Data")
    if hdr.trailing_bytes:
        raise _fail("the output has bytes after Pixel Data")
    _independent_dicom_parse(path)
    _decode_frames(path, hdr)
    if hdr.pixel.encapsulated:
        with open(path, "rb") as fh:
            bad = codestream.frame_text_problem(fh, hdr.pixel.fragments)
        if bad is not None:
            raise _fail(f"Pixel Data fragment {bad} carries a comment/APPn segment")
    return [(0, hdr.pixel.value_offset)]


def _walk_dataset(ds: Any, policy: DeidPolicy, where: str, content_item: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        elements = list(ds)
    for elem in elements:
        tag = int(elem.tag)
        name = f"{where}({elem.tag.group:04X},{elem.tag.element:04X})"
        if elem.tag.is_private:
            raise _fail(f"private attribute {name}")
        act = RULES.get(tag)
        if content_item and tag == CONTENT_ITEM_TEXT:
            continue  # a pseudonymised specimen identifier, checked by _check_content_item
        if act is None or (tag not in OUTPUT_ALLOWED):
            raise _fail(f"attribute {name} is not on the keep-list")
        value = elem.value
        empty = value is None or value == "" or (isinstance(value, list) and not value)
        year_form = (
            policy.date_policy == "year"
            and elem.VR in ("DA", "DT")
            and bool(re.match(r"^\d{4}0101(?:000000)?$", str(value)))
            and len(str(value)) == (8 if elem.VR == "DA" else 14)
        )
        if act is Act.KEEP and elem.VR in FREE_TEXT_VRS:
            values = (
                [str(value or "")]
                if value is None or isinstance(value, str | bytes)
                else [str(v) for v in value]
            )
            if not value_allowed(elem.keyword, values):
                raise _fail(f"attribute {name} holds a value outside its vocabulary")
        if elem.keyword == "ICCProfile" and not (
            isinstance(value, bytes) and codestream.icc_profile_texts(value)[0]
        ):
            raise _fail(f"attribute {name} holds an ICC profile with free text")
        if act is Act.CODE_MEANING:
            code = str(
                ds.get("CodeValue") or ds.get("LongCodeValue") or ds.get("URNCodeValue") or ""
            )
            scheme = str(ds.get("CodingSchemeDesignator") or "")
            if str(value) != canonical_code_meaning(code, scheme, str(value))[:64]:
                raise _fail(f"attribute {name} is not the dictionary meaning of its code")
        if act is Act.EMPTY and not empty and not year_form:
            raise _fail(f"attribute {name} should be empty")
        if act is Act.SEQ_EMPTY and value:
            raise _fail(f"sequence {name} should be empty")
        if (
            act is Act.SPECIMEN_PREPARATION
            and value
            and policy.dicom_specimen_preparation == "empty"
        ):
            raise _fail(f"sequence {name} should be empty")
        if (
            elem.VR in DATE_VRS
            and not empty
            and str(value) != DUMMY_BY_VR.get(elem.VR)
            and not year_form
        ):
            raise _fail(f"date/time attribute {name} holds a value")
        if elem.VR == "SQ":
            for i, item in enumerate(value or []):
                if act is Act.CONTENT:
                    _check_content_item(item, f"{name}[{i}]")
                _walk_dataset(item, policy, f"{name}[{i}].", act is Act.CONTENT)


def _check_content_item(item: Any, where: str) -> None:
    vt = str(item.get("ValueType", "")).upper()
    if vt in ("CODE", "NUMERIC", "UIDREF"):
        if "TextValue" in item:
            raise _fail(f"content item {where} holds text")
        return
    seq = item.get("ConceptNameCodeSequence")
    concept = (
        (str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", "")))
        if seq
        else None
    )
    if vt != "TEXT" or concept not in SPECIMEN_ID_CONCEPTS:
        raise _fail(f"content item {where} is not allowed")
    if not _PSEUDONYM.match(str(item.get("TextValue", ""))):
        raise _fail(f"content item {where} holds a specimen identifier that is no pseudonym")


def _independent_dicom_parse(path: Path) -> None:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = pydicom.dcmread(path, defer_size=1024)
            private = any(elem.tag.is_private for elem in full.iterall())
    except Exception as exc:
        raise _fail(f"pydicom cannot parse the whole output ({type(exc).__name__})") from exc
    if private:
        raise _fail("private attribute found by the full parse")


def _decode_frames(path: Path, hdr: DicomHeader) -> None:
    import imagecodecs
    from pydicom import encaps

    ds = hdr.dataset
    pixel = hdr.pixel
    assert pixel is not None
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    if not pixel.encapsulated:
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 8)
        if pixel.length < rows * cols * spp * max(1, bits // 8) * frames:
            raise DeidRejected(CORRUPT_IMAGE_DATA, "native Pixel Data is too short")
        return
    ts = hdr.transfer_syntax
    decoder: Any
    if ts in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"):
        decoder = imagecodecs.jpeg8_decode
    elif ts in ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"):
        decoder = imagecodecs.ljpeg_decode
    elif ts in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
        decoder = imagecodecs.jpegls_decode
    else:
        decoder = imagecodecs.jpeg2k_decode
    with open(path, "rb") as fh:
        for index in sorted({0, frames // 2, frames - 1}):
            fh.seek(pixel.value_offset)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    frame = encaps.get_frame(fh, index, number_of_frames=frames)
                    arr = np.asarray(decoder(frame))
            except Exception as exc:
                raise DeidRejected(CORRUPT_IMAGE_DATA, f"frame {index} does not decode") from exc
            if arr.shape[:2] != (rows, cols):
                raise DeidRejected(CORRUPT_IMAGE_DATA, f"frame {index} has the wrong size")


_CS_HEAD = 1 << 20
_TAIL = 16  # zero padding allowed after EOI/EOC within the last bytes


def _incomplete_tile(
    fd: int,
    offs: np.ndarray,
    cnts: np.ndarray,
    used: np.ndarray,
    heads: streams.HeadScans,
    markers: tuple[bytes, bytes],
) -> int | None:
    """First tile (index) that does not start with SOI/SOC or end with EOI/EOC."""
    assert heads.tail is not None and heads.has_tail is not None and heads.lead is not None
    m0, m1 = markers
    lead, tail = heads.lead[used], heads.tail[used]
    ok = (lead[:, 0] == m0[0]) & (lead[:, 1] == m0[1]) & heads.has_tail[used]
    ok &= (tail[:, -2] == m1[0]) & (tail[:, -1] == m1[1])
    for k in used[~ok].tolist():  # zero padding after the end marker, or a huge strip
        off, cnt = int(offs[k]), int(cnts[k])
        head = os.pread(fd, 2, off)
        end = os.pread(fd, min(cnt, _TAIL), off + cnt - min(cnt, _TAIL)).rstrip(b"\x00")
        if head != m0 or not end.endswith(m1):
            return k
    return None


def _check_codestream_heads(path: Path, st: TiffStructure) -> _Entropy:
    """Every JPEG / JPEG 2000 tile must start with SOI/SOC and end with EOI/EOC (zero
    padding allowed after it; sample tiles are fully decoded separately), and no JPEG
    COM/APPn (beyond JFIF/Adobe and known encoder signatures) or JPEG 2000 COM may remain
    in the header of any tile: every header is parsed up to SOS/SOT (tiles whose header
    bytes are identical share one parse, see :func:`streams.scan_heads`; the first and last
    bytes of every tile are taken in the same mapped pass). Returns the entropy-coded range
    of every JPEG tile, searched for such markers by :func:`_scan_output` in the same pass
    as the identifying values."""
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    ifds: list[np.ndarray] = []
    tiles: list[np.ndarray] = []
    with open(path, "rb") as fh:
        for ifd in st.all_ifds():
            comp = ifd.compression
            j2k = comp in codestream.J2K_COMPRESSIONS
            if comp not in codestream.JPEG_COMPRESSIONS and not j2k:
                continue
            offs, cnts = ifd.segment_arrays()
            used = np.flatnonzero(cnts > 0)
            if (cnts[used] < 4).any():
                raise DeidRejected(CORRUPT_IMAGE_DATA, f"IFD {ifd.index}: a tile is too short")
            try:
                heads = streams.scan_heads(
                    fh.fileno(), st.file_size, offs, cnts, head_max=_CS_HEAD, tail=_TAIL
                )
            except streams.HeadError as exc:
                what = "malformed" if exc.problem == "malformed" else "incomplete"
                raise DeidRejected(
                    CORRUPT_IMAGE_DATA, f"IFD {ifd.index}: tile {exc.index} header is {what}"
                ) from exc
            bad = _incomplete_tile(fh.fileno(), offs, cnts, used, heads, _MARKERS[comp])
            if bad is not None:
                raise _incomplete_stream(ifd.index, bad)
            if heads.drops:
                raise _fail(
                    f"IFD {ifd.index}: tile {min(heads.drops)} carries a comment/APPn segment"
                )
            if j2k:
                continue
            starts.append(offs[used] + heads.header_end[used])
            ends.append(offs[used] + cnts[used])
            ifds.append(np.full(len(used), ifd.index, dtype=np.int64))
            tiles.append(used)
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return _Entropy.of(empty, empty, empty, empty)
    return _Entropy.of(
        np.concatenate(starts), np.concatenate(ends), np.concatenate(ifds), np.concatenate(tiles)
    )


# --- bundles: MRXS and DICOM series ----------------------------------------------------------
# Re-read from the output ZIP alone. MRXS, in place (the output is a stored bundle): names,
# Slidedat.ini keys and values against the output keep-list, our own walk of Index.dat, every
# data-file byte either inside a kept image/record or zero, sample images of every level
# decoded, OpenSlide on a sparse copy holding the lowest level (vendor, no associated image,
# only allowed mirax.* properties, the level decodes). DICOM series: every instance through
# the single-instance checks, one Study/Series/Frame of Reference UID in all, nothing but
# VOLUME/THUMBNAIL. The forbidden values are searched in every byte of the bundle (and,
# with short values too, in the metadata members).
_MRXS_NAME = re.compile(r"^slide/(?:Slidedat\.ini|Index\.dat|Data\d{4}\.dat)$")
_MRXS_LEVEL_KEYS = frozenset(
    {
        "OVERLAP_X", "OVERLAP_Y", "MICROMETER_PER_PIXEL_X", "MICROMETER_PER_PIXEL_Y",
        "IMAGE_FORMAT", "IMAGE_CONCAT_FACTOR", "IMAGE_FILL_COLOR_BGR", "DIGITIZER_WIDTH",
        "DIGITIZER_HEIGHT",
    }
)  # fmt: skip
_MRXS_GENERAL_KEYS = frozenset(
    {
        "SLIDE_ID", "SLIDE_VERSION", "CURRENT_SLIDE_VERSION", "SLIDE_TYPE", "IMAGENUMBER_X",
        "IMAGENUMBER_Y", "OBJECTIVE_MAGNIFICATION", "CameraImageDivisionsPerSide",
        "OBJECTIVE_NAME", "CAMERA_TYPE", "MICROSCOPE_TYPE",
    }
)  # fmt: skip
_MRXS_LAYERS = frozenset({"VIMSLIDE_POSITION_BUFFER", "StitchingIntensityLayer"})
_MRXS_VALUE = re.compile(r"^[A-Za-z0-9 ._\-()/+,:]{0,64}$")


def _verify_bundle(
    path: Path, fmt: SlideFormat, forbidden: Sequence[bytes], policy: DeidPolicy
) -> None:
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".verify-", dir=path.parent))
    try:
        try:
            lay = bundle.layout(path)
            members = {m.name: m for m in lay.members}
            sources = {n: bundle.stored_source(path, m) for n, m in members.items()}
        except bundle.BundleError as exc:
            raise _fail(f"output bundle: {exc.reason}") from exc
        if any(s is None for s in sources.values()):
            raise _fail("the output bundle holds a compressed member")
        placed = {n: s for n, s in sources.items() if s is not None}
        meta: list[tuple[int, int]] = []
        if fmt is SlideFormat.MIRAX and lay.kind == bundle.KIND_MRXS:
            _verify_mrxs(path, placed, tmp, policy)
            meta = [(s.offset, s.offset + s.size) for n, s in placed.items() if n[-4:] != ".dat"]
        elif fmt is SlideFormat.DICOM_WSI and lay.kind == bundle.KIND_DICOM:
            try:
                files = bundle.extract(path, tmp, lay.members)
            except bundle.BundleError as exc:
                raise _fail(f"output bundle: {exc.reason}") from exc
            regions = _verify_dicom_series(files, policy)
            for name, f in files.items():  # the elements before Pixel Data: every pattern
                search_forbidden(f, forbidden, regions[name], policy)
        else:
            raise _fail("the output bundle does not hold the input format")
        search_forbidden(path, forbidden, meta, policy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_source(path: Path, src: bundle.Source) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(src.offset)
        return fh.read(src.size)


def _verify_mrxs(
    path: Path, sources: dict[str, bundle.Source], tmp: Path, policy: DeidPolicy
) -> None:
    names = set(sources)
    if "slide.mrxs" not in names or sources["slide.mrxs"].size:
        raise _fail("the output MRXS file is missing or not empty")
    if not all(_MRXS_NAME.match(n) for n in names - {"slide.mrxs"}):
        raise _fail("the output bundle holds an unexpected member")
    if "slide/Slidedat.ini" not in names or sources["slide/Slidedat.ini"].size > 1 << 20:
        raise _fail("the output Slidedat.ini is missing or too large")
    ini_bytes = _read_source(path, sources["slide/Slidedat.ini"])
    try:
        ini = bundle.parse_ini(ini_bytes)
    except bundle.BundleError as exc:
        raise _fail("the output Slidedat.ini cannot be read") from exc
    levels = {f"LAYER_0_LEVEL_{n}_SECTION" for n in range(64)}
    kept = set(policy.kept("mrxs"))
    for section, keys in ini.sections.items():
        for key, value in keys.items():
            if section == "GENERAL":
                # keys a data steward's rule keeps (DeidPolicy.approved_rules) are allowed too
                ok = key in _MRXS_GENERAL_KEYS or f"GENERAL.{key}" in kept
            elif section == "HIERARCHICAL":
                ok = bool(re.match(r"^(?:(?:NON)?HIER_|INDEXFILE$)", key))
            elif section == "DATAFILE":
                ok = bool(re.match(r"^FILE_(?:COUNT|\d+)$", key))
            else:
                ok = section in levels and key in _MRXS_LEVEL_KEYS
            if not ok or not _MRXS_VALUE.match(value):
                raise _fail(f"output Slidedat.ini: a key outside the keep-list ({section})")
            if section == "HIERARCHICAL" and key.endswith("_NAME"):
                if key.startswith("HIER_") and value != "Slide zoom level":
                    raise _fail("the output holds a hierarchical layer other than the zoom levels")
                if key.startswith("NONHIER_") and value not in _MRXS_LAYERS:
                    raise _fail("the output holds a non-hierarchical layer other than positions")
    index_name = f"slide/{ini.get('HIERARCHICAL', 'INDEXFILE') or ''}"
    if index_name not in sources:
        raise _fail("the output index file is missing")
    index = _read_source(path, sources[index_name])
    try:
        records = _mrxs_index_records(index, ini)
        files = [
            f"slide/{ini.get('DATAFILE', f'FILE_{i}') or ''}"
            for i in range(ini.int("DATAFILE", "FILE_COUNT"))
        ]
    except bundle.BundleError as exc:
        raise _fail("the output Slidedat.ini does not describe the index") from exc
    if set(files) | {"slide.mrxs", "slide/Slidedat.ini", index_name} != names:
        raise _fail("the output bundle members do not match Slidedat.ini")
    spans: dict[int, list[tuple[int, int]]] = {}
    for _level, items in records:
        for off, length, fileno in items:
            if not 0 <= fileno < len(files) or off < 0 or length < 0:
                raise _fail("the output index names an unknown data file")
            if off + length > sources[files[fileno]].size:
                raise _fail("an output index item runs past its data file")
            spans.setdefault(fileno, []).append((off, off + length))
    for i, name in enumerate(files):
        _check_zero_outside(path, sources[name], spans.get(i, []))
    _decode_mrxs_samples(path, [sources[f] for f in files], records)
    # OpenSlide on a sparse copy: the metadata and the bytes of the lowest level and of the
    # position records (what it reads when opening and when reading that level)
    lowest = max(level for level, _items in records)
    folder = tmp / "slide"
    folder.mkdir(parents=True)
    (tmp / "slide.mrxs").write_bytes(b"")
    (folder / "Slidedat.ini").write_bytes(ini_bytes)
    (folder / Path(index_name).name).write_bytes(index)
    handles = {}
    try:
        for i, name in enumerate(files):
            handles[i] = open(folder / Path(name).name, "wb")  # noqa: SIM115 - closed below
            handles[i].truncate(sources[name].size)
        with open(path, "rb") as fin:
            for level, items in records:
                if level not in (lowest, -1):
                    continue
                for off, length, fileno in items:
                    fin.seek(sources[files[fileno]].offset + off)
                    handles[fileno].seek(off)
                    handles[fileno].write(fin.read(length))
    finally:
        for h in handles.values():
            h.close()
    _check_mrxs_openslide(tmp / "slide.mrxs", lowest, policy.kept("mrxs"))


def _mrxs_index_records(
    data: bytes, ini: bundle.IniFile
) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """Walk Index.dat (independently of the writer): (zoom level or -1 for a
    non-hierarchical record, [(offset, length, data file)])."""
    import struct

    sid = (ini.get("GENERAL", "SLIDE_ID") or "").encode()
    if not data.startswith(b"01.02" + sid):
        raise _fail("the output index does not start with the version and SLIDE_ID")

    def ints(at: int, n: int) -> tuple[int, ...]:
        if at < 0 or n < 0 or at + 4 * n > len(data):
            raise _fail("the output index points outside itself")
        return struct.unpack_from(f"<{n}i", data, at)

    hier_root, non_root = ints(5 + len(sid), 2)
    wanted = [(hier_root, n, 4, n) for n in range(ini.int("HIERARCHICAL", "HIER_0_COUNT"))]
    total = sum(
        ini.int("HIERARCHICAL", f"NONHIER_{i}_COUNT")
        for i in range(ini.int("HIERARCHICAL", "NONHIER_COUNT"))
    )
    wanted += [(non_root, n, 5, -1) for n in range(total)]
    out = []
    for table, n, width, level in wanted:
        (page,) = ints(table + 4 * n, 1)
        seen: set[int] = set()
        items: list[tuple[int, int, int]] = []
        while True:
            if page in seen:
                raise _fail("the output index has a page loop")
            seen.add(page)
            count, nxt = ints(page, 2)
            body = ints(page + 8, count * width)
            for k in range(0, len(body), width):
                off, length, fileno = body[k + width - 3 : k + width]
                items.append((off, length, fileno))
            if not nxt:
                break
            page = nxt
        out.append((level, items))
    return out


def _check_zero_outside(path: Path, src: bundle.Source, spans: list[tuple[int, int]]) -> None:
    pos = 0
    with open(path, "rb") as fh:
        for start, end in [*_merge(spans), (src.size, src.size)]:
            fh.seek(src.offset + pos)
            left = start - pos
            while left > 0:
                chunk = fh.read(min(left, 8 << 20))
                if not chunk or chunk.strip(b"\x00"):
                    raise _fail("an output data file holds unreferenced non-zero bytes")
                left -= len(chunk)
            pos = max(pos, end)


def _decode_mrxs_samples(
    path: Path,
    sources: list[bundle.Source],
    records: list[tuple[int, list[tuple[int, int, int]]]],
) -> None:
    import io

    from PIL import Image

    with open(path, "rb") as fh:
        for level, items in records:
            if level < 0 or not items:
                continue
            for k in sorted({0, len(items) // 2, len(items) - 1}):
                off, length, fileno = items[k]
                fh.seek(sources[fileno].offset + off)
                data = fh.read(length)
                if codestream.scan_header(data[: 1 << 20]) is None or data[:2] != b"\xff\xd8":
                    raise DeidRejected(CORRUPT_IMAGE_DATA, f"zoom level {level}: not a JPEG image")
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        img.load()
                except Exception as exc:
                    raise DeidRejected(
                        CORRUPT_IMAGE_DATA, f"zoom level {level}: an image does not decode"
                    ) from exc


def _check_mrxs_openslide(path: Path, lowest: int, kept: frozenset[str] = frozenset()) -> None:
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:
        raise DeidRejected(CORRUPT_IMAGE_DATA, "OpenSlide cannot open the output") from exc
    try:
        if slide.properties.get("openslide.vendor") != "mirax":
            raise _fail("OpenSlide sees a different vendor format")
        if slide.associated_images.keys():
            raise _fail("OpenSlide lists an associated image")
        for key in slide.properties:
            name = key[14:]
            if (
                key.startswith("mirax.GENERAL.")
                and name not in _MRXS_GENERAL_KEYS
                and f"GENERAL.{name}" not in kept
            ):
                raise _fail("OpenSlide shows a Slidedat.ini key outside the keep-list")
        if slide.level_count != lowest + 1:
            raise _fail("OpenSlide and the index disagree on the number of levels")
        w, h = slide.level_dimensions[lowest]
        try:
            slide.read_region((0, 0), lowest, (min(w, 2048), min(h, 2048)))
        except openslide.OpenSlideError as exc:
            raise DeidRejected(CORRUPT_IMAGE_DATA, "OpenSlide cannot decode the output") from exc
    finally:
        slide.close()


def _verify_dicom_series(
    files: dict[str, Path], policy: DeidPolicy
) -> dict[str, list[tuple[int, int]]]:
    if not files or not all(re.match(r"^instance-\d{4}\.dcm$", n) for n in files):
        raise _fail("the output bundle holds an unexpected member")
    uids: set[tuple[str, str, str]] = set()
    flavors = []
    regions = {}
    for name in sorted(files):
        regions[name] = _verify_dicom(files[name], policy)  # every instance, as a single one
        ds = read_dicom_header(files[name]).dataset
        uids.add(
            (
                str(ds.get("StudyInstanceUID", "")),
                str(ds.get("SeriesInstanceUID", "")),
                str(ds.get("FrameOfReferenceUID", "")),
            )
        )
        it = [str(v).upper() for v in (ds.get("ImageType") or [])]
        flavors.append(it[2] if len(it) > 2 else "")
        if not ds.get("DeidentificationMethodCodeSequence"):
            raise _fail("an instance lacks Deidentification Method Code Sequence")
    if len(uids) != 1:
        raise _fail("the output instances do not share one study, series and frame of reference")
    if "VOLUME" not in flavors or set(flavors) - {"VOLUME", "THUMBNAIL"}:
        raise _fail("the output series holds an instance other than VOLUME/THUMBNAIL")
    return regions
