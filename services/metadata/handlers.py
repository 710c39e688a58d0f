"""Kafka handlers of the catalogue: thin, they delegate to `Catalogue`."""

from __future__ import annotations

from collections.abc import Mapping

from services.metadata.core import Catalogue
from services.shared.events import Handler


def handlers(catalogue: Catalogue) -> Mapping[str, Handler]:
    return catalogue.handlers()
