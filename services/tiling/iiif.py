"""IIIF Image API 3.0 over the Deep Zoom pyramid of a slide.

    {base}/iiif/3/{slide_id}/info.json
    {base}/iiif/3/{slide_id}/{region}/{size}/{rotation}/{quality}.{format}

Supported (advertised in info.json): regions `full`, `square`, `x,y,w,h`, `pct:x,y,w,h`;
sizes `max`, `w,`, `,h`, `pct:n`, `w,h`, `!w,h`, each also with `^` (upscaling); rotation `0`;
qualities `default`, `color`, `gray`; formats `jpg`, `png`. Syntactically valid requests for
anything else (other rotations, mirroring, `bitonal`, `tif`/`gif`/`webp`/`jp2`/`pdf`) answer
501; malformed ones, and sizes past the region without `^` or past the server's limits, 400.

Images are composed from the tiles of the nearest pyramid level at or above the requested
resolution (never from the original slide), then resampled to the exact size. The parser
(`parse`, `resolve`) is pure; `IiifRenderer` does the I/O through `TilingStage`, so access
control, the decision cache and the tile cache apply exactly as for DZI tiles.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from PIL import Image

from services.shared.auth import Principal
from services.tiling.core import TileData, TilingStage
from services.tiling.engine import DziGeometry

CONTEXT: Final = "http://iiif.io/api/image/3/context.json"
PROTOCOL: Final = "http://iiif.io/api/image"
MAX_WIDTH: Final = 4096
MAX_HEIGHT: Final = 4096
MAX_AREA: Final = 2048 * 2048
QUALITIES: Final = ("default", "color", "gray")
FORMATS: Final = {"jpg": "image/jpeg", "png": "image/png"}
# Named by the specification but not produced here: 501, not 400.
_KNOWN_QUALITIES: Final = frozenset({"bitonal"})
_KNOWN_FORMATS: Final = frozenset({"tif", "gif", "pdf", "jp2", "webp"})
JPEG_QUALITY: Final = 90

_INT = r"(?:0|[1-9][0-9]{0,8})"
_NUM = r"(?:[0-9]{1,9}(?:\.[0-9]{1,9})?|\.[0-9]{1,9})"
_REGION_PX = re.compile(rf"({_INT}),({_INT}),({_INT}),({_INT})")
_REGION_PCT = re.compile(rf"pct:({_NUM}),({_NUM}),({_NUM}),({_NUM})")
_SIZE_W = re.compile(rf"({_INT}),")
_SIZE_H = re.compile(rf",({_INT})")
_SIZE_WH = re.compile(rf"(!?)({_INT}),({_INT})")
_SIZE_PCT = re.compile(rf"pct:({_NUM})")
_ROTATION = re.compile(rf"(!?)({_NUM})")
_QUALITY_FORMAT = re.compile(r"([a-z]{1,16})\.([a-z0-9]{1,8})")


class IiifError(Exception):
    """A request the endpoint refuses: `status` is 400 (malformed) or 501 (not supported)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> IiifError:
    return IiifError(400, message)


def _unsupported(message: str) -> IiifError:
    return IiifError(501, message)


@dataclass(frozen=True, slots=True)
class Region:
    kind: str  # "full" | "square" | "px" | "pct"
    values: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True, slots=True)
class Size:
    kind: str  # "max" | "w" | "h" | "pct" | "wh" | "confined"
    upscale: bool = False
    width: int = 0
    height: int = 0
    pct: float = 0.0


@dataclass(frozen=True, slots=True)
class ImageRequest:
    region: Region
    size: Size
    quality: str
    format: str


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request resolved against one image: the region in full-resolution pixels and the
    exact output size."""

    x: int
    y: int
    w: int
    h: int
    out_w: int
    out_h: int
    quality: str
    format: str

    @property
    def canonical(self) -> str:
        return f"{self.x},{self.y},{self.w},{self.h}/{self.out_w},{self.out_h}/{self.quality}"


def parse_region(text: str) -> Region:
    if text == "full":
        return Region("full")
    if text == "square":
        return Region("square")
    m = _REGION_PX.fullmatch(text)
    if m is not None:
        x, y, w, h = (int(v) for v in m.groups())
        if w == 0 or h == 0:
            raise _bad("region width and height must be positive")
        return Region("px", (x, y, w, h))
    m = _REGION_PCT.fullmatch(text)
    if m is not None:
        px, py, pw, ph = (float(v) for v in m.groups())
        if pw <= 0 or ph <= 0:
            raise _bad("region width and height must be positive")
        if px >= 100 or py >= 100:
            raise _bad("region lies outside the image")
        return Region("pct", (px, py, pw, ph))
    raise _bad("region must be full, square, x,y,w,h or pct:x,y,w,h")


def parse_size(text: str) -> Size:
    upscale = text.startswith("^")
    body = text[1:] if upscale else text
    if body == "max":
        return Size("max", upscale)
    m = _SIZE_W.fullmatch(body)
    if m is not None:
        w = int(m.group(1))
        if w == 0:
            raise _bad("size width must be positive")
        return Size("w", upscale, width=w)
    m = _SIZE_H.fullmatch(body)
    if m is not None:
        h = int(m.group(1))
        if h == 0:
            raise _bad("size height must be positive")
        return Size("h", upscale, height=h)
    m = _SIZE_PCT.fullmatch(body)
    if m is not None:
        pct = float(m.group(1))
        if pct <= 0:
            raise _bad("size percentage must be positive")
        if pct > 100 and not upscale:
            raise _bad("size percentage above 100 needs ^")
        return Size("pct", upscale, pct=pct)
    m = _SIZE_WH.fullmatch(body)
    if m is not None:
        w, h = int(m.group(2)), int(m.group(3))
        if w == 0 or h == 0:
            raise _bad("size width and height must be positive")
        return Size("confined" if m.group(1) else "wh", upscale, width=w, height=h)
    raise _bad("size must be max, w,, ,h, pct:n, w,h or !w,h (optionally with ^)")


def parse_rotation(text: str) -> None:
    m = _ROTATION.fullmatch(text)
    if m is None:
        raise _bad("rotation must be a number from 0 to 360, optionally after !")
    degrees = float(m.group(2))
    if degrees > 360:
        raise _bad("rotation must be a number from 0 to 360")
    if m.group(1):
        raise _unsupported("mirroring is not supported")
    if degrees not in (0, 360):
        raise _unsupported("only rotation 0 is supported")


def parse_quality_format(text: str) -> tuple[str, str]:
    m = _QUALITY_FORMAT.fullmatch(text)
    if m is None:
        raise _bad("the last segment must be {quality}.{format}")
    quality, fmt = m.groups()
    if quality not in QUALITIES:
        if quality in _KNOWN_QUALITIES:
            raise _unsupported(f"quality {quality} is not supported")
        raise _bad("quality must be default, color, gray or bitonal")
    if fmt not in FORMATS:
        if fmt in _KNOWN_FORMATS:
            raise _unsupported(f"format {fmt} is not supported")
        raise _bad("unknown format")
    return quality, fmt


def parse(region: str, size: str, rotation: str, quality_format: str) -> ImageRequest:
    """Syntax of one image request (no image needed). Raises `IiifError`."""
    r = parse_region(region)
    s = parse_size(size)
    parse_rotation(rotation)
    quality, fmt = parse_quality_format(quality_format)
    return ImageRequest(r, s, "color" if quality == "default" else quality, fmt)


def _region_box(region: Region, width: int, height: int) -> tuple[int, int, int, int]:
    if region.kind == "full":
        return 0, 0, width, height
    if region.kind == "square":
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side
    if region.kind == "px":
        x, y, w, h = (int(v) for v in region.values)
    else:
        px, py, pw, ph = region.values
        x, y = round(px * width / 100), round(py * height / 100)
        w, h = max(1, round(pw * width / 100)), max(1, round(ph * height / 100))
    if x >= width or y >= height:
        raise _bad("region lies outside the image")
    return x, y, min(w, width - x), min(h, height - y)


def _fit(w: int, h: int, max_w: int, max_h: int, max_area: int, upscale: bool) -> tuple[int, int]:
    """(w, h) scaled to the largest size of the same aspect ratio within the limits; smaller
    images are only enlarged with `upscale`."""
    scale = min(max_w / w, max_h / h, math.sqrt(max_area / (w * h)))
    if scale >= 1.0 and not upscale:
        return w, h
    return max(1, min(max_w, math.floor(w * scale))), max(1, min(max_h, math.floor(h * scale)))


def resolve(
    req: ImageRequest,
    width: int,
    height: int,
    *,
    max_width: int = MAX_WIDTH,
    max_height: int = MAX_HEIGHT,
    max_area: int = MAX_AREA,
) -> Resolved:
    """The request against an image of `width` x `height`. Raises `IiifError` (400) for a
    region outside the image or a size that is zero, larger than the region without `^`, or
    beyond the limits."""
    x, y, rw, rh = _region_box(req.region, width, height)
    s = req.size
    if s.kind == "max":
        out_w, out_h = _fit(rw, rh, max_width, max_height, max_area, s.upscale)
    elif s.kind == "w":
        out_w, out_h = s.width, max(1, round(rh * s.width / rw))
    elif s.kind == "h":
        out_w, out_h = max(1, round(rw * s.height / rh)), s.height
    elif s.kind == "pct":
        out_w, out_h = round(rw * s.pct / 100), round(rh * s.pct / 100)
        if out_w == 0 or out_h == 0:
            raise _bad("the requested size is less than one pixel")
    elif s.kind == "wh":
        out_w, out_h = s.width, s.height
    else:  # confined: the largest size of the region's aspect ratio within w x h, and (without
        # ^) not larger than the region itself
        scale = min(s.width / rw, s.height / rh)
        if not s.upscale:
            scale = min(scale, 1.0)
        out_w = max(1, min(s.width, round(rw * scale)))
        out_h = max(1, min(s.height, round(rh * scale)))
    if not s.upscale and (out_w > rw or out_h > rh):
        raise _bad("the requested size is larger than the region; use ^ to upscale")
    if out_w > max_width or out_h > max_height or out_w * out_h > max_area:
        raise _bad(
            f"the requested size exceeds the limits ({max_width}x{max_height}, {max_area} px)"
        )
    return Resolved(x, y, rw, rh, out_w, out_h, req.quality, req.format)


def info(
    geometry: DziGeometry,
    service_id: str,
    *,
    max_width: int = MAX_WIDTH,
    max_height: int = MAX_HEIGHT,
    max_area: int = MAX_AREA,
) -> dict[str, Any]:
    """The info.json document of one slide."""
    factors: list[int] = []
    sizes: list[dict[str, int]] = []
    for level in range(geometry.max_level, -1, -1):
        factor = geometry.level_downsample(level)
        w, h = geometry.level_size(level)
        factors.append(factor)
        if w <= max_width and h <= max_height and w * h <= max_area and max(w, h) >= 16:
            sizes.append({"width": w, "height": h})
        if w <= geometry.tile_size and h <= geometry.tile_size:
            break
    return {
        "@context": CONTEXT,
        "id": service_id,
        "type": "ImageService3",
        "protocol": PROTOCOL,
        "profile": "level1",
        "width": geometry.width,
        "height": geometry.height,
        "maxWidth": max_width,
        "maxHeight": max_height,
        "maxArea": max_area,
        "tiles": [{"width": geometry.tile_size, "scaleFactors": factors}],
        "sizes": sorted(sizes, key=lambda d: d["width"]),
        "extraQualities": ["color", "gray"],
        "extraFormats": ["png"],
        "extraFeatures": [
            "baseUriRedirect",
            "cors",
            "regionByPct",
            "sizeByConfinedWh",
            "sizeByPct",
            "sizeUpscaling",
        ],
    }


@dataclass(frozen=True, slots=True)
class Plan:
    """Which pyramid tiles make one resolved request, and where they go."""

    level: int
    # the integer window of the level that the tiles are pasted into
    window: tuple[int, int, int, int]  # x0, y0, x1, y1 in level pixels
    # the exact (float) region inside that window
    box: tuple[float, float, float, float]
    tiles: tuple[tuple[int, int], ...]  # (col, row)


def plan(geometry: DziGeometry, r: Resolved) -> Plan:
    """Pick the lowest-resolution level that still has at least the output's resolution
    (downsample 2**k <= region/output), and the tiles of that level covering the region."""
    scale = min(r.w / r.out_w, r.h / r.out_h)
    k = min(geometry.max_level, max(0, math.floor(math.log2(scale)))) if scale >= 1 else 0
    # guard against floating point at exact powers of two
    while k > 0 and (1 << k) > scale:
        k -= 1
    level = geometry.max_level - k
    f = 1 << k
    lw, lh = geometry.level_size(level)
    fx0, fy0, fx1, fy1 = r.x / f, r.y / f, (r.x + r.w) / f, (r.y + r.h) / f
    x0, y0 = math.floor(fx0), math.floor(fy0)
    x1, y1 = min(lw, max(x0 + 1, math.ceil(fx1))), min(lh, max(y0 + 1, math.ceil(fy1)))
    ts = geometry.tile_size
    tiles = tuple(
        (col, row)
        for row in range(y0 // ts, (y1 - 1) // ts + 1)
        for col in range(x0 // ts, (x1 - 1) // ts + 1)
    )
    box = (fx0 - x0, fy0 - y0, min(fx1, x1) - x0, min(fy1, y1) - y0)
    return Plan(level, (x0, y0, x1, y1), box, tiles)


def compose(
    geometry: DziGeometry, p: Plan, r: Resolved, tiles: dict[tuple[int, int], bytes]
) -> bytes:
    """Paste the tiles into the plan's window, resample to the output size and encode."""
    x0, y0, x1, y1 = p.window
    canvas = Image.new("RGB", (x1 - x0, y1 - y0), (255, 255, 255))
    for (col, row), data in tiles.items():
        tx, ty, _, _ = geometry.tile_bounds(p.level, col, row)
        with Image.open(io.BytesIO(data)) as tile:
            canvas.paste(tile.convert("RGB"), (tx - x0, ty - y0))
    bx0, by0, bx1, by1 = p.box
    exact = (
        bx0.is_integer()
        and by0.is_integer()
        and round(bx1 - bx0) == r.out_w
        and round(by1 - by0) == r.out_h
        and bx1.is_integer()
        and by1.is_integer()
    )
    if exact:
        out = canvas.crop((int(bx0), int(by0), int(bx1), int(by1)))
    else:
        out = canvas.resize((r.out_w, r.out_h), Image.Resampling.LANCZOS, box=p.box)
    if r.quality == "gray":
        out = out.convert("L")
    buf = io.BytesIO()
    if r.format == "png":
        out.save(buf, "PNG", optimize=False)
    else:
        out.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class IiifRenderer:
    """Serves info.json and images of slides through `TilingStage` (access checks included).
    At most `concurrency` images are composed at once (CPU and memory stay bounded)."""

    def __init__(self, stage: TilingStage, concurrency: int = 2) -> None:
        self._stage = stage
        self._sem = asyncio.Semaphore(concurrency)

    async def info(self, caller: Principal, slide_id: str, service_id: str) -> dict[str, Any]:
        view = await self._stage.descriptor(caller, slide_id)
        return info(view.geometry, service_id)

    async def image(self, caller: Principal, slide_id: str, req: ImageRequest) -> TileData:
        view = await self._stage.descriptor(caller, slide_id)
        geom = view.geometry
        r = resolve(req, geom.width, geom.height)
        key = f"iiif/{slide_id}/{r.canonical}.{r.format}"
        cached = self._stage.cache.get(key)
        if cached is not None:
            return TileData(cached.data, FORMATS[r.format], cached.etag)
        p = plan(geom, r)
        parts = await asyncio.gather(
            *(self._stage.tile(caller, slide_id, p.level, col, row) for col, row in p.tiles)
        )
        tiles = {pos: t.data for pos, t in zip(p.tiles, parts, strict=True)}
        async with self._sem:
            data = await asyncio.to_thread(compose, geom, p, r, tiles)
        blob = self._stage.cache.put(key, data)
        return TileData(blob.data, FORMATS[r.format], blob.etag)
