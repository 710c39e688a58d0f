"""`python -m services.operator`: the Tessera operator (kopf), one replica, liveness on
http://<liveness_host>:<liveness_port>/healthz."""

from __future__ import annotations

import logging

import kopf

from services.operator.settings import OperatorSettings


def main() -> None:
    settings = OperatorSettings()
    logging.basicConfig(
        level=settings.log_level,
        format='{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","message":"%(message)s"}',
    )
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
