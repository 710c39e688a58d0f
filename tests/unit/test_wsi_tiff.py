"""TIFF/BigTIFF/NDPI structure parser and verbatim-copy writer."""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tifffile

from services.shared.wsi import tiff
from services.shared.wsi.tiff import (
    OutIfd,
    OutTag,
    TiffError,
    TiffFlavor,
    TiffLimits,
    read_tiff,
    write_tiff,
)

SLIDES = Path(__file__).resolve().parents[2].parent / "shared" / "slides"

TIFF_SAMPLES = [
    "aperio/CMU-1-Small-Region.svs",
    "aperio/small.svs",
    "aperio/tcga-cr-7395-01a-01-ts1.svs",
    "hamamatsu/test3-DAPI-2-(387).ndpi",
    "hamamatsu/test3-TRITC 2 (560).ndpi",
    "generic-tiff/boxes.tiff",
    "generic-tiff/yb10kx5k.zstd.tiff",
    "broken/unreadable.svs",
    "broken/unopenable.tiff",
    "ome-tiff/4D-series.ome.tiff",
    "perkinelmer-qptiff/small_vectra.qptiff",
    "olympus-vsi/vsi-ets-test-jpg2k.vsi",
]


@pytest.fixture(scope="module", autouse=True)
def _slides_present() -> None:
    if not SLIDES.is_dir():
        pytest.fail(f"sample slides missing: {SLIDES}")


def slide(name: str) -> Path:
    p = SLIDES / name
    if not p.is_file():
        pytest.fail(f"sample slide missing: {p}")
    return p


# --- a tiny TIFF builder for hostile inputs --------------------------------------------------
class Builder:
    """Assembles classic or BigTIFF bytes entry by entry (no validation on purpose)."""

    def __init__(self, bo: str = "<", big: bool = False) -> None:
        self.bo = bo
        self.big = big
        self.buf = bytearray()
        mark = b"II" if bo == "<" else b"MM"
        if big:
            self.buf += mark + struct.pack(bo + "HHHQ", 43, 8, 0, 0)
        else:
            self.buf += mark + struct.pack(bo + "HI", 42, 0)

    def blob(self, data: bytes) -> int:
        if len(self.buf) % 2:
            self.buf += b"\x00"
        at = len(self.buf)
        self.buf += data
        return at

    def ifd(self, entries: Sequence[tuple[int, int, int, bytes | int]], next_ifd: int = 0) -> int:
        bo, big = self.bo, self.big
        inline = 8 if big else 4
        resolved = []
        for code, dtype, count, val in entries:
            if isinstance(val, int):
                field = struct.pack(bo + ("Q" if big else "I"), val)  # explicit offset/value
            elif len(val) <= inline:
                field = val.ljust(inline, b"\x00")
            else:
                field = struct.pack(bo + ("Q" if big else "I"), self.blob(val))
            resolved.append((code, dtype, count, field))
        if len(self.buf) % 2:
            self.buf += b"\x00"
        at = len(self.buf)
        if big:
            self.buf += struct.pack(bo + "Q", len(resolved))
            for code, dtype, count, field in resolved:
                self.buf += struct.pack(bo + "HHQ", code, dtype, count) + field
            self.buf += struct.pack(bo + "Q", next_ifd)
        else:
            self.buf += struct.pack(bo + "H", len(resolved))
            for code, dtype, count, field in resolved:
                self.buf += struct.pack(bo + "HHI", code, dtype, count) + field
            self.buf += struct.pack(bo + "I", next_ifd)
        return at

    def set_next(self, ifd_at: int, target: int) -> None:
        bo, big = self.bo, self.big
        n = struct.unpack_from(bo + ("Q" if big else "H"), self.buf, ifd_at)[0]
        pos = ifd_at + (8 + 20 * n if big else 2 + 12 * n)
        struct.pack_into(bo + ("Q" if big else "I"), self.buf, pos, target)

    def set_first(self, target: int) -> None:
        if self.big:
            struct.pack_into(self.bo + "Q", self.buf, 8, target)
        else:
            struct.pack_into(self.bo + "I", self.buf, 4, target)

    def data(self) -> bytes:
        return bytes(self.buf)


def short(v: int, bo: str = "<") -> bytes:
    return struct.pack(bo + "H", v)


def long_(v: int, bo: str = "<") -> bytes:
    return struct.pack(bo + "I", v)


def minimal_entries(
    width: int = 16, height: int = 16, data_at: int = 8, nbytes: int = 4
) -> list[tuple[int, int, int, bytes | int]]:
    return [
        (256, tiff.SHORT, 1, short(width)),
        (257, tiff.SHORT, 1, short(height)),
        (259, tiff.SHORT, 1, short(1)),
        (273, tiff.LONG, 1, long_(data_at)),
        (279, tiff.LONG, 1, long_(nbytes)),
    ]


def one_ifd_file(entries: Sequence[tuple[int, int, int, bytes | int]]) -> bytes:
    b = Builder()
    at = b.ifd(entries)
    b.set_first(at)
    return b.data()


# --- parsing real files ----------------------------------------------------------------------
@pytest.mark.parametrize("name", TIFF_SAMPLES)
def test_parser_agrees_with_tifffile(name: str) -> None:
    path = slide(name)
    st = read_tiff(path)
    with tifffile.TiffFile(path, is_ndpi=name.endswith(".ndpi")) as tf:
        pages = list(tf.pages)
        assert len(st.ifds) == len(pages)
        for ifd, page in zip(st.ifds, pages, strict=True):
            assert isinstance(page, tifffile.TiffPage)
            assert set(ifd.tags) == {t.code for t in page.tags}
            assert (ifd.width, ifd.height) == (page.imagewidth, page.imagelength)
            assert ifd.compression == int(page.compression)
            if not name.endswith(".ndpi"):  # tifffile re-tiles NDPI strips by McuStarts
                segs = ifd.segments()
                assert [o for o, _ in segs] == list(page.dataoffsets)
                assert [c for _, c in segs] == list(page.databytecounts)
            for tag in page.tags:
                if tag.dtype == tiff.ASCII:
                    mine = ifd.tags[tag.code].text()
                    assert mine.strip("\x00 \r\n") == str(tag.value).strip("\x00 \r\n")


def test_flavours_and_byte_orders() -> None:
    assert read_tiff(slide("aperio/CMU-1-Small-Region.svs")).flavor is TiffFlavor.CLASSIC
    big = read_tiff(slide("generic-tiff/yb10kx5k.zstd.tiff"))
    assert big.flavor is TiffFlavor.BIGTIFF and big.byteorder == "<"
    ndpi = read_tiff(slide("hamamatsu/test3-DAPI-2-(387).ndpi"))
    assert ndpi.flavor is TiffFlavor.NDPI and ndpi.header_size == 12
    ome = read_tiff(slide("ome-tiff/4D-series.ome.tiff"))
    assert ome.byteorder == ">" and ome.flavor is TiffFlavor.CLASSIC and len(ome.ifds) == 35


def test_ndpi_details() -> None:
    st = read_tiff(slide("hamamatsu/test3-DAPI-2-(387).ndpi"))
    lenses = [ifd.tags[tiff.NDPI_SOURCE_LENS].floats()[0] for ifd in st.ifds]
    assert lenses == [40.0, 20.0, 10.0, 5.0, -1.0, -2.0]
    level0 = st.ifds[0]
    assert len(level0.segments()) == 1  # one JPEG strip per level
    assert len(level0.tags[tiff.NDPI_MCU_STARTS].ints()) == 608


def test_first_only_and_bytes_source() -> None:
    data = slide("aperio/small.svs").read_bytes()
    st = read_tiff(data, first_only=True)
    assert len(st.ifds) == 1
    assert (st.ifds[0].description or "").startswith("Aperio")


def test_metadata_regions_cover_ifds_and_values() -> None:
    st = read_tiff(slide("aperio/small.svs"))
    regions = st.metadata_regions()
    assert regions[0] == (0, 8)
    for ifd in st.ifds:
        assert (ifd.offset, ifd.offset + ifd.block_size) in regions


# --- hostile files ---------------------------------------------------------------------------
def test_ifd_loop_to_itself() -> None:
    b = Builder()
    at = b.ifd(minimal_entries())
    b.set_next(at, at)
    b.set_first(at)
    with pytest.raises(TiffError) as e:
        read_tiff(b.data())
    assert e.value.reason == "IFD_LOOP"


def test_ifd_loop_two_cycle() -> None:
    b = Builder()
    a = b.ifd(minimal_entries())
    c = b.ifd(minimal_entries(), next_ifd=a)
    b.set_next(a, c)
    b.set_first(a)
    with pytest.raises(TiffError) as e:
        read_tiff(b.data())
    assert e.value.reason == "IFD_LOOP"


def test_subifd_loop() -> None:
    b = Builder()
    at = b.ifd([*minimal_entries(), (330, tiff.LONG, 1, long_(0))])
    # make the SubIFDs pointer refer back to the parent IFD
    n = struct.unpack_from("<H", b.buf, at)[0]
    for i in range(n):
        if struct.unpack_from("<H", b.buf, at + 2 + 12 * i)[0] == 330:
            struct.pack_into("<I", b.buf, at + 2 + 12 * i + 8, at)
    b.set_first(at)
    with pytest.raises(TiffError) as e:
        read_tiff(b.data())
    assert e.value.reason == "IFD_LOOP"


def test_first_ifd_offset_past_eof() -> None:
    b = Builder()
    b.ifd(minimal_entries())
    b.set_first(10_000_000)
    with pytest.raises(TiffError) as e:
        read_tiff(b.data())
    assert e.value.reason == "TRUNCATED"


def test_tag_value_offset_past_eof() -> None:
    data = one_ifd_file([*minimal_entries(), (270, tiff.ASCII, 100, 50_000_000)])
    with pytest.raises(TiffError) as e:
        read_tiff(data)
    assert e.value.reason == "TRUNCATED"


def test_tag_count_2_pow_40_bigtiff() -> None:
    b = Builder(big=True)
    at = b.ifd([(256, tiff.SHORT, 1, short(16)), (324, tiff.LONG8, 2**40, 16)])
    b.set_first(at)
    with pytest.raises(TiffError) as e:
        read_tiff(b.data())
    assert e.value.reason == "TAG_COUNT_TOO_LARGE"


def test_tag_count_huge_classic() -> None:
    data = one_ifd_file([*minimal_entries(), (324, tiff.LONG, 0xFFFFFFFF, 8)])
    with pytest.raises(TiffError) as e:
        read_tiff(data)
    assert e.value.reason == "TAG_COUNT_TOO_LARGE"


def test_tag_bytes_limit() -> None:
    data = one_ifd_file([*minimal_entries(), (270, tiff.ASCII, 4096, b"x" * 4096)])
    with pytest.raises(TiffError) as e:
        read_tiff(data, TiffLimits(max_tag_bytes=1024))
    assert e.value.reason == "TAG_TOO_LARGE"


def test_total_metadata_budget() -> None:
    entries = [*minimal_entries()] + [
        (60000 + i, tiff.UNDEFINED, 2000, b"z" * 2000) for i in range(10)
    ]
    with pytest.raises(TiffError) as e:
        read_tiff(one_ifd_file(entries), TiffLimits(max_total_tag_bytes=10_000))
    assert e.value.reason == "METADATA_TOO_LARGE"


def test_too_many_ifds() -> None:
    b = Builder()
    prev = None
    first = None
    for _ in range(40):
        at = b.ifd(minimal_entries())
        if prev is not None:
            b.set_next(prev, at)
        first = first if first is not None else at
        prev = at
    assert first is not None
    b.set_first(first)
    assert len(read_tiff(b.data()).ifds) == 40
    with pytest.raises(TiffError) as e:
        read_tiff(b.data(), TiffLimits(max_ifds=32))
    assert e.value.reason == "TOO_MANY_IFDS"


def test_too_many_tags_per_ifd() -> None:
    entries = [(40000 + i, tiff.SHORT, 1, short(i)) for i in range(1100)]
    with pytest.raises(TiffError) as e:
        read_tiff(one_ifd_file(entries))
    assert e.value.reason == "TOO_MANY_TAGS"


def test_unknown_field_type_duplicate_and_empty_ifd() -> None:
    with pytest.raises(TiffError) as e:
        read_tiff(one_ifd_file([*minimal_entries(), (40000, 99, 1, b"\x00")]))
    assert e.value.reason == "UNKNOWN_FIELD_TYPE"
    with pytest.raises(TiffError) as e:
        read_tiff(one_ifd_file([*minimal_entries(), (256, tiff.SHORT, 1, short(3))]))
    assert e.value.reason == "DUPLICATE_TAG"
    with pytest.raises(TiffError) as e:
        read_tiff(one_ifd_file([]))
    assert e.value.reason == "EMPTY_IFD"


def test_ifd_entries_truncated() -> None:
    data = one_ifd_file(minimal_entries())
    with pytest.raises(TiffError) as e:
        read_tiff(data[:-8])
    assert e.value.reason == "TRUNCATED"


def test_truncated_real_file() -> None:
    data = slide("aperio/CMU-1-Small-Region.svs").read_bytes()
    with pytest.raises(TiffError) as e:
        read_tiff(data[: len(data) // 2])
    assert e.value.reason == "TRUNCATED"


def test_not_a_tiff() -> None:
    for junk in (
        b"",
        b"II",
        b"hello world, not a tiff",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"II\x2a\x00\x00\x00\x00\x00",
    ):
        with pytest.raises(TiffError):
            read_tiff(junk)


def test_ascii_tag_with_raw_bytes_is_kept_raw() -> None:
    raw = b"Scan\xff\xfe\x00by \xc3\x28 op\x00"
    st = read_tiff(one_ifd_file([*minimal_entries(), (270, tiff.ASCII, len(raw), raw)]))
    tag = st.ifds[0].tags[270]
    assert tag.data == raw  # byte-exact
    assert isinstance(tag.text(), str)  # decoding never raises (Latin-1 fallback)
    assert tag.raw_text() == raw.rstrip(b"\x00")


def test_error_messages_carry_no_values() -> None:
    secret = b"PATIENT-JOHN-DOE-1234"
    data = one_ifd_file(
        [*minimal_entries(), (270, tiff.ASCII, len(secret), secret), (40000, 99, 1, b"\x00")]
    )
    with pytest.raises(TiffError) as e:
        read_tiff(data)
    assert "JOHN" not in str(e.value)


def test_segments_validation() -> None:
    st = read_tiff(one_ifd_file(minimal_entries(data_at=8, nbytes=10_000)))
    with pytest.raises(TiffError) as e:
        tiff.check_segments(st.ifds[0], st.file_size)
    assert e.value.reason == "TRUNCATED"


# --- writing ---------------------------------------------------------------------------------
def rewrite_all(src: Path, dst: Path, buffer_size: int = tiff.COPY_BUFFER) -> tiff.WriteResult:
    st = read_tiff(src)
    outs = []
    for ifd in st.ifds:
        tags = [
            OutTag.copy(t)
            for c, t in ifd.tags.items()
            if c
            not in (
                tiff.DATA_OFFSET_TAGS
                | {tiff.NDPI_OFFSET_HIGH_BYTES, tiff.NDPI_BYTECOUNT_HIGH_BYTES}
            )
        ]
        outs.append(OutIfd(tags, ifd.segments(), ifd.is_tiled))
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        return write_tiff(
            fs, fd, outs, byteorder=st.byteorder, flavor=st.flavor, buffer_size=buffer_size
        )


@pytest.mark.parametrize(
    "name",
    [
        "aperio/CMU-1-Small-Region.svs",
        "aperio/tcga-cr-7395-01a-01-ts1.svs",
        "hamamatsu/test3-DAPI-2-(387).ndpi",
        "generic-tiff/boxes.tiff",
        "generic-tiff/yb10kx5k.zstd.tiff",
        "ome-tiff/4D-series.ome.tiff",
    ],
)
def test_round_trip_is_lossless(name: str, tmp_path: Path) -> None:
    src = slide(name)
    dst = tmp_path / ("out" + src.suffix)
    result = rewrite_all(src, dst)
    a, b = read_tiff(src), read_tiff(dst)
    assert b.flavor is a.flavor and b.byteorder == a.byteorder
    assert result.size == dst.stat().st_size
    src_bytes, dst_bytes = src.read_bytes(), dst.read_bytes()
    for ia, ib in zip(a.ifds, b.ifds, strict=True):
        assert set(ia.tags) == set(ib.tags)
        for code, tag in ia.tags.items():
            if code not in tiff.DATA_OFFSET_TAGS:
                assert ib.tags[code].data == tag.data
        for (oa, ca), (ob, cb) in zip(ia.segments(), ib.segments(), strict=True):
            assert ca == cb
            assert src_bytes[oa : oa + ca] == dst_bytes[ob : ob + cb]  # verbatim tiles
    is_ndpi = name.endswith(".ndpi")
    with (
        tifffile.TiffFile(src, is_ndpi=is_ndpi) as ta,
        tifffile.TiffFile(dst, is_ndpi=is_ndpi) as tb,
    ):
        for pa, pb in zip(ta.pages, tb.pages, strict=True):
            assert isinstance(pa, tifffile.TiffPage) and isinstance(pb, tifffile.TiffPage)
            if pa.compression == 52479:
                continue
            assert np.array_equal(pa.asarray(), pb.asarray())


def test_ndpi_output_keeps_layout_flavour(tmp_path: Path) -> None:
    dst = tmp_path / "x.ndpi"
    rewrite_all(slide("hamamatsu/test3-DAPI-2-(387).ndpi"), dst)
    head = dst.read_bytes()[:12]
    assert head[:4] == b"II*\x00"
    (first,) = struct.unpack("<Q", head[4:12])  # NDPI: 64-bit first IFD offset
    assert read_tiff(dst).ifds[0].offset == first


def test_small_buffer_and_user_space_copy(tmp_path: Path) -> None:
    src = slide("aperio/CMU-1-Small-Region.svs")
    st = read_tiff(src)
    outs = [
        OutIfd(
            [OutTag.copy(t) for c, t in i.tags.items() if c not in tiff.DATA_OFFSET_TAGS],
            i.segments(),
            i.is_tiled,
        )
        for i in st.ifds
    ]
    reads: list[int] = []

    class Recording(io.BytesIO):
        def readinto(self, b: object) -> int:  # type: ignore[override]
            n = super().readinto(b)  # type: ignore[arg-type]
            reads.append(n)
            return n

    srcf = Recording(src.read_bytes())
    out = io.BytesIO()
    write_tiff(srcf, out, outs, byteorder="<", flavor=st.flavor, buffer_size=64 << 10)
    assert reads and max(reads) <= 64 << 10  # bounded memory: fixed-size reads
    dst = tmp_path / "o.svs"
    dst.write_bytes(out.getvalue())
    with tifffile.TiffFile(src) as ta, tifffile.TiffFile(dst) as tb:
        assert np.array_equal(ta.pages[0].asarray(), tb.pages[0].asarray())


def test_writer_copies_only_referenced_bytes(tmp_path: Path) -> None:
    secret = b"HIDDEN-PATIENT-NAME-BETWEEN-TILES"
    b = Builder()
    t1 = b.blob(b"\x01" * 64)
    b.blob(secret)
    t2 = b.blob(b"\x02" * 64)
    at = b.ifd(
        [
            (256, tiff.SHORT, 1, short(32)),
            (257, tiff.SHORT, 1, short(16)),
            (259, tiff.SHORT, 1, short(1)),
            (322, tiff.SHORT, 1, short(16)),
            (323, tiff.SHORT, 1, short(16)),
            (324, tiff.LONG, 2, long_(t1) + long_(t2)),
            (325, tiff.LONG, 2, long_(64) + long_(64)),
        ]
    )
    b.set_first(at)
    src = tmp_path / "in.tif"
    src.write_bytes(b.data())
    dst = tmp_path / "out.tif"
    rewrite_all(src, dst)
    out = dst.read_bytes()
    assert secret not in out
    assert b"\x01" * 64 in out and b"\x02" * 64 in out


def test_writer_shared_segments_stay_shared(tmp_path: Path) -> None:
    b = Builder()
    t = b.blob(b"\x07" * 50)
    at = b.ifd(
        [
            (256, tiff.SHORT, 1, short(32)),
            (257, tiff.SHORT, 1, short(16)),
            (259, tiff.SHORT, 1, short(1)),
            (322, tiff.SHORT, 1, short(16)),
            (323, tiff.SHORT, 1, short(16)),
            (324, tiff.LONG, 2, long_(t) + long_(t)),
            (325, tiff.LONG, 2, long_(50) + long_(50)),
        ]
    )
    b.set_first(at)
    src = tmp_path / "in.tif"
    src.write_bytes(b.data())
    dst = tmp_path / "out.tif"
    res = rewrite_all(src, dst)
    assert res.segment_offsets[0][0] == res.segment_offsets[0][1]
    assert dst.read_bytes().count(b"\x07" * 50) == 1


def test_writer_rejects_segments_past_source_end(tmp_path: Path) -> None:
    src = tmp_path / "in.tif"
    src.write_bytes(one_ifd_file(minimal_entries(data_at=8, nbytes=4)))
    out = OutIfd([OutTag.ints(256, tiff.SHORT, [1], "<")], [(8, 10**9)], False)
    with open(src, "rb") as fs, pytest.raises(TiffError) as e:
        write_tiff(fs, io.BytesIO(), [out], byteorder="<", flavor=TiffFlavor.CLASSIC)
    assert e.value.reason == "TRUNCATED"


def test_writer_refuses_explicit_data_tags() -> None:
    out = OutIfd([OutTag.ints(273, tiff.LONG, [8], "<")], [(0, 1)], False)
    with pytest.raises(TiffError) as e:
        write_tiff(
            io.BytesIO(b"II*\x00" + b"\x00" * 8),
            io.BytesIO(),
            [out],
            byteorder="<",
            flavor=TiffFlavor.CLASSIC,
        )
    assert e.value.reason == "WRITER_MISUSE"


# --- beyond 4 GiB, with sparse in-memory files ---------------------------------------------
class Sparse(io.RawIOBase):
    """A seekable file that stores only non-zero chunks (reads zeros elsewhere)."""

    def __init__(self, size: int = 0) -> None:
        self.size = size
        self.chunks: dict[int, bytes] = {}
        self.pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no fd")

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        self.size = size
        self.chunks = {k: v for k, v in self.chunks.items() if k < size}
        return size

    def put(self, at: int, data: bytes) -> None:
        self.chunks[at] = data
        self.size = max(self.size, at + len(data))

    def write(self, b: object) -> int:
        arr = np.frombuffer(b, dtype=np.uint8)  # type: ignore[call-overload]
        if arr.any():
            self.chunks[self.pos] = arr.tobytes()
        self.pos += arr.size
        self.size = max(self.size, self.pos)
        return int(arr.size)

    def readinto(self, b: object) -> int:
        mv = memoryview(b)  # type: ignore[arg-type]
        n = max(0, min(len(mv), self.size - self.pos))
        np.frombuffer(mv, dtype=np.uint8)[:n] = 0
        for at, data in self.chunks.items():
            lo, hi = max(at, self.pos), min(at + len(data), self.pos + n)
            if lo < hi:
                mv[lo - self.pos : hi - self.pos] = data[lo - at : hi - at]
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else n
        buf = bytearray(max(0, min(n, self.size - self.pos)))
        self.readinto(buf)
        return bytes(buf)


GIB4 = 1 << 32


def _big_source(first_strip: int) -> tuple[Sparse, list[OutIfd]]:
    """Source with a (sparse) huge strip and a small marked strip after it."""
    src = Sparse(first_strip + 4096)
    marker = b"MARKER-STRIP-" * 8
    src.put(first_strip, marker)
    ifd_tags = [
        OutTag.ints(256, tiff.LONG, [100000], "<"),
        OutTag.ints(257, tiff.LONG, [10], "<"),
        OutTag.ints(259, tiff.SHORT, [1], "<"),
        OutTag.ints(tiff.NDPI_FORMAT_FLAG, tiff.SHORT, [1], "<"),
    ]
    outs = [
        OutIfd(list(ifd_tags), [(0, first_strip)], False),
        OutIfd(list(ifd_tags), [(first_strip, len(marker))], False),
    ]
    return src, outs


@pytest.mark.parametrize("flavor", [TiffFlavor.NDPI, TiffFlavor.CLASSIC])
def test_outputs_beyond_4gib(flavor: TiffFlavor) -> None:
    first_strip = GIB4 + (1 << 20)
    src, outs = _big_source(first_strip)
    dst = Sparse()
    res = write_tiff(src, dst, outs, byteorder="<", flavor=flavor)
    expected = TiffFlavor.NDPI if flavor is TiffFlavor.NDPI else TiffFlavor.BIGTIFF
    assert res.flavor is expected  # classic is promoted to BigTIFF, NDPI keeps its layout
    assert res.size > GIB4
    dst.seek(0)
    st = read_tiff(dst)
    assert st.flavor is expected
    ((off, cnt),) = st.ifds[1].segments()
    assert off > GIB4
    dst.seek(off)
    assert dst.read(cnt) == b"MARKER-STRIP-" * 8
    if expected is TiffFlavor.NDPI:
        assert st.ifds[1].tags[tiff.STRIP_OFFSETS].high == off >> 32


def test_copy_file_range_path(tmp_path: Path) -> None:
    # plain files on both ends: the kernel copy path; output must equal the user-space path
    src = slide("generic-tiff/boxes.tiff")
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    rewrite_all(src, a)
    st = read_tiff(src)
    outs = [
        OutIfd(
            [OutTag.copy(t) for c, t in i.tags.items() if c not in tiff.DATA_OFFSET_TAGS],
            i.segments(),
            i.is_tiled,
        )
        for i in st.ifds
    ]
    buf = io.BytesIO()
    write_tiff(io.BytesIO(src.read_bytes()), buf, outs, byteorder="<", flavor=st.flavor)
    b.write_bytes(buf.getvalue())
    assert a.read_bytes() == b.read_bytes()
    assert os.path.getsize(a) == os.path.getsize(src)
