"""`python -m services.operator`: the Tessera operator (kopf), one replica, liveness on
http://<liveness_host>:<liveness_port>/healthz. Logs are the services' JSON lines."""

from __future__ import annotations

import json
import logging

import kopf

from services.operator.settings import OperatorSettings
from services.shared.telemetry import JsonFormatter, configure_logging


class OperatorJsonFormatter(JsonFormatter):
    """kopf's messages name handlers and objects (no slide content), so they are kept."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if not record.name.startswith("kopf"):
            return line
        entry = json.loads(line)
        entry["msg"] = record.getMessage()
        return json.dumps(entry, default=str)


def main() -> None:
    settings = OperatorSettings()
    configure_logging("operator", settings.log_level)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(OperatorJsonFormatter("operator"))
    import services.operator.handlers  # noqa: F401 - registers the handlers

    namespaces = settings.namespace_list()
    kopf.run(
        standalone=True,  # one replica (Recreate); no peering CRDs needed
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://{settings.liveness_host}:{settings.liveness_port}/healthz",
    )


if __name__ == "__main__":
    main()
