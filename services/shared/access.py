"""Port for asking the access-control service, used by every service that serves data."""

from __future__ import annotations

import abc
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
