"""Plain-HTTP tile routes for OpenSeadragon and other viewers (aiohttp).

    GET /slides/{slide_id}.dzi                              Deep Zoom descriptor
    GET /slides/{slide_id}_files/{level}/{col}_{row}.jpeg   a tile
    GET /slides/{slide_id}/thumbnail.jpeg                   thumbnail
    GET /healthz

Every request carries a bearer token (`Authorization: Bearer ...`, or `?access_token=` for
viewers that cannot set headers) and is checked by access control like the gRPC calls.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import web

from services.shared.auth import TokenVerifier, bearer_from_metadata
from services.shared.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    TesseraError,
    Unauthenticated,
)
from services.tiling.core import TileData, TilingStage

log = logging.getLogger(__name__)

_TILE = re.compile(r"(\d{1,3})/(\d{1,10})_(\d{1,10})\.(jpeg|png)")
_HTTP_STATUS = {
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    OutOfRange: 404,
    InvalidArgument: 400,
}


class TileHttpServer:
    def __init__(self, stage: TilingStage, verifier: TokenVerifier, host: str, port: int) -> None:
        self._stage = stage
        self._verifier = verifier
        self._host = host
        self._port = port
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
            "Vary": "Origin",
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
        except TesseraError as exc:
            status = next((code for cls, code in _HTTP_STATUS.items() if isinstance(exc, cls)), 503)
            return web.json_response({"error": exc.reason, "message": exc.message}, status=status)
        except Exception as exc:  # noqa: BLE001 - never a traceback to the client
            log.error("unhandled error in http route", extra={"reason": type(exc).__name__})
            return web.json_response({"error": "INTERNAL"}, status=500)

    def _principal(self, request: web.Request):  # type: ignore[no-untyped-def]
        # The header wins; the query parameter is for viewers that cannot set headers.
        if "Authorization" in request.headers:
            return self._verifier.verify(bearer_from_metadata(list(request.headers.items())))
        token = request.query.get("access_token")
        if token:
            return self._verifier.verify(token)
        return self._verifier.verify(bearer_from_metadata([]))

    @staticmethod
    def _respond(request: web.Request, tile: TileData) -> web.Response:
        etag = f'"{tile.etag}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=tile.data, content_type=tile.content_type, headers=headers)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _slide_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not name.endswith(".dzi"):
            raise NotFound("unknown resource", "NOT_FOUND")
        view = await self._stage.descriptor(self._principal(request), name[: -len(".dzi")])
        return web.Response(
            text=view.descriptor_xml,
            content_type="application/xml",
            headers={"Cache-Control": "private, max-age=3600"},
        )

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
