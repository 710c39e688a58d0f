"""Tiling stage and tile reads. Transport-free: the Kafka handler, the gRPC servicer and the
HTTP routes all call `TilingStage`."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from openslide import OpenSlideError

from services.shared.access import AccessChecker, Action, DecisionCache
from services.shared.auth import Principal
from services.shared.errors import FailedPrecondition, NotFound, OutOfRange, check_slide_id
from services.shared.events import (
    TOPIC_SLIDE_REJECTED,
    TOPIC_SLIDE_TILED,
    event_id_for,
    new_envelope,
    publish_stage_failure,
)
from services.shared.outbox import Outbox
from services.shared.ports.documents import Collection
from services.shared.ports.objects import ObjectStore
from services.shared.tempfiles import scratch_dir
from services.shared.wsi import bundle
from services.tiling.cache import TileCache, TtlCache
from services.tiling.engine import (
    DicomCodec,
    DziError,
    DziGeometry,
    SlideOpenError,
    SlideReadError,
    Tile,
    dicom_series_prefix,
    dzi_object_keys,
    export_dicom,
    make_thumbnail,
    open_builder,
    thumbnail_key,
    tile_key,
)
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2

log = logging.getLogger(__name__)

UPLOAD_CONCURRENCY = 16
BATCH = 64


@dataclass(frozen=True)
class TileData:
    data: bytes
    content_type: str
    etag: str


@dataclass(frozen=True)
class PyramidView:
    slide_id: str
    descriptor_xml: str
    geometry: DziGeometry


class TilingStage:
    def __init__(
        self,
        *,
        objects: ObjectStore,
        pyramids: Collection,
        outbox: Outbox,
        access: AccessChecker,
        tiles_bucket: str,
        work_dir: Path,
        tile_size: int = 254,
        overlap: int = 1,
        cache_bytes: int = 256 * 1024 * 1024,
        access_ttl_s: float = 0.0,
        lossless_copy: bool = True,
        dicom_export: bool = True,
        dicom_codec: DicomCodec = "jpeg",
    ) -> None:
        self._objects = objects
        self._pyramids = pyramids
        self._outbox = outbox
        self._access = access
        self._bucket = tiles_bucket
        self._work = work_dir
        self._tile_size = tile_size
        self._overlap = overlap
        # Tiled-JPEG sources get their own tile size and no overlap, so full-resolution tiles
        # are the scanner's bytes (engine/pyramid.py); tile_size/overlap apply to the rest.
        self._lossless = lossless_copy
        # DICOM WSI archive series next to the pyramid (engine/dicom_export.py).
        self._dicom = dicom_export
        self._dicom_codec: DicomCodec = dicom_codec
        self.cache = TileCache(cache_bytes)
        # Viewing a slide (descriptor, tiles, thumbnail, IIIF) asks access control once per
        # (subject, slide) and window; downloads are asked every time. See `DecisionCache`.
        self.decisions = DecisionCache(access, access_ttl_s)
        self._docs: TtlCache[str, dict[str, Any]] = TtlCache(access_ttl_s, 10_000)
        self._geometry: dict[str, tuple[str, DziGeometry]] = {}

    async def ensure_ready(self) -> None:
        await self._objects.ensure_bucket(self._bucket)

    # -- building -------------------------------------------------------------------------

    async def handle_deidentified(self, env: events_pb2.EventEnvelope) -> None:
        slide_id = env.slide_id
        doc = await self._pyramids.get(slide_id)
        if doc is not None and doc.get("state") == "TILED":
            await self._announce(doc)
            return
        if doc is not None and doc.get("state") == "REJECTED":
            await self._reject(slide_id, env.dataset_id, doc["reason"])
            return
        src = env.slide_deidentified
        with scratch_dir(self._work, "tile-") as tmp:
            path = tmp / "slide"
            await self._objects.download_file(src.bucket, src.key, path)
            try:
                path = await asyncio.to_thread(_unpacked_entry, path, tmp / "bundle")
                summary = await self._build(slide_id, path)
                thumb = await asyncio.to_thread(make_thumbnail, path, 1024)
                dicom_prefix = await self._export_dicom(slide_id, path, tmp / "dicom")
            except (SlideOpenError, SlideReadError) as exc:
                # The pixels cannot be read at all: a permanent outcome, not a retry.
                reason = (
                    "UNOPENABLE_SLIDE" if isinstance(exc, SlideOpenError) else "UNREADABLE_PIXELS"
                )
                await self._objects.delete_prefix(self._bucket, f"slides/{slide_id}/")
                await self._pyramids.update(
                    {"_id": slide_id},
                    set_fields={
                        "dataset_id": env.dataset_id,
                        "state": "REJECTED",
                        "reason": reason,
                    },
                    upsert=True,
                )
                await self._reject(slide_id, env.dataset_id, reason)
                return
        thumb_key = thumbnail_key(slide_id)
        await self._objects.put_bytes(self._bucket, thumb_key, thumb, "image/jpeg")
        descriptor_key, _ = dzi_object_keys(slide_id)
        doc = {
            "_id": slide_id,
            "dataset_id": env.dataset_id,
            "state": "TILED",
            "bucket": self._bucket,
            "descriptor_key": descriptor_key,
            "thumbnail_key": thumb_key,
            "tile_size": summary["tile_size"],
            "overlap": summary["overlap"],
            "tile_format": "jpeg",
            "dicom_series_prefix": dicom_prefix,
            "level_count": summary["level_count"],
            "tile_count": summary["tile_count"],
            "failed_tiles": summary["failed_tiles"],
            "width": summary["width"],
            "height": summary["height"],
            "source_bucket": src.bucket,
            "source_key": src.key,
            "source_sha256": src.sha256,
            "source_size": src.size_bytes,
            "extension": src.key.rsplit(".", 1)[-1],
            "geometry": {
                "width": src.geometry.width,
                "height": src.geometry.height,
                "mpp_x": src.geometry.mpp_x,
                "mpp_y": src.geometry.mpp_y,
            },
            "tiled_at": datetime.now(UTC),
        }
        await self._pyramids.update({"_id": slide_id}, set_fields=doc, upsert=True)
        await self._announce(doc)
        log.info("slide tiled", extra={"slide_id": slide_id, "count": summary["tile_count"]})

    async def _build(self, slide_id: str, path: Path) -> dict[str, Any]:
        builder = await asyncio.to_thread(
            functools.partial(
                open_builder,
                path,
                tile_size=self._tile_size,
                overlap=self._overlap,
                lossless=self._lossless,
            )
        )
        try:
            batches: Iterator[list[Tile]] = builder.iter_batches(BATCH)
            sem = asyncio.Semaphore(UPLOAD_CONCURRENCY)
            content_type = builder.content_type

            async def upload(tile: Tile) -> None:
                async with sem:
                    key = tile_key(slide_id, tile.level, tile.col, tile.row, builder.format)
                    await self._objects.put_bytes(self._bucket, key, tile.data, content_type)

            count = 0
            while True:
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    break
                await asyncio.gather(*(upload(t) for t in batch))
                count += len(batch)
            descriptor_key, _ = dzi_object_keys(slide_id)
            await self._objects.put_bytes(
                self._bucket, descriptor_key, builder.descriptor().encode(), "application/xml"
            )
            failed = [f"{p.level}/{p.col}_{p.row}" for p in builder.failed_tiles()]
            width, height = builder.geometry.width, builder.geometry.height
            return {
                "level_count": builder.level_count,
                "tile_count": count,
                "failed_tiles": failed,
                "width": width,
                "height": height,
                "tile_size": builder.geometry.tile_size,
                "overlap": builder.geometry.overlap,
            }
        finally:
            await asyncio.to_thread(builder.close)

    async def _export_dicom(self, slide_id: str, path: Path, out: Path) -> str:
        """Write the DICOM WSI series and store it under ``slides/ID/dicom/``; the prefix, or
        "" when switched off or the pixels cannot be re-read for it (the pyramid stands)."""
        if not self._dicom:
            return ""
        try:
            series = await asyncio.to_thread(
                functools.partial(export_dicom, path, out, slide_id, codec=self._dicom_codec)
            )
        except (OpenSlideError, SlideOpenError, SlideReadError, OSError, ValueError) as exc:
            log.warning(
                "dicom export skipped",
                extra={"slide_id": slide_id, "reason": type(exc).__name__},
            )
            return ""
        prefix = dicom_series_prefix(slide_id)
        for level in series.levels:
            await self._objects.put_file(
                self._bucket, prefix + level.path.name, level.path, "application/dicom"
            )
        return prefix

    async def on_failure(self, env: events_pb2.EventEnvelope, reason: str, detail: str) -> None:
        await publish_stage_failure(self._outbox, "tiling", "tiling-outcome", env, reason, detail)

    async def _reject(self, slide_id: str, dataset_id: str, reason: str) -> None:
        env = new_envelope(
            payload_field="slide_rejected",
            payload=events_pb2.SlideRejected(
                stage="tiling", reason=reason, detail="slide pixels could not be read"
            ),
            slide_id=slide_id,
            dataset_id=dataset_id,
            event_id=event_id_for(slide_id, "tiling-outcome"),
        )
        await self._outbox.publish(TOPIC_SLIDE_REJECTED, env)
        log.info("slide rejected", extra={"slide_id": slide_id, "reason": reason})

    async def _announce(self, doc: dict[str, Any]) -> None:
        g = doc["geometry"]
        payload = events_pb2.SlideTiled(
            pyramid=common_pb2.Pyramid(
                bucket=doc["bucket"],
                descriptor_key=doc["descriptor_key"],
                tile_size=doc["tile_size"],
                overlap=doc["overlap"],
                tile_format=doc["tile_format"],
                level_count=doc["level_count"],
                thumbnail_key=doc["thumbnail_key"],
                tile_count=doc["tile_count"],
                failed_tiles=doc["failed_tiles"],
                dicom_series_prefix=doc.get("dicom_series_prefix", ""),
            ),
            geometry=common_pb2.SlideGeometry(
                width=g["width"], height=g["height"], mpp_x=g["mpp_x"], mpp_y=g["mpp_y"]
            ),
        )
        env = new_envelope(
            payload_field="slide_tiled",
            payload=payload,
            slide_id=doc["_id"],
            dataset_id=doc["dataset_id"],
            event_id=event_id_for(doc["_id"], "tiled"),
        )
        await self._outbox.publish(TOPIC_SLIDE_TILED, env)

    # -- reading --------------------------------------------------------------------------

    async def _pyramid(
        self, caller: Principal, slide_id: str, resource: str, *, view: bool = False
    ) -> dict[str, Any]:
        check_slide_id(slide_id)
        doc = self._docs.get(slide_id) if view else None
        if doc is None:
            doc = await self._pyramids.get(slide_id)
            if doc is None:
                raise NotFound("no pyramid for this slide (unknown, or not tiled yet)", "NOT_TILED")
            if view and doc.get("state") == "TILED":
                self._docs.put(slide_id, doc)
        if view:
            await self.decisions.require(
                caller.subject,
                Action.ACTION_READ_PIXELS,
                doc["dataset_id"],
                slide_id,
                f"slide/{slide_id}/view",
            )
        else:
            await self._access.require(
                caller.subject, Action.ACTION_READ_PIXELS, doc["dataset_id"], resource
            )
        if doc.get("state") != "TILED":
            raise FailedPrecondition(
                f"the slide was rejected by tiling ({doc.get('reason', 'UNKNOWN')})",
                "SLIDE_REJECTED",
            )
        return doc

    async def _geometry_of(self, doc: dict[str, Any]) -> tuple[str, DziGeometry]:
        cached = self._geometry.get(doc["_id"])
        if cached is None:
            xml = (await self._objects.get_bytes(doc["bucket"], doc["descriptor_key"])).decode()
            cached = (xml, DziGeometry.from_descriptor(xml))
            self._geometry[doc["_id"]] = cached
        return cached

    async def descriptor(self, caller: Principal, slide_id: str) -> PyramidView:
        doc = await self._pyramid(caller, slide_id, f"slide/{slide_id}/dzi", view=True)
        xml, geom = await self._geometry_of(doc)
        return PyramidView(slide_id, xml, geom)

    async def tile(
        self, caller: Principal, slide_id: str, level: int, col: int, row: int
    ) -> TileData:
        doc = await self._pyramid(
            caller, slide_id, f"slide/{slide_id}/tile/{level}/{col}_{row}", view=True
        )
        _, geom = await self._geometry_of(doc)
        try:
            geom.check(level, col, row)
        except DziError as exc:
            raise OutOfRange(str(exc), "TILE_OUT_OF_RANGE") from None
        key = tile_key(slide_id, level, col, row, geom.format)
        blob = self.cache.get(key)
        if blob is None:
            blob = self.cache.put(key, await self._objects.get_bytes(doc["bucket"], key))
        return TileData(blob.data, geom.content_type, blob.etag)

    async def thumbnail(self, caller: Principal, slide_id: str) -> TileData:
        doc = await self._pyramid(caller, slide_id, f"slide/{slide_id}/thumbnail", view=True)
        data = await self._objects.get_bytes(doc["bucket"], doc["thumbnail_key"])
        return TileData(data, "image/jpeg", hashlib.sha1(data, usedforsecurity=False).hexdigest())

    async def download(
        self, caller: Principal, slide_id: str, chunk: int = 2 * 1024 * 1024
    ) -> tuple[dict[str, Any], AsyncIterator[tuple[int, bytes]]]:
        doc = await self._pyramid(caller, slide_id, f"slide/{slide_id}/file")
        info = await self._objects.stat(doc["source_bucket"], doc["source_key"])
        if info is None:
            raise FailedPrecondition("the de-identified file is no longer stored", "ERASED")

        async def chunks() -> AsyncIterator[tuple[int, bytes]]:
            offset = 0
            while offset < info.size:
                n = min(chunk, info.size - offset)
                data = await self._objects.get_range(
                    doc["source_bucket"], doc["source_key"], offset, n
                )
                yield offset, data
                offset += len(data)

        return {**doc, "size": info.size}, chunks()


def _unpacked_entry(path: Path, dest: Path) -> Path:
    """The file OpenSlide opens: ``path`` itself, or - when the de-identified slide is a
    bundle (MRXS, DICOM series: services/shared/wsi/bundle.py) - its entry file after
    unpacking it to ``dest`` (inside the stage's scratch directory)."""
    if not bundle.is_zip(path):
        return path
    try:
        lay = bundle.layout(path)
        bundle.extract(path, dest, lay.members)
        return bundle.entry_point(dest)
    except bundle.BundleError as exc:
        raise SlideOpenError(f"cannot open slide bundle: {exc.reason}") from None
