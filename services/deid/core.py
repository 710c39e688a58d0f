"""De-identification stage: quarantine object in, verified de-identified slide out.

Transport-free: the Kafka handler and the gRPC servicer both call `DeidStage`. Idempotent per
slide: the job record says what was already done, and the outcome event has a deterministic
id, so a redelivered "received" event re-announces the same outcome instead of redoing work.

Outcomes of a job: PENDING (being processed), DEIDENTIFIED, REJECTED and NEEDS_REVIEW: the
file is well-formed but holds metadata no rule knows, so it stays in quarantine until a data
steward approves it with an explicit rule per key (stored with the dataset, so the dataset's
later slides get the same treatment) or rejects it.

The identified original ("raw copy") in quarantine is erased once the slide has a final
outcome: at once by default, or after the dataset's retention (hours) by the sweep. A held
slide keeps it until the steward's decision. Every erasure is recorded on the job
(`quarantine_erased_at`, `quarantine_erasure_reason`) and announced on
`tessera.quarantine.erased.v1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.deid.engine import DeidNeedsReview, DeidPolicy, DeidRejected, deidentify, verify
from services.deid.engine.model import RULE_KEEP, RULE_KEY, RULE_REMOVE, ReviewItem
from services.shared import metrics
from services.shared.access import AccessChecker, Action
from services.shared.auth import Principal
from services.shared.counts import from_entries, to_entries
from services.shared.digest import file_sha256
from services.shared.errors import FailedPrecondition, InvalidArgument, NotFound, check_slide_id
from services.shared.events import (
    TOPIC_QUARANTINE_ERASED,
    TOPIC_SLIDE_DEIDENTIFIED,
    TOPIC_SLIDE_HELD,
    TOPIC_SLIDE_REJECTED,
    TOPIC_SLIDE_REVIEWED,
    event_id_for,
    new_envelope,
    publish_stage_failure,
)
from services.shared.outbox import Outbox
from services.shared.ports.documents import Collection
from services.shared.ports.objects import ObjectStore
from services.shared.pseudonym import Pseudonymizer
from services.shared.tempfiles import scratch_dir
from services.shared.wsi.bundle import is_zip
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
    common_pb2.SLIDE_FORMAT_MRXS: SlideFormat.MIRAX,
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
    common_pb2.SLIDE_FORMAT_MRXS: "zip",
}

PENDING, DEIDENTIFIED, REJECTED, NEEDS_REVIEW = (
    "PENDING",
    "DEIDENTIFIED",
    "REJECTED",
    "NEEDS_REVIEW",
)
FINAL = (DEIDENTIFIED, REJECTED)

# Why the raw copy left quarantine.
ERASED_VERIFIED = "VERIFIED_COPY_STORED"
ERASED_RETENTION = "RETENTION_EXPIRED"
ERASED_REVIEW_REJECTED = "REVIEW_REJECTED"
ERASED_REJECTED = "REJECTED"

# Dataset policy values (as in the API: tessera.deid.v1 MacroPolicy / DatePolicy).
MACRO_REMOVE, MACRO_KEEP_LABEL_BLANKED = "REMOVE", "KEEP_LABEL_BLANKED"
DATES_REMOVE, DATES_YEAR_ONLY = "REMOVE", "YEAR_ONLY"
_ENGINE_MACRO = {MACRO_REMOVE: "remove", MACRO_KEEP_LABEL_BLANKED: "blank_label"}
_ENGINE_DATES = {DATES_REMOVE: "remove", DATES_YEAR_ONLY: "year"}
_API_MACRO = {v: k for k, v in _ENGINE_MACRO.items()}
_API_DATES = {v: k for k, v in _ENGINE_DATES.items()}
RULE_ACTIONS = {"REMOVE": RULE_REMOVE, "KEEP": RULE_KEEP}
# An identified copy may be kept at most this long after the outcome (30 days).
MAX_RETENTION_HOURS = 720
MAX_RULES_PER_REQUEST = 64
# A re-run after an approval that has not finished after this long is resumed by the sweep
# (its process died); the lease is taken with a compare-and-set, so only one resumes it.
RERUN_LEASE = timedelta(minutes=15)
SWEEP_BATCH = 200


@dataclass(frozen=True)
class JobView:
    slide_id: str
    outcome: str  # PENDING | DEIDENTIFIED | REJECTED | NEEDS_REVIEW
    summary: dict[str, Any]
    reason: str
    detail: str
    review_items: tuple[ReviewItem, ...] = ()
    quarantine_erased_at: datetime | None = None
    quarantine_erasure_reason: str = ""
    quarantine_erase_after: datetime | None = None


@dataclass(frozen=True)
class HeldSlide:
    slide_id: str
    dataset_id: str
    reason: str
    detail: str
    items: tuple[ReviewItem, ...]
    held_at: datetime | None
    round: int


@dataclass(frozen=True)
class StoredRule:
    key: str
    action: str  # REMOVE | KEEP
    approved_by: str
    approved_at: datetime
    slide_id: str


@dataclass(frozen=True)
class DatasetPolicy:
    dataset_id: str
    macro: str = MACRO_REMOVE
    dates: str = DATES_REMOVE
    retention_hours: int = 0
    rules: tuple[StoredRule, ...] = ()
    updated_at: datetime | None = None
    updated_by: str = ""


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


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
        datasets: Collection | None = None,
        rules: Collection | None = None,
        default_retention_hours: int = 0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._objects = objects
        self._jobs = jobs
        self._outbox = outbox
        self._pseudo = pseudonymizer
        self._policy = policy  # node defaults; a dataset's stored policy overrides them
        self._work = work_dir
        self._bucket = output_bucket
        self._access = access
        self._datasets = datasets
        self._rules = rules
        self._default_retention = default_retention_hours
        self._now = clock

    async def ensure_ready(self) -> None:
        await self._objects.ensure_bucket(self._bucket)
        await self._jobs.ensure_index([("erase_after", 1)])
        await self._jobs.ensure_index([("outcome", 1), ("dataset_id", 1)])
        if self._rules is not None:
            await self._rules.ensure_index([("dataset_id", 1)])

    # -- pipeline -------------------------------------------------------------------------

    async def handle_received(self, env: events_pb2.EventEnvelope) -> None:
        slide_id = env.slide_id
        job = await self._jobs.get(slide_id)
        if job is not None and job["outcome"] in (*FINAL, NEEDS_REVIEW):
            await self._announce(job)  # same event id: consumers apply it once
            await self._settle_quarantine(job)
            return
        received = env.slide_received
        base = {
            "_id": slide_id,
            "dataset_id": env.dataset_id,
            "format": int(received.format),
            "quarantine_bucket": received.quarantine_bucket,
            "quarantine_key": received.quarantine_key,
        }
        await self._process(base)

    async def _process(self, job: dict[str, Any]) -> dict[str, Any]:
        """De-identify the raw copy of `job` with the dataset's policy; record, announce and
        settle the outcome. Returns the job as stored."""
        slide_id = str(job["_id"])
        fmt = FORMAT_OF_PROTO.get(int(job["format"]))
        if fmt is None:
            return await self._reject(
                job, "UNSUPPORTED_FORMAT", "format not supported by de-identification"
            )
        if await self._objects.stat(job["quarantine_bucket"], job["quarantine_key"]) is None:
            return await self._reject(job, "QUARANTINE_OBJECT_MISSING", "no raw upload to process")
        ds = await self.dataset_policy(str(job["dataset_id"]))
        policy = self.engine_policy(ds)
        applied = {
            "macro": ds.macro,
            "dates": ds.dates,
            "retention_hours": ds.retention_hours,
            "rule_keys": [k for k, _a in policy.approved_rules],
        }
        with scratch_dir(self._work, "deid-") as tmp:
            src, dst = tmp / "in", tmp / "out"
            await self._objects.download_file(job["quarantine_bucket"], job["quarantine_key"], src)
            try:
                report = await asyncio.to_thread(self._run, src, dst, fmt, policy)
            except DeidNeedsReview as exc:
                return await self._hold(job, exc.items, applied)
            except DeidRejected as exc:
                return await self._reject(job, exc.reason, exc.detail, applied)
            digest, size = await asyncio.to_thread(file_sha256, dst)
            # multi-file slides (MRXS, DICOM series) are stored as one bundle ZIP
            ext = "zip" if is_zip(dst) else EXTENSION_OF[int(job["format"])]
            key = f"slides/{slide_id}/slide.{ext}"
            await self._objects.put_file(self._bucket, key, dst)
        now = self._now()
        job = {
            **_identity(job),
            "outcome": DEIDENTIFIED,
            "reason": "",
            "detail": "",
            "review": None,
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
            "applied_policy": applied,
            "finished_at": now,
            **self._erasure_due(now, ds.retention_hours, ERASED_VERIFIED),
        }
        await self._jobs.update({"_id": slide_id}, set_fields=job, upsert=True)
        metrics.DEID_OUTCOMES.labels(DEIDENTIFIED, "OK").inc()
        await self._announce(job)
        await self._settle_quarantine(job)
        log.info("slide de-identified", extra={"slide_id": slide_id, "outcome": DEIDENTIFIED})
        return job

    async def on_failure(self, env: events_pb2.EventEnvelope, reason: str, detail: str) -> None:
        """The event was dead-lettered: record a final outcome so the slide is not pending,
        and let the raw copy go like any rejected slide's (the sweep retries the erasure)."""
        now = self._now()
        fields: dict[str, Any] = {
            "dataset_id": env.dataset_id,
            "outcome": REJECTED,
            "reason": reason,
            "detail": detail[:300],
            "finished_at": now,
        }
        received = env.slide_received
        if received.quarantine_bucket and received.quarantine_key:
            fields |= {
                "format": int(received.format),
                "quarantine_bucket": received.quarantine_bucket,
                "quarantine_key": received.quarantine_key,
            }
            ds = await self.dataset_policy(env.dataset_id)
            fields |= self._erasure_due(now, ds.retention_hours, ERASED_REJECTED)
        await self._jobs.update({"_id": env.slide_id}, set_fields=fields, upsert=True)
        metrics.DEID_OUTCOMES.labels("FAILED", reason).inc()  # dead-lettered
        await publish_stage_failure(
            self._outbox, "deidentification", "deid-outcome", env, reason, detail
        )

    def _run(self, src: Path, dst: Path, fmt: SlideFormat, policy: DeidPolicy) -> Any:
        report = deidentify(src, dst, fmt, self._pseudo, policy)
        verify(dst, fmt, report.identifying_values, policy)
        return report

    def _rejected_fields(
        self, reason: str, detail: str, retention_hours: int, erasure: str = ERASED_REJECTED
    ) -> dict[str, Any]:
        now = self._now()
        return {
            "outcome": REJECTED,
            "reason": reason,
            "detail": detail[:300],
            "review": None,
            "finished_at": now,
            **self._erasure_due(now, retention_hours, erasure),
        }

    async def _reject(
        self,
        base: dict[str, Any],
        reason: str,
        detail: str,
        applied: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        ds = await self.dataset_policy(str(base["dataset_id"]))
        job = {**_identity(base), **self._rejected_fields(reason, detail, ds.retention_hours)}
        if applied is not None:
            job["applied_policy"] = applied
        await self._jobs.update({"_id": base["_id"]}, set_fields=job, upsert=True)
        metrics.DEID_OUTCOMES.labels(REJECTED, reason).inc()
        await self._announce(job)
        await self._settle_quarantine(job)
        log.info("slide rejected", extra={"slide_id": base["_id"], "reason": reason})
        return job

    async def _hold(
        self, base: dict[str, Any], items: Sequence[ReviewItem], applied: dict[str, Any]
    ) -> dict[str, Any]:
        """Keep the slide (and its raw copy) in quarantine for a data steward's decision."""
        now = self._now()
        rnd = int(base.get("review_round") or 0) + 1
        keys = ", ".join(i.key for i in items[:20])
        job = {
            **_identity(base),
            "outcome": NEEDS_REVIEW,
            "reason": items[0].reason,
            "detail": f"held for review: {keys}"[:300],
            "review": {
                "items": [{"key": i.key, "reason": i.reason, "where": i.where} for i in items],
                "round": rnd,
            },
            "review_round": rnd,
            "held_at": now,
            "applied_policy": applied,
        }
        await self._jobs.update({"_id": base["_id"]}, set_fields=job, upsert=True)
        metrics.DEID_OUTCOMES.labels(NEEDS_REVIEW, job["reason"]).inc()
        await self._announce(job)
        log.info(
            "slide held for review",
            extra={"slide_id": base["_id"], "reason": job["reason"], "count": len(items)},
        )
        return job

    # -- quarantine -----------------------------------------------------------------------

    def _erasure_due(self, now: datetime, retention_hours: int, reason: str) -> dict[str, Any]:
        """When the raw copy of a slide with a final outcome goes. Always a time (now for no
        retention), so the sweep erases what a crash or an object-store outage left behind."""
        if retention_hours > 0:
            return {
                "erase_after": now + timedelta(hours=retention_hours),
                "erase_reason": ERASED_RETENTION,
            }
        return {"erase_after": now, "erase_reason": reason}

    async def _settle_quarantine(self, job: dict[str, Any]) -> None:
        if job["outcome"] not in FINAL or not job.get("quarantine_key"):
            return
        if job.get("quarantine_erased_at"):
            await self._announce_erasure(job)  # a redelivery: same event id
            return
        due = _aware(job.get("erase_after"))
        if due is not None and due <= self._now():
            await self._erase(job, str(job.get("erase_reason") or ERASED_VERIFIED))

    async def _erase(self, job: dict[str, Any], reason: str) -> None:
        slide_id = str(job["_id"])
        await self._objects.delete(job["quarantine_bucket"], job["quarantine_key"])
        now = self._now()
        fields = {"quarantine_erased_at": now, "quarantine_erasure_reason": reason}
        await self._jobs.update({"_id": slide_id}, set_fields=fields)
        job.update(fields)
        await self._announce_erasure(job)
        log.info("quarantine erased", extra={"slide_id": slide_id, "reason": reason})

    async def _announce_erasure(self, job: dict[str, Any]) -> None:
        payload = events_pb2.QuarantineErased(reason=job["quarantine_erasure_reason"])
        payload.erased_at.FromDatetime(_aware(job["quarantine_erased_at"]) or self._now())
        env = new_envelope(
            payload_field="quarantine_erased",
            payload=payload,
            slide_id=str(job["_id"]),
            dataset_id=str(job["dataset_id"]),
            event_id=event_id_for(str(job["_id"]), "quarantine-erased"),
        )
        await self._outbox.publish(TOPIC_QUARANTINE_ERASED, env)

    async def sweep(self) -> int:
        """Erase raw copies whose time has come; resume approved re-runs whose process died.
        Returns how many raw copies were erased."""
        now = self._now()
        erased = 0
        due = await self._jobs.find(
            {"erase_after": {"$lte": now}, "quarantine_erased_at": {"$exists": False}},
            sort=[("erase_after", 1)],
            limit=SWEEP_BATCH,
        )
        for job in due:
            if job.get("outcome") not in FINAL or not job.get("quarantine_key"):
                continue
            await self._erase(job, str(job.get("erase_reason") or ERASED_RETENTION))
            erased += 1
        stale = await self._jobs.find(
            {"outcome": PENDING, "rerun_started_at": {"$lte": now - RERUN_LEASE}},
            limit=SWEEP_BATCH,
        )
        for job in stale:
            taken = await self._jobs.update(
                {
                    "_id": job["_id"],
                    "outcome": PENDING,
                    "rerun_started_at": job["rerun_started_at"],
                },
                set_fields={"rerun_started_at": now},
            )
            if taken:
                await self._process(job)
        if erased:
            log.info("quarantine sweep", extra={"count": erased})
        return erased

    async def run_sweeper(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - a store may be down: next round
                log.warning("quarantine sweep failed", extra={"reason": type(exc).__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    # -- events ---------------------------------------------------------------------------

    async def _announce(self, job: dict[str, Any]) -> None:
        slide_id = job["_id"]
        if job["outcome"] == NEEDS_REVIEW:
            review = job.get("review") or {}
            rnd = int(review.get("round") or job.get("review_round") or 1)
            env = new_envelope(
                payload_field="slide_held_for_review",
                payload=events_pb2.SlideHeldForReview(
                    stage="deidentification",
                    reason=job["reason"],
                    detail=job.get("detail", ""),
                    keys=[i["key"] for i in review.get("items", [])],
                    round=rnd,
                ),
                slide_id=slide_id,
                dataset_id=job["dataset_id"],
                event_id=event_id_for(slide_id, f"deid-held-{rnd}"),
            )
            await self._outbox.publish(TOPIC_SLIDE_HELD, env)
            return
        if job["outcome"] == REJECTED:
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

    async def _announce_review(
        self, job: dict[str, Any], decision: int, reviewer: str, rules: dict[str, str], did: str
    ) -> None:
        rnd = int(job.get("review_round") or 1)
        env = new_envelope(
            payload_field="slide_reviewed",
            payload=events_pb2.SlideReviewed(
                decision=decision,  # type: ignore[arg-type]
                reviewer=reviewer,
                removed_keys=sorted(k for k, a in rules.items() if a == RULE_REMOVE),
                kept_keys=sorted(k for k, a in rules.items() if a == RULE_KEEP),
                access_decision_id=did,
                round=rnd,
            ),
            slide_id=str(job["_id"]),
            dataset_id=str(job["dataset_id"]),
            event_id=event_id_for(str(job["_id"]), f"deid-review-{rnd}"),
        )
        await self._outbox.publish(TOPIC_SLIDE_REVIEWED, env)

    # -- review by a data steward ---------------------------------------------------------

    async def _held_job(self, caller: Principal, slide_id: str, verb: str, purpose: str) -> Any:
        check_slide_id(slide_id)
        job = await self._jobs.get(slide_id)
        if job is None:
            raise NotFound("no de-identification job for this slide", "SLIDE_NOT_FOUND")
        decision = await self._access.require(
            caller.subject,
            Action.ACTION_REVIEW,
            job["dataset_id"],
            f"slide/{slide_id}/deid-review/{verb}",
            purpose[:200],
        )
        if job["outcome"] != NEEDS_REVIEW:
            raise FailedPrecondition("the slide is not held for review", "NOT_IN_REVIEW")
        return job, decision.decision_id

    async def approve(
        self, caller: Principal, slide_id: str, rules: Sequence[tuple[str, str]]
    ) -> JobView:
        """Approve a held slide with a rule ("REMOVE" | "KEEP") for every key it is held for;
        the rules are stored with the dataset and the raw copy is de-identified again."""
        # for the audit trail: the rule keys asked for (well-formed ones only)
        purpose = "approve " + ", ".join(
            f"{k}={a}" for k, a in sorted(rules) if RULE_KEY.fullmatch(k) and a in RULE_ACTIONS
        )
        job, decision_id = await self._held_job(caller, slide_id, "approve", purpose)
        wanted = _check_rules(rules)
        held = [i["key"] for i in (job.get("review") or {}).get("items", [])]
        missing = [k for k in held if k not in wanted]
        if missing:
            raise InvalidArgument(
                f"no rule for held key(s): {', '.join(missing[:20])}", "RULES_INCOMPLETE"
            )
        now = self._now()
        claimed = await self._jobs.update(
            {"_id": slide_id, "outcome": NEEDS_REVIEW, "review_round": job.get("review_round")},
            set_fields={"outcome": PENDING, "rerun_started_at": now},
        )
        if not claimed:
            raise FailedPrecondition("the slide was decided meanwhile", "NOT_IN_REVIEW")
        engine_rules = {k: RULE_ACTIONS[a] for k, a in wanted.items()}
        await self._store_rules(str(job["dataset_id"]), slide_id, caller.subject, wanted, now)
        await self._jobs.update(
            {"_id": slide_id},
            push={
                "decisions": {
                    "decision": "APPROVED",
                    "by": caller.subject,
                    "at": now,
                    "round": job.get("review_round"),
                    "rules": [{"key": k, "action": a} for k, a in sorted(wanted.items())],
                    "access_decision_id": decision_id,
                }
            },
        )
        await self._announce_review(
            job, events_pb2.REVIEW_DECISION_APPROVED, caller.subject, engine_rules, decision_id
        )
        log.info("held slide approved", extra={"slide_id": slide_id, "count": len(wanted)})
        final = await self._process({**job, "outcome": PENDING})
        return _view(final)

    async def reject_review(self, caller: Principal, slide_id: str) -> JobView:
        """Reject a held slide: REJECTED, and its raw copy is erased at once."""
        job, decision_id = await self._held_job(caller, slide_id, "reject", "reject")
        now = self._now()
        # final in one step (erase_after = now): a crash after it leaves the erasure to the
        # sweep, never a held slide nobody can decide on any more
        fields = self._rejected_fields(
            "REVIEW_REJECTED", "rejected by a data steward", 0, ERASED_REVIEW_REJECTED
        )
        claimed = await self._jobs.update(
            {"_id": slide_id, "outcome": NEEDS_REVIEW, "review_round": job.get("review_round")},
            set_fields=fields,
            push={
                "decisions": {
                    "decision": "REJECTED",
                    "by": caller.subject,
                    "at": now,
                    "round": job.get("review_round"),
                    "rules": [],
                    "access_decision_id": decision_id,
                }
            },
        )
        if not claimed:
            raise FailedPrecondition("the slide was decided meanwhile", "NOT_IN_REVIEW")
        await self._announce_review(
            job, events_pb2.REVIEW_DECISION_REJECTED, caller.subject, {}, decision_id
        )
        final = {**job, **fields}
        await self._announce(final)
        await self._settle_quarantine(final)
        log.info("held slide rejected", extra={"slide_id": slide_id})
        return _view(await self._jobs.get(slide_id) or final)

    async def list_reviews(
        self, caller: Principal, dataset_id: str = "", limit: int = 100
    ) -> list[HeldSlide]:
        if not 0 <= limit <= 500:
            raise InvalidArgument("page_size must be within 1..500", "BAD_PAGE_SIZE")
        if dataset_id:
            await self._access.require(
                caller.subject, Action.ACTION_REVIEW, dataset_id, f"dataset/{dataset_id}/reviews"
            )
            datasets = [dataset_id]
        else:
            datasets = await self._access.permitted_datasets(caller.subject, Action.ACTION_REVIEW)
        if not datasets:
            return []
        docs = await self._jobs.find(
            {"outcome": NEEDS_REVIEW, "dataset_id": {"$in": datasets}},
            sort=[("held_at", 1), ("_id", 1)],
            limit=limit or 100,
        )
        return [
            HeldSlide(
                str(d["_id"]),
                str(d["dataset_id"]),
                str(d.get("reason", "")),
                str(d.get("detail", "")),
                _items(d),
                _aware(d.get("held_at")),
                int(d.get("review_round") or 1),
            )
            for d in docs
        ]

    # -- dataset policy -------------------------------------------------------------------

    async def dataset_policy(self, dataset_id: str) -> DatasetPolicy:
        """The stored policy of a dataset, or the node's defaults."""
        default = DatasetPolicy(
            dataset_id,
            macro=_API_MACRO[self._policy.macro_policy],
            dates=_API_DATES[self._policy.date_policy],
            retention_hours=self._default_retention,
        )
        doc = await self._datasets.get(dataset_id) if self._datasets is not None else None
        rules: tuple[StoredRule, ...] = ()
        if self._rules is not None:
            rule_docs = await self._rules.find({"dataset_id": dataset_id}, sort=[("key", 1)])
            rules = tuple(
                StoredRule(
                    str(r["key"]),
                    str(r["action"]),
                    str(r["approved_by"]),
                    _aware(r["approved_at"]) or self._now(),
                    str(r.get("slide_id", "")),
                )
                for r in rule_docs
            )
        if doc is None:
            return dataclasses.replace(default, rules=rules)
        return DatasetPolicy(
            dataset_id,
            macro=str(doc.get("macro") or default.macro),
            dates=str(doc.get("dates") or default.dates),
            retention_hours=int(doc.get("retention_hours", default.retention_hours)),
            rules=rules,
            updated_at=_aware(doc.get("updated_at")),
            updated_by=str(doc.get("updated_by", "")),
        )

    def engine_policy(self, ds: DatasetPolicy) -> DeidPolicy:
        return dataclasses.replace(
            self._policy,
            macro_policy=_ENGINE_MACRO[ds.macro],
            date_policy=_ENGINE_DATES[ds.dates],
            approved_rules=tuple((r.key, RULE_ACTIONS[r.action]) for r in ds.rules),
        )

    async def get_policy(self, caller: Principal, dataset_id: str) -> DatasetPolicy:
        if not dataset_id:
            raise InvalidArgument("dataset_id is required", "MISSING_FIELD")
        await self._access.require(
            caller.subject, Action.ACTION_READ_RECORD, dataset_id, f"dataset/{dataset_id}/policy"
        )
        return await self.dataset_policy(dataset_id)

    async def set_policy(
        self,
        caller: Principal,
        dataset_id: str,
        *,
        macro: str = "",
        dates: str = "",
        retention_hours: int | None = None,
    ) -> DatasetPolicy:
        """Set (part of) a dataset's policy; applies to slides processed from now on."""
        if not dataset_id:
            raise InvalidArgument("dataset_id is required", "MISSING_FIELD")
        await self._access.require(
            caller.subject, Action.ACTION_REVIEW, dataset_id, f"dataset/{dataset_id}/policy"
        )
        if macro and macro not in _ENGINE_MACRO:
            raise InvalidArgument("macro must be REMOVE or KEEP_LABEL_BLANKED", "BAD_POLICY")
        if dates and dates not in _ENGINE_DATES:
            raise InvalidArgument("dates must be REMOVE or YEAR_ONLY", "BAD_POLICY")
        if retention_hours is not None and not 0 <= retention_hours <= MAX_RETENTION_HOURS:
            raise InvalidArgument(
                f"quarantine retention must be within 0..{MAX_RETENTION_HOURS} hours",
                "BAD_RETENTION",
            )
        if self._datasets is None:
            raise FailedPrecondition("dataset policies are not configured", "NO_POLICY_STORE")
        current = await self.dataset_policy(dataset_id)
        fields: dict[str, Any] = {
            "macro": macro or current.macro,
            "dates": dates or current.dates,
            "retention_hours": current.retention_hours
            if retention_hours is None
            else retention_hours,
            "updated_at": self._now(),
            "updated_by": caller.subject,
        }
        await self._datasets.update({"_id": dataset_id}, set_fields=fields, upsert=True)
        log.info("dataset deid policy set", extra={"dataset_id": dataset_id})
        return await self.dataset_policy(dataset_id)

    async def _store_rules(
        self, dataset_id: str, slide_id: str, by: str, rules: dict[str, str], at: datetime
    ) -> None:
        if self._rules is None:
            raise FailedPrecondition("dataset rules are not configured", "NO_POLICY_STORE")
        for key, action in rules.items():
            # one document per (dataset, key): an upsert, so concurrent approvals never lose
            # each other's rules; a later decision on the same key replaces the earlier one.
            await self._rules.update(
                {"_id": f"{dataset_id}/{key}"},
                set_fields={
                    "dataset_id": dataset_id,
                    "key": key,
                    "action": action,
                    "approved_by": by,
                    "approved_at": at,
                    "slide_id": slide_id,
                },
                upsert=True,
            )

    # -- reports --------------------------------------------------------------------------

    async def report(self, caller: Principal, slide_id: str) -> JobView:
        job = await self._jobs.get(slide_id)
        if job is None:
            raise NotFound("no de-identification job for this slide", "SLIDE_NOT_FOUND")
        await self._access.require(
            caller.subject, Action.ACTION_READ_RECORD, job["dataset_id"], f"slide/{slide_id}"
        )
        return _view(job)


def _check_rules(rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    if not rules:
        raise InvalidArgument("at least one rule is required", "MISSING_FIELD")
    if len(rules) > MAX_RULES_PER_REQUEST:
        raise InvalidArgument(f"at most {MAX_RULES_PER_REQUEST} rules", "TOO_MANY_RULES")
    out: dict[str, str] = {}
    for key, action in rules:
        if not RULE_KEY.fullmatch(key):
            raise InvalidArgument(
                "a rule key is tiff:, svs:, ndpi:, qptiff:, philips:, bif:, mrxs: or ome:"
                " and a name",
                "BAD_RULE_KEY",
            )
        if action not in RULE_ACTIONS:
            raise InvalidArgument("a rule's action is REMOVE or KEEP", "BAD_RULE_ACTION")
        if out.get(key, action) != action:
            raise InvalidArgument("two different actions for one key", "CONFLICTING_RULES")
        out[key] = action
    return out


def _identity(job: dict[str, Any]) -> dict[str, Any]:
    """The fields every job write repeats (never lists other writers append to)."""
    return {
        k: job[k]
        for k in (
            "_id",
            "dataset_id",
            "format",
            "quarantine_bucket",
            "quarantine_key",
            "review_round",
        )
        if k in job
    }


def _items(job: dict[str, Any]) -> tuple[ReviewItem, ...]:
    review = job.get("review") or {}
    return tuple(
        ReviewItem(str(i["key"]), str(i["reason"]), str(i.get("where", "")))
        for i in review.get("items", [])
    )


def _view(job: dict[str, Any]) -> JobView:
    summary = dict(job.get("summary") or {})
    for key in ("removed", "pseudonymized"):
        summary[key] = from_entries(summary.get(key))
    erased = _aware(job.get("quarantine_erased_at"))
    return JobView(
        str(job["_id"]),
        str(job["outcome"]),
        summary,
        str(job.get("reason", "")),
        str(job.get("detail", "")),
        _items(job) if job["outcome"] == NEEDS_REVIEW else (),
        erased,
        str(job.get("quarantine_erasure_reason", "")),
        None if erased else _aware(job.get("erase_after")),
    )
