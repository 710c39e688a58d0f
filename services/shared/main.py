"""The one entry point shape every service uses: typed settings, logs, traces, run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.shared.grpc.server import ServiceHost
from services.shared.settings import S, load_settings
from services.shared.telemetry import configure_logging, configure_tracing


def run_service(name: str, settings_cls: type[S], bootstrap: Callable[[S], ServiceHost]) -> None:
    settings = load_settings(settings_cls)
    configure_logging(name, settings.telemetry.log_level)
    provider = configure_tracing(name, settings.telemetry)

    async def serve() -> None:
        # Built inside the running loop: gRPC aio channels and the async drivers bind to it.
        await bootstrap(settings).run()

    try:
        asyncio.run(serve())
    finally:
        provider.shutdown()
