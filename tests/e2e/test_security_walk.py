"""Security walk against the six running services: every RPC of every service found in the
generated descriptors (see `tests/unit/security_walk.py`), with

- no token, and every forged token (expired, not yet valid, tampered payload or signature,
  another key, alg=none, HS256 with the public key, wrong issuer or audience, no expiry, no
  subject, malformed headers): UNAUTHENTICATED;
- a valid token of a caller with no role and no grant, asking about a real dataset and a real
  READY slide (so the refusal is about permission, not existence): PERMISSION_DENIED, except
  the reviewed `OPEN_TO_AUTHENTICATED` and `PUBLIC` allow-lists;
- a live grant whose role lacks the action (a contributor asking for pixels, inference, grant
  management or the audit trail): PERMISSION_DENIED.

Which server hosts a service is asked of the servers themselves (the standard health service
answers SERVING for the names a host registered), so a new service is found too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2

from services.cli.client import DEFAULT_PORTS, TesseraClient, endpoint
from tests.e2e.conftest import KEYS, World, health_status, role, token
from tests.unit.security_walk import (
    OPEN_TO_AUTHENTICATED,
    PUBLIC,
    Fill,
    Rpc,
    all_methods,
    build_request,
    call,
    forged_tokens,
)

pytestmark = pytest.mark.e2e

RPCS = all_methods()
OUTSIDER = f"walk-outsider-{uuid.uuid4().hex[:8]}"


async def _hosts() -> dict[str, str]:
    """service full name -> endpoint of the server that registered it."""
    services = {r.service for r in RPCS}
    found: dict[str, str] = {}
    for name in DEFAULT_PORTS:
        target = endpoint(name)
        for svc in services:
            if await health_status(target, svc) == health_pb2.HealthCheckResponse.SERVING:
                found.setdefault(svc, target)
    return found


@pytest.fixture(scope="module")
def hosts() -> dict[str, str]:
    return asyncio.run(_hosts())


@pytest.fixture(scope="module")
def fill(world: World) -> Fill:
    return Fill(world.dataset, world.slides["svs"], "e2e-steward")


def _targets(rpc: Rpc, hosts: dict[str, str]) -> Iterator[str]:
    if rpc.path in PUBLIC:
        yield from sorted(set(hosts.values()))  # every host serves health
        return
    target = hosts.get(rpc.service)
    if target is None:
        pytest.fail(f"no running service registers {rpc.service} (walk found it in protos)")
    yield target


def test_every_declared_service_is_served(hosts: dict[str, str]) -> None:
    missing = sorted({r.service for r in RPCS if r.path not in PUBLIC} - set(hosts))
    assert not missing, f"declared in protos but served by no running service: {missing}"


@pytest.mark.parametrize("rpc", RPCS, ids=[r.id for r in RPCS])
def test_rpc_without_token(rpc: Rpc, hosts: dict[str, str], fill: Fill) -> None:
    async def go() -> list[tuple[str, grpc.StatusCode]]:
        out = []
        for target in _targets(rpc, hosts):
            async with aio.insecure_channel(target) as ch:
                code, _ = await call(ch, rpc, build_request(rpc, fill), None)
                out.append((target, code))
        return out

    want = PUBLIC[rpc.path][0] if rpc.path in PUBLIC else grpc.StatusCode.UNAUTHENTICATED
    for target, code in asyncio.run(go()):
        assert code == want, f"{rpc.path} on {target} without a token: {code.name}"


@pytest.mark.parametrize("rpc", [r for r in RPCS if r.path not in PUBLIC], ids=lambda r: r.id)
def test_rpc_with_forged_tokens(rpc: Rpc, hosts: dict[str, str], fill: Fill) -> None:
    private = (KEYS / "issuer.pem").read_bytes()
    public = (KEYS / "issuer.pub.pem").read_bytes()
    forged = forged_tokens(private, public, OUTSIDER)

    async def go() -> dict[str, tuple[grpc.StatusCode, str]]:
        (target,) = _targets(rpc, hosts)
        async with aio.insecure_channel(target) as ch:
            return {
                name: await call(ch, rpc, build_request(rpc, fill), header)
                for name, header in forged.items()
            }

    got = asyncio.run(go())
    wrong = {n: c.name for n, (c, _) in got.items() if c != grpc.StatusCode.UNAUTHENTICATED}
    assert not wrong, f"{rpc.path}: forged tokens not refused as UNAUTHENTICATED: {wrong}"
    assert got["expired"][1] == "TOKEN_EXPIRED"


@pytest.mark.parametrize("rpc", [r for r in RPCS if r.path not in PUBLIC], ids=lambda r: r.id)
def test_rpc_without_role_or_grant(rpc: Rpc, hosts: dict[str, str], fill: Fill) -> None:
    header = f"Bearer {token(OUTSIDER)}"

    async def go() -> tuple[grpc.StatusCode, str]:
        (target,) = _targets(rpc, hosts)
        async with aio.insecure_channel(target) as ch:
            return await call(ch, rpc, build_request(rpc, fill), header)

    code, reason = asyncio.run(go())
    if rpc.path in OPEN_TO_AUTHENTICATED:
        assert code not in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INTERNAL,
        ), f"{rpc.path} is allow-listed as open ({OPEN_TO_AUTHENTICATED[rpc.path]}): {code.name}"
        return
    assert code == grpc.StatusCode.PERMISSION_DENIED, (
        f"{rpc.path} with a valid token holding no role or grant: {code.name} ({reason})"
    )


def test_allow_lists_name_real_rpcs() -> None:
    paths = {r.path for r in RPCS}
    stale = sorted((set(OPEN_TO_AUTHENTICATED) | set(PUBLIC)) - paths)
    assert not stale, f"allow-list entries for RPCs that no longer exist: {stale}"


# A live grant whose role lacks the action: a contributor (upload, read records) asking for
# pixels, inference, grant management or the audit trail of the dataset.
CONTRIBUTOR_DENIED = {
    "/tessera.tiling.v1.TilingService/GetDeepZoomDescriptor",
    "/tessera.tiling.v1.TilingService/GetTile",
    "/tessera.tiling.v1.TilingService/GetThumbnail",
    "/tessera.tiling.v1.TilingService/DownloadSlide",
    "/tessera.serving.v1.SlideInferenceService/InferSlide",
    "/tessera.access.v1.AccessService/GrantRole",
    "/tessera.access.v1.AccessService/RevokeRole",
    "/tessera.access.v1.AccessService/ListAuditRecords",
}


@pytest.fixture(scope="module")
def contributor(world: World) -> str:
    subject = f"walk-contributor-{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        async with TesseraClient(world.admin_token) as c:
            await c.grant(world.dataset, subject, role("contributor"), days=1, purpose="walk")

    asyncio.run(go())
    return subject


@pytest.mark.parametrize("path", sorted(CONTRIBUTOR_DENIED), ids=lambda p: p.rsplit("/", 1)[-1])
def test_role_without_the_action_is_denied(
    path: str, contributor: str, hosts: dict[str, str], fill: Fill
) -> None:
    (rpc,) = [r for r in RPCS if r.path == path]
    header = f"Bearer {token(contributor)}"

    async def go() -> tuple[grpc.StatusCode, str]:
        (target,) = _targets(rpc, hosts)
        async with aio.insecure_channel(target) as ch:
            return await call(ch, rpc, build_request(rpc, fill), header)

    code, reason = asyncio.run(go())
    assert code == grpc.StatusCode.PERMISSION_DENIED, f"{path} as contributor: {code.name}"
    assert reason in ("ROLE_LACKS_ACTION", "NOT_ADMIN"), reason
