"""Admission control for new uploads: while de-identification is too far behind, a new upload
is refused with RESOURCE_EXHAUSTED and a wait hint instead of piling more identified raw
copies into quarantine. Resuming an upload already begun is always allowed.

"Behind" is the broker's own measure: messages on `tessera.slide.received.v1` that the
de-identification consumer group has not committed. It is asked at most every `refresh_s`;
if the broker cannot be asked, the last answer stands (the outbox keeps events anyway)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from services.shared.errors import ResourceExhausted
from services.shared.events import TOPIC_SLIDE_RECEIVED
from services.shared.ports.bus import MessageBus

log = logging.getLogger(__name__)

DEID_GROUP = "tessera-deid"


class Admission:
    def __init__(
        self,
        bus: MessageBus,
        *,
        max_backlog: int,
        group: str = DEID_GROUP,
        topics: Sequence[str] = (TOPIC_SLIDE_RECEIVED,),
        refresh_s: float = 5.0,
        retry_after_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._max = max_backlog
        self._group = group
        self._topics = tuple(topics)
        self._refresh_s = refresh_s
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._backlog = 0
        self._asked_at: float | None = None
        self._lock = asyncio.Lock()

    async def backlog(self) -> int:
        async with self._lock:
            now = self._clock()
            if self._asked_at is None or now - self._asked_at >= self._refresh_s:
                self._asked_at = now
                try:
                    self._backlog = await asyncio.wait_for(
                        self._bus.backlog(self._group, self._topics), 5.0
                    )
                except Exception as exc:  # noqa: BLE001 - an unreachable broker: keep the last
                    log.warning("backlog unknown", extra={"reason": type(exc).__name__})
            return self._backlog

    async def admit(self) -> None:
        """Raise ResourceExhausted (reason PIPELINE_BACKLOG, with a wait hint) when behind."""
        if self._max <= 0:
            return
        if await self.backlog() > self._max:
            raise ResourceExhausted(
                "de-identification is behind; retry later",
                "PIPELINE_BACKLOG",
                retry_after_s=self._retry_after_s,
            )
