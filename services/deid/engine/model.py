"""Public value types of the de-identification engine."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.shared.wsi.sniff import SlideFormat


class DeidRejected(Exception):
    """The slide cannot be de-identified safely; it stays in quarantine.

    ``reason`` is a stable UPPER_SNAKE code, ``detail`` names the tag/key/attribute concerned
    but never contains a value taken from the file.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ReviewItem:
    """Something no rule knows, found in a file that is otherwise well-formed.

    ``key`` is the identifier a steward's rule names ("tiff:40001", "svs:Scanner Mode",
    "ndpi:Foo.Bar"); ``where`` says where it was first seen. Neither holds a value.
    """

    key: str
    reason: str
    where: str


class DeidNeedsReview(DeidRejected):
    """The slide is well-formed but holds metadata no rule knows: it stays in quarantine
    until a data steward approves it with a rule for every key (or rejects it).

    A subclass of :class:`DeidRejected` so that callers that only know "not safe" keep
    failing closed; ``reason`` is the code of the first item, ``items`` lists them all.
    """

    def __init__(self, items: Sequence[ReviewItem]) -> None:
        first = items[0]
        keys = ", ".join(i.key for i in items[:20])
        more = f" and {len(items) - 20} more" if len(items) > 20 else ""
        super().__init__(first.reason, f"needs review: {first.where}; keys: {keys}{more}")
        self.items = list(items)


# Stable reason codes (others are passed through from inspection, e.g. TRUNCATED_FILE).
UNKNOWN_TIFF_TAG = "UNKNOWN_TIFF_TAG"
UNEXPECTED_TAG_VALUE = "UNEXPECTED_TAG_VALUE"
UNKNOWN_SVS_FIELD = "UNKNOWN_SVS_FIELD"
UNEXPECTED_SVS_VALUE = "UNEXPECTED_SVS_VALUE"
UNEXPECTED_DICOM_VALUE = "UNEXPECTED_DICOM_VALUE"
UNKNOWN_NDPI_IFD = "UNKNOWN_NDPI_IFD"
UNKNOWN_NDPI_PROPERTY = "UNKNOWN_NDPI_PROPERTY"
AMBIGUOUS_ASSOCIATED_IMAGE = "AMBIGUOUS_ASSOCIATED_IMAGE"
UNEXPECTED_IFD = "UNEXPECTED_IFD"
UNSUPPORTED_STRUCTURE = "UNSUPPORTED_STRUCTURE"
UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
UNSUPPORTED_COMPRESSION = "UNSUPPORTED_COMPRESSION"
MALFORMED_FILE = "MALFORMED_FILE"
CORRUPT_IMAGE_DATA = "CORRUPT_IMAGE_DATA"
ASSOCIATED_IMAGE_ONLY = "ASSOCIATED_IMAGE_ONLY"
LABEL_IN_IMAGE = "LABEL_IN_IMAGE"
BURNED_IN_ANNOTATION = "BURNED_IN_ANNOTATION"
MISSING_IMAGE_TYPE = "MISSING_IMAGE_TYPE"
UNSUPPORTED_IMAGE_TYPE = "UNSUPPORTED_IMAGE_TYPE"
PSEUDONYM_TOO_LONG = "PSEUDONYM_TOO_LONG"
VERIFICATION_FAILED = "VERIFICATION_FAILED"
FORMAT_MISMATCH = "FORMAT_MISMATCH"

# Steward rules for items no built-in rule knows.
RULE_REMOVE = "remove"
RULE_KEEP = "keep"
# A rule key: "<kind>:<name>", the name a short printable vendor identifier. Items whose name
# does not fit are not "unknown but plausible": they are treated as hostile (rejected).
RULE_KEY = re.compile(
    r"^(tiff|svs|ndpi|qptiff|philips|bif|mrxs|ome):[A-Za-z0-9][A-Za-z0-9 ._\-()\[\]/#+:]{0,63}$"
)
# More distinct unknown items than this in one slide is not a scanner's output.
MAX_REVIEW_ITEMS = 64


@dataclass(frozen=True)
class DeidPolicy:
    """Knobs of the de-identification. Defaults are the strict, fail-closed behaviour."""

    # Dates/times: "remove" drops them (or blanks/dummies them where DICOM requires a value).
    # "year" keeps only the year of acquisition/study dates: DICOM DA/DT -> YYYY0101 /
    # YYYY0101000000 (times still dummied), TIFF DateTime -> "YYYY:01:01 00:00:00", OME
    # AcquisitionDate -> YYYY-01-01T00:00:00. Free-text vendor dates (SVS "Date", NDPI
    # Created/Updated, QPTIFF calibration dates, Philips/BIF scan dates) are removed under
    # both policies: they are not structured acquisition dates and gain nothing from a year.
    # (plain str so it can come straight from configuration; validated below)
    date_policy: str = "remove"
    # Keys of the NDPI property map (tag 65449) that no rule knows: "reject" the slide, or
    # "drop" the key (dropping never leaks; rejecting makes unknown scanner output visible).
    ndpi_unknown_property: str = "reject"
    # DICOM Specimen Preparation Sequence: "empty" follows PS3.15 (Z); "filter" keeps coded
    # and numeric steps, pseudonymises specimen identifiers and drops free text and dates.
    dicom_specimen_preparation: str = "empty"
    # Slide overview ("macro": a photograph of the whole glass slide, label included):
    # "remove" drops it; "blank_label" keeps the SVS/NDPI macro re-encoded (JPEG, the only
    # re-encoded image - pyramid levels never are) with the label end of the slide filled
    # black. The label end is the left ``macro_label_fraction`` of the landscape macro
    # (default 1/3, rounded up to whole 16-px JPEG blocks); for NDPI the barcode ROI of the
    # property map widens it when it reaches further. Verified after writing: the blanked
    # columns must decode to uniform black.
    macro_policy: str = "remove"
    macro_label_fraction: float = 1 / 3
    # Keep the Aperio thumbnail (second IFD) when it is certainly not the label.
    keep_svs_thumbnail: bool = True
    # Streaming buffer for copying and scanning pixel data.
    buffer_size: int = 8 << 20
    # fsync the output before renaming it into place (durability; costs a disk flush).
    fsync: bool = False
    # Identifying values shorter than this are not used for the byte-level search.
    min_forbidden_length: int = 4
    # A data steward's rules for items no built-in rule knows: (key, "remove" | "keep")
    # pairs, key as in :class:`ReviewItem`. Without a rule such an item holds the slide for
    # review (:class:`DeidNeedsReview`). Built-in rules always win over these.
    approved_rules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.date_policy not in ("remove", "year"):
            raise ValueError("date_policy must be 'remove' or 'year'")
        if self.macro_policy not in ("remove", "blank_label"):
            raise ValueError("macro_policy must be 'remove' or 'blank_label'")
        if not 0.05 <= self.macro_label_fraction <= 0.9:
            raise ValueError("macro_label_fraction must lie between 0.05 and 0.9")
        if self.ndpi_unknown_property not in ("reject", "drop"):
            raise ValueError("ndpi_unknown_property must be 'reject' or 'drop'")
        if self.dicom_specimen_preparation not in ("empty", "filter"):
            raise ValueError("dicom_specimen_preparation must be 'empty' or 'filter'")
        if self.buffer_size < (64 << 10):
            raise ValueError("buffer_size must be at least 64 KiB")
        for key, action in self.approved_rules:
            if not RULE_KEY.fullmatch(key) or action not in (RULE_REMOVE, RULE_KEEP):
                raise ValueError("approved_rules: (key, 'remove' | 'keep') with a valid key")

    @property
    def rules(self) -> Mapping[str, str]:
        return dict(self.approved_rules)

    def kept(self, kind: str) -> frozenset[str]:
        """Names of the items of ``kind`` ("tiff", "svs", "ndpi", "qptiff", "philips", "bif",
        "mrxs", "ome") a steward rule keeps."""
        prefix = f"{kind}:"
        return frozenset(
            k[len(prefix) :]
            for k, a in self.approved_rules
            if a == RULE_KEEP and k.startswith(prefix)
        )


@dataclass
class DeidReport:
    """What de-identification did. Counts name categories, never values.

    ``identifying_values`` are the identifying byte strings seen in the input; they feed the
    verifier's forbidden list and must stay in memory (never logged, never sent anywhere).
    """

    format: SlideFormat
    width: int
    height: int
    level_dimensions: list[tuple[int, int]]
    levels_kept: int
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    removed: dict[str, int]
    pseudonymized: dict[str, int]
    output_size: int
    identifying_values: list[bytes] = field(default_factory=list, repr=False)

    def public_dict(self) -> dict[str, Any]:
        """Everything except the identifying values (safe for events, logs and metrics)."""
        return {
            "format": self.format.value,
            "width": self.width,
            "height": self.height,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "levels_kept": self.levels_kept,
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "objective_power": self.objective_power,
            "removed": dict(self.removed),
            "pseudonymized": dict(self.pseudonymized),
            "output_size": self.output_size,
        }


def printable_name(name: str) -> str:
    """A vendor name as it may appear in an error detail: printable characters only (the others
    shown as "?"), at most 64 of them."""
    return "".join(ch if ch.isprintable() else "?" for ch in name)[:64]


class Tally:
    """Collects category counts and identifying values while a slide is processed."""

    def __init__(self, min_length: int, rules: Mapping[str, str] | None = None) -> None:
        self.removed: Counter[str] = Counter()
        self.pseudonymized: Counter[str] = Counter()
        self._values: dict[bytes, None] = {}
        self._min = min_length
        self._rules = dict(rules or {})
        self._review: dict[str, ReviewItem] = {}

    def unknown(self, kind: str, name: str, reason: str, where: str) -> bool:
        """An item no built-in rule knows. Returns True when a steward rule keeps it. With a
        "remove" rule, or no rule, the caller drops it (and counts what it dropped); without
        a rule the item is also recorded for review, so the rest of the file is still
        examined and every such item is listed at once (:meth:`raise_for_review`).

        A name that is not a plausible vendor identifier is hostile input: rejected."""
        key = f"{kind}:{name.strip()}"
        if not RULE_KEY.fullmatch(key):
            raise DeidRejected(reason, f"{where}: an unknown name that is not an identifier")
        action = self._rules.get(key)
        if action is not None:
            return action == RULE_KEEP
        if key not in self._review:
            if len(self._review) >= MAX_REVIEW_ITEMS:
                raise DeidRejected(reason, f"more than {MAX_REVIEW_ITEMS} unknown items")
            self._review[key] = ReviewItem(key, reason, where)
        return False

    def unknown_removable(self, kind: str, name: str, reason: str, where: str) -> None:
        """:meth:`unknown` for an item a rule can only remove (structured content the cleaner
        does not know how to write back): a steward's keep rule for it is refused. The caller
        drops the item."""
        if self.unknown(kind, name, reason, where):
            raise DeidRejected(reason, f"{where}: a rule can only remove {kind}:{name.strip()}")

    def dropped_text(self, *texts: str) -> None:
        """Texts of a dropped item of unknown meaning: searched for in the output when they
        could name someone (six characters or more, one of them a letter)."""
        self.identifying(*(t for t in texts if len(t.strip()) >= 6 and any(map(str.isalpha, t))))

    @property
    def review_items(self) -> list[ReviewItem]:
        return list(self._review.values())

    def raise_for_review(self) -> None:
        if self._review:
            raise DeidNeedsReview(self.review_items)

    def remove(self, category: str, *identifying: object) -> None:
        self.removed[category] += 1
        self.identifying(*identifying)

    def pseudonymize(self, category: str, *identifying: object) -> None:
        self.pseudonymized[category] += 1
        self.identifying(*identifying)

    def identifying(self, *values: object) -> None:
        for value in values:
            for text in _texts(value):
                self._add(text)

    def _add(self, text: str) -> None:
        text = unicodedata.normalize("NFC", text).strip().strip("\x00").strip()
        if len(text) < self._min or not any(ch.isalnum() for ch in text):
            return
        self._values[text.encode("utf-8")] = None
        # person names: also the separate components (Family^Given^...)
        if "^" in text:
            for part in text.split("^"):
                part = part.strip()
                if len(part) >= self._min:
                    self._values[part.encode("utf-8")] = None

    def discard(self, *values: str) -> None:
        """Forget values that are our own replacements (e.g. dummy dates)."""
        for v in values:
            self._values.pop(v.encode("utf-8"), None)

    @property
    def values(self) -> list[bytes]:
        return list(self._values)


def _texts(value: object) -> Iterable[str]:
    if value is None:
        return
    if isinstance(value, bytes | bytearray):
        raw = bytes(value).rstrip(b"\x00")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            yield raw.decode("latin-1")
        return
    if isinstance(value, str):
        yield value
        return
    if isinstance(value, list | tuple):
        for v in value:
            yield from _texts(v)
        return
    yield str(value)
