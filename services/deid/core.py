"""De-identification stage: quarantine object in, verified de-identified slide out.

Transport-free: the Kafka handler and the gRPC servicer both call `DeidStage`. Idempotent per
slide: the job record says what was already done, and the outcome event has a deterministic
id, so a redelivered "received" event re-announces the same outcome instead of redoing work.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.deid.engine import DeidPolicy, DeidRejected, deidentify, verify
from services.shared.access import AccessChecker, Action
from services.shared.auth import Principal
from services.shared.counts import from_entries, to_entries
from services.shared.digest import file_sha256
from services.shared.errors import NotFound
from services.shared.events import (
    TOPIC_SLIDE_DEIDENTIFIED,
    TOPIC_SLIDE_REJECTED,
    event_id_for,
    new_envelope,
    publish_stage_failure,
)
from services.shared.outbox import Outbox
from services.shared.ports.documents import Collection
from services.shared.ports.objects import ObjectStore
from services.shared.pseudonym import Pseudonymizer
from services.shared.tempfiles import scratch_dir
from services.shared.wsi.sniff import SlideFormat
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2

log = logging.getLogger(__name__)

FORMAT_OF_PROTO: dict[int, SlideFormat] = {
    common_pb2.SLIDE_FORMAT_APERIO_SVS: SlideFormat.APERIO_SVS,
    common_pb2.SLIDE_FORMAT_HAMAMATSU_NDPI: SlideFormat.HAMAMATSU_NDPI,
    common_pb2.SLIDE_FORMAT_GENERIC_TIFF: SlideFormat.GENERIC_TIFF,
    common_pb2.SLIDE_FORMAT_DICOM_WSI: SlideFormat.DICOM_WSI,
    common_pb2.SLIDE_FORMAT_OME_TIFF: SlideFormat.OME_TIFF,
    common_pb2.SLIDE_FORMAT_QPTIFF: SlideFormat.QPTIFF,
    common_pb2.SLIDE_FORMAT_PHILIPS_TIFF: SlideFormat.PHILIPS_TIFF,
    common_pb2.SLIDE_FORMAT_VENTANA_BIF: SlideFormat.VENTANA_BIF,
}
EXTENSION_OF: dict[int, str] = {
    common_pb2.SLIDE_FORMAT_APERIO_SVS: "svs",
    common_pb2.SLIDE_FORMAT_HAMAMATSU_NDPI: "ndpi",
    common_pb2.SLIDE_FORMAT_GENERIC_TIFF: "tiff",
    common_pb2.SLIDE_FORMAT_DICOM_WSI: "dcm",
    common_pb2.SLIDE_FORMAT_OME_TIFF: "ome.tiff",
    common_pb2.SLIDE_FORMAT_QPTIFF: "qptiff",
    common_pb2.SLIDE_FORMAT_PHILIPS_TIFF: "tiff",
    common_pb2.SLIDE_FORMAT_VENTANA_BIF: "bif",
}


@dataclass(frozen=True)
class JobView:
    slide_id: str
    outcome: str  # PENDING | DEIDENTIFIED | REJECTED
    summary: dict[str, Any]
    reason: str
    detail: str


class DeidStage:
    def __init__(
        self,
        *,
        objects: ObjectStore,
        jobs: Collection,
        outbox: Outbox,
        pseudonymizer: Pseudonymizer,
        policy: DeidPolicy,
        work_dir: Path,
        output_bucket: str,
        access: AccessChecker,
    ) -> None:
        self._objects = objects
        self._jobs = jobs
        self._outbox = outbox
        self._pseudo = pseudonymizer
        self._policy = policy
        self._work = work_dir
        self._bucket = output_bucket
        self._access = access

    async def ensure_ready(self) -> None:
        await self._objects.ensure_bucket(self._bucket)

    async def handle_received(self, env: events_pb2.EventEnvelope) -> None:
        slide_id = env.slide_id
        job = await self._jobs.get(slide_id)
        if job is not None and job["outcome"] in ("DEIDENTIFIED", "REJECTED"):
            await self._announce(job)  # same event id: consumers apply it once
            await self._erase_quarantine(job)
            return
        received = env.slide_received
        fmt = FORMAT_OF_PROTO.get(received.format)
        base = {
            "_id": slide_id,
            "dataset_id": env.dataset_id,
            "format": int(received.format),
            "quarantine_bucket": received.quarantine_bucket,
            "quarantine_key": received.quarantine_key,
        }
        if fmt is None:
            await self._reject(
                base, "UNSUPPORTED_FORMAT", "format not supported by de-identification"
            )
            return
        if await self._objects.stat(received.quarantine_bucket, received.quarantine_key) is None:
            await self._reject(base, "QUARANTINE_OBJECT_MISSING", "no raw upload to process")
            return
        with scratch_dir(self._work, "deid-") as tmp:
            src, dst = tmp / "in", tmp / "out"
            await self._objects.download_file(
                received.quarantine_bucket, received.quarantine_key, src
            )
            try:
                report = await asyncio.to_thread(self._run, src, dst, fmt)
            except DeidRejected as exc:
                await self._reject(base, exc.reason, exc.detail)
                return
            digest, size = await asyncio.to_thread(file_sha256, dst)
            ext = EXTENSION_OF[received.format]
            key = f"slides/{slide_id}/slide.{ext}"
            await self._objects.put_file(self._bucket, key, dst)
        job = {
            **base,
            "outcome": "DEIDENTIFIED",
            "bucket": self._bucket,
            "key": key,
            "sha256": digest,
            "size_bytes": size,
            "summary": {
                "removed": to_entries(report.removed),
                "pseudonymized": to_entries(report.pseudonymized),
                "levels_kept": report.levels_kept,
                "verified": True,
            },
            "geometry": {
                "width": report.width,
                "height": report.height,
                "levels": [{"width": w, "height": h} for w, h in report.level_dimensions],
                "mpp_x": report.mpp_x or 0.0,
                "mpp_y": report.mpp_y or 0.0,
                "objective_power": report.objective_power or 0.0,
            },
            "finished_at": datetime.now(UTC),
        }
        await self._jobs.update({"_id": slide_id}, set_fields=job, upsert=True)
        await self._announce(job)
        await self._erase_quarantine(job)
        log.info("slide de-identified", extra={"slide_id": slide_id, "outcome": "DEIDENTIFIED"})

    async def on_failure(self, env: events_pb2.EventEnvelope, reason: str, detail: str) -> None:
        """The event was dead-lettered: record a final outcome so the slide is not pending."""
        await self._jobs.update(
            {"_id": env.slide_id},
            set_fields={
                "dataset_id": env.dataset_id,
                "outcome": "REJECTED",
                "reason": reason,
                "detail": detail[:300],
            },
            upsert=True,
        )
        await publish_stage_failure(
            self._outbox, "deidentification", "deid-outcome", env, reason, detail
        )

    def _run(self, src: Path, dst: Path, fmt: SlideFormat) -> Any:
        report = deidentify(src, dst, fmt, self._pseudo, self._policy)
        verify(dst, fmt, report.identifying_values, self._policy)
        return report

    async def _reject(self, base: dict[str, Any], reason: str, detail: str) -> None:
        job = {
            **base,
            "outcome": "REJECTED",
            "reason": reason,
            "detail": detail[:300],
            "finished_at": datetime.now(UTC),
        }
        await self._jobs.update({"_id": base["_id"]}, set_fields=job, upsert=True)
        await self._announce(job)
        log.info("slide rejected", extra={"slide_id": base["_id"], "reason": reason})

    async def _erase_quarantine(self, job: dict[str, Any]) -> None:
        """Once the de-identified copy is verified and stored, the identified original goes.
        A rejected slide stays in quarantine (unreadable by any API) for review."""
        if job["outcome"] != "DEIDENTIFIED" or job.get("quarantine_erased_at"):
            return
        await self._objects.delete(job["quarantine_bucket"], job["quarantine_key"])
        await self._jobs.update(
            {"_id": job["_id"]}, set_fields={"quarantine_erased_at": datetime.now(UTC)}
        )

    async def _announce(self, job: dict[str, Any]) -> None:
        slide_id = job["_id"]
        if job["outcome"] == "REJECTED":
            env = new_envelope(
                payload_field="slide_rejected",
                payload=events_pb2.SlideRejected(
                    stage="deidentification", reason=job["reason"], detail=job.get("detail", "")
                ),
                slide_id=slide_id,
                dataset_id=job["dataset_id"],
                event_id=event_id_for(slide_id, "deid-outcome"),
            )
            await self._outbox.publish(TOPIC_SLIDE_REJECTED, env)
            return
        g, s = job["geometry"], job["summary"]
        payload = events_pb2.SlideDeidentified(
            format=job["format"],
            bucket=job["bucket"],
            key=job["key"],
            size_bytes=job["size_bytes"],
            sha256=job["sha256"],
            geometry=common_pb2.SlideGeometry(
                width=g["width"],
                height=g["height"],
                levels=[
                    common_pb2.LevelDimensions(
                        width=lv["width"],
                        height=lv["height"],
                        downsample=(g["width"] / lv["width"]) if lv["width"] else 0.0,
                    )
                    for lv in g["levels"]
                ],
                mpp_x=g["mpp_x"],
                mpp_y=g["mpp_y"],
                objective_power=g["objective_power"],
            ),
            summary=common_pb2.DeidSummary(
                removed=from_entries(s["removed"]),
                pseudonymized=from_entries(s["pseudonymized"]),
                levels_kept=s["levels_kept"],
                verified=s["verified"],
            ),
        )
        env = new_envelope(
            payload_field="slide_deidentified",
            payload=payload,
            slide_id=slide_id,
            dataset_id=job["dataset_id"],
            event_id=event_id_for(slide_id, "deid-outcome"),
        )
        await self._outbox.publish(TOPIC_SLIDE_DEIDENTIFIED, env)

    async def report(self, caller: Principal, slide_id: str) -> JobView:
        job = await self._jobs.get(slide_id)
        if job is None:
            raise NotFound("no de-identification job for this slide", "SLIDE_NOT_FOUND")
        await self._access.require(
            caller.subject, Action.ACTION_READ_RECORD, job["dataset_id"], f"slide/{slide_id}"
        )
        summary = dict(job.get("summary", {}))
        for key in ("removed", "pseudonymized"):
            summary[key] = from_entries(summary.get(key))
        return JobView(
            slide_id,
            job["outcome"],
            summary,
            job.get("reason", ""),
            job.get("detail", ""),
        )
