"""Category counts ({"associated_image.label": 1, ...}) as stored documents.

Category names contain dots and spaces, which document stores do not allow in field names,
so counts are stored as a list of {"name", "count"} entries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def to_entries(counts: Mapping[str, int]) -> list[dict[str, Any]]:
    return [{"name": k, "count": int(v)} for k, v in sorted(counts.items())]


def from_entries(entries: Iterable[Mapping[str, Any]] | Mapping[str, int] | None) -> dict[str, int]:
    if not entries:
        return {}
    if isinstance(entries, Mapping):
        return {str(k): int(v) for k, v in entries.items()}
    return {str(e["name"]): int(e["count"]) for e in entries}
