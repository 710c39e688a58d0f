"""Bounded-memory byte copying and searching over files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import BinaryIO


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


def find_value(data: bytes, p: bytes, numeric: bool) -> bool:
    """True if ``p`` occurs in ``data``; numeric patterns must not touch other digits."""
    i = data.find(p)
    if not numeric:
        return i != -1
    step = 2 if b"\x00" in p else 1  # UTF-16: neighbours are one code unit away
    while i != -1:
        before = data[i - step] if i - step >= 0 else None
        after = data[i + len(p) + (step - 1)] if i + len(p) + (step - 1) < len(data) else None
        if (before is None or before not in _DIGITS) and (after is None or after not in _DIGITS):
            return True
        i = data.find(p, i + 1)
    return False


def stream_contains(
    fh: BinaryIO,
    patterns: Sequence[bytes],
    buffer_size: int,
    start: int = 0,
    end: int | None = None,
) -> int | None:
    """Index into ``patterns`` of the first one found in fh[start:end], else None.

    Reads with a fixed buffer and an overlap of (longest pattern) bytes so matches that
    straddle chunk boundaries are found.
    """
    if not patterns:
        return None
    numeric = [is_numeric_pattern(p) for p in patterns]
    if end is None:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
    overlap = max(len(p) for p in patterns) + 1
    fh.seek(start)
    pos = start
    tail = b""
    while pos < end:
        chunk = fh.read(min(buffer_size, end - pos))
        if not chunk:
            break
        pos += len(chunk)
        window = tail + chunk
        for i, p in enumerate(patterns):
            if find_value(window, p, numeric[i]):
                return i
        tail = window[-overlap:]
    return None
