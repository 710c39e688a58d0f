"""Bounded-memory byte copying and searching over files.

* :class:`PatternSet` finds every occurrence of a set of literal byte patterns in one pass
  (Hyperscan's SIMD literal matcher when the pinned wheel is importable, else one ``find`` per
  pattern - same results, slower).
* :func:`scan_file` runs pattern sets over ranges of a file through read-only mapped windows,
  so memory stays bounded (one window mapped at a time) and nothing is copied into Python.
* :func:`scan_heads` parses the header of every JPEG / JPEG 2000 tile of an image without a
  Python-level loop over tiles: tiles whose first bytes are identical share one parse.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from services.shared.wsi import codestream

_hs: Any
try:  # the pinned wheel (pyproject.toml); without it the plain ``find`` engine is used
    import hyperscan as _hs
except ImportError:  # pragma: no cover - exercised through engine="find" in the tests
    _hs = None


def copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int, buffer_size: int) -> None:
    """Append ``length`` bytes of ``src`` starting at ``offset`` to ``dst`` (streamed)."""
    dst.flush()
    if hasattr(os, "copy_file_range"):
        try:
            done = 0
            start = dst.tell()
            while done < length:
                n = os.copy_file_range(
                    src.fileno(),
                    dst.fileno(),
                    min(length - done, 256 << 20),
                    offset + done,
                    start + done,
                )
                if n <= 0:
                    raise EOFError("source ended while copying")
                done += n
        except (OSError, AttributeError, ValueError):
            dst.seek(0, os.SEEK_END)
            dst.truncate(dst.tell())
        else:
            dst.seek(start + length)
            return
    buf = bytearray(buffer_size)
    view = memoryview(buf)
    src.seek(offset)
    left = length
    while left:
        n = src.readinto(view[: min(left, len(view))])  # type: ignore[attr-defined]
        if not n:
            raise EOFError("source ended while copying")
        dst.write(view[:n])
        left -= n


def pattern_variants(value: bytes) -> list[bytes]:
    """The byte forms an identifying value may take on disk: UTF-8, Latin-1, UTF-16 LE/BE.

    For text whose characters are all below U+0100 one pattern covers both UTF-16 byte
    orders: LE is ``c0 00 c1 00 .. cn 00`` and BE ``00 c0 00 c1 .. 00 cn``; both contain
    ``c0 00 c1 .. 00 cn``, so searching that halves the work.
    """
    out = [value]
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return out
    forms: list[bytes] = []
    try:
        forms.append(text.encode("latin-1"))
        forms.append(text.encode("utf-16-le")[:-1])
    except UnicodeEncodeError:
        forms += [text.encode("utf-16-le"), text.encode("utf-16-be")]
    for form in forms:
        if form and form not in out:
            out.append(form)
    return out


def minimal_patterns(patterns: Iterable[bytes]) -> list[bytes]:
    """Drop duplicates and patterns containing another plain pattern (finding the shorter
    one suffices; numeric patterns match with boundaries, so they never subsume others)."""
    uniq = sorted(set(p for p in patterns if p), key=len)
    kept: list[bytes] = []
    plain: list[bytes] = []
    for p in uniq:
        if not any(k in p for k in plain):
            kept.append(p)
            if not is_numeric_pattern(p):
                plain.append(p)
    return kept


_NUMERIC_CHARS = frozenset(b"0123456789.:/-+ ")
_DIGITS = frozenset(b"0123456789")


def is_numeric_pattern(p: bytes) -> bool:
    """Dates, times and numbers: such values only count when not part of a longer number."""
    stripped = p.replace(b"\x00", b"")
    return bool(stripped) and all(b in _NUMERIC_CHARS for b in stripped)


# --- one-pass multi-pattern search -----------------------------------------------------------
Buffer = bytes | bytearray | mmap.mmap
HitHandler = Callable[[int, int], bool]  # (pattern index, offset of its first byte) -> stop?
ENGINES = ("hyperscan", "find") if _hs is not None else ("find",)


_HS_LONGEST = 1024  # longer patterns (rare: whole descriptions) are searched with find


class PatternSet:
    """Literal byte patterns found together: every occurrence of every pattern is reported
    (overlapping ones too), in ascending order of the occurrence's end within each engine.

    ``engine``: "hyperscan" (one SIMD pass for all patterns up to _HS_LONGEST bytes; longer
    ones, or all if Hyperscan refuses the set, by ``find``) or "find" (``bytes.find`` per
    pattern); "auto" takes Hyperscan when it is installed. Both report the same hits."""

    def __init__(self, patterns: Sequence[bytes], engine: str = "auto") -> None:
        if any(not p for p in patterns):
            raise ValueError("empty pattern")
        if engine == "auto":
            engine = ENGINES[0]
        if engine not in ENGINES:
            raise ValueError(f"pattern engine {engine!r} is not available")
        self.patterns = [bytes(p) for p in patterns]
        self.lengths = [len(p) for p in self.patterns]
        self.longest = max(self.lengths, default=0)
        self.engine = engine
        self._db: Any = None
        self._by_find = list(range(len(self.patterns)))  # indexes searched with find
        if engine == "hyperscan":
            short = [k for k, p in enumerate(self.patterns) if len(p) <= _HS_LONGEST]
            if short:
                db = _hs.Database(mode=_hs.HS_MODE_BLOCK)
                try:
                    db.compile(
                        expressions=[
                            b"".join(b"\\x%02x" % c for c in self.patterns[k]) for k in short
                        ],
                        ids=short,
                        elements=len(short),
                        flags=[0] * len(short),
                    )
                except _hs.error:  # e.g. a set too large for one database
                    pass
                else:
                    self._db = db
                    in_db = set(short)
                    self._by_find = [k for k in self._by_find if k not in in_db]

    def scan(
        self,
        buf: Buffer,
        on_hit: HitHandler,
        lo: int = 0,
        hi: int | None = None,
        report_from: int | None = None,
        base: int = 0,
    ) -> bool:
        """Call ``on_hit(index, base + start)`` for every occurrence lying wholly inside
        ``buf[lo:hi]`` whose last byte is at ``report_from`` (default ``lo``) or later.
        Returns True when ``on_hit`` asked to stop (by returning True)."""
        hi = len(buf) if hi is None else hi
        first = lo if report_from is None else report_from
        if not self.patterns or hi - lo <= 0:
            return False
        if self._db is not None and self._scan_hs(buf, on_hit, lo, hi, first, base):
            return True
        return bool(self._by_find) and self._scan_find(buf, on_hit, lo, hi, first, base)

    def _scan_hs(
        self, buf: Buffer, on_hit: HitHandler, lo: int, hi: int, first: int, base: int
    ) -> bool:
        lengths = self.lengths
        min_end = first - lo  # relative end offsets <= this belong to an earlier range
        shift = base + lo

        def handler(index: int, _frm: int, to: int, _flags: int, _ctx: object) -> int:
            if to <= min_end:
                return 0
            return 1 if on_hit(index, shift + to - lengths[index]) else 0

        with memoryview(buf) as whole, whole[lo:hi] as part:
            try:
                self._db.scan(part, match_event_handler=handler)
            except _hs.ScanTerminated:
                return True
        return False

    def _scan_find(
        self, buf: Buffer, on_hit: HitHandler, lo: int, hi: int, first: int, base: int
    ) -> bool:
        hits: list[tuple[int, int, int]] = []  # (end, index, start)
        for index in self._by_find:
            p = self.patterns[index]
            i = buf.find(p, max(lo, first - len(p) + 1), hi)
            while i != -1:
                hits.append((i + len(p), index, i))
                i = buf.find(p, i + 1, hi)
        hits.sort()
        return any(on_hit(index, base + start) for _end, index, start in hits)


@contextmanager
def mapped(fd: int, start: int, end: int) -> Iterator[tuple[mmap.mmap, int]]:
    """Read-only mapping of file bytes [start, end): yields (map, index of ``start`` in it).
    Unmapped on exit, so only the window being worked on counts against memory."""
    base = start - start % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, end - base, access=mmap.ACCESS_READ, offset=base)
    try:
        yield mm, start - base
    finally:
        with suppress(BufferError):  # a view escaped with an exception's traceback
            mm.close()  # (then the mapping is freed with it)


FileHitHandler = Callable[[PatternSet, int, int], bool]  # (set, pattern index, file offset)
SCAN_WINDOW = 16 << 20  # bytes mapped at once (bounds the resident file pages)


def scan_file(
    fd: int,
    plan: Iterable[tuple[int, int, PatternSet]],
    on_hit: FileHitHandler,
    window: int = SCAN_WINDOW,
    threads: int = 1,
) -> bool:
    """Search file ranges, each with its own pattern set, through mapped windows.

    For every ``(start, end, patterns)`` of ``plan`` each occurrence of those patterns whose
    *last* byte lies in [start, end) is reported once, also when it begins before ``start``
    or straddles a window boundary (each window is mapped from ``longest - 1`` bytes before
    its start). Splitting a file into consecutive ranges therefore misses nothing at the
    cuts. Returns True when ``on_hit`` asked to stop.

    ``threads`` > 1 cuts the plan into that many consecutive parts of equal size, each
    searched by its own thread with its own compiled copy of the pattern sets (Hyperscan
    releases the GIL while it scans); ``on_hit`` then runs in those threads (it is always
    given the caller's pattern set objects) and must be thread-safe."""
    window = max(window, mmap.ALLOCATIONGRANULARITY)
    steps = [(a, b, ps) for a, b, ps in plan if ps.patterns and a < b]
    total = sum(b - a for a, b, _ps in steps)
    if threads <= 1 or total < threads * window:
        return _scan_plan(fd, steps, on_hit, window, None)
    parts: list[list[tuple[int, int, PatternSet]]] = [[] for _ in range(threads)]
    share, part, used = -(-total // threads), 0, 0
    for a, b, ps in steps:
        while a < b:
            take = min(b - a, share - used)
            parts[part].append((a, a + take, ps))
            a, used = a + take, used + take
            if used == share and part + 1 < threads:
                part, used = part + 1, 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(steps: list[tuple[int, int, PatternSet]], clone: bool) -> None:
        try:
            searched: dict[int, PatternSet] = {}  # id of the caller's set -> set searched
            for _a, _b, ps in steps:
                if id(ps) not in searched:
                    searched[id(ps)] = PatternSet(ps.patterns, ps.engine) if clone else ps
            owner = {id(searched[id(ps)]): ps for _a, _b, ps in steps}
            mine = [(a, b, searched[id(ps)]) for a, b, ps in steps]

            def hit(ps: PatternSet, index: int, off: int) -> bool:
                if stop.is_set() or on_hit(owner[id(ps)], index, off):
                    stop.set()
                    return True
                return False

            _scan_plan(fd, mine, hit, window, stop)
        except Exception as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
            stop.set()

    workers = [
        threading.Thread(target=run, args=(steps_k, k > 0), name=f"scan-{k}", daemon=True)
        for k, steps_k in enumerate(parts)
        if steps_k
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return stop.is_set()


def _scan_plan(
    fd: int,
    steps: Sequence[tuple[int, int, PatternSet]],
    on_hit: FileHitHandler,
    window: int,
    stop: threading.Event | None,
) -> bool:
    for start, end, ps in steps:
        s = start
        while s < end:
            if stop is not None and stop.is_set():
                return True
            e = min(end, s + window)
            lo = max(0, s - ps.longest + 1)
            with mapped(fd, lo, e) as (mm, d):

                def hit(index: int, off: int, ps: PatternSet = ps) -> bool:
                    return on_hit(ps, index, off)

                if ps.scan(mm, hit, lo=d, hi=d + e - lo, report_from=d + s - lo, base=lo - d):
                    return True
            s = e
    return False


def numeric_boundary_ok(read: Callable[[int], int | None], start: int, p: bytes) -> bool:
    """A numeric pattern at ``start`` counts only when no digit touches it (``read(i)``: the
    byte at ``i`` or None outside the data). UTF-16 forms: neighbours are one unit away."""
    step = 2 if b"\x00" in p else 1
    before = read(start - step) if start - step >= 0 else None
    after = read(start + len(p) + step - 1)
    return (before is None or before not in _DIGITS) and (after is None or after not in _DIGITS)


# --- tile headers ------------------------------------------------------------------------------
class HeadError(Exception):
    """A tile header that is malformed or does not end within the bytes allowed."""

    def __init__(self, index: int, problem: str, detail: str = "") -> None:
        super().__init__(problem)
        self.index = index  # segment index of the tile
        self.problem = problem  # "malformed" or "incomplete"
        self.detail = detail


@dataclass
class HeadScans:
    """Per segment of an image: where its header ends (0 for empty segments), and for the
    segments whose header carries droppable text segments, the scan and the header bytes."""

    header_end: np.ndarray
    drops: dict[int, tuple[codestream.HeaderScan, bytes]] = field(default_factory=dict)
    # with ``tail``: the last ``tail`` bytes of every segment (fewer for shorter segments:
    # right-aligned), gathered while the window is mapped anyway; always filled for segments
    # up to ``head_max`` bytes, maybe not for longer ones (``has_tail`` False)
    tail: np.ndarray | None = None
    has_tail: np.ndarray | None = None
    lead: np.ndarray | None = None  # with ``tail``: the first 2 bytes of every segment


_PREFIX = 16  # grouping key: shorter than any JPEG (SOI+SOF+SOS) / JPEG 2000 main header
_ROUNDS = 8  # distinct headers tried per group before the rest is parsed one by one
_BATCH = 1 << 16  # tiles per window at most
_COMPARE_BYTES = 8 << 20
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F], dtype=np.uint64)


def scan_heads(
    fd: int,
    file_size: int,
    offsets: np.ndarray,
    counts: np.ndarray,
    head_read: int = 4096,
    head_max: int = 1 << 20,
    window: int = SCAN_WINDOW,
    tail: int = 0,
) -> HeadScans:
    """Run :func:`codestream.scan_header` on the header of every non-empty segment.

    Tiles of one image usually share their header byte for byte (JPEGTables hold the
    tables), so segments are grouped by a hash of their first bytes; one segment per group
    is parsed and the others are compared with it byte for byte over the whole header
    (plus the SOS/SOT marker that ends it), which makes the result provably the same.
    Segments that differ are parsed one by one. Identical (offset, count) pairs are parsed
    once. Raises :class:`HeadError` naming the first segment index of a bad header.
    ``tail`` > 0 also returns the last bytes of every segment (see :class:`HeadScans`)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    out = HeadScans(np.zeros(len(offsets), dtype=np.int64))
    used = np.flatnonzero(counts > 0)
    if tail:
        out.tail = np.zeros((len(offsets), tail), dtype=np.uint8)
        out.has_tail = np.zeros(len(offsets), dtype=bool)
        out.lead = np.zeros((len(offsets), 2), dtype=np.uint8)
    if not len(used):
        return out
    pairs = np.stack([offsets[used], counts[used]], axis=1)
    uniq, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
    u_off, u_cnt = uniq[:, 0], np.minimum(uniq[:, 1], np.maximum(file_size - uniq[:, 0], 0))
    u_index = used[first]  # segment index named in errors: first one at that place
    u_end = np.zeros(len(uniq), dtype=np.int64)
    u_drops: dict[int, tuple[codestream.HeaderScan, bytes]] = {}
    u_tail = np.zeros((len(uniq), tail), dtype=np.uint8)
    u_has = np.zeros(len(uniq), dtype=bool)
    u_lead = np.zeros((len(uniq), 2), dtype=np.uint8)
    i = 0
    while i < len(uniq):
        lo = int(u_off[i])
        j = int(np.searchsorted(u_off, lo + window, "left"))
        j = min(max(j, i + 1), i + _BATCH)
        hi = min(file_size, int(u_off[j - 1]) + head_max)
        failed: HeadError | None = None
        with mapped(fd, lo, hi) as (mm, d):
            arr = np.frombuffer(mm, dtype=np.uint8)
            try:
                _heads_window(arr, u_off[i:j] - lo + d, u_cnt[i:j], i, head_read, head_max,
                              u_index, u_end, u_drops)  # fmt: skip
            except HeadError as exc:  # re-raised without the frames that hold the mapping
                failed = HeadError(exc.index, exc.problem, exc.detail)
            else:
                if tail:
                    _tails(arr, u_off[i:j] - lo + d, u_cnt[i:j], d + hi - lo, tail,
                           u_tail[i:j], u_has[i:j], u_lead[i:j])  # fmt: skip
            finally:
                del arr
        if failed is not None:
            raise failed
        i = j
    inverse = inverse.reshape(-1)
    out.header_end[used] = u_end[inverse]
    if out.tail is not None and out.has_tail is not None and out.lead is not None:
        out.tail[used] = u_tail[inverse]
        out.has_tail[used] = u_has[inverse]
        out.lead[used] = u_lead[inverse]
    if u_drops:
        with_drops = np.isin(inverse, np.fromiter(u_drops, dtype=np.int64))
        for k, u in zip(used[with_drops].tolist(), inverse[with_drops].tolist(), strict=True):
            out.drops[k] = u_drops[u]
    return out


def _tails(
    arr: np.ndarray,
    rel: np.ndarray,
    cnt: np.ndarray,
    mapped_end: int,
    tail: int,
    out: np.ndarray,
    has: np.ndarray,
    lead: np.ndarray,
) -> None:
    """First 2 bytes of the segments, and the last ``tail`` bytes of those that end inside
    the mapped part of ``arr``."""
    two = cnt >= 2
    lead[two] = sliding_window_view(arr, 2)[rel[two]]
    ends = rel + cnt
    inside = ends <= mapped_end
    full = inside & (cnt >= tail)
    if full.any():
        out[full] = sliding_window_view(arr, tail)[ends[full] - tail]
    for k in np.flatnonzero(inside & ~full).tolist():  # shorter than ``tail``: right-aligned
        out[k, tail - int(cnt[k]) :] = arr[int(rel[k]) : int(ends[k])]
    has[inside] = True


def _parse_one(
    arr: np.ndarray, rel: int, cnt: int, index: int, head_read: int, head_max: int
) -> tuple[codestream.HeaderScan, bytes]:
    want = min(cnt, head_read)
    limit = min(cnt, head_max)
    while True:
        head = arr[rel : rel + want].tobytes()
        try:
            scan = codestream.scan_header(head)
        except codestream.CodestreamError as exc:
            raise HeadError(index, "malformed", str(exc)) from exc
        if scan is not None:
            return scan, head[: scan.header_end + 2]
        if want >= limit:
            raise HeadError(index, "incomplete")
        want = min(limit, want * 4)


def _heads_window(
    arr: np.ndarray,
    rel: np.ndarray,
    cnt: np.ndarray,
    u0: int,
    head_read: int,
    head_max: int,
    u_index: np.ndarray,
    u_end: np.ndarray,
    u_drops: dict[int, tuple[codestream.HeaderScan, bytes]],
) -> None:
    """Headers of the tiles of one mapped window (``rel``: their offsets in ``arr``)."""

    def settle(ks: np.ndarray, scan: codestream.HeaderScan, head: bytes) -> None:
        u_end[u0 + ks] = scan.header_end
        if scan.drops:
            for k in ks.tolist():
                u_drops[u0 + k] = (scan, head)

    def parse(k: int) -> tuple[codestream.HeaderScan, bytes]:
        return _parse_one(arr, int(rel[k]), int(cnt[k]), int(u_index[u0 + k]), head_read,
                          head_max)  # fmt: skip

    for k in np.flatnonzero(cnt < _PREFIX).tolist():  # too short to group: on its own
        settle(np.array([k]), *parse(k))
    big = np.flatnonzero(cnt >= _PREFIX)
    if not len(big):
        return
    # group by the first _PREFIX bytes (shorter than any JPEG / JPEG 2000 main header);
    # rows are gathered from a strided view of the window (no index arrays)
    rows = np.ascontiguousarray(sliding_window_view(arr, _PREFIX)[rel[big]])
    words = rows.view(np.uint64)
    key = (words[:, 0] * _MIX[0]) ^ (words[:, 1] * _MIX[1])
    _keys, inv = np.unique(key, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(int(inv.max()) + 2))
    for g in range(len(bounds) - 1):
        rest = big[order[bounds[g] : bounds[g + 1]]]
        rounds = 0
        while len(rest):
            if rounds == _ROUNDS:  # many different headers: one by one
                for k in rest.tolist():
                    settle(np.array([k]), *parse(k))
                break
            rounds += 1
            scan, head = parse(int(rest[0]))
            need = len(head)  # the result depends on these bytes only
            ref = np.frombuffer(head, dtype=np.uint8)
            fits = rest[cnt[rest] >= need]
            step = max(1, _COMPARE_BYTES // need)
            view = sliding_window_view(arr, need)
            same = np.concatenate(
                [
                    (view[rel[part]] == ref).all(axis=1)
                    for part in (fits[s : s + step] for s in range(0, len(fits), step))
                ]
            )
            del view
            settle(fits[same], scan, head)
            rest = np.setdiff1d(rest, fits[same], assume_unique=True)
