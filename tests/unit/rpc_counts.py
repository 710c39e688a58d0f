"""What a test server counted of its calls: `tessera_rpc_requests_total` read from the
process's Prometheus registry. The server counts a call just after sending its status, so a
client that has the status may have to wait for the count."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY


def served(service: str, method: str, code: str) -> float:
    """Calls of `method` the server named `service` answered with `code`, so far."""
    value = REGISTRY.get_sample_value(
        "tessera_rpc_requests_total", {"service": service, "method": method, "code": code}
    )
    return value or 0.0


async def served_at_least(
    service: str, method: str, code: str, expected: float, patience_s: float = 10.0
) -> float:
    """The count once it reaches `expected`, or as it stands after `patience_s` (generous,
    for a loaded machine)."""
    deadline = asyncio.get_running_loop().time() + patience_s
    while served(service, method, code) < expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return served(service, method, code)
