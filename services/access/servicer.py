"""gRPC servicer: converts messages and delegates to AccessControl."""

from __future__ import annotations

from datetime import UTC

from grpc import aio

from services.access import mapping
from services.access.core import AccessControl
from services.shared.auth import current_principal
from tessera.access.v1 import access_pb2, access_pb2_grpc


class AccessServicer(access_pb2_grpc.AccessServiceServicer):
    def __init__(self, core: AccessControl) -> None:
        self._core = core

    async def CreateDataset(
        self, request: access_pb2.CreateDatasetRequest, context: aio.ServicerContext
    ) -> access_pb2.CreateDatasetResponse:
        ds = await self._core.create_dataset(
            current_principal(), request.dataset_id, request.name, request.description
        )
        return access_pb2.CreateDatasetResponse(dataset=mapping.dataset_to_proto(ds))

    async def GetDataset(
        self, request: access_pb2.GetDatasetRequest, context: aio.ServicerContext
    ) -> access_pb2.GetDatasetResponse:
        ds = await self._core.get_dataset(current_principal(), request.dataset_id)
        return access_pb2.GetDatasetResponse(dataset=mapping.dataset_to_proto(ds))

    async def GrantRole(
        self, request: access_pb2.GrantRoleRequest, context: aio.ServicerContext
    ) -> access_pb2.GrantRoleResponse:
        expires = (
            request.expires_at.ToDatetime(tzinfo=UTC) if request.HasField("expires_at") else None
        )
        grant = await self._core.grant(
            current_principal(),
            request.dataset_id,
            request.subject,
            request.role,
            request.purpose,
            expires,
        )
        return access_pb2.GrantRoleResponse(grant=mapping.grant_to_proto(grant))

    async def RevokeRole(
        self, request: access_pb2.RevokeRoleRequest, context: aio.ServicerContext
    ) -> access_pb2.RevokeRoleResponse:
        n = await self._core.revoke(
            current_principal(), request.dataset_id, request.subject, request.role
        )
        return access_pb2.RevokeRoleResponse(revoked=n)

    async def ListGrants(
        self, request: access_pb2.ListGrantsRequest, context: aio.ServicerContext
    ) -> access_pb2.ListGrantsResponse:
        grants = await self._core.list_grants(
            current_principal(), request.dataset_id, request.subject
        )
        return access_pb2.ListGrantsResponse(grants=[mapping.grant_to_proto(g) for g in grants])

    async def Check(
        self, request: access_pb2.CheckRequest, context: aio.ServicerContext
    ) -> access_pb2.CheckResponse:
        d = await self._core.check(
            current_principal(),
            request.subject,
            request.action,
            request.dataset_id,
            request.resource,
            request.purpose,
        )
        return access_pb2.CheckResponse(
            allowed=d.allowed, reason=d.reason, decision_id=d.decision_id
        )

    async def ListPermittedDatasets(
        self, request: access_pb2.ListPermittedDatasetsRequest, context: aio.ServicerContext
    ) -> access_pb2.ListPermittedDatasetsResponse:
        ids = await self._core.permitted_datasets(
            current_principal(), request.subject, request.action
        )
        return access_pb2.ListPermittedDatasetsResponse(dataset_ids=ids)

    async def ListAuditRecords(
        self, request: access_pb2.ListAuditRecordsRequest, context: aio.ServicerContext
    ) -> access_pb2.ListAuditRecordsResponse:
        records = await self._core.list_audit(
            current_principal(),
            request.subject,
            request.dataset_id,
            request.resource,
            request.page_size,
        )
        return access_pb2.ListAuditRecordsResponse(
            records=[mapping.audit_to_proto(r) for r in records]
        )
