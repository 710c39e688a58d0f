"""De-identification of 3DHISTECH MRXS slides (uploaded as a bundle, see
services/shared/wsi/bundle.py).

An MRXS slide is ``<name>.mrxs`` plus the folder ``<name>/`` with ``Slidedat.ini`` (an INI file:
slide name, project, barcode, creation time, the pyramid layout), an index file and
``Data*.dat`` files packing JPEG images. The index (``"01.02"`` + SLIDE_ID, then two pointers
to the hierarchical and non-hierarchical record tables, each record a linked list of pages of
little-endian int32 items) says where every image lies: the pyramid levels
(HIER_0 "Slide zoom level") and the non-hierarchical layers - camera positions and, in
"Scan data layer", the slide label (barcode), the slide preview (macro) and thumbnail photos.

What the output keeps:

* ``Slidedat.ini`` rewritten from a keep-list: known structural/optical keys (validated
  values), SLIDE_ID replaced by a keyed pseudonym, identifying keys (SLIDE_NAME,
  PROJECT_NAME, SLIDE_BARCODE, creation times...) removed. A key no rule knows rejects the
  slide, naming the key. Sections and layers are renumbered canonically.
* The pyramid images, byte for byte at their original offsets (data files keep their size).
* Camera position layers (numbers only; checked).
* Nothing else: the label, preview and thumbnail images are dropped from the index and their
  bytes - like every byte no kept record refers to (data-file headers, removed layers) - are
  zeroed. Extra hierarchical layers (focus levels) are dropped; OpenSlide reads HIER_0 only.
* Neutral names: ``slide.mrxs`` (empty), ``slide/Slidedat.ini``, ``slide/Index.dat``,
  ``slide/DataNNNN.dat``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.deid.engine.model import (
    MALFORMED_FILE,
    UNSUPPORTED_COMPRESSION,
    UNSUPPORTED_STRUCTURE,
    DeidPolicy,
    DeidRejected,
    Tally,
)
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi import bundle, codestream

UNKNOWN_MRXS_KEY = "UNKNOWN_MRXS_KEY"
UNKNOWN_MRXS_LAYER = "UNKNOWN_MRXS_LAYER"
UNEXPECTED_MRXS_VALUE = "UNEXPECTED_MRXS_VALUE"

INDEX_VERSION = b"01.02"
OUT_MRXS = "slide.mrxs"
OUT_DIR = "slide"
OUT_INDEX = "Index.dat"
ZOOM_LAYER = "Slide zoom level"
SCAN_DATA_LAYER = "Scan data layer"
POSITION_LAYERS = frozenset({"VIMSLIDE_POSITION_BUFFER", "StitchingIntensityLayer"})
ASSOCIATED_VALUES = {
    "ScanDataLayer_SlideBarcode": "label",
    "ScanDataLayer_SlidePreview": "macro",
    "ScanDataLayer_SlideThumbnail": "thumbnail",
}
POSITION_RECORD = 9  # flag byte + int32 x + int32 y
_MAX_PAGES = 1 << 20
_MAX_POSITION_BYTES = 64 << 20
_MAX_INDEX_BYTES = 256 << 20

_INT = re.compile(r"^-?\d{1,9}$")
_NUM = re.compile(r"^-?\d{1,9}(?:\.\d{1,12})?(?:[eE][-+]?\d{1,3})?$")
_VERSION = re.compile(r"^\d{1,3}(?:\.\d{1,3}){0,3}$")
_DEVICE = re.compile(r"^[A-Za-z0-9 ._\-()/+,]{0,64}$")
_WORD = re.compile(r"^[A-Za-z ]{0,32}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

# GENERAL keys kept (value must match; DEVICE_KEYS are removed instead when they do not)
GENERAL_KEEP: dict[str, re.Pattern[str]] = {
    "SLIDE_VERSION": _VERSION,
    "CURRENT_SLIDE_VERSION": _VERSION,
    "SLIDE_TYPE": _WORD,
    "IMAGENUMBER_X": _INT,
    "IMAGENUMBER_Y": _INT,
    "OBJECTIVE_MAGNIFICATION": _INT,
    "CameraImageDivisionsPerSide": _INT,
    "OBJECTIVE_NAME": _DEVICE,
    "CAMERA_TYPE": _DEVICE,
    "MICROSCOPE_TYPE": _DEVICE,
}
DEVICE_KEYS = frozenset({"OBJECTIVE_NAME", "CAMERA_TYPE", "MICROSCOPE_TYPE"})
# GENERAL keys that identify the slide, the patient, the project or the time of scanning
GENERAL_REMOVE = frozenset(
    {
        "SLIDE_NAME",
        "PROJECT_NAME",
        "SLIDE_BARCODE",
        "SLIDE_LABEL",
        "SLIDE_COMMENT",
        "SLIDE_DESCRIPTION",
        "SLIDE_CREATIONDATETIME",
        "SLIDE_UTC_CREATIONDATETIME",
        "SLIDE_MODIFICATIONDATETIME",
        "SCANNER_SERIAL_NUMBER",
        "SCANNER_NAME",
        "COMPUTER_NAME",
        "OPERATOR_NAME",
        "USER_NAME",
    }
)
SLIDE_ID = "SLIDE_ID"
LEVEL_KEEP: dict[str, re.Pattern[str]] = {
    "OVERLAP_X": _NUM,
    "OVERLAP_Y": _NUM,
    "MICROMETER_PER_PIXEL_X": _NUM,
    "MICROMETER_PER_PIXEL_Y": _NUM,
    "IMAGE_FORMAT": re.compile(r"^JPEG$"),
    "IMAGE_CONCAT_FACTOR": _INT,
    "IMAGE_FILL_COLOR_BGR": _INT,
    "DIGITIZER_WIDTH": _INT,
    "DIGITIZER_HEIGHT": _INT,
}
_HIER_KEY = re.compile(
    r"^(?:(?:NON)?HIER_COUNT|INDEXFILE|(?:NON)?HIER_\d{1,4}_(?:NAME|COUNT|VAL_\d{1,6}(?:_SECTION)?))$"
)
_DATAFILE_KEY = re.compile(r"^(?:FILE_COUNT|FILE_\d{1,6})$")
# structural vocabulary that is never identifying (not fed to the forbidden-value search)
_VOCABULARY = frozenset({"JPEG", "PNG", "BMP24", "default", ZOOM_LAYER, SCAN_DATA_LAYER})


def key_label(key: str) -> str:
    """A key as it may appear in a rejection detail: only plain key-like names are quoted."""
    return key if _SAFE_NAME.match(key) else "a key with an unusual name"


@dataclass
class Layer:
    name: str
    values: list[tuple[str, str]]  # (value, section name)


@dataclass
class Item:
    file: int
    offset: int
    length: int
    image: int = 0  # hierarchical items: image index


@dataclass
class Parsed:
    ini: bundle.IniFile
    hier: list[Layer]
    nonhier: list[Layer]
    datafiles: list[str]
    index_name: str
    slide_id: str


@dataclass(frozen=True)
class MrxsResult:
    level_dimensions: list[tuple[int, int]]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    output_size: int


def _layers(ini: bundle.IniFile, kind: str) -> list[Layer]:
    count = ini.int("HIERARCHICAL", f"{kind}_COUNT") if kind in ("HIER", "NONHIER") else 0
    if not 0 <= count <= 256:
        raise DeidRejected(MALFORMED_FILE, f"Slidedat.ini {kind}_COUNT out of range")
    layers = []
    for i in range(count):
        name = ini.get("HIERARCHICAL", f"{kind}_{i}_NAME")
        n = ini.int("HIERARCHICAL", f"{kind}_{i}_COUNT")
        if name is None or not 0 < n <= 4096:
            raise DeidRejected(MALFORMED_FILE, f"Slidedat.ini {kind}_{i} is incomplete")
        values = []
        for j in range(n):
            val = ini.get("HIERARCHICAL", f"{kind}_{i}_VAL_{j}")
            sec = ini.get("HIERARCHICAL", f"{kind}_{i}_VAL_{j}_SECTION", "")
            if val is None:
                raise DeidRejected(MALFORMED_FILE, f"Slidedat.ini {kind}_{i}_VAL_{j} is missing")
            values.append((val, sec or ""))
        layers.append(Layer(name, values))
    return layers


def parse(ini_bytes: bytes) -> Parsed:
    try:
        ini = bundle.parse_ini(ini_bytes)
        for sec in ("GENERAL", "HIERARCHICAL", "DATAFILE"):
            if sec not in ini.sections:
                raise DeidRejected(MALFORMED_FILE, f"Slidedat.ini has no [{sec}] section")
        hier = _layers(ini, "HIER")
        nonhier = _layers(ini, "NONHIER")
        nfiles = ini.int("DATAFILE", "FILE_COUNT")
    except bundle.BundleError as exc:
        raise DeidRejected(MALFORMED_FILE, exc.message) from exc
    if not hier or hier[0].name != ZOOM_LAYER:
        raise DeidRejected(UNSUPPORTED_STRUCTURE, "HIER_0 is not the slide zoom level")
    if not 0 < nfiles <= 4096:
        raise DeidRejected(MALFORMED_FILE, "Slidedat.ini FILE_COUNT out of range")
    files = []
    for i in range(nfiles):
        name = ini.get("DATAFILE", f"FILE_{i}") or ""
        if not _SAFE_NAME.match(name) or name in (".", ".."):
            raise DeidRejected(MALFORMED_FILE, f"Slidedat.ini FILE_{i} is not a plain file name")
        files.append(name)
    index = ini.get("HIERARCHICAL", "INDEXFILE") or ""
    if not _SAFE_NAME.match(index) or index in (".", ".."):
        raise DeidRejected(MALFORMED_FILE, "Slidedat.ini INDEXFILE is not a plain file name")
    slide_id = ini.get("GENERAL", SLIDE_ID) or ""
    if not slide_id or len(slide_id) > 256:
        raise DeidRejected(MALFORMED_FILE, "Slidedat.ini SLIDE_ID is missing")
    return Parsed(ini, hier, nonhier, files, index, slide_id)


# --- index -----------------------------------------------------------------------------------
class _Index:
    def __init__(self, data: bytes, slide_id: str) -> None:
        head = INDEX_VERSION + slide_id.encode("utf-8")
        if not data.startswith(head):
            raise DeidRejected(MALFORMED_FILE, "the index file does not match Slidedat.ini")
        self.data = data
        self.roots = self._ints(len(head), 2)

    def _ints(self, at: int, n: int) -> tuple[int, ...]:
        if at < 0 or at + 4 * n > len(self.data):
            raise DeidRejected(MALFORMED_FILE, "an index pointer lies outside the index file")
        return struct.unpack_from(f"<{n}i", self.data, at)

    def record(self, table: int, n: int, width: int) -> list[tuple[int, ...]]:
        """Items of record ``n`` of a root table (linked pages of ``width``-int items)."""
        (page,) = self._ints(table + 4 * n, 1)
        items: list[tuple[int, ...]] = []
        seen: set[int] = set()
        while True:
            if page in seen or len(seen) > _MAX_PAGES:
                raise DeidRejected(MALFORMED_FILE, "the index file has a page loop")
            seen.add(page)
            count, nxt = self._ints(page, 2)
            if count < 0 or count * 4 * width > len(self.data):
                raise DeidRejected(MALFORMED_FILE, "an index page count is out of range")
            body = self._ints(page + 8, count * width)
            items.extend(body[k : k + width] for k in range(0, len(body), width))
            if nxt == 0:
                return items
            page = nxt


def _items(
    index: _Index, table: int, n: int, hier: bool, nfiles: int, sizes: list[int]
) -> list[Item]:
    out = []
    for it in index.record(table, n, 4 if hier else 5):
        image, off, length, fileno = (it[0], it[1], it[2], it[3]) if hier else (0, *it[2:5])
        if min(image, off, length, fileno) < 0 or fileno >= nfiles:
            raise DeidRejected(MALFORMED_FILE, "an index item is out of range")
        if off + length > sizes[fileno]:
            raise DeidRejected(MALFORMED_FILE, "an index item runs past the end of its data file")
        out.append(Item(fileno, off, length, image))
    return out


def _page(items: list[tuple[int, ...]], buf: bytearray) -> int:
    """Append an empty first page and one page holding ``items``; returns the first page."""
    first = len(buf)
    buf += struct.pack("<ii", 0, first + 8)
    buf += struct.pack("<ii", len(items), 0)
    for it in items:
        buf += struct.pack(f"<{len(it)}i", *it)
    return first


def build_index(slide_id: str, levels: list[list[Item]], nonhier: list[list[Item]]) -> bytes:
    buf = bytearray(INDEX_VERSION + slide_id.encode("ascii"))
    roots = len(buf)
    buf += b"\x00" * 8
    hier_root = len(buf)
    buf += b"\x00" * (4 * len(levels))
    non_root = len(buf)
    buf += b"\x00" * (4 * len(nonhier))
    for n, items in enumerate(levels):
        p = _page([(i.image, i.offset, i.length, i.file) for i in items], buf)
        struct.pack_into("<i", buf, hier_root + 4 * n, p)
    for n, items in enumerate(nonhier):
        p = _page([(0, 0, i.offset, i.length, i.file) for i in items], buf)
        struct.pack_into("<i", buf, non_root + 4 * n, p)
    struct.pack_into("<ii", buf, roots, hier_root, non_root)
    return bytes(buf)


# --- rules -----------------------------------------------------------------------------------
def _identifying(tally: Tally, value: str) -> None:
    if value not in _VOCABULARY and not _NUM.match(value):
        tally.identifying(value)


def new_slide_id(pseudonymizer: Pseudonymizer, slide_id: str) -> str:
    """A keyed replacement for SLIDE_ID: stable per node, 32 upper-case hex digits."""
    pseudo = pseudonymizer.pseudonym("slide", slide_id)
    return hashlib.sha256(pseudo.encode()).hexdigest()[:32].upper()


def clean_general(p: Parsed, pseudonymizer: Pseudonymizer, tally: Tally) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in p.ini.sections["GENERAL"].items():
        if key == SLIDE_ID:
            tally.pseudonymize("mrxs_key.SLIDE_ID", value)
            out.append((key, new_slide_id(pseudonymizer, value)))
        elif key in GENERAL_KEEP:
            if GENERAL_KEEP[key].match(value):
                out.append((key, value))
            elif key in DEVICE_KEYS:
                tally.remove(f"mrxs_key.{key}", value)
            else:
                raise DeidRejected(
                    UNEXPECTED_MRXS_VALUE, f"Slidedat.ini [GENERAL] {key} holds an unexpected value"
                )
        elif key in GENERAL_REMOVE:
            if value:
                tally.remove(f"mrxs_key.{key}", value)
        elif tally.unknown("mrxs", f"GENERAL.{key}", UNKNOWN_MRXS_KEY, "Slidedat.ini [GENERAL]"):
            out.append((key, value))  # a steward's KEEP rule for this key
        elif value:
            # dropped (a REMOVE rule, or held for review: nothing is written then)
            tally.remove(f"mrxs_key.{key_label(key)}", value)
    for key in ("IMAGENUMBER_X", "IMAGENUMBER_Y", "OBJECTIVE_MAGNIFICATION"):
        if key not in dict(out):
            raise DeidRejected(MALFORMED_FILE, f"Slidedat.ini [GENERAL] {key} is missing")
    return out


def _held(tally: Tally, key: str, reason: str, where: str, values: list[str]) -> None:
    """A level key, layer or section no rule knows: held for review under ``mrxs:<key>``; a
    steward's "remove" rule drops it. Only [GENERAL] keys can be kept by a rule: the rest
    shapes how the pyramid is read, and the output describes only what is known."""
    tally.unknown_removable("mrxs", key, reason, where)
    tally.remove(f"mrxs_unknown.{key.split('.', 1)[0].lower()}")
    for value in values:
        _identifying(tally, value)


def clean_level(p: Parsed, n: int, section: str, tally: Tally) -> list[tuple[str, str]]:
    keys = p.ini.sections.get(section)
    if keys is None:
        raise DeidRejected(MALFORMED_FILE, f"Slidedat.ini has no section for zoom level {n}")
    out = []
    for key, value in keys.items():
        pattern = LEVEL_KEEP.get(key)
        if pattern is None:
            where = f"Slidedat.ini [zoom level {n}]"
            _held(tally, f"LEVEL.{key}", UNKNOWN_MRXS_KEY, where, [value])
            continue
        if not pattern.match(value):
            if key == "IMAGE_FORMAT":
                raise DeidRejected(UNSUPPORTED_COMPRESSION, f"zoom level {n} images are not JPEG")
            raise DeidRejected(
                UNEXPECTED_MRXS_VALUE, f"Slidedat.ini [zoom level {n}] {key} is not a number"
            )
        out.append((key, value))
    missing = set(LEVEL_KEEP) - {k for k, _ in out}
    if missing:
        raise DeidRejected(
            MALFORMED_FILE, f"Slidedat.ini [zoom level {n}] lacks {sorted(missing)[0]}"
        )
    return out


def _check_position_data(src: bundle.Source, item: Item, layer: str) -> None:
    with open(src.path, "rb") as fh:
        fh.seek(src.offset + item.offset)
        raw = fh.read(min(item.length, _MAX_POSITION_BYTES))
    if layer == "StitchingIntensityLayer":
        try:
            d = zlib.decompressobj()
            raw = d.decompress(raw, _MAX_POSITION_BYTES)
        except zlib.error as exc:
            raise DeidRejected(MALFORMED_FILE, "camera positions do not decompress") from exc
    if len(raw) % POSITION_RECORD or any(raw[k] > 1 for k in range(0, len(raw), POSITION_RECORD)):
        raise DeidRejected(UNEXPECTED_MRXS_VALUE, "the camera position layer holds other data")


# --- the slide -------------------------------------------------------------------------------
def _sources(
    src: Path, members: dict[str, bundle.Member], names: list[str], scratch: Path
) -> list[bundle.Source]:
    """The bytes of each named member: in place when stored (a bundle built by the CLI),
    else inflated once into ``scratch``."""
    out = []
    for i, name in enumerate(names):
        m = members.get(name)
        if m is None:
            raise DeidRejected(MALFORMED_FILE, f"data file FILE_{i} is missing from the bundle")
        try:
            where = bundle.stored_source(src, m)
            if where is None:
                path = bundle.extract(src, scratch / f"m{i}", [m])[m.name]
                where = bundle.Source(path, 0, path.stat().st_size)
        except bundle.BundleError as exc:
            raise DeidRejected(exc.reason, exc.message) from exc
        out.append(where)
    return out


def _small(src: Path, members: dict[str, bundle.Member], name: str, what: str, cap: int) -> bytes:
    m = members.get(name)
    if m is None:
        raise DeidRejected(MALFORMED_FILE, f"{what} is missing from the bundle")
    try:
        return bundle.read_member(src, m, cap)
    except bundle.BundleError as exc:
        raise DeidRejected(MALFORMED_FILE, f"{what} is too large or corrupt") from exc


def deidentify_mrxs(
    src: Path,
    lay: bundle.BundleLayout,
    scratch: Path,
    pseudonymizer: Pseudonymizer,
    policy: DeidPolicy,
    tally: Tally,
) -> tuple[MrxsResult, list[tuple[str, bytes | bundle.MemberWriter]]]:
    """De-identify the MRXS slide of bundle ``src``; returns the result and the members of
    the output bundle (data files as writers that stream kept bytes from the input)."""
    d = lay.data_dir
    members = {m.name: m for m in lay.members}
    p = parse(_small(src, members, f"{d}/Slidedat.ini", "Slidedat.ini", bundle.SLIDEDAT_MAX_BYTES))
    general = clean_general(p, pseudonymizer, tally)
    sources = _sources(src, members, [f"{d}/{n}" for n in p.datafiles], scratch)
    index = _Index(
        _small(src, members, f"{d}/{p.index_name}", "the index file", _MAX_INDEX_BYTES), p.slide_id
    )
    sizes = [q.size for q in sources]
    hier_root, non_root = index.roots
    zoom = p.hier[0]
    levels: list[list[Item]] = []
    level_keys: list[list[tuple[str, str]]] = []
    for n, (_val, section) in enumerate(zoom.values):
        level_keys.append(clean_level(p, n, section, tally))
        items = _items(index, hier_root, n, True, len(p.datafiles), sizes)
        if not items:
            raise DeidRejected(MALFORMED_FILE, f"zoom level {n} has no image")
        levels.append(items)
    for _extra in p.hier[1:]:
        tally.remove("mrxs_layer.hierarchical")  # focus levels etc.: OpenSlide reads HIER_0 only
        for _val, section in _extra.values:
            for value in p.ini.sections.get(section, {}).values():
                _identifying(tally, value)
    kept_layers: list[tuple[str, list[list[Item]]]] = []
    record = 0
    for i, layer in enumerate(p.nonhier):
        recs = []
        for val, section in layer.values:
            items = _items(index, non_root, record, False, len(p.datafiles), sizes)
            record += 1
            recs.append(items)
            if layer.name == SCAN_DATA_LAYER:
                kind = ASSOCIATED_VALUES.get(val)
                if kind is None:
                    raise DeidRejected(
                        UNKNOWN_MRXS_LAYER, f"Slidedat.ini NONHIER_{i} holds an unknown value"
                    )
                tally.remove(f"mrxs_associated_image.{kind}")
            for value in p.ini.sections.get(section, {}).values():
                _identifying(tally, value)
        if layer.name in POSITION_LAYERS:
            for items in recs:
                for it in items:
                    _check_position_data(sources[it.file], it, layer.name)
            kept_layers.append((layer.name, recs))
        elif layer.name != SCAN_DATA_LAYER:  # its records are not kept (their bytes zeroed)
            # (the values of its sections were collected above)
            where = f"Slidedat.ini NONHIER_{i}"
            _held(tally, f"LAYER.{layer.name}", UNKNOWN_MRXS_LAYER, where, [])
    _check_sections(p, tally)
    for key in p.ini.sections["HIERARCHICAL"]:
        if not _HIER_KEY.match(key):
            raise DeidRejected(
                UNKNOWN_MRXS_KEY, f"Slidedat.ini [HIERARCHICAL] {key_label(key)} is not a known key"
            )
    for key in p.ini.sections["DATAFILE"]:
        if not _DATAFILE_KEY.match(key):
            raise DeidRejected(
                UNKNOWN_MRXS_KEY, f"Slidedat.ini [DATAFILE] {key_label(key)} is not a known key"
            )
    tally.raise_for_review()  # items no rule knows: the slide is held, nothing is written
    # tiles are copied verbatim: text segments inside them cannot be stripped in place
    for n, items in enumerate(levels):
        by_file: dict[int, list[tuple[int, int]]] = {}
        for it in items:
            base = sources[it.file].offset
            by_file.setdefault(it.file, []).append((base + it.offset, it.length))
        for fileno, frags in by_file.items():
            with open(sources[fileno].path, "rb") as fh:
                bad = codestream.frame_text_problem(fh, frags)
            if bad is not None:
                raise DeidRejected(
                    UNEXPECTED_MRXS_VALUE, f"a zoom level {n} image carries a JPEG comment/APPn"
                )
    # output
    new_id = dict(general).get(SLIDE_ID, "")
    kept_nonhier = [items for _name, recs in kept_layers for items in recs]
    keep: dict[int, list[tuple[int, int]]] = {}
    for it in [i for lv in levels for i in lv] + [i for r in kept_nonhier for i in r]:
        keep.setdefault(it.file, []).append((it.offset, it.offset + it.length))
    names = [f"Data{i:04d}.dat" for i in range(len(sources))]
    out: list[tuple[str, bytes | bundle.MemberWriter]] = []
    zeroed = 0
    for i, source in enumerate(sources):
        spans = _merge(keep.get(i, []))
        zeroed += source.size - sum(e - s for s, e in spans)
        out.append((f"{OUT_DIR}/{names[i]}", _kept_writer(source, spans, policy.buffer_size)))
    if zeroed:
        tally.remove("mrxs_unreferenced_data")
    ini_text = _render_ini(general, level_keys, kept_layers, names)
    out += [
        (OUT_MRXS, b""),
        (f"{OUT_DIR}/{OUT_INDEX}", build_index(new_id, levels, kept_nonhier)),
        (f"{OUT_DIR}/Slidedat.ini", ini_text.encode("utf-8")),
    ]
    dropped = (
        set(members)
        - {f"{d}/Slidedat.ini", f"{d}/{p.index_name}"}
        - {f"{d}/{n}" for n in p.datafiles}
        - {lay.mrxs_name}
    )
    if dropped:
        tally.remove("mrxs_unreferenced_file")
    geo = bundle.mrxs_geometry(bundle.parse_ini(ini_text.encode()))
    return (
        MrxsResult(list(geo.level_dimensions), geo.mpp_x, geo.mpp_y, geo.objective_power, 0),
        out,
    )


def _check_sections(p: Parsed, tally: Tally) -> None:
    """A section no layer refers to is not written to the output; it is held for review
    (``mrxs:SECTION.<name>``) until a rule removes it."""
    known = {"GENERAL", "HIERARCHICAL", "DATAFILE"}
    for layer in p.hier + p.nonhier:
        known |= {sec for _v, sec in layer.values if sec}
    for name in sorted(set(p.ini.sections) - known):
        values = list(p.ini.sections[name].values())
        _held(tally, f"SECTION.{name}", UNKNOWN_MRXS_KEY, "Slidedat.ini", values)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _kept_writer(
    src: bundle.Source, spans: list[tuple[int, int]], buffer_size: int
) -> bundle.MemberWriter:
    """A data file of the same size as ``src`` holding the bytes of ``spans`` (merged, in
    order) and zeros everywhere else, so every kept offset stays valid."""
    zeros = bytes(min(buffer_size, 1 << 20))

    def write(fout: IO[bytes]) -> None:
        def fill(n: int) -> None:
            while n:
                k = min(n, len(zeros))
                fout.write(zeros[:k])
                n -= k

        with open(src.path, "rb") as fin:
            pos = 0
            for s, e in spans:
                fill(s - pos)
                fin.seek(src.offset + s)
                left = e - s
                while left:
                    chunk = fin.read(min(left, buffer_size))
                    if not chunk:
                        raise DeidRejected(MALFORMED_FILE, "a data file ended early")
                    fout.write(chunk)
                    left -= len(chunk)
                pos = e
            fill(src.size - pos)

    return bundle.MemberWriter(src.size, write)


def _render_ini(
    general: list[tuple[str, str]],
    levels: list[list[tuple[str, str]]],
    layers: list[tuple[str, list[list[Item]]]],
    datafiles: list[str],
) -> str:
    lines = ["[GENERAL]", *(f"{k}={v}" for k, v in general), "[HIERARCHICAL]"]
    lines += ["HIER_COUNT=1", f"HIER_0_NAME={ZOOM_LAYER}", f"HIER_0_COUNT={len(levels)}"]
    for n in range(len(levels)):
        lines += [
            f"HIER_0_VAL_{n}=ZoomLevel_{n}",
            f"HIER_0_VAL_{n}_SECTION=LAYER_0_LEVEL_{n}_SECTION",
        ]
    lines.append(f"NONHIER_COUNT={len(layers)}")
    sections: list[str] = []
    for i, (name, recs) in enumerate(layers):
        lines += [f"NONHIER_{i}_NAME={name}", f"NONHIER_{i}_COUNT={len(recs)}"]
        for j in range(len(recs)):
            val = "default" if name == "VIMSLIDE_POSITION_BUFFER" else "StitchingIntensityLevel"
            sec = f"NONHIERLAYER_{i}_LEVEL_{j}_SECTION"
            lines += [f"NONHIER_{i}_VAL_{j}={val}", f"NONHIER_{i}_VAL_{j}_SECTION={sec}"]
            sections.append(sec)
    lines += [f"INDEXFILE={OUT_INDEX}", "[DATAFILE]", f"FILE_COUNT={len(datafiles)}"]
    lines += [f"FILE_{i}={n}" for i, n in enumerate(datafiles)]
    for n, keys in enumerate(levels):
        lines.append(f"[LAYER_0_LEVEL_{n}_SECTION]")
        lines += [f"{k}={v}" for k, v in keys]
    lines += [f"[{sec}]" for sec in sections]
    return "\r\n".join(lines) + "\r\n"


def deidentify_mrxs_bundle(
    src: Path, dst: Path, pseudonymizer: Pseudonymizer, policy: DeidPolicy, tally: Tally
) -> MrxsResult:
    """Read the bundle in place (deflated members are inflated to scratch beside ``dst``),
    de-identify, and stream the output bundle to ``dst``: for a stored bundle the data files
    are read once and written once."""
    try:
        lay = bundle.layout(src)
    except bundle.BundleError as exc:
        raise DeidRejected(exc.reason, exc.message) from exc
    if lay.kind != bundle.KIND_MRXS:
        raise DeidRejected("FORMAT_MISMATCH", "the bundle does not hold an MRXS slide")
    with bundle_scratch(dst) as tmp:
        res, members = deidentify_mrxs(src, lay, tmp, pseudonymizer, policy, tally)
        size = bundle.pack(dst, members)
    return MrxsResult(res.level_dimensions, res.mpp_x, res.mpp_y, res.objective_power, size)


@contextlib.contextmanager
def bundle_scratch(dst: Path) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=dst.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unpack_bundle(src: Path, dest: Path, kind: str) -> tuple[bundle.BundleLayout, dict[str, Path]]:
    try:
        lay = bundle.layout(src)
        if lay.kind != kind:
            raise DeidRejected("FORMAT_MISMATCH", f"the bundle does not hold a {kind} slide")
        return lay, bundle.extract(src, dest, lay.members)
    except bundle.BundleError as exc:
        raise DeidRejected(exc.reason, exc.message) from exc
