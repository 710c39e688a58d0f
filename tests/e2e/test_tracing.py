"""One OpenTelemetry trace per slide, across every service and every Kafka hop.

The test uploads a slide with its own W3C `traceparent` (as an instrumented partner client
would), waits until the inference result reached the catalogue, and reads the spans the six
services wrote as JSON lines (`.tessera/stack/app/traces/*.jsonl`, the local stack's file
exporter). It asserts the span tree: the UploadSlide server span is a child of the caller's
span; every span of the slide is in that one trace and hangs from it; each Kafka hop
(received → deid and metadata; deidentified → tiling and metadata; tiled → serving and
metadata; inference completed → metadata) is a PRODUCER span whose CONSUMER spans in the
next services are its children; the stages chain ingestion → deid → tiling → serving →
metadata.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from services.cli.client import TesseraClient, _requests
from services.shared.digest import file_sha256
from services.shared.events import (
    TOPIC_INFERENCE_COMPLETED,
    TOPIC_SLIDE_DEIDENTIFIED,
    TOPIC_SLIDE_RECEIVED,
    TOPIC_SLIDE_TILED,
)
from tessera.common.v1 import common_pb2
from tessera.ingestion.v1 import ingestion_pb2
from tests.e2e.conftest import SAMPLES, TRACES, World, token

pytestmark = pytest.mark.e2e

UPLOAD = "/tessera.ingestion.v1.IngestionService/UploadSlide"
# topic -> (producing service, consuming services)
HOPS = {
    TOPIC_SLIDE_RECEIVED: ("ingestion", {"deid", "metadata"}),
    TOPIC_SLIDE_DEIDENTIFIED: ("deid", {"tiling", "metadata"}),
    TOPIC_SLIDE_TILED: ("tiling", {"serving", "metadata"}),
    TOPIC_INFERENCE_COMPLETED: ("serving", {"metadata"}),
}
CHAIN = [
    (TOPIC_SLIDE_RECEIVED, "deid"),
    (TOPIC_SLIDE_DEIDENTIFIED, "tiling"),
    (TOPIC_SLIDE_TILED, "serving"),
    (TOPIC_INFERENCE_COMPLETED, "metadata"),
]


def _spans(traces: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(traces.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    return out


def _slide_spans(spans: list[dict[str, Any]], slide_id: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["attributes"].get("tessera.slide_id") == slide_id]


async def _upload_with_traceparent(admin: str, dataset: str, trace_id: str, parent_id: str) -> str:
    sample = SAMPLES["svs"]
    size = sample.path.stat().st_size
    digest, _ = file_sha256(sample.path)
    header = ingestion_pb2.UploadHeader(
        dataset_id=dataset,
        filename=sample.path.name,
        size_bytes=size,
        sha256=digest,
        metadata=common_pb2.ClinicalMetadata(stain="H&E", organ="skin", species="human"),
    )
    async with TesseraClient(admin) as c:
        resp = await c.ingestion.UploadSlide(
            _requests(header, sample.path, 0),
            metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
        )
        slide = await c.wait(resp.slide_id, timeout_s=300)
        assert slide.status == common_pb2.SLIDE_STATUS_READY, slide
        return str(resp.slide_id)


async def _wait_for_trace(slide_id: str, timeout_s: float = 180) -> list[dict[str, Any]]:
    """All spans, once every consumer of every hop wrote its span for the slide (the
    catalogue may take the tiled event after the inference result: topics are independent)."""
    wanted = {(service, f"{topic} process") for topic, (_p, cs) in HOPS.items() for service in cs}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        spans = _spans(TRACES)
        seen = {(s["service"], s["name"]) for s in _slide_spans(spans, slide_id)}
        if wanted <= seen or asyncio.get_running_loop().time() > deadline:
            return spans
        await asyncio.sleep(0.5)


async def test_one_trace_spans_every_service_and_kafka_hop(world: World) -> None:
    admin = token("trace-steward", ("admin",))
    dataset = f"trace-{uuid.uuid4().hex[:10]}"
    async with TesseraClient(admin) as c:
        await c.create_dataset(dataset, "tracing", "trace test dataset")
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    slide_id = await _upload_with_traceparent(admin, dataset, trace_id, caller_span)
    spans = await _wait_for_trace(slide_id)

    mine = _slide_spans(spans, slide_id)
    assert mine, "no span carries the slide id"
    assert {s["trace_id"] for s in mine} == {trace_id}, "the slide's spans are in other traces"
    trace = [s for s in spans if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in trace}

    uploads = [s for s in trace if s["name"] == UPLOAD and s["kind"] == "SERVER"]
    assert len(uploads) == 1, [s["name"] for s in trace]
    root = uploads[0]
    assert root["service"] == "ingestion"
    assert root["parent_span_id"] == caller_span, "UploadSlide is not a child of the caller"
    orphans = [
        (s["service"], s["name"])
        for s in trace
        if s is not root and s["parent_span_id"] not in by_id
    ]
    assert not orphans, f"spans of the trace whose parent is missing: {orphans}"

    def ancestors(span: dict[str, Any]) -> list[dict[str, Any]]:
        chain, seen = [], set()
        while span["parent_span_id"] in by_id and span["span_id"] not in seen:
            seen.add(span["span_id"])
            span = by_id[span["parent_span_id"]]
            chain.append(span)
        return chain

    services = {s["service"] for s in trace}
    assert services >= {"ingestion", "access", "deid", "tiling", "serving", "metadata"}, services

    children = defaultdict(list)
    for s in trace:
        children[s["parent_span_id"]].append(s)
    for topic, (producer, consumers) in HOPS.items():
        publishes = [
            s
            for s in trace
            if s["name"] == f"{topic} publish"
            and s["kind"] == "PRODUCER"
            and s["status"] != "ERROR"
        ]
        assert publishes, f"no PRODUCER span for {topic}"
        assert {p["service"] for p in publishes} == {producer}, (topic, publishes)
        consumed = {
            c["service"]
            for p in publishes
            for c in children[p["span_id"]]
            if c["kind"] == "CONSUMER" and c["name"] == f"{topic} process"
        }
        assert consumed >= consumers, f"{topic}: consumers under the producer span: {consumed}"

    # the stages chain: each consumer span descends from the previous stage's consumer span
    previous = root
    for topic, service in CHAIN:
        stage = [
            s
            for s in trace
            if s["service"] == service
            and s["kind"] == "CONSUMER"
            and s["name"] == f"{topic} process"
        ]
        assert stage, f"no {service} CONSUMER span for {topic}"
        assert any(previous in ancestors(s) for s in stage), (
            f"{service}'s {topic} span does not descend from {previous['service']}'s span"
        )
        previous = stage[0]
    # every span of the slide, in every service, hangs from the upload call
    assert all(root in ancestors(s) for s in mine)
