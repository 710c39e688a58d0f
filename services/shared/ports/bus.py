"""Port: a partitioned, at-least-once message bus (Kafka in production).

Transport-level only: keys, bytes and headers. Envelope parsing, retries and dead-lettering
live in `services.shared.events`, which is written once against this port.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = field(default_factory=tuple)

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class Publisher(abc.ABC):
    """Sends messages. `publish` returns only once the broker has acknowledged the write."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None: ...


class Subscription(abc.ABC):
    """A consumer-group member over some topics, with manual commits.

    Offsets are committed only by `commit`; a message that was fetched but not committed is
    delivered again to the group after this subscription closes (at-least-once).
    """

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def fetch(self, timeout_s: float, max_messages: int = 100) -> list[Message]:
        """Next messages (possibly none when `timeout_s` passes), in partition order."""

    @abc.abstractmethod
    async def commit(self, message: Message) -> None:
        """Mark `message` and everything before it in its partition as processed."""

    async def lag(self) -> dict[tuple[str, int], int]:
        """Messages not yet committed by the group, per (topic, partition) this member owns
        (as far as the client knows; partitions it knows nothing about yet are left out)."""
        return {}


class MessageBus(abc.ABC):
    """Factory of publishers and subscriptions, plus topic administration."""

    @abc.abstractmethod
    def publisher(self) -> Publisher: ...

    @abc.abstractmethod
    def subscription(self, group: str, topics: Sequence[str]) -> Subscription: ...

    @abc.abstractmethod
    async def ensure_topics(self, topics: Sequence[str], partitions: int = 1) -> None: ...

    @abc.abstractmethod
    async def backlog(self, group: str, topics: Sequence[str]) -> int:
        """Messages on `topics` that consumer group `group` has not committed yet (all of a
        partition's messages if the group never committed there). Admission control uses it:
        a producer stage refuses new work while the next stage is this far behind."""
