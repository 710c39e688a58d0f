"""Plain-HTTP routes of tiling for viewers (aiohttp).

    GET /slides/{slide_id}.dzi                              Deep Zoom descriptor
    GET /slides/{slide_id}_files/{level}/{col}_{row}.jpeg   a tile
    GET /slides/{slide_id}/thumbnail.jpeg                   thumbnail
    GET /iiif/3/{slide_id}/info.json                        IIIF Image API 3.0 (see iiif.py)
    GET /iiif/3/{slide_id}/{region}/{size}/{rotation}/{quality}.{format}
    GET /api/slides/{slide_id}                              catalogue record (JSON)
    GET /viewer/{slide_id}                                  OpenSeadragon viewer page
    GET /viewer/static/...                                  its script, style and images
    GET /healthz

Every data request carries a bearer token (`Authorization: Bearer ...`, or `?access_token=`
for viewers that cannot set headers) and is checked by access control like the gRPC calls.
The viewer page itself is a static shell: it holds no data and sends the token it is given on
each request. Responses that carry pixels are `Cache-Control: private` with an ETag, and
answer 304 to a matching `If-None-Match`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from services.shared.auth import Principal, TokenVerifier, bearer_from_metadata
from services.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    TesseraError,
    Unauthenticated,
    check_slide_id,
)
from services.tiling.cache import etag_of
from services.tiling.core import TileData, TilingStage
from services.tiling.iiif import IiifError, IiifRenderer, parse

log = logging.getLogger(__name__)

_TILE = re.compile(r"(\d{1,3})/(\d{1,10})_(\d{1,10})\.(jpeg|png)")
_HTTP_STATUS = {
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    OutOfRange: 404,
    InvalidArgument: 400,
    FailedPrecondition: 409,
}
VIEWER_DIR = Path(__file__).resolve().parent / "viewer"
STATIC_DIR = VIEWER_DIR / "static"
VENDOR_MARKER = STATIC_DIR / "vendor" / "openseadragon" / "openseadragon.min.js"
PIXELS_CACHE = "private, max-age=3600"
_VIEWER_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class RecordSource(Protocol):
    async def get(self, token: str, slide_id: str) -> dict[str, Any]: ...


def etag_matches(header: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: `*`, or a list of (possibly weak) entity tags."""
    if not header:
        return False
    for item in header.split(","):
        tag = item.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


class TileHttpServer:
    def __init__(
        self,
        stage: TilingStage,
        verifier: TokenVerifier,
        host: str,
        port: int,
        *,
        records: RecordSource | None = None,
        public_base_url: str = "",
    ) -> None:
        self._stage = stage
        self._verifier = verifier
        self._host = host
        self._port = port
        self._records = records
        self._base = public_base_url.rstrip("/")
        self._iiif = IiifRenderer(stage)
        self._stopping = asyncio.Event()
        self.app = web.Application(middlewares=[self._cors, self._errors])
        self.app.on_response_prepare.append(self._strip_server_header)
        self.app.add_routes(
            [
                web.get("/healthz", self._health),
                web.options("/{tail:.*}", self._health),
                web.get("/slides/{name}", self._slide_file),
                web.get("/slides/{slide_id}_files/{rest:.+}", self._tile),
                web.get("/slides/{slide_id}/thumbnail.jpeg", self._thumbnail),
                web.get("/iiif/3/{slide_id}", self._iiif_base),
                web.get("/iiif/3/{slide_id}/info.json", self._iiif_info),
                web.get(
                    "/iiif/3/{slide_id}/{region}/{size}/{rotation}/{qf}",
                    self._iiif_image,
                ),
                web.get("/api/slides/{slide_id}", self._record),
                web.get("/viewer/static/{path:.+}", self._static),
                web.get("/viewer/{slide_id}", self._viewer),
            ]
        )

    @staticmethod
    async def _strip_server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.pop("Server", None)

    @web.middleware
    async def _cors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Viewers are often served from another origin. Tokens travel in a header, never in
        cookies, so any origin may read what its token allows."""
        cors = {
            "Access-Control-Allow-Origin": request.headers.get("Origin", "*"),
            "Access-Control-Allow-Headers": "Authorization, If-None-Match",
            "Access-Control-Allow-Methods": "GET, OPTIONS",
            "Access-Control-Expose-Headers": "ETag",
            "Access-Control-Max-Age": "600",
            # the answer depends on who asks: no shared cache may reuse it for someone else
            "Vary": "Origin, Authorization",
        }
        if request.method == "OPTIONS":
            return web.Response(status=204, headers=cors)
        response = await handler(request)
        response.headers.update(cors)
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except IiifError as exc:
            error = "IIIF_NOT_SUPPORTED" if exc.status == 501 else "BAD_IIIF_REQUEST"
            return web.json_response({"error": error, "message": exc.message}, status=exc.status)
        except TesseraError as exc:
            status = next((code for cls, code in _HTTP_STATUS.items() if isinstance(exc, cls)), 503)
            return web.json_response({"error": exc.reason, "message": exc.message}, status=status)
        except Exception as exc:  # noqa: BLE001 - never a traceback to the client
            log.error("unhandled error in http route", extra={"reason": type(exc).__name__})
            return web.json_response({"error": "INTERNAL"}, status=500)

    @staticmethod
    def _token(request: web.Request) -> str:
        # The header wins; the query parameter is for viewers that cannot set headers.
        if "Authorization" in request.headers:
            return bearer_from_metadata(list(request.headers.items()))
        token = request.query.get("access_token")
        if token:
            return token
        return bearer_from_metadata([])

    def _principal(self, request: web.Request) -> Principal:
        return self._verifier.verify(self._token(request))

    def _base_url(self, request: web.Request) -> str:
        return self._base or f"{request.scheme}://{request.host}"

    @staticmethod
    def _respond(request: web.Request, tile: TileData) -> web.Response:
        etag = f'"{tile.etag}"'
        headers = {"ETag": etag, "Cache-Control": PIXELS_CACHE}
        if etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=tile.data, content_type=tile.content_type, headers=headers)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    # -- Deep Zoom -----------------------------------------------------------------------

    async def _slide_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not name.endswith(".dzi"):
            raise NotFound("unknown resource", "NOT_FOUND")
        view = await self._stage.descriptor(self._principal(request), name[: -len(".dzi")])
        xml = view.descriptor_xml.encode()
        return self._respond(request, TileData(xml, "application/xml", etag_of(xml)))

    async def _tile(self, request: web.Request) -> web.Response:
        m = _TILE.fullmatch(request.match_info["rest"])
        if m is None:
            raise NotFound("malformed tile path", "BAD_TILE_PATH")
        level, col, row = int(m.group(1)), int(m.group(2)), int(m.group(3))
        tile = await self._stage.tile(
            self._principal(request), request.match_info["slide_id"], level, col, row
        )
        if tile.content_type != f"image/{m.group(4)}":
            raise NotFound(f"tiles of this slide are not {m.group(4)}", "WRONG_TILE_FORMAT")
        return self._respond(request, tile)

    async def _thumbnail(self, request: web.Request) -> web.Response:
        tile = await self._stage.thumbnail(self._principal(request), request.match_info["slide_id"])
        return self._respond(request, tile)

    # -- IIIF Image API 3.0 --------------------------------------------------------------

    async def _iiif_base(self, request: web.Request) -> web.Response:
        slide_id = request.match_info["slide_id"]
        check_slide_id(slide_id)
        raise web.HTTPSeeOther(f"{self._base_url(request)}/iiif/3/{slide_id}/info.json")

    async def _iiif_info(self, request: web.Request) -> web.Response:
        slide_id = request.match_info["slide_id"]
        caller = self._principal(request)
        service_id = f"{self._base_url(request)}/iiif/3/{slide_id}"
        doc = await self._iiif.info(caller, slide_id, service_id)
        ld = "application/ld+json" in request.headers.get("Accept", "")
        response = web.json_response(
            doc,
            content_type="application/ld+json" if ld else "application/json",
            headers={"Cache-Control": PIXELS_CACHE},
        )
        if ld:
            response.headers["Content-Type"] = (
                'application/ld+json;profile="http://iiif.io/api/image/3/context.json"'
            )
        return response

    async def _iiif_image(self, request: web.Request) -> web.Response:
        caller = self._principal(request)
        m = request.match_info
        req = parse(m["region"], m["size"], m["rotation"], m["qf"])
        image = await self._iiif.image(caller, m["slide_id"], req)
        response = self._respond(request, image)
        service = f"{self._base_url(request)}/iiif/3/{m['slide_id']}"
        response.headers["Link"] = f'<{service}>;rel="profile"'
        return response

    # -- viewer --------------------------------------------------------------------------

    async def _record(self, request: web.Request) -> web.Response:
        slide_id = request.match_info["slide_id"]
        check_slide_id(slide_id)
        token = self._token(request)
        self._verifier.verify(token)
        if self._records is None:
            raise NotFound("this node serves no catalogue records", "NO_CATALOGUE")
        record = await self._records.get(token, slide_id)
        return web.json_response(record, headers={"Cache-Control": "private, no-store"})

    async def _viewer(self, request: web.Request) -> web.Response:
        check_slide_id(request.match_info["slide_id"])
        if not VENDOR_MARKER.is_file():
            return web.json_response(
                {"error": "VIEWER_NOT_BUILT", "message": "viewer assets missing: run make viewer"},
                status=503,
            )
        html = (VIEWER_DIR / "index.html").read_bytes()
        return web.Response(
            body=html,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Cache-Control": "no-cache",
                "Content-Security-Policy": _VIEWER_CSP,
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def _static(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        path = (STATIC_DIR / rel).resolve()
        if not path.is_relative_to(STATIC_DIR) or not path.is_file():
            raise NotFound("no such file", "NOT_FOUND")
        if path.suffix not in {".js", ".css", ".png", ".svg"}:
            raise NotFound("no such file", "NOT_FOUND")
        return web.FileResponse(
            path,
            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    async def run(self) -> None:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        self._stopping.set()
