"""Slide bundles: one ZIP holding a multi-file slide.

Two multi-file slide kinds travel as a bundle:

* **MRXS** (3DHISTECH): ``<name>.mrxs`` plus the folder ``<name>/`` holding ``Slidedat.ini``,
  the index file and the ``Data*.dat`` files;
* **DICOM series**: the instances (``.dcm`` or extensionless files starting with the DICM
  preamble) of one whole-slide series.

The ZIP is untrusted input, so every member is checked before a byte is written: no absolute
paths, no ``..``, no backslashes or drive letters, no symbolic links or other special files, no
encrypted members, no nested archives, only stored or deflated members, bounded entry count,
member size, total size and compression ratio; extraction re-counts the bytes actually
inflated. Members may sit under one common top folder (``zip -r`` of a directory), which is
stripped.

:func:`pack` writes the canonical, deterministic bundle (sorted members, fixed timestamps,
stored): the CLI uses it to build uploads (so a resumed upload has the same checksum) and
de-identification to write its output. Error messages name limits and reason codes only,
never member names (they can carry patient names).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
DICM_OFFSET = 128

# reason codes
BAD_BUNDLE = "BAD_BUNDLE"
UNSAFE_BUNDLE = "UNSAFE_BUNDLE"
BUNDLE_TOO_LARGE = "BUNDLE_TOO_LARGE"
NOT_A_SLIDE_BUNDLE = "NOT_A_SLIDE_BUNDLE"
MISSING_SLIDEDAT = "MISSING_SLIDEDAT"

KIND_MRXS = "mrxs"
KIND_DICOM = "dicom"

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


class BundleError(Exception):
    """The bundle is unacceptable. ``reason`` is a stable UPPER_SNAKE code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class BundleLimits:
    max_entries: int = 4096
    max_member_bytes: int = 16 * 1024**3
    max_total_bytes: int = 32 * 1024**3
    # inflated/compressed: slide data is already compressed, so a large ratio is a bomb
    max_ratio: int = 200
    max_name_length: int = 255


@dataclass(frozen=True)
class Member:
    name: str  # relative POSIX path inside the bundle, top folder stripped
    info: zipfile.ZipInfo


@dataclass(frozen=True)
class BundleLayout:
    kind: str  # KIND_MRXS | KIND_DICOM
    members: tuple[Member, ...]
    mrxs_name: str = ""  # MRXS: the .mrxs member
    data_dir: str = ""  # MRXS: the folder with Slidedat.ini


def is_zip(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except (IsADirectoryError, FileNotFoundError):
        return False
    return head in (ZIP_MAGIC, EMPTY_ZIP_MAGIC)


def _safe_name(raw: str, limits: BundleLimits) -> PurePosixPath:
    if not raw or len(raw) > limits.max_name_length * 4:
        raise BundleError(UNSAFE_BUNDLE, "a member has an empty or overlong name")
    if "\\" in raw or "\x00" in raw or ":" in raw:
        raise BundleError(UNSAFE_BUNDLE, "a member name holds a backslash, colon or NUL")
    if raw.startswith("/"):
        raise BundleError(UNSAFE_BUNDLE, "a member has an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise BundleError(UNSAFE_BUNDLE, "a member path leaves the bundle (..)")
    if not parts or any(len(p) > limits.max_name_length for p in parts):
        raise BundleError(UNSAFE_BUNDLE, "a member has an empty or overlong name")
    return PurePosixPath(*parts)


def _is_special(info: zipfile.ZipInfo) -> bool:
    mode = (info.external_attr >> 16) & 0xFFFF
    if info.create_system != 3 or not stat.S_IFMT(mode):  # no Unix file type: plain
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def list_members(
    path: str | os.PathLike[str], limits: BundleLimits | None = None
) -> tuple[Member, ...]:
    """The validated file members of a bundle (top folder stripped), or :class:`BundleError`."""
    limits = limits or BundleLimits()
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BundleError(BAD_BUNDLE, "the ZIP directory cannot be read") from exc
    with zf:
        infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise BundleError(BUNDLE_TOO_LARGE, f"more than {limits.max_entries} entries")
    files: list[tuple[PurePosixPath, zipfile.ZipInfo]] = []
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = _safe_name(info.filename, limits)
        if _is_special(info):
            raise BundleError(UNSAFE_BUNDLE, "a member is a symbolic link or special file")
        key = str(name).casefold()
        if key in seen:
            raise BundleError(UNSAFE_BUNDLE, "two members have the same name")
        seen.add(key)
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise BundleError(UNSAFE_BUNDLE, "a member is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BundleError(UNSAFE_BUNDLE, "a member uses a compression other than deflate")
        if name.suffix.lower() in (".zip", ".jar", ".7z", ".rar", ".gz", ".tar"):
            raise BundleError(UNSAFE_BUNDLE, "nested archives are not accepted")
        if info.file_size > limits.max_member_bytes:
            raise BundleError(BUNDLE_TOO_LARGE, f"a member exceeds {limits.max_member_bytes} bytes")
        if info.file_size > max(info.compress_size, 1) * limits.max_ratio and info.file_size > (
            1 << 20
        ):
            raise BundleError(BUNDLE_TOO_LARGE, "a member's compression ratio is implausible")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise BundleError(BUNDLE_TOO_LARGE, f"members exceed {limits.max_total_bytes} bytes")
        files.append((name, info))
    if not files:
        raise BundleError(NOT_A_SLIDE_BUNDLE, "the bundle holds no file")
    names = {str(n).casefold() for n, _ in files}
    for n, _ in files:
        if any(str(parent).casefold() in names for parent in n.parents):
            raise BundleError(UNSAFE_BUNDLE, "a member is both a file and a folder")
    # one common top folder (an archived directory) is stripped
    tops = {n.parts[0] for n, _ in files}
    strip = len(tops) == 1 and all(len(n.parts) > 1 for n, _ in files)
    out = []
    for name, info in files:
        rel = PurePosixPath(*name.parts[1:]) if strip else name
        out.append(Member(str(rel), info))
    return tuple(out)


_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError)


def read_head(path: str | os.PathLike[str], member: Member, n: int) -> bytes:
    try:
        with zipfile.ZipFile(path) as zf, zf.open(member.info) as fh:
            return fh.read(n)
    except _READ_ERRORS as exc:
        raise BundleError(BAD_BUNDLE, "a member is corrupt") from exc


def read_member(path: str | os.PathLike[str], member: Member, max_bytes: int) -> bytes:
    """A small member's bytes (Slidedat.ini), bounded."""
    if member.info.file_size > max_bytes:
        raise BundleError(BUNDLE_TOO_LARGE, f"a metadata member exceeds {max_bytes} bytes")
    try:
        with zipfile.ZipFile(path) as zf, zf.open(member.info) as fh:
            data = fh.read(max_bytes + 1)
    except _READ_ERRORS as exc:
        raise BundleError(BAD_BUNDLE, "a member is corrupt") from exc
    if len(data) > max_bytes:
        raise BundleError(BUNDLE_TOO_LARGE, f"a metadata member exceeds {max_bytes} bytes")
    return data


def layout(path: str | os.PathLike[str], limits: BundleLimits | None = None) -> BundleLayout:
    """Recognise what a bundle holds: one MRXS slide or the instances of DICOM files."""
    members = list_members(path, limits)
    mrxs = [m for m in members if "/" not in m.name and m.name.lower().endswith(".mrxs")]
    if len(mrxs) > 1:
        raise BundleError(NOT_A_SLIDE_BUNDLE, "the bundle holds more than one .mrxs slide")
    if mrxs:
        stem = mrxs[0].name[: -len(".mrxs")]
        ini = [m for m in members if m.name == f"{stem}/Slidedat.ini"]
        if not ini:
            raise BundleError(MISSING_SLIDEDAT, "the .mrxs slide has no <name>/Slidedat.ini")
        stray = [m for m in members if m is not mrxs[0] and not m.name.startswith(stem + "/")]
        if stray:
            raise BundleError(NOT_A_SLIDE_BUNDLE, "files outside the MRXS slide folder")
        return BundleLayout(KIND_MRXS, members, mrxs[0].name, stem)
    if any(m.name.endswith("Slidedat.ini") for m in members):
        raise BundleError(MISSING_SLIDEDAT, "a Slidedat.ini without its .mrxs file")
    for m in members:
        head = read_head(path, m, DICM_OFFSET + 4)
        if head[:4] in (ZIP_MAGIC, EMPTY_ZIP_MAGIC):
            raise BundleError(UNSAFE_BUNDLE, "nested archives are not accepted")
        if head[DICM_OFFSET : DICM_OFFSET + 4] != b"DICM":
            raise BundleError(NOT_A_SLIDE_BUNDLE, "a member is neither DICOM nor part of MRXS")
    return BundleLayout(KIND_DICOM, members)


def extract(
    path: str | os.PathLike[str],
    dest: Path,
    members: Iterable[Member],
    limits: BundleLimits | None = None,
) -> dict[str, Path]:
    """Write ``members`` below ``dest`` (which must be empty or new); returns name -> path.
    Inflated bytes are counted, so a member that inflates past its declared size fails."""
    limits = limits or BundleLimits()
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    out: dict[str, Path] = {}
    total = 0
    with zipfile.ZipFile(path) as zf:
        for m in members:
            target = (root / m.name).resolve()
            if root not in target.parents:
                raise BundleError(UNSAFE_BUNDLE, "a member path leaves the bundle")
            written = 0
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m.info) as src, open(target, "xb") as dst:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        written += len(chunk)
                        total += len(chunk)
                        if written > m.info.file_size or total > limits.max_total_bytes:
                            raise BundleError(BUNDLE_TOO_LARGE, "a member inflates past its size")
                        dst.write(chunk)
            except (FileExistsError, NotADirectoryError) as exc:
                raise BundleError(UNSAFE_BUNDLE, "two members have the same name") from exc
            except _READ_ERRORS as exc:
                raise BundleError(BAD_BUNDLE, "a member is corrupt (CRC or size)") from exc
            out[m.name] = target
    return out


@dataclass(frozen=True)
class Source:
    """Where a member's bytes are: a file, or a stored member in place inside its ZIP."""

    path: Path
    offset: int
    size: int


def stored_source(path: str | os.PathLike[str], member: Member) -> Source | None:
    """The in-place bytes of a stored (uncompressed) member, read without extracting it;
    None for a deflated member."""
    info = member.info
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        head = fh.read(30)
    if len(head) != 30 or head[:4] != ZIP_MAGIC:
        raise BundleError(BAD_BUNDLE, "a member's local header is missing")
    name_len, extra_len = struct.unpack_from("<HH", head, 26)
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise BundleError(BAD_BUNDLE, "a member runs past the end of the bundle")
    return Source(Path(path), start, info.file_size)


@dataclass(frozen=True)
class MemberWriter:
    """A member written by a function (streamed into the bundle, never staged on disk)."""

    size: int
    write: Callable[[IO[bytes]], None]


def pack(dst: Path, files: Sequence[tuple[str, Path | bytes | MemberWriter]]) -> int:
    """Write a canonical bundle: members in name order, stored, fixed timestamps and modes,
    so the same files always give the same bytes. Returns the bundle size."""
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, src in sorted(files, key=lambda f: f[0]):
                info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.create_system = 3
                if isinstance(src, bytes):
                    size = len(src)
                elif isinstance(src, MemberWriter):
                    size = src.size
                else:
                    size = src.stat().st_size
                with zf.open(info, "w", force_zip64=size >= 1 << 31) as fout:
                    if isinstance(src, bytes):
                        fout.write(src)
                    elif isinstance(src, MemberWriter):
                        src.write(fout)
                    else:
                        with open(src, "rb") as fin:
                            shutil.copyfileobj(fin, fout, 8 << 20)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dst.stat().st_size


# --- building an upload from local files (CLI) ----------------------------------------------
def upload_files(paths: Sequence[Path]) -> list[tuple[str, Path]] | None:
    """What to bundle for ``tessera upload PATH...``: None when a single plain slide file is
    uploaded as it is; else (bundle name, local file) pairs. A directory holding one .mrxs
    and its folder, a .mrxs file (its sibling folder is taken along), a directory of DICOM
    files, or several DICOM files are bundled. Raises ValueError for anything else."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no file given")
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        mrxs = sorted(folder.glob("*.mrxs"))
        if len(mrxs) > 1:
            raise ValueError("the directory holds more than one .mrxs slide")
        if mrxs:
            return _mrxs_files(mrxs[0])
        files = sorted(p for p in folder.iterdir() if p.is_file() and _is_dicom(p))
        if not files:
            raise ValueError("the directory holds neither a .mrxs slide nor DICOM files")
        return _dicom_files(files)
    if len(paths) == 1 and paths[0].suffix.lower() == ".mrxs":
        return _mrxs_files(paths[0])
    if len(paths) == 1:
        return None
    if not all(p.is_file() and _is_dicom(p) for p in paths):
        raise ValueError("several files can only be uploaded together when all are DICOM")
    return _dicom_files(paths)


def _is_dicom(p: Path) -> bool:
    with open(p, "rb") as fh:
        head = fh.read(DICM_OFFSET + 4)
    return head[DICM_OFFSET:] == b"DICM"


def _mrxs_files(mrxs: Path) -> list[tuple[str, Path]]:
    folder = mrxs.with_suffix("")
    if not (folder / "Slidedat.ini").is_file():
        raise ValueError("the .mrxs file has no sibling folder with Slidedat.ini")
    # neutral top names (local names can carry patient names); the folder's own files keep
    # theirs, since Slidedat.ini refers to them
    out = [("slide.mrxs", mrxs)]
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise ValueError("the MRXS folder holds a symbolic link")
        if p.is_file():
            out.append((f"slide/{p.relative_to(folder).as_posix()}", p))
    return out


def _dicom_files(files: Sequence[Path]) -> list[tuple[str, Path]]:
    # neutral member names: local file names can carry patient names
    return [(f"instance-{i:04d}.dcm", p) for i, p in enumerate(sorted(files))]


def entry_point(root: Path) -> Path:
    """The file OpenSlide opens in an unpacked (de-identified) bundle: the .mrxs file, or the
    first DICOM instance (OpenSlide finds the other instances of the series beside it)."""
    mrxs = sorted(root.glob("*.mrxs"))
    if mrxs:
        return mrxs[0]
    dcm = sorted(p for p in root.rglob("*") if p.is_file() and _is_dicom(p))
    if not dcm:
        raise BundleError(NOT_A_SLIDE_BUNDLE, "the bundle holds no slide")
    return dcm[0]


# --- Slidedat.ini ---------------------------------------------------------------------------
SLIDEDAT_MAX_BYTES = 1 << 20


@dataclass
class IniFile:
    """A parsed Slidedat.ini: sections in file order, keys in file order (no duplicates)."""

    sections: dict[str, dict[str, str]]

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        return self.sections.get(section, {}).get(key, default)

    def int(self, section: str, key: str) -> int:
        value = self.get(section, key)
        try:
            return int(str(value).strip())
        except ValueError as exc:
            raise BundleError(
                BAD_BUNDLE, f"Slidedat.ini [{section}] {key} is not a number"
            ) from exc


def parse_ini(data: bytes) -> IniFile:
    """Strict INI reader (Slidedat.ini): UTF-8 (optional BOM), ``[section]`` headers,
    ``key=value`` lines, ``;``/``#`` comments. Anything else, a key outside a section or a
    repeated section/key is an error naming the line number only."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BundleError(BAD_BUNDLE, "Slidedat.ini is not UTF-8 text") from exc
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip()
            if not name or name in sections:
                raise BundleError(BAD_BUNDLE, f"Slidedat.ini line {n}: empty or repeated section")
            current = sections[name] = {}
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or current is None:
            raise BundleError(BAD_BUNDLE, f"Slidedat.ini line {n} is not key=value in a section")
        if key in current:
            raise BundleError(BAD_BUNDLE, f"Slidedat.ini line {n}: repeated key")
        current[key] = value.strip()
    return IniFile(sections)


@dataclass(frozen=True)
class MrxsGeometry:
    level_dimensions: tuple[tuple[int, int], ...]
    tile_width: int
    tile_height: int
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None


def mrxs_geometry(ini: IniFile) -> MrxsGeometry:
    """Pyramid geometry from Slidedat.ini (as OpenSlide lays it out, overlaps ignored)."""
    nx, ny = ini.int("GENERAL", "IMAGENUMBER_X"), ini.int("GENERAL", "IMAGENUMBER_Y")
    if ini.get("HIERARCHICAL", "HIER_0_NAME") != "Slide zoom level":
        raise BundleError(BAD_BUNDLE, "Slidedat.ini HIER_0 is not the slide zoom level")
    levels = ini.int("HIERARCHICAL", "HIER_0_COUNT")
    if not (0 < nx <= 1 << 16 and 0 < ny <= 1 << 16 and 0 < levels <= 32):
        raise BundleError(BAD_BUNDLE, "Slidedat.ini image grid or level count out of range")
    sec0 = ini.get("HIERARCHICAL", "HIER_0_VAL_0_SECTION") or ""
    tw, th = ini.int(sec0, "DIGITIZER_WIDTH"), ini.int(sec0, "DIGITIZER_HEIGHT")
    if not (0 < tw <= 16384 and 0 < th <= 16384):
        raise BundleError(BAD_BUNDLE, "Slidedat.ini image size out of range")
    dims = tuple(((nx * tw) >> i or 1, (ny * th) >> i or 1) for i in range(levels))

    def num(section: str, key: str) -> float | None:
        try:
            v = float(ini.get(section, key) or "")
        except ValueError:
            return None
        return v if v > 0 else None

    return MrxsGeometry(
        dims,
        tw,
        th,
        num(sec0, "MICROMETER_PER_PIXEL_X"),
        num(sec0, "MICROMETER_PER_PIXEL_Y"),
        num("GENERAL", "OBJECTIVE_MAGNIFICATION"),
    )
