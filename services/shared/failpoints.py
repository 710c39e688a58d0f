"""Named crash points for fault tests, in the manner of etcd's gofail or TiKV's fail-rs: inert
unless `TESSERA_FAILPOINTS` names them. A named point ends the process on the spot (no drain,
no commit, no flush: a power cut at the worst moment) the first time it is reached; a marker
file in `TESSERA_FAILPOINTS_DIR` records that it fired, so a restarted process goes on.

Points: `events.before_commit` — a consumer has finished an event's side effects but not yet
committed its offset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

POINTS_ENV = "TESSERA_FAILPOINTS"
DIR_ENV = "TESSERA_FAILPOINTS_DIR"
EXIT_CODE = 86

_ARMED = frozenset(p for p in os.environ.get(POINTS_ENV, "").split(",") if p)
_DIR = os.environ.get(DIR_ENV, "")


def hit(point: str, owner: str) -> None:
    """Crash here if `point` is armed and has not fired for `owner` yet."""
    if point not in _ARMED or not _DIR:
        return
    marker = Path(_DIR) / f"{owner}.{point}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    sys.stderr.write(f"failpoint {point} fired in {owner}\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)
