"""SHA-256 of a file, streamed with a fixed buffer (blocking: call it in a thread)."""

from __future__ import annotations

import hashlib
from pathlib import Path

BUFFER = 8 * 1024 * 1024


def file_sha256(path: Path) -> tuple[str, int]:
    """(lower-case hex digest, size in bytes)."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(BUFFER):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size
