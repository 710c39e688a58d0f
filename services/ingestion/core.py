"""Ingestion: resumable, verified uploads into the quarantine bucket. Transport-free.

An upload is keyed by (caller, dataset, sha256, size). Bytes are spooled to a local file as
they arrive, so the durable offset of an interrupted upload is the spool file's length.
`finish` verifies size and checksum, inspects the file (format, structure, dimensions),
writes it to quarantine under an opaque key, records the slide and publishes "received".
Any rejection deletes the spool, so nothing half-written survives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.ingestion.admission import Admission
from services.shared.access import AccessChecker, Action
from services.shared.auth import Principal
from services.shared.digest import file_sha256
from services.shared.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
)
from services.shared.events import TOPIC_SLIDE_RECEIVED, event_id_for, new_envelope
from services.shared.outbox import Outbox
from services.shared.ports.documents import Collection
from services.shared.ports.objects import ObjectStore
from services.shared.pseudonym import Pseudonymizer
from services.shared.wsi.bundle import is_zip
from services.shared.wsi.sniff import (
    InvalidSlide,
    SlideFormat,
    SlideInfo,
    SlideLimits,
    inspect_slide,
    sniff_file,
)
from tessera.common.v1 import common_pb2
from tessera.events.v1 import events_pb2

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
LABEL_TEXT = re.compile(r"^[A-Za-z0-9 ._()+/&-]{0,64}$")
EXTENSION = re.compile(r"^[a-z0-9]{1,8}$")
SUPPORTED: dict[SlideFormat, int] = {
    SlideFormat.APERIO_SVS: common_pb2.SLIDE_FORMAT_APERIO_SVS,
    SlideFormat.HAMAMATSU_NDPI: common_pb2.SLIDE_FORMAT_HAMAMATSU_NDPI,
    SlideFormat.GENERIC_TIFF: common_pb2.SLIDE_FORMAT_GENERIC_TIFF,
    SlideFormat.DICOM_WSI: common_pb2.SLIDE_FORMAT_DICOM_WSI,
    # De-identification also handles OME-TIFF, QPTIFF and Ventana BIF, but tiling reads slides
    # with OpenSlide, which opens none of them here: accepting them would only move the
    # rejection later. Philips TIFF is de-identified and tiled.
    SlideFormat.PHILIPS_TIFF: common_pb2.SLIDE_FORMAT_PHILIPS_TIFF,
    # multi-file slides arrive as one ZIP bundle (services/shared/wsi/bundle.py): MRXS, and
    # DICOM series (SLIDE_FORMAT_DICOM_WSI, like a single instance)
    SlideFormat.MIRAX: common_pb2.SLIDE_FORMAT_MRXS,
}
IDENTIFIER_FIELDS = ("case_id", "patient_id", "specimen_id", "block_id")
DESCRIPTIVE_FIELDS = ("stain", "organ", "species")


@dataclass(frozen=True)
class IngestionLimits:
    max_upload_bytes: int = 8 * 1024**3
    max_chunk_bytes: int = 4 * 1024 * 1024
    max_side_px: int = 500_000
    max_pixels: int = 200_000 * 200_000


@dataclass(frozen=True)
class UploadHeader:
    dataset_id: str
    filename: str
    size_bytes: int
    sha256: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class UploadSession:
    upload_id: str
    slide_id: str
    dataset_id: str
    size_bytes: int
    sha256: str
    extension: str
    metadata: dict[str, str]
    received: int
    completed: bool
    path: Path


@dataclass(frozen=True)
class UploadResult:
    slide_id: str
    upload_id: str
    format: int
    size_bytes: int
    duplicate: bool


@dataclass(frozen=True)
class UploadStatus:
    upload_id: str
    state: str  # NOT_STARTED | IN_PROGRESS | COMPLETED
    received_bytes: int
    size_bytes: int
    slide_id: str


class Ingestion:
    def __init__(
        self,
        *,
        spool_dir: Path,
        uploads: Collection,
        objects: ObjectStore,
        quarantine_bucket: str,
        access: AccessChecker,
        outbox: Outbox,
        pseudonymizer: Pseudonymizer,
        limits: IngestionLimits,
        admission: Admission | None = None,
    ) -> None:
        self._admission = admission
        self._spool = spool_dir
        self._uploads = uploads
        self._objects = objects
        self._bucket = quarantine_bucket
        self._access = access
        self._outbox = outbox
        self._pseudo = pseudonymizer
        self._limits = limits
        self._locks: dict[str, asyncio.Lock] = {}
        spool_dir.mkdir(parents=True, exist_ok=True)

    async def ensure_ready(self) -> None:
        await self._objects.ensure_bucket(self._bucket)
        await self._uploads.ensure_index([("slide_id", 1)])

    async def expire_abandoned(self, max_age_s: float) -> int:
        """Delete spooled partial uploads untouched for `max_age_s`: an abandoned upload must
        not keep identified bytes on disk forever. Returns how many were removed."""
        removed = 0
        for path in await asyncio.to_thread(_stale_parts, self._spool, max_age_s):
            upload_id = path.name.removesuffix(".part")
            if self.lock(upload_id).locked():
                continue
            await asyncio.to_thread(_unlink, path)
            await self._uploads.delete({"_id": upload_id, "state": "IN_PROGRESS"})
            removed += 1
        if removed:
            log.info("expired abandoned uploads", extra={"count": removed})
        return removed

    async def run_expiry(self, max_age_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.expire_abandoned(max_age_s)
            except OSError as exc:
                log.warning("upload expiry failed", extra={"reason": type(exc).__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(3600.0, max_age_s / 4))

    @staticmethod
    def upload_id_for(subject: str, dataset_id: str, sha256: str, size: int) -> str:
        raw = f"{subject}\x00{dataset_id}\x00{sha256}\x00{size}".encode()
        return hashlib.sha256(raw).hexdigest()[:32]

    # -- validation -----------------------------------------------------------------------

    def _validate_header(self, header: UploadHeader) -> str:
        if not header.dataset_id:
            raise InvalidArgument("dataset_id is required", "MISSING_DATASET")
        if not SHA256_HEX.fullmatch(header.sha256):
            raise InvalidArgument("sha256 must be 64 lower-case hex digits", "BAD_SHA256")
        if header.size_bytes <= 0:
            raise InvalidArgument("size_bytes must be positive", "BAD_SIZE")
        if header.size_bytes > self._limits.max_upload_bytes:
            raise InvalidArgument(
                f"declared size exceeds the limit of {self._limits.max_upload_bytes} bytes",
                "TOO_LARGE",
            )
        ext = Path(header.filename).suffix.lower().lstrip(".")
        if ext and not EXTENSION.fullmatch(ext):
            ext = ""
        for key in DESCRIPTIVE_FIELDS:
            if not LABEL_TEXT.fullmatch(header.metadata.get(key, "")):
                raise InvalidArgument(
                    f"metadata.{key} must be at most 64 plain characters", "BAD_METADATA"
                )
        for key in IDENTIFIER_FIELDS:
            if len(header.metadata.get(key, "")) > 256:
                raise InvalidArgument(f"metadata.{key} too long", "BAD_METADATA")
        return ext

    def _pseudonymise(self, metadata: dict[str, str]) -> dict[str, str]:
        out = {k: metadata.get(k, "").strip().lower() for k in DESCRIPTIVE_FIELDS}
        for key in IDENTIFIER_FIELDS:
            value = metadata.get(key, "").strip()
            out[key] = self._pseudo.pseudonym(key.removesuffix("_id"), value) if value else ""
        return {k: v for k, v in out.items() if v}

    # -- upload lifecycle -----------------------------------------------------------------

    async def begin(self, caller: Principal, header: UploadHeader) -> UploadSession:
        ext = self._validate_header(header)
        await self._access.require(
            caller.subject,
            Action.ACTION_UPLOAD,
            header.dataset_id,
            f"dataset/{header.dataset_id}/uploads",
        )
        upload_id = self.upload_id_for(
            caller.subject, header.dataset_id, header.sha256, header.size_bytes
        )
        path = self._spool / f"{upload_id}.part"
        doc = await self._uploads.get(upload_id)
        if doc is None:
            if self._admission is not None:
                await self._admission.admit()  # new work only: a resume always goes on
            doc = {
                "_id": upload_id,
                "slide_id": str(uuid.uuid4()),
                "dataset_id": header.dataset_id,
                "size_bytes": header.size_bytes,
                "sha256": header.sha256,
                "extension": ext,
                "metadata": self._pseudonymise(header.metadata),
                "state": "IN_PROGRESS",
            }
            await self._uploads.update({"_id": upload_id}, set_on_insert=doc, upsert=True)
            doc = await self._uploads.get(upload_id) or doc
        received = await asyncio.to_thread(_size_of, path)
        return UploadSession(
            upload_id=upload_id,
            slide_id=doc["slide_id"],
            dataset_id=doc["dataset_id"],
            size_bytes=int(doc["size_bytes"]),
            sha256=doc["sha256"],
            extension=doc.get("extension", ""),
            metadata=dict(doc.get("metadata", {})),
            received=received,
            completed=doc["state"] == "COMPLETED",
            path=path,
        )

    def lock(self, upload_id: str) -> asyncio.Lock:
        return self._locks.setdefault(upload_id, asyncio.Lock())

    async def write_chunk(self, session: UploadSession, offset: int, data: bytes) -> None:
        if session.completed:
            return  # a duplicate of a finished upload: nothing to write
        if len(data) > self._limits.max_chunk_bytes:
            raise InvalidArgument(
                f"chunks must be at most {self._limits.max_chunk_bytes} bytes", "CHUNK_TOO_LARGE"
            )
        end = offset + len(data)
        if end > session.size_bytes:
            await self._discard(session)
            raise InvalidArgument("more bytes than the declared size", "SIZE_MISMATCH")
        if offset > session.received:
            raise FailedPrecondition(
                f"chunk at offset {offset} leaves a gap; resume at {session.received}",
                "OFFSET_GAP",
            )
        if end <= session.received:
            return  # already held (a client restarting from 0)
        data = data[session.received - offset :]
        await asyncio.to_thread(_append, session.path, data)
        session.received += len(data)

    async def finish(self, session: UploadSession) -> UploadResult:
        if session.completed:
            await self._publish_received(session, await self._uploads.get(session.upload_id))
            return await self._result(session, duplicate=True)
        if session.received < session.size_bytes:
            raise FailedPrecondition(
                f"upload incomplete: {session.received} of {session.size_bytes} bytes received; "
                f"resume at offset {session.received}",
                "TRUNCATED",
            )
        digest, _ = await asyncio.to_thread(file_sha256, session.path)
        if digest != session.sha256:
            await self._discard(session)
            raise DataLoss("sha256 of the received bytes does not match", "CHECKSUM_MISMATCH")
        info = await self._inspect(session)
        fmt = SUPPORTED[info.format]
        key = f"slides/{session.slide_id}"
        await self._objects.put_file(self._bucket, key, session.path)
        await self._uploads.update(
            {"_id": session.upload_id},
            set_fields={
                "state": "COMPLETED",
                "format": fmt,
                "quarantine_key": key,
                "width": info.width,
                "height": info.height,
            },
        )
        doc = await self._uploads.get(session.upload_id)
        await self._publish_received(session, doc)
        await asyncio.to_thread(_unlink, session.path)
        session.completed = True
        log.info(
            "slide received",
            extra={"slide_id": session.slide_id, "dataset_id": session.dataset_id},
        )
        return UploadResult(session.slide_id, session.upload_id, fmt, session.size_bytes, False)

    async def status(
        self, caller: Principal, dataset_id: str, sha256: str, size_bytes: int
    ) -> UploadStatus:
        self._validate_header(UploadHeader(dataset_id, "", size_bytes, sha256))
        await self._access.require(
            caller.subject, Action.ACTION_UPLOAD, dataset_id, f"dataset/{dataset_id}/uploads"
        )
        upload_id = self.upload_id_for(caller.subject, dataset_id, sha256, size_bytes)
        doc = await self._uploads.get(upload_id)
        if doc is None:
            return UploadStatus(upload_id, "NOT_STARTED", 0, size_bytes, "")
        if doc["state"] == "COMPLETED":
            return UploadStatus(upload_id, "COMPLETED", size_bytes, size_bytes, doc["slide_id"])
        received = await asyncio.to_thread(_size_of, self._spool / f"{upload_id}.part")
        return UploadStatus(upload_id, "IN_PROGRESS", received, size_bytes, "")

    # -- internals ------------------------------------------------------------------------

    async def _inspect(self, session: UploadSession) -> SlideInfo:
        try:
            # Content decides, not the file name: NDPI keeps its first IFD at the end.
            fmt = await asyncio.to_thread(sniff_file, session.path)
        except InvalidSlide as exc:
            # DICOM preamble, unreadable file meta (found by tests/fuzz: was INTERNAL, and
            # the spool was kept)
            await self._discard(session)
            raise InvalidArgument(exc.message, exc.reason) from None
        except (OSError, ValueError):
            fmt = SlideFormat.UNKNOWN
        # a ZIP is a multi-file slide bundle: inspection gives its precise rejection reason
        bundled = await asyncio.to_thread(is_zip, session.path)
        if fmt == SlideFormat.UNKNOWN and not bundled:
            await self._discard(session)
            raise InvalidArgument("not a recognised whole-slide image format", "UNKNOWN_FORMAT")
        if fmt not in SUPPORTED and not bundled:
            await self._discard(session)
            raise InvalidArgument(
                f"format {fmt.name} is recognised but not supported yet", "UNSUPPORTED_FORMAT"
            )
        limits = SlideLimits(
            max_side=self._limits.max_side_px, max_total_pixels=self._limits.max_pixels
        )
        try:
            declared = None if bundled else fmt
            return await asyncio.to_thread(inspect_slide, session.path, declared, limits)
        except InvalidSlide as exc:
            await self._discard(session)
            raise InvalidArgument(exc.message, exc.reason) from None
        except OSError:
            raise  # the spool could not be read: keep it, the upload is not at fault
        except Exception as exc:  # noqa: BLE001 - a parser failing on hostile input
            # The file is untrusted input: whatever a parser raises on it means it cannot be
            # understood, so reject it (fail closed) rather than keep a spool nobody can finish.
            log.warning(
                "slide inspection failed",
                extra={"upload_id": session.upload_id, "reason": type(exc).__name__},
            )
            await self._discard(session)
            raise InvalidArgument("the file structure cannot be parsed", "MALFORMED_FILE") from None

    async def _discard(self, session: UploadSession) -> None:
        await asyncio.to_thread(_unlink, session.path)
        await self._uploads.delete({"_id": session.upload_id, "state": "IN_PROGRESS"})
        session.received = 0

    async def _publish_received(self, session: UploadSession, doc: dict[str, Any] | None) -> None:
        if doc is None:
            return
        md = doc.get("metadata", {})
        payload = events_pb2.SlideReceived(
            format=int(doc.get("format", 0)),  # type: ignore[arg-type]
            quarantine_bucket=self._bucket,
            quarantine_key=doc.get("quarantine_key", ""),
            size_bytes=int(doc["size_bytes"]),
            metadata=common_pb2.ClinicalMetadata(**md),
            extension=doc.get("extension", ""),
        )
        env = new_envelope(
            payload_field="slide_received",
            payload=payload,
            slide_id=doc["slide_id"],
            dataset_id=doc["dataset_id"],
            event_id=event_id_for(doc["slide_id"], "received"),
        )
        await self._outbox.publish(TOPIC_SLIDE_RECEIVED, env)

    async def _result(self, session: UploadSession, *, duplicate: bool) -> UploadResult:
        doc = await self._uploads.get(session.upload_id) or {}
        return UploadResult(
            session.slide_id,
            session.upload_id,
            int(doc.get("format", 0)),
            session.size_bytes,
            duplicate,
        )


def _stale_parts(spool: Path, max_age_s: float) -> list[Path]:
    cutoff = time.time() - max_age_s
    return [p for p in spool.glob("*.part") if p.stat().st_mtime < cutoff]


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
