"""Deep Zoom (DZI) pyramid geometry, descriptor XML and object-key layout.

Pure functions and value objects: no I/O, no OpenSlide. The server side uses
:class:`DziGeometry` (parsed back from the stored ``.dzi`` descriptor) to reject absurd tile
requests before touching object storage.

Deep Zoom conventions implemented here:

* level ``L`` (0 <= L <= max_level) has the size ``ceil(W / 2**(max_level - L))`` by
  ``ceil(H / 2**(max_level - L))`` where ``max_level = ceil(log2(max(W, H)))``; level 0 is 1x1
  and the top level is the full image;
* a level is cut into ``tile_size`` squares; each tile is extended by ``overlap`` pixels on every
  side that has a neighbour, and clipped at the level border.
"""

from __future__ import annotations

import re
import xml.parsers.expat
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

DZI_NAMESPACE: Final = "http://schemas.microsoft.com/deepzoom/2008"
# Older Deep Zoom Composer output uses the 2009 namespace; the schema is otherwise the same.
_ACCEPTED_NAMESPACES: Final = frozenset(
    {DZI_NAMESPACE, "http://schemas.microsoft.com/deepzoom/2009"}
)

SUPPORTED_FORMATS: Final = ("jpeg", "png")
CONTENT_TYPES: Final = {"jpeg": "image/jpeg", "png": "image/png"}

MAX_IMAGE_SIDE: Final = 1 << 22  # 4,194,304 px: far above any real WSI, far below overflow
MAX_TILE_SIZE: Final = 8192
MAX_DESCRIPTOR_BYTES: Final = 64 * 1024

DESCRIPTOR_NAME: Final = "slide.dzi"
TILES_DIR_NAME: Final = "slide_files"

_SLIDE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_UINT_RE: Final = re.compile(r"[0-9]{1,9}")
_TILE_PATH_RE: Final = re.compile(r"([0-9]{1,2})/([0-9]{1,9})_([0-9]{1,9})\.(jpeg|png)")


class DziError(ValueError):
    """Base class for geometry, descriptor and tile-address errors."""


class DescriptorError(DziError):
    """The ``.dzi`` descriptor text is malformed, unsafe or outside supported limits."""


class InvalidTileAddressError(DziError):
    """A tile address (path or key) is syntactically malformed (maps to INVALID_ARGUMENT)."""


class TileOutOfRangeError(DziError):
    """A well-formed tile address that lies outside the pyramid (maps to OUT_OF_RANGE)."""


class TileAddress(NamedTuple):
    level: int
    col: int
    row: int
    fmt: str


@dataclass(frozen=True, slots=True)
class DziGeometry:
    """Geometry of one Deep Zoom pyramid. Immutable and cheap to construct."""

    width: int
    height: int
    tile_size: int = 254
    overlap: int = 1
    format: str = "jpeg"

    def __post_init__(self) -> None:
        for name, value in (("width", self.width), ("height", self.height)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise DziError(f"{name} must be an int")
            if not 1 <= value <= MAX_IMAGE_SIDE:
                raise DziError(f"{name} must be within 1..{MAX_IMAGE_SIDE}, got {value}")
        if not isinstance(self.tile_size, int) or not 1 <= self.tile_size <= MAX_TILE_SIZE:
            raise DziError(f"tile_size must be within 1..{MAX_TILE_SIZE}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.tile_size:
            raise DziError("overlap must be within 0..tile_size-1")
        if self.format not in SUPPORTED_FORMATS:
            raise DziError(f"format must be one of {SUPPORTED_FORMATS}, got {self.format!r}")

    # ----------------------------------------------------------------- levels
    @property
    def max_level(self) -> int:
        """Index of the full-resolution level: ``ceil(log2(max(width, height)))``."""
        return (max(self.width, self.height) - 1).bit_length()

    @property
    def level_count(self) -> int:
        return self.max_level + 1

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    def _check_level(self, level: int) -> None:
        if not isinstance(level, int) or isinstance(level, bool):
            raise InvalidTileAddressError("level must be an int")
        if not 0 <= level <= self.max_level:
            raise TileOutOfRangeError(f"level {level} outside 0..{self.max_level}")

    def level_downsample(self, level: int) -> int:
        """Downsample factor of ``level`` relative to the full-resolution image."""
        self._check_level(level)
        return 1 << (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) in pixels of ``level``."""
        factor = self.level_downsample(level)
        return -(-self.width // factor), -(-self.height // factor)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.level_size(level) for level in range(self.level_count))

    def tile_grid(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at ``level``."""
        w, h = self.level_size(level)
        return -(-w // self.tile_size), -(-h // self.tile_size)

    @property
    def tile_count(self) -> int:
        total = 0
        for level in range(self.level_count):
            cols, rows = self.tile_grid(level)
            total += cols * rows
        return total

    # ------------------------------------------------------------------ tiles
    def contains(self, level: int, col: int, row: int) -> bool:
        """True when (level, col, row) names a tile of this pyramid."""
        for value in (level, col, row):
            if not isinstance(value, int) or isinstance(value, bool):
                return False
        if not 0 <= level <= self.max_level:
            return False
        cols, rows = self.tile_grid(level)
        return 0 <= col < cols and 0 <= row < rows

    def check(self, level: int, col: int, row: int) -> None:
        """Raise :class:`TileOutOfRangeError` unless the tile exists."""
        for name, value in (("level", level), ("col", col), ("row", row)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidTileAddressError(f"{name} must be an int")
        self._check_level(level)
        cols, rows = self.tile_grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileOutOfRangeError(
                f"tile ({col}, {row}) outside the {cols}x{rows} grid of level {level}"
            )

    def tile_bounds(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of a tile in the pixel space of its level, overlap included."""
        self.check(level, col, row)
        level_w, level_h = self.level_size(level)
        x0 = col * self.tile_size - (self.overlap if col > 0 else 0)
        y0 = row * self.tile_size - (self.overlap if row > 0 else 0)
        x1 = min(level_w, (col + 1) * self.tile_size + self.overlap)
        y1 = min(level_h, (row + 1) * self.tile_size + self.overlap)
        return x0, y0, x1 - x0, y1 - y0

    def tile_size_at(self, level: int, col: int, row: int) -> tuple[int, int]:
        """(width, height) in pixels of the tile's image."""
        _, _, w, h = self.tile_bounds(level, col, row)
        return w, h

    # ------------------------------------------------------------- descriptor
    def to_descriptor(self) -> str:
        """The ``.dzi`` XML text (all values are validated integers / enum strings)."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="{DZI_NAMESPACE}" Format="{self.format}" '
            f'Overlap="{self.overlap}" TileSize="{self.tile_size}">'
            f'<Size Width="{self.width}" Height="{self.height}"/>'
            "</Image>\n"
        )

    @classmethod
    def from_descriptor(cls, xml_text: str | bytes) -> DziGeometry:
        """Parse a ``.dzi`` descriptor. DOCTYPE, entity declarations and external entities are
        rejected outright (no entity expansion, no network/file access)."""
        return _parse_descriptor(xml_text)

    # ---------------------------------------------------------------- parsing
    def parse_tile_path(self, path: str) -> TileAddress:
        """Parse ``"{level}/{col}_{row}.{ext}"`` (relative to the tiles folder) and check it
        against this pyramid: malformed -> :class:`InvalidTileAddressError`, outside the pyramid
        or of another format -> :class:`TileOutOfRangeError`."""
        address = parse_tile_path(path)
        if address.fmt != self.format:
            raise TileOutOfRangeError(f"this pyramid holds {self.format} tiles")
        self.check(address.level, address.col, address.row)
        return address


def parse_tile_path(path: str) -> TileAddress:
    """Syntactic parse of ``"{level}/{col}_{row}.{ext}"``; no geometry check."""
    if not isinstance(path, str) or len(path) > 64:
        raise InvalidTileAddressError("malformed tile path")
    match = _TILE_PATH_RE.fullmatch(path)
    if match is None:
        raise InvalidTileAddressError("malformed tile path")
    level, col, row, fmt = match.groups()
    return TileAddress(int(level), int(col), int(row), fmt)


# ------------------------------------------------------------------ object keys
def validate_slide_id(slide_id: str) -> str:
    """Slide ids become object-key path segments: allow ``[A-Za-z0-9._-]``, 1..128 chars,
    starting alphanumeric, no ``..``."""
    if not isinstance(slide_id, str) or _SLIDE_ID_RE.fullmatch(slide_id) is None:
        raise ValueError("invalid slide id")
    if ".." in slide_id:
        raise ValueError("invalid slide id")
    return slide_id


def dzi_object_keys(slide_id: str) -> tuple[str, str]:
    """(descriptor_key, tiles_prefix), e.g. ``("slides/ID/dzi/slide.dzi",
    "slides/ID/dzi/slide_files/")``. The prefix ends with ``/``."""
    validate_slide_id(slide_id)
    base = f"slides/{slide_id}/dzi/"
    return base + DESCRIPTOR_NAME, base + TILES_DIR_NAME + "/"


def tile_key(slide_id: str, level: int, col: int, row: int, fmt: str = "jpeg") -> str:
    """Object key of one tile: ``slides/ID/dzi/slide_files/{level}/{col}_{row}.{fmt}``."""
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"format must be one of {SUPPORTED_FORMATS}")
    for value in (level, col, row):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError("level, col and row must be non-negative ints")
    _, prefix = dzi_object_keys(slide_id)
    return f"{prefix}{tile_relative_path(level, col, row, fmt)}"


def tile_relative_path(level: int, col: int, row: int, fmt: str = "jpeg") -> str:
    """Path of a tile relative to the tiles folder (``{level}/{col}_{row}.{fmt}``)."""
    return f"{level}/{col}_{row}.{fmt}"


def thumbnail_key(slide_id: str) -> str:
    """Object key of the slide thumbnail (JPEG)."""
    validate_slide_id(slide_id)
    return f"slides/{slide_id}/thumbnail.jpeg"


# ----------------------------------------------------------- descriptor parsing
class _DescriptorHandler:
    def __init__(self) -> None:
        self.depth = 0
        self.image: dict[str, str] | None = None
        self.size: dict[str, str] | None = None
        self.root_seen = False

    def start(self, name: str, attrs: dict[str, str]) -> None:
        ns, _, local = name.rpartition("}")
        self.depth += 1
        if self.depth == 1:
            if self.root_seen or local != "Image" or ns not in _ACCEPTED_NAMESPACES:
                raise DescriptorError("root element must be a Deep Zoom <Image>")
            self.root_seen = True
            self.image = dict(attrs)
        elif self.depth == 2 and local == "Size" and ns in _ACCEPTED_NAMESPACES:
            if self.size is not None:
                raise DescriptorError("more than one <Size> element")
            self.size = dict(attrs)

    def end(self, _name: str) -> None:
        self.depth -= 1


def _reject_doctype(*_args: Any) -> None:
    raise DescriptorError("DOCTYPE declarations are not allowed in a descriptor")


def _reject_entity(*_args: Any) -> None:
    raise DescriptorError("entity declarations are not allowed in a descriptor")


def _reject_external(*_args: Any) -> int:
    raise DescriptorError("external entities are not allowed in a descriptor")


def _uint_attr(attrs: dict[str, str], name: str) -> int:
    value = attrs.get(name)
    if value is None or _UINT_RE.fullmatch(value.strip()) is None:
        raise DescriptorError(f"attribute {name} must be a non-negative integer")
    return int(value.strip())


def _parse_descriptor(xml_text: str | bytes) -> DziGeometry:
    data = xml_text.encode("utf-8") if isinstance(xml_text, str) else bytes(xml_text)
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise DescriptorError("descriptor too large")
    lowered = data.lower()
    if b"<!doctype" in lowered or b"<!entity" in lowered:
        raise DescriptorError("DOCTYPE/entity declarations are not allowed in a descriptor")

    handler = _DescriptorHandler()
    parser = xml.parsers.expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _reject_doctype
    parser.EntityDeclHandler = _reject_entity
    parser.UnparsedEntityDeclHandler = _reject_entity
    parser.ExternalEntityRefHandler = _reject_external
    parser.StartElementHandler = handler.start
    parser.EndElementHandler = handler.end
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        raise DescriptorError(f"descriptor is not well-formed XML: {exc}") from None

    if handler.image is None or handler.size is None:
        raise DescriptorError("descriptor needs an <Image> root with a <Size> child")
    fmt = handler.image.get("Format", "").strip()
    try:
        return DziGeometry(
            width=_uint_attr(handler.size, "Width"),
            height=_uint_attr(handler.size, "Height"),
            tile_size=_uint_attr(handler.image, "TileSize"),
            overlap=_uint_attr(handler.image, "Overlap"),
            format=fmt,
        )
    except DescriptorError:
        raise
    except DziError as exc:
        raise DescriptorError(str(exc)) from None


class GeometryView:
    """The Deep Zoom surface every pyramid builder shares, read from its ``geometry``."""

    geometry: DziGeometry

    @property
    def level_count(self) -> int:
        return self.geometry.level_count

    @property
    def tile_count(self) -> int:
        return self.geometry.tile_count

    @property
    def format(self) -> str:
        return self.geometry.format

    @property
    def content_type(self) -> str:
        return self.geometry.content_type

    def descriptor(self) -> str:
        """The ``.dzi`` XML descriptor text."""
        return self.geometry.to_descriptor()
