"""Kafka handlers of model serving: thin, they delegate to `InferenceService`."""

from __future__ import annotations

from collections.abc import Mapping

from services.serving.core import InferenceService
from services.shared.events import TOPIC_SLIDE_TILED, Handler


def handlers(service: InferenceService) -> Mapping[str, Handler]:
    return {TOPIC_SLIDE_TILED: service.handle_tiled}
