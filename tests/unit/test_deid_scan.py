"""Scanning primitives of the de-identification engine (services/deid/engine/streams.py):
the one-pass multi-pattern search, mapped-window file scans and the grouped tile-header
parse - each checked against a brute-force reference, at chunk/window/range boundaries and
in every kind of region, with both pattern engines; and the verifier built on them."""

from __future__ import annotations

import importlib
import itertools
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from services.deid.engine import DeidPolicy, DeidRejected, deidentify, streams, verify
from services.deid.engine.verify import search_forbidden
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import codestream
from services.shared.wsi.sniff import SlideFormat
from services.shared.wsi.tiff import read_tiff

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"
P = Pseudonymizer(b"k" * 32, "siteA")
ENGINES = list(streams.ENGINES)


def test_hyperscan_engine_is_installed() -> None:
    # the pinned wheel must be importable: without it the verifier still works, slower
    assert ENGINES[0] == "hyperscan"


def brute(data: bytes, patterns: list[bytes]) -> list[tuple[int, int]]:
    """Every occurrence as (start, pattern index), sorted."""
    out = []
    for k, p in enumerate(patterns):
        i = data.find(p)
        while i != -1:
            out.append((i, k))
            i = data.find(p, i + 1)
    return sorted(out)


def collect(ps: streams.PatternSet, buf: bytes, **kw: int) -> list[tuple[int, int]]:
    hits: list[tuple[int, int]] = []

    def hit(k: int, at: int) -> bool:
        hits.append((at, k))
        return False

    ps.scan(buf, hit, **kw)
    return sorted(hits)


def random_bytes(n: int, seed: int) -> bytearray:
    # bytes 0x80..0xFF only: the planted ASCII patterns cannot occur by chance
    return bytearray(np.random.default_rng(seed).integers(0x80, 0x100, n, dtype=np.uint8))


PATTERNS = [b"SECRET-1", b"ET-1X", b"\xff\xe1", b"\xff\xfe", b"a\x00b\x00c", b"11/03/26"]


@pytest.mark.parametrize("engine", ENGINES)
def test_pattern_set_finds_every_occurrence(engine: str) -> None:
    data = random_bytes(50_000, 1)
    rng = np.random.default_rng(2)
    for _ in range(200):
        p = PATTERNS[int(rng.integers(len(PATTERNS)))]
        at = int(rng.integers(0, len(data) - len(p)))
        data[at : at + len(p)] = p
    data[: len(PATTERNS[0])] = PATTERNS[0]  # at the very start ...
    data[-len(PATTERNS[1]) :] = PATTERNS[1]  # ... and the very end
    data[1000:1009] = b"SECRET-1X"  # overlapping occurrences of two patterns
    blob = bytes(data)
    ps = streams.PatternSet(PATTERNS, engine)
    assert collect(ps, blob) == brute(blob, PATTERNS)
    # a slice: only occurrences wholly inside, and only those ending at report_from or later
    lo, hi, first = 700, 40_000, 20_000
    want = [
        (s, k) for s, k in brute(blob[lo:hi], PATTERNS) if lo + s + len(PATTERNS[k]) - 1 >= first
    ]
    want = [(s + lo + 5, k) for s, k in want]
    assert collect(ps, blob, lo=lo, hi=hi, report_from=first, base=5) == sorted(want)


@pytest.mark.parametrize("engine", ENGINES)
def test_pattern_set_long_and_many_patterns(engine: str) -> None:
    # whole descriptions can be identifying values: longer than Hyperscan takes in one go
    rng = np.random.default_rng(9)
    long_value = bytes(rng.integers(0x20, 0x7F, 9000, dtype=np.uint8))
    many = [b"VALUE-%04d" % n for n in range(300)]
    patterns = [long_value, *many, long_value[:2000]]
    data = random_bytes(200_000, 10)
    data[100:9100] = long_value
    data[150_000:150_010] = many[123]
    blob = bytes(data)
    ps = streams.PatternSet(patterns, engine)
    assert collect(ps, blob) == brute(blob, patterns)
    assert [k for _s, k in collect(ps, blob)] == [0, len(patterns) - 1, 124]


@pytest.mark.parametrize("engine", ENGINES)
def test_pattern_set_stops_when_asked(engine: str) -> None:
    blob = b"xx SECRET-1 yy SECRET-1 zz"
    seen: list[int] = []

    def stop(_k: int, at: int) -> bool:
        seen.append(at)
        return True

    ps = streams.PatternSet([b"SECRET-1"], engine)
    assert ps.scan(blob, stop) is True
    assert seen == [3]
    assert streams.PatternSet([], engine).scan(blob, lambda _k, _a: True) is False
    with pytest.raises(ValueError):
        streams.PatternSet([b""], engine)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("engine", ENGINES)
def test_scan_file_across_window_boundaries(tmp_path: Path, engine: str, threads: int) -> None:
    window = 64 << 10
    p = b"SECRET-VALUE-XYZ"
    data = random_bytes((len(p) + 1) * window + 123, 3)
    # one occurrence straddling a window boundary by every possible amount
    for m, cut in enumerate(range(1, len(p))):
        at = (m + 1) * window - cut
        data[at : at + len(p)] = p
    for at in (0, len(data) - len(p)):  # first and last bytes of the file
        data[at : at + len(p)] = p
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(data))
    ps = streams.PatternSet([p, b"\xff\xe2"], engine)
    hits: list[tuple[int, int]] = []

    def hit(_ps: streams.PatternSet, k: int, at: int) -> bool:
        hits.append((at, k))
        return False

    with open(path, "rb") as fh:
        streams.scan_file(fh.fileno(), [(0, len(data), ps)], hit, window=window, threads=threads)
    assert sorted(hits) == brute(bytes(data), ps.patterns)  # each exactly once


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("engine", ENGINES)
def test_scan_file_ranges_partition_the_file(tmp_path: Path, engine: str, threads: int) -> None:
    """Ranges with different pattern sets: an occurrence counts in the range holding its
    last byte, also when it begins in the range before - so no cut loses a match."""
    data = random_bytes(300_000, 4)
    rng = np.random.default_rng(5)
    cuts = sorted({int(c) for c in rng.integers(1, len(data) - 1, 9)})
    for c in cuts:  # a value across every cut
        data[c - 4 : c + 4] = b"SECRET-1"
        data[c + 50 : c + 52] = b"\xff\xe1"
    blob = bytes(data)
    (path := tmp_path / "blob.bin").write_bytes(blob)
    values = streams.PatternSet([b"SECRET-1"], engine)
    both = streams.PatternSet([b"SECRET-1", b"\xff\xe1"], engine)
    bounds = [0, *cuts, len(blob)]
    pairs = itertools.pairwise(bounds)
    plan = [(a, b, both if n % 2 else values) for n, (a, b) in enumerate(pairs)]
    hits: list[tuple[int, bytes]] = []

    def hit(ps: streams.PatternSet, k: int, at: int) -> bool:
        hits.append((at, ps.patterns[k]))
        return False

    with open(path, "rb") as fh:
        streams.scan_file(fh.fileno(), plan, hit, window=8192, threads=threads)
    want = []
    for at, k in brute(blob, [b"SECRET-1", b"\xff\xe1"]):
        p = [b"SECRET-1", b"\xff\xe1"][k]
        last = at + len(p) - 1
        owner = next(ps for a, b, ps in plan if a <= last < b)
        if p in owner.patterns:
            want.append((at, p))
    assert sorted(hits) == sorted(want)
    assert len([h for h in hits if h[1] == b"SECRET-1"]) == len(cuts)


def test_numeric_boundaries() -> None:
    data = b"x201906041y date 20190604; 2\x000\x001\x009\x00"

    def read(i: int) -> int | None:
        return data[i] if i < len(data) else None

    assert not streams.numeric_boundary_ok(read, 2, b"20190604")  # inside a longer number
    assert streams.numeric_boundary_ok(read, 17, b"20190604")
    assert streams.numeric_boundary_ok(read, 27, b"2\x000\x001\x009")  # UTF-16, at the end


# --- tile headers ---------------------------------------------------------------------------
def seg(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


SOF = seg(0xC0, bytes([8, 0, 240, 0, 240, 3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]))
SOS = seg(0xDA, bytes([3, 1, 0, 2, 0x11, 3, 0x11, 0, 0x3F, 0]))


def tile(
    rng: np.random.Generator, *extra: bytes, sof: bytes = SOF, after: tuple[bytes, ...] = ()
) -> bytes:
    """A JPEG tile: segments ``extra`` before SOF, ``after`` between SOF and SOS (then the
    first bytes of tiles that differ only there are the same)."""
    body = rng.integers(0, 255, int(rng.integers(50, 400)), dtype=np.uint8).tobytes()
    return b"\xff\xd8" + b"".join(extra) + sof + b"".join(after) + SOS + body + b"\xff\xd9"


def reference(data: bytes, offs: list[int], cnts: list[int]) -> tuple[list[int], dict]:
    ends, drops = [], {}
    for k, (o, c) in enumerate(zip(offs, cnts, strict=True)):
        if not c:
            ends.append(0)
            continue
        scan = codestream.scan_header(data[o : o + c])
        assert scan is not None
        ends.append(scan.header_end)
        if scan.drops:
            drops[k] = (scan.drops, scan.texts)
    return ends, drops


def write_tiles(path: Path, tiles: list[bytes]) -> tuple[bytes, list[int], list[int]]:
    data, offs, cnts = bytearray(b"\x00" * 8), [], []
    for t in tiles:
        offs.append(len(data))
        cnts.append(len(t))
        data += t
    path.write_bytes(bytes(data))
    return bytes(data), offs, cnts


def test_scan_heads_matches_per_tile_parse(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    other_sof = SOF.replace(b"\x00\xf0\x00\xf0", b"\x00\x80\x00\xf0")
    kinds = [
        (),
        (seg(0xFE, b"PLANT-COMMENT"),),
        (seg(0xE1, b"Exif\x00\x00PLANT"),),
        (seg(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),),  # kept
        (seg(0xFE, b"Hamamatsu NanoZoomer Digital Pathology"),),  # vendor signature
        (seg(0xDD, b"\x00\x10"),),  # DRI
    ]
    tiles = []
    for n in range(3000):
        r = rng.random()
        extra = kinds[0] if r < 0.8 else kinds[int(rng.integers(1, len(kinds)))]
        sof = other_sof if n % 97 == 5 else SOF
        if rng.random() < 0.5:
            tiles.append(tile(rng, *extra, sof=sof))
        else:
            tiles.append(tile(rng, sof=sof, after=extra))
    tiles[10] = b"\xff\xd8\xff\xd9"  # shorter than the grouping prefix
    tiles[11] = tile(rng, seg(0xFE, b"A" * 6000))  # header longer than the first read
    path = tmp_path / "tiles.bin"
    data, offs, cnts = write_tiles(path, tiles)
    offs += [offs[3], 0, offs[2999]]  # shared places and an empty segment
    cnts += [cnts[3], 0, cnts[2999]]
    want_end, want_drops = reference(data, offs, cnts)
    with open(path, "rb") as fh:
        for window in (4096, 64 << 10, 64 << 20):
            got = streams.scan_heads(
                fh.fileno(), len(data), np.array(offs), np.array(cnts), window=window
            )
            assert got.header_end.tolist() == want_end
            assert {k: (s.drops, s.texts) for k, (s, _h) in got.drops.items()} == want_drops
            for k, (scan, head) in got.drops.items():  # the header bytes to rewrite
                assert head == data[offs[k] : offs[k] + scan.header_end + 2]
            with_tails = streams.scan_heads(
                fh.fileno(), len(data), np.array(offs), np.array(cnts), window=window, tail=16
            )
            assert with_tails.tail is not None and with_tails.lead is not None
            assert with_tails.has_tail is not None
            for k, (o, c) in enumerate(zip(offs, cnts, strict=True)):
                if not c:
                    continue
                last = data[max(o, o + c - 16) : o + c]
                assert with_tails.has_tail[k]
                assert with_tails.tail[k].tobytes() == last.rjust(16, b"\x00"), k
                assert with_tails.lead[k].tobytes() == data[o : o + 2]


def test_scan_heads_many_distinct_headers(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    # every tile its own header (e.g. per-tile Huffman tables): parsed one by one
    tiles = [tile(rng, seg(0xC4, rng.bytes(40)), seg(0xFE, b"C%d" % n)) for n in range(400)]
    path = tmp_path / "tiles.bin"
    data, offs, cnts = write_tiles(path, tiles)
    with open(path, "rb") as fh:
        got = streams.scan_heads(fh.fileno(), len(data), np.array(offs), np.array(cnts))
    want_end, want_drops = reference(data, offs, cnts)
    assert got.header_end.tolist() == want_end
    assert sorted(got.drops) == sorted(want_drops) == list(range(400))


def test_scan_heads_names_the_bad_tile(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    tiles = [tile(rng) for _ in range(200)]
    tiles[57] = b"\x00\x01" + tiles[57][2:]  # no SOI
    path = tmp_path / "tiles.bin"
    data, offs, cnts = write_tiles(path, tiles)
    with open(path, "rb") as fh, pytest.raises(streams.HeadError) as e:
        streams.scan_heads(fh.fileno(), len(data), np.array(offs), np.array(cnts))
    assert (e.value.index, e.value.problem) == (57, "malformed")
    tiles[57] = tile(rng, seg(0xFE, b"B" * 5000))
    data, offs, cnts = write_tiles(path, tiles)
    with open(path, "rb") as fh, pytest.raises(streams.HeadError) as e:
        streams.scan_heads(fh.fileno(), len(data), np.array(offs), np.array(cnts), head_max=4096)
    assert (e.value.index, e.value.problem) == (57, "incomplete")


# --- the verifier on a real slide: every region, both engines -------------------------------
@pytest.fixture(scope="module")
def svs_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    src = SLIDES / "aperio" / "CMU-1-Small-Region.svs"
    if not src.is_file():
        pytest.fail(f"sample slide missing: {src}")
    out = tmp_path_factory.mktemp("scan") / "out.svs"
    report = deidentify(src, out, SlideFormat.APERIO_SVS, P)
    return out, report.identifying_values


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(streams, "ENGINES", (request.param,))
    return str(request.param)


def planted(out: Path, tmp_path: Path, at: int, value: bytes) -> Path:
    data = bytearray(out.read_bytes())
    data[at : at + len(value)] = value
    bad = tmp_path / "bad.svs"
    bad.write_bytes(bytes(data))
    return bad


def test_verifier_clean_output_passes(svs_out: tuple[Path, list[bytes]], engine: str) -> None:
    out, values = svs_out
    verify(out, SlideFormat.APERIO_SVS, values, DeidPolicy(buffer_size=64 << 10))


def test_verifier_finds_a_value_in_every_region(
    svs_out: tuple[Path, list[bytes]], tmp_path: Path, engine: str
) -> None:
    out, values = svs_out
    st = read_tiff(out)
    value = b"PLANTED-NAME-0042"
    offs, cnts = st.ifds[0].segment_arrays()
    k = 5  # not one of the tiles the verifier decodes
    places = {
        "entropy data of a tile": int(offs[k] + cnts[k] // 2),
        "header of a tile": int(offs[k]) + 2,
        "image data across a window boundary": (int(offs[k]) // (64 << 10) + 1) * (64 << 10) - 7,
    }
    meta = [(s, e) for s, e in st.metadata_regions() if e - s > len(value) + 4]
    places["a tag value / IFD"] = meta[-1][0] + 2
    policy = DeidPolicy(buffer_size=64 << 10)
    for where, at in places.items():
        bad = planted(out, tmp_path, at, value)
        for regions in (st.metadata_regions(), []):  # metadata search, and the whole-file one
            with pytest.raises(DeidRejected) as e:
                search_forbidden(bad, [value], regions, policy)
            assert e.value.reason == "VERIFICATION_FAILED", where
            assert "PLANTED" not in str(e.value)
        search_forbidden(out, [value], st.metadata_regions(), policy)  # not in the clean one
    # whole verify, value inside the entropy data of an undecoded tile
    bad = planted(out, tmp_path, places["entropy data of a tile"], value)
    with pytest.raises(DeidRejected) as e:
        verify(bad, SlideFormat.APERIO_SVS, [*values, value], policy)
    assert e.value.reason == "VERIFICATION_FAILED" and "output bytes" in e.value.detail
    # after the last IFD (trailing bytes): caught by the byte accounting and the search
    data = out.read_bytes() + value
    (tail := tmp_path / "tail.bin").write_bytes(data)
    with pytest.raises(DeidRejected):
        search_forbidden(tail, [value], [], policy)


def test_verifier_finds_a_marker_in_entropy_data(
    svs_out: tuple[Path, list[bytes]], tmp_path: Path, engine: str
) -> None:
    out, values = svs_out
    st = read_tiff(out)
    offs, cnts = st.ifds[0].segment_arrays()
    for k, at in ((6, int(offs[6] + cnts[6] // 2)), (9, int(offs[9] + cnts[9]) - 4)):
        bad = planted(out, tmp_path, at, b"\xff\xe1")
        with pytest.raises(DeidRejected) as e:
            verify(bad, SlideFormat.APERIO_SVS, values, DeidPolicy(buffer_size=64 << 10))
        assert e.value.reason == "VERIFICATION_FAILED"
        assert f"IFD 0: tile {k} carries a comment/APPn segment after its header" in str(e.value)


def test_verifier_with_more_markers_than_the_early_search_keeps(
    svs_out: tuple[Path, list[bytes]],
    tmp_path: Path,
    engine: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search that runs beside the structure checks records text markers without knowing
    yet where entropy-coded data is; past its limit it hands over to the sequential search,
    which gives the same verdicts."""
    verify_mod = importlib.import_module("services.deid.engine.verify")  # not the function
    out, values = svs_out
    st = read_tiff(out)
    offs, cnts = st.ifds[0].segment_arrays()
    policy = DeidPolicy(buffer_size=64 << 10)
    verify(out, SlideFormat.APERIO_SVS, values, policy)  # the clean output has a few markers
    calls: list[int] = []
    sequential = verify_mod._scan_output

    def counted(*args: object, **kwargs: object) -> None:
        calls.append(1)
        sequential(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(verify_mod, "_scan_output", counted)
    monkeypatch.setattr(verify_mod, "_EARLY_MARKER_HITS", 0)
    verify(out, SlideFormat.APERIO_SVS, values, policy)  # clean: still passes
    bad = planted(out, tmp_path, int(offs[6] + cnts[6] // 2), b"\xff\xfe")
    with pytest.raises(DeidRejected) as e:
        verify(bad, SlideFormat.APERIO_SVS, values, policy)
    assert calls  # the first marker was already one too many: decided sequentially
    assert "IFD 0: tile 6 carries a comment/APPn segment after its header" in str(e.value)
    value = b"PLANTED-NAME-0043"
    bad = planted(out, tmp_path, int(offs[5] + cnts[5] // 2), value)
    with pytest.raises(DeidRejected) as e:
        verify(bad, SlideFormat.APERIO_SVS, [*values, value], policy)
    assert "output bytes" in e.value.detail


@pytest.mark.parametrize("threads", [1, 2])
def test_scan_file_stops_on_first_hit(tmp_path: Path, threads: int) -> None:
    path = tmp_path / "b.bin"
    path.write_bytes(b"\x01" * 100_000 + b"SECRET-1" + b"\x01" * 100_000 + b"SECRET-1")
    ps = streams.PatternSet([b"SECRET-1"])
    seen: list[int] = []

    def stop(_ps: streams.PatternSet, _k: int, at: int) -> bool:
        seen.append(at)
        return True

    with open(path, "rb") as fh:
        size = path.stat().st_size
        assert streams.scan_file(fh.fileno(), [(0, size, ps)], stop, 8192, threads) is True
    assert seen[0] in (100_000, 200_008) and len(seen) <= threads


@pytest.mark.parametrize("threads", [1, 2])
def test_unmapped_after_scan(tmp_path: Path, threads: int) -> None:
    # a mapping is released even when the hit handler raises
    path = tmp_path / "b.bin"
    path.write_bytes(b"\x01" * 10_000 + b"SECRET-1" + b"\x01" * 10_000)
    ps = streams.PatternSet([b"SECRET-1"])

    def boom(_ps: streams.PatternSet, _k: int, _at: int) -> bool:
        raise KeyError("stop")

    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(KeyError):
            streams.scan_file(fd, [(0, 20_008, ps)], boom, window=4096, threads=threads)
    finally:
        os.close(fd)


def test_verifier_checks_every_tile_end(
    svs_out: tuple[Path, list[bytes]], tmp_path: Path, engine: str
) -> None:
    out, values = svs_out
    offs, cnts = read_tiff(out).ifds[0].segment_arrays()
    end = int(offs[5] + cnts[5])
    # zero padding after the end marker is allowed ...
    verify(planted(out, tmp_path, end - 4, b"\xff\xd9\x00\x00"), SlideFormat.APERIO_SVS, values)
    # ... a tile that does not end with EOI is not
    with pytest.raises(DeidRejected) as e:
        verify(planted(out, tmp_path, end - 4, b"\xff\xd9\x00\x01"), SlideFormat.APERIO_SVS, values)
    assert e.value.reason == "CORRUPT_IMAGE_DATA" and "tile 5" in e.value.detail
