"""Kafka handlers of de-identification: thin, they delegate to the stage."""

from __future__ import annotations

from collections.abc import Mapping

from services.deid.core import DeidStage
from services.shared.events import TOPIC_SLIDE_RECEIVED, Handler


def handlers(stage: DeidStage) -> Mapping[str, Handler]:
    return {TOPIC_SLIDE_RECEIVED: stage.handle_received}
