"""Property-based fuzzing (Hypothesis) of the upload path and the de-identification parsers.

Seeds are valid slides from `tests/fixtures/wsigen.py` (SVS, NDPI, generic TIFF, BigTIFF,
DICOM WSM) and codestream heads (JPEG with COM/APPn, JPEG 2000 with COM, an ICC profile).
Hypothesis draws a seed and a list of mutations - byte flips, truncation, insertions and
deletions, block copies, and integers of 2/4/8 bytes written over the structural fields of
the seed (TIFF header, IFD entry counts/types/counts/offsets, next-IFD pointers, out-of-line
value offsets; DICOM element headers and encapsulated item lengths) - and the mutated bytes go
to a target.

Every case runs in a worker process (address space limited) with a 10 s limit. The
property: the target returns, or raises one of its domain errors (`DeidRejected`,
`InvalidSlide`, `TiffError`, `CodestreamError`, the `TesseraError` family); anything else, a
dead worker or a case over the limit is a finding. Findings are written (bytes + what
happened) under `FUZZ_FINDINGS` (default `.tessera/fuzz/findings`) for reproduction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing as mp
import os
import resource
import struct
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
CASE_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 120.0  # a fresh worker's imports, not counted in a case's time
WORKER_MEMORY_BYTES = 3 * 1024**3

# --- seeds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    fmt: str  # SlideFormat value, or "codestream"/"icc"
    hot: tuple[int, ...]  # offsets of structural fields
    byteorder: str = "<"


def _tiff_hot(data: bytes) -> tuple[tuple[int, ...], str]:
    from services.shared.wsi import tiff

    st_ = tiff.read_tiff(data)
    bo = st_.byteorder
    hot: set[int] = set(range(0, min(16, len(data))))
    big = st_.flavor is tiff.TiffFlavor.BIGTIFF
    head, entry, cnt_w = (8, 20, 8) if big else (2, 12, 4)
    for ifd in st_.all_ifds():
        hot.add(ifd.offset)
        n = len(ifd.tags)
        for i in range(n):
            e = ifd.offset + head + i * entry
            hot.update({e, e + 2, e + 4, e + 4 + cnt_w})
        hot.add(ifd.offset + head + n * entry)  # next-IFD pointer
        for tag in ifd.tags.values():
            if tag.value_offset is not None:
                hot.add(tag.value_offset)
    return tuple(sorted(p for p in hot if p < len(data))), bo


def _dicom_hot(data: bytes) -> tuple[int, ...]:
    hot: set[int] = set(range(128, 140))
    for marker in (b"\xfe\xff\x00\xe0", b"\xe0\x7f\x10\x00", b"\x28\x00\x10\x00"):
        at = data.find(marker)
        while at != -1 and len(hot) < 4000:
            hot.update({at, at + 4})
            at = data.find(marker, at + 4)
    for group in (b"\x02\x00", b"\x08\x00", b"\x10\x00", b"\x28\x00", b"\x48\x00"):
        at = data.find(group, 132)
        while at != -1 and at < 4096:
            hot.update({at, at + 4, at + 6})
            at = data.find(group, at + 2)
    return tuple(sorted(p for p in hot if p < len(data)))


def build_seeds(out_dir: Path) -> dict[str, Seed]:
    """Writes the seed slides into `out_dir` (a few hundred kB each) and returns them."""
    from tests.fixtures import wsigen

    out_dir.mkdir(parents=True, exist_ok=True)

    def rng(name: str) -> np.random.Generator:
        return np.random.default_rng([7, *name.encode()])

    fixtures = {
        "svs": wsigen.aperio_svs(out_dir, rng("svs"), variant="classic", name="seed_svs"),
        "ndpi": wsigen.hamamatsu_ndpi(out_dir, rng("ndpi"), name="seed_ndpi"),
        "tiff": wsigen.generic_tiff(out_dir, rng("tiff"), name="seed_tiff")[0],
        "bigtiff": wsigen.generic_tiff(out_dir, rng("big"), bigtiff=True, name="seed_big")[0],
        "dicom": wsigen.dicom_wsm(out_dir, rng("dicom"), name="seed_dicom"),
    }
    seeds: dict[str, Seed] = {}
    for key, fx in fixtures.items():
        data = fx.path.read_bytes()
        if key == "dicom":
            seeds[key] = Seed(key, data, fx.fmt.value, _dicom_hot(data))
        else:
            hot, bo = _tiff_hot(data)
            seeds[key] = Seed(key, data, fx.fmt.value, hot, bo)
    # codestream heads: a JPEG tile with a comment and an APP1, a JPEG 2000 stream with COM
    jpeg_tile = fixtures["svs"].level_segments[0][0]
    jpeg = wsigen.with_comment(jpeg_tile, b"PLANT-fuzz comment")
    seeds["jpeg"] = Seed("jpeg", jpeg, "codestream", tuple(range(0, min(len(jpeg), 400))))
    import imagecodecs

    arr = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    j2k = bytes(imagecodecs.jpeg2k_encode(arr, level=80, codecformat="j2k"))
    com = b"\xff\x64" + struct.pack(">HH", 4 + 10, 1) + b"PLANT-j2k!"
    j2k = j2k[:2] + com + j2k[2:]  # a COM right after SOC (in the main header)
    seeds["j2k"] = Seed("j2k", j2k, "codestream", tuple(range(0, min(len(j2k), 300))))
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    seeds["icc"] = Seed("icc", icc, "icc", tuple(range(128, min(len(icc), 400))))
    return seeds


# --- mutations -----------------------------------------------------------------------------

INTERESTING = (
    0,
    1,
    2,
    7,
    8,
    0x7F,
    0xFF,
    0x100,
    0x7FFF,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 32,
    1 << 40,
    (1 << 63) - 1,
    (1 << 64) - 1,
)


def mutation(seed: Seed) -> st.SearchStrategy[tuple[Any, ...]]:
    n = max(len(seed.data), 1)
    # Hypothesis favours small integers; scrambling spreads "anywhere" over the whole file
    # instead of piling the mutations onto the first bytes (the header).
    anywhere = st.integers(0, n - 1).map(lambda p: (p * 0x9E3779B1) % n)
    header = [p for p in seed.hot if p < 16]
    structure = [p for p in seed.hot if p >= 16] or header
    if seed.hot:
        fields = st.sampled_from(structure)
        pos = st.one_of(fields, fields, fields, anywhere, anywhere, st.sampled_from(header or [0]))
    else:
        pos = anywhere
    width = st.sampled_from((1, 2, 4, 8))
    value = st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << 64) - 1))
    near_size = st.integers(max(0, n - 64), n + 64)  # offsets just inside/outside the file
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("int"), pos, width, st.one_of(value, near_size)),
        st.tuples(st.just("truncate"), anywhere),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("copy"), pos, pos, st.integers(2, 256)),
    )


def apply(seed: Seed, ops: Sequence[tuple[Any, ...]]) -> bytes:
    buf = bytearray(seed.data)
    for op in ops:
        kind = op[0]
        if not buf:
            break
        if kind == "flip":
            p = op[1] % len(buf)
            buf[p] ^= op[2]
        elif kind == "int":
            p, w, v = op[1] % len(buf), op[2], op[3] & ((1 << (8 * op[2])) - 1)
            fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[w]
            raw = struct.pack(seed.byteorder + fmt, v)
            buf[p : p + w] = raw[: len(buf) - p]
        elif kind == "truncate":
            del buf[op[1] % len(buf) :]
        elif kind == "insert":
            p = op[1] % (len(buf) + 1)
            buf[p:p] = op[2]
        elif kind == "delete":
            p = op[1] % len(buf)
            del buf[p : p + op[2]]
        elif kind == "copy":
            src, dst, k = op[1] % len(buf), op[2] % len(buf), op[3]
            block = bytes(buf[src : src + k])
            buf[dst : dst + len(block)] = block
    return bytes(buf)


# --- targets (run inside the worker) -------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    seeds: tuple[str, ...]
    run: Callable[[bytes, Seed, Path], str]  # returns an outcome label; raises on error
    domain: Callable[[], tuple[type[BaseException], ...]]
    what: str


def _write(work: Path, data: bytes, ext: str = "bin") -> Path:
    path = work / f"case.{ext}"
    path.write_bytes(data)
    return path


def _run_sniff(data: bytes, seed: Seed, work: Path) -> str:
    from services.shared.wsi.sniff import sniff, sniff_file

    a = sniff(data[:65536], "upload")
    b = sniff_file(_write(work, data))
    return f"{a.value}/{b.value}"


def _run_tiff(data: bytes, seed: Seed, work: Path) -> str:
    from services.shared.wsi import tiff

    st_ = tiff.read_tiff(_write(work, data))
    for ifd in st_.ifds:  # the image chain (EXIF/GPS child IFDs hold no image data)
        tiff.check_segments(ifd, st_.file_size)
    st_.metadata_regions()
    return "parsed"


def _run_inspect(data: bytes, seed: Seed, work: Path) -> str:
    from services.shared.wsi.sniff import SlideLimits, inspect_slide, sniff_file

    path = _write(work, data)
    fmt = sniff_file(path)
    if not fmt.supported:
        return f"not-inspected:{fmt.value}"
    info = inspect_slide(path, fmt, SlideLimits())
    return f"valid:{info.format.value}"


def _run_codestream(data: bytes, seed: Seed, work: Path) -> str:
    import io

    from services.shared.wsi import codestream

    if seed.fmt == "icc":
        clean, _texts = codestream.icc_profile_texts(data)
        return f"icc-clean={clean}"
    scan = codestream.scan_header(data)
    if scan is None:
        return "incomplete"
    if scan.drops:
        head, skip = codestream.rewrite_head(data, scan)
        again = codestream.scan_header(head + data[skip:])
        if again is not None and again.drops:
            raise AssertionError("rewritten head still holds droppable segments")
    problem = codestream.frame_text_problem(io.BytesIO(data), [(0, len(data))])
    return f"scanned:drops={len(scan.drops)}:problem={problem is not None}"


_INSPECTION_FAILURES: list[str] = []


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "slide inspection failed":
            _INSPECTION_FAILURES.append(str(record.__dict__.get("reason", "?")))


def _run_upload(data: bytes, seed: Seed, work: Path) -> str:
    """Ingestion core over in-memory fakes: header, chunks of 64 kB, finish."""
    from services.ingestion.core import Ingestion, IngestionLimits, UploadHeader
    from services.shared.access import Action, StaticAccessChecker
    from services.shared.adapters.memory import (
        InMemoryBus,
        InMemoryDocumentStore,
        InMemoryObjectStore,
    )
    from services.shared.auth import Principal
    from services.shared.events import ALL_TOPICS, EventEmitter
    from services.shared.outbox import Outbox
    from services.shared.pseudonym import Pseudonymizer

    async def go() -> str:
        docs, objects, bus = InMemoryDocumentStore(), InMemoryObjectStore(), InMemoryBus()
        await bus.ensure_topics(list(ALL_TOPICS))
        publisher = bus.publisher()
        await publisher.start()
        core = Ingestion(
            spool_dir=work / "spool",
            uploads=docs.collection("uploads"),
            objects=objects,
            quarantine_bucket="quarantine",
            access=StaticAccessChecker({("fuzz", "ds-fuzz"): {Action.ACTION_UPLOAD}}, {"ds-fuzz"}),
            outbox=Outbox(docs.collection("outbox"), EventEmitter("fuzz", publisher)),
            pseudonymizer=Pseudonymizer(b"k" * 32, "fuzz"),
            limits=IngestionLimits(),
        )
        await core.ensure_ready()
        header = UploadHeader(
            "ds-fuzz", f"case.{seed.fmt}", len(data), hashlib.sha256(data).hexdigest()
        )
        session = await core.begin(Principal("fuzz"), header)
        for off in range(0, len(data), 65536):
            await core.write_chunk(session, off, data[off : off + 65536])
        result = await core.finish(session)
        return f"accepted:{result.format}"

    _INSPECTION_FAILURES.clear()
    try:
        return asyncio.run(go())
    finally:
        if _INSPECTION_FAILURES:
            # The fail-closed fallback answered MALFORMED_FILE, but a parser raised something
            # other than its domain error: a finding all the same.
            raise ParserEscape(_INSPECTION_FAILURES[0])


class ParserEscape(Exception):
    """A parser raised a non-domain exception that the upload path's fallback caught."""


def _run_deid(data: bytes, seed: Seed, work: Path) -> str:
    from services.deid.engine import DeidPolicy, deidentify_and_verify
    from services.shared.pseudonym import Pseudonymizer
    from services.shared.wsi.sniff import SlideFormat

    src = _write(work, data)
    dst = work / "out.bin"
    fmt = SlideFormat(seed.fmt)  # as ingestion recorded it for the original upload
    deidentify_and_verify(src, dst, fmt, Pseudonymizer(b"k" * 32, "fuzz"), DeidPolicy())
    return "deidentified"


def _deid_domain() -> tuple[type[BaseException], ...]:
    from services.deid.engine import DeidRejected

    return (DeidRejected,)


def _sniff_domain() -> tuple[type[BaseException], ...]:
    # sniffing answers a format; only a DICOM preamble over unreadable file meta is refused
    # (InvalidSlide MALFORMED_FILE), which its callers handle
    from services.shared.wsi.sniff import InvalidSlide

    return (InvalidSlide,)


def _tiff_domain() -> tuple[type[BaseException], ...]:
    from services.shared.wsi.tiff import TiffError

    return (TiffError,)


def _inspect_domain() -> tuple[type[BaseException], ...]:
    from services.shared.wsi.sniff import InvalidSlide

    return (InvalidSlide,)


def _codestream_domain() -> tuple[type[BaseException], ...]:
    from services.shared.wsi.codestream import CodestreamError

    return (CodestreamError,)


def _upload_domain() -> tuple[type[BaseException], ...]:
    from services.shared.errors import TesseraError

    return (TesseraError,)


SLIDES = ("svs", "ndpi", "tiff", "bigtiff", "dicom")
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("sniff", SLIDES, _run_sniff, _sniff_domain, "sniff + sniff_file"),
        Target(
            "tiff_parse",
            ("svs", "ndpi", "tiff", "bigtiff"),
            _run_tiff,
            _tiff_domain,
            "TIFF/BigTIFF/NDPI reader",
        ),
        Target("inspect", SLIDES, _run_inspect, _inspect_domain, "sniff + inspect_slide"),
        Target(
            "codestream",
            ("jpeg", "j2k", "icc"),
            _run_codestream,
            _codestream_domain,
            "JPEG/J2K header scan+rewrite, ICC",
        ),
        Target("upload", SLIDES, _run_upload, _upload_domain, "ingestion core (fakes)"),
        Target("deid_svs", ("svs",), _run_deid, _deid_domain, "deidentify+verify SVS"),
        Target("deid_ndpi", ("ndpi",), _run_deid, _deid_domain, "deidentify+verify NDPI"),
        Target("deid_tiff", ("tiff",), _run_deid, _deid_domain, "deidentify+verify TIFF"),
        Target("deid_bigtiff", ("bigtiff",), _run_deid, _deid_domain, "deidentify+verify BigTIFF"),
        Target("deid_dicom", ("dicom",), _run_deid, _deid_domain, "deidentify+verify DICOM"),
    )
}


# --- worker --------------------------------------------------------------------------------


def _worker(conn: Any, seeds: dict[str, Seed]) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    logging.getLogger().handlers[:] = [_Capture()]
    logging.getLogger().setLevel(logging.WARNING)
    import warnings

    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="tessera-fuzz-"))
    _warm()
    conn.send(("ready", "", ""))
    while True:
        job = conn.recv()
        if job is None:
            return
        target_name, seed_name, data = job
        target = TARGETS[target_name]
        case = work / "c"
        case.mkdir(exist_ok=True)
        try:
            label = target.run(data, seeds[seed_name], case)
            conn.send(("ok", label, ""))
        except target.domain() as exc:
            conn.send(("domain", str(getattr(exc, "reason", type(exc).__name__)), ""))
        except BaseException as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in tb[::-1][:4])
            conn.send(("bug", f"{type(exc).__name__}", f"{where}: {str(exc)[:200]}"))
        finally:
            for p in case.glob("**/*"):
                if p.is_file():
                    p.unlink(missing_ok=True)


def _warm() -> None:
    """Import what the targets import, so that a case's time limit measures the case, not a
    fresh worker's start-up on a loaded machine."""
    import importlib

    for module in (
        "imagecodecs",
        "PIL.ImageCms",
        "pydicom",
        "services.deid.engine",
        "services.ingestion.core",
        "services.shared.adapters.memory",
        "services.shared.wsi.codestream",
        "services.shared.wsi.sniff",
        "services.shared.wsi.tiff",
    ):
        importlib.import_module(module)


@dataclass
class Outcome:
    kind: str  # ok | domain | bug | hang | crash
    label: str
    detail: str
    seconds: float


class Runner:
    """A worker process that runs one case at a time; replaced after a hang or a crash."""

    def __init__(self, seeds: dict[str, Seed], timeout_s: float = CASE_TIMEOUT_S) -> None:
        self._seeds = seeds
        self._timeout = timeout_s
        # spawn, not fork: the parent may run gRPC or Kafka client threads
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker, args=(child, self._seeds), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        try:
            ready = parent.poll(STARTUP_TIMEOUT_S) and parent.recv()[0] == "ready"
        except EOFError:
            ready = False
        if not ready:
            self._kill()
            raise RuntimeError(f"the fuzz worker did not start within {STARTUP_TIMEOUT_S:.0f}s")

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        self._proc = None

    def run(self, target: str, seed: str, data: bytes) -> Outcome:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        started = time.monotonic()
        self._conn.send((target, seed, data))
        if not self._conn.poll(self._timeout):
            self._kill()
            return Outcome("hang", f">{self._timeout:.0f}s", "", time.monotonic() - started)
        try:
            kind, label, detail = self._conn.recv()
        except EOFError:
            code = self._proc.exitcode if self._proc is not None else None
            self._kill()
            return Outcome("crash", f"exit {code}", "", time.monotonic() - started)
        return Outcome(kind, label, detail, time.monotonic() - started)

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(5)
        self._kill()


# --- driving Hypothesis ----------------------------------------------------------------------


@dataclass
class Tally:
    target: str
    cases: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)
    findings: list[dict[str, Any]] = field(default_factory=list)
    slowest_s: float = 0.0

    @property
    def bad(self) -> int:
        return self.kinds["bug"] + self.kinds["hang"] + self.kinds["crash"]


def findings_dir() -> Path:
    return Path(os.environ.get("FUZZ_FINDINGS", REPO / ".tessera" / "fuzz" / "findings"))


def fuzz(
    target: str,
    examples: int,
    runner: Runner,
    seeds: dict[str, Seed],
    *,
    derandomize: bool,
    keep_findings: bool = True,
) -> Tally:
    """Run `examples` Hypothesis cases of `target`; never raises for a finding (counted)."""
    spec = TARGETS[target]
    tally = Tally(target)
    pool = [seeds[s] for s in spec.seeds]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        phases=[Phase.generate],  # no shrinking: a hang would be re-run for 10 s each time
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def case(data: st.DataObject) -> None:
        seed = data.draw(st.sampled_from(pool), label="seed")
        ops = data.draw(st.lists(mutation(seed), min_size=1, max_size=6), label="mutations")
        payload = apply(seed, ops)
        out = runner.run(target, seed.name, payload)
        tally.cases += 1
        tally.kinds[out.kind] += 1
        tally.labels[f"{out.kind}:{out.label}"] += 1
        tally.slowest_s = max(tally.slowest_s, out.seconds)
        if out.kind in ("bug", "hang", "crash"):
            digest = hashlib.sha256(payload).hexdigest()[:16]
            finding = {
                "target": target,
                "seed": seed.name,
                "kind": out.kind,
                "label": out.label,
                "detail": out.detail,
                "seconds": round(out.seconds, 2),
                "mutations": [list(map(_jsonable, op)) for op in ops],
                "file": f"{target}-{digest}.bin",
            }
            tally.findings.append(finding)
            if keep_findings:
                out_dir = findings_dir()
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / finding["file"]).write_bytes(payload)
                (out_dir / f"{target}-{digest}.json").write_text(json.dumps(finding, indent=2))

    case()
    return tally


def _jsonable(v: Any) -> Any:
    return v.hex() if isinstance(v, bytes) else v
