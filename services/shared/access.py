"""Port for asking the access-control service, used by every service that serves data."""

from __future__ import annotations

import abc
import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc import aio

from services.shared.errors import NotFound, PermissionDenied, Unavailable
from services.shared.grpc.client import open_channel
from tessera.access.v1 import access_pb2, access_pb2_grpc

Action = access_pb2.Action


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    decision_id: str


class AccessChecker(abc.ABC):
    @abc.abstractmethod
    async def check(
        self, subject: str, action: int, dataset_id: str, resource: str, purpose: str = ""
    ) -> Decision: ...

    @abc.abstractmethod
    async def permitted_datasets(self, subject: str, action: int) -> list[str]: ...

    async def require(
        self, subject: str, action: int, dataset_id: str, resource: str, purpose: str = ""
    ) -> Decision:
        """Raise PermissionDenied (or NotFound for a missing dataset) unless allowed."""
        decision = await self.check(subject, action, dataset_id, resource, purpose)
        if decision.allowed:
            return decision
        if decision.reason == "DATASET_NOT_FOUND":
            raise NotFound("dataset not found", "DATASET_NOT_FOUND")
        name = Action.Name(action)  # type: ignore[arg-type]
        raise PermissionDenied(f"{name} on {resource} denied: {decision.reason}", decision.reason)

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


class DecisionCache:
    """Allow decisions remembered for a short time, per (subject, action, dataset, scope).

    A viewer fetching hundreds of tiles of one slide then costs one round trip to access
    control, and one audit record, per `ttl_s` window instead of one per tile. Only allows are
    remembered: a denial is asked again (and audited) every time. Consequence, documented in
    the README: a revoked or expired grant keeps working in this process for at most `ttl_s`
    seconds. Concurrent requests of one key wait for a single check and share it when it allows;
    when it refuses, each of them asks (and is audited) on its own. A TTL of 0 asks every time.
    """

    def __init__(
        self,
        checker: AccessChecker,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checker = checker
        self._ttl = ttl_s
        self._max = max(1, max_entries)
        self._clock = clock
        self._allowed: OrderedDict[tuple[str, int, str, str], float] = OrderedDict()
        self._pending: dict[tuple[str, int, str, str], asyncio.Future[Decision]] = {}
        self.hits = 0
        self.misses = 0

    async def require(
        self, subject: str, action: int, dataset_id: str, scope: str, resource: str
    ) -> None:
        """Like `AccessChecker.require`; `resource` is what the audit record names when the
        decision is asked (once per window)."""
        if self._ttl <= 0:
            self.misses += 1
            await self._checker.require(subject, action, dataset_id, resource)
            return
        key = (subject, action, dataset_id, scope)
        until = self._allowed.get(key)
        if until is not None and until > self._clock():
            self.hits += 1
            return
        self._allowed.pop(key, None)
        pending = self._pending.get(key)
        if pending is not None:
            try:
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request itself was cancelled
            except Exception:  # noqa: BLE001, S110 - a refusal is not shared: see below
                pass
            if pending.done() and not pending.cancelled() and pending.exception() is None:
                self.hits += 1
                return
            # the shared check refused (or its caller went away): this request asks for itself,
            # so every refusal is decided and audited on its own
            self.misses += 1
            await self._checker.require(subject, action, dataset_id, resource)
            return
        self.misses += 1
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            decision = await self._checker.require(subject, action, dataset_id, resource)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark it retrieved: there may be no other waiter
            raise
        finally:
            del self._pending[key]
        future.set_result(decision)
        self._allowed[key] = self._clock() + self._ttl
        while len(self._allowed) > self._max:
            self._allowed.popitem(last=False)


class GrpcAccessChecker(AccessChecker):
    def __init__(self, target: str, token: Callable[[], str]) -> None:
        self._channel: aio.Channel = open_channel(target, token)
        self._stub = access_pb2_grpc.AccessServiceStub(self._channel)

    async def check(
        self, subject: str, action: int, dataset_id: str, resource: str, purpose: str = ""
    ) -> Decision:
        try:
            resp = await self._stub.Check(
                access_pb2.CheckRequest(
                    subject=subject,
                    action=action,  # type: ignore[arg-type]
                    dataset_id=dataset_id,
                    resource=resource,
                    purpose=purpose,
                ),
                timeout=10,
            )
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise PermissionDenied("access check refused the request", "BAD_CHECK") from None
            raise Unavailable("access control unavailable") from None
        return Decision(resp.allowed, resp.reason, resp.decision_id)

    async def permitted_datasets(self, subject: str, action: int) -> list[str]:
        try:
            resp = await self._stub.ListPermittedDatasets(
                access_pb2.ListPermittedDatasetsRequest(subject=subject, action=action),  # type: ignore[arg-type]
                timeout=10,
            )
        except aio.AioRpcError:
            raise Unavailable("access control unavailable") from None
        return list(resp.dataset_ids)

    async def close(self) -> None:
        await self._channel.close()


class StaticAccessChecker(AccessChecker):
    """In-memory fake for unit tests: {(subject, dataset): {actions}}."""

    def __init__(self, allowed: dict[tuple[str, str], set[int]], datasets: set[str]) -> None:
        self.allowed = allowed
        self.datasets = datasets
        self.calls: list[tuple[str, int, str, str]] = []

    async def check(
        self, subject: str, action: int, dataset_id: str, resource: str, purpose: str = ""
    ) -> Decision:
        self.calls.append((subject, action, dataset_id, resource))
        if dataset_id not in self.datasets:
            return Decision(False, "DATASET_NOT_FOUND", "fake")
        ok = action in self.allowed.get((subject, dataset_id), set())
        return Decision(ok, "GRANTED" if ok else "NO_GRANT", "fake")

    async def permitted_datasets(self, subject: str, action: int) -> list[str]:
        return sorted(d for (s, d), acts in self.allowed.items() if s == subject and action in acts)
