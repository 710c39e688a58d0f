"""Kafka handlers of tiling: thin, they delegate to the stage."""

from __future__ import annotations

from collections.abc import Mapping

from services.shared.events import TOPIC_SLIDE_DEIDENTIFIED, Handler
from services.tiling.core import TilingStage


def handlers(stage: TilingStage) -> Mapping[str, Handler]:
    return {TOPIC_SLIDE_DEIDENTIFIED: stage.handle_deidentified}
