"""Prometheus collectors common to every service (each service adds its own in its
`metrics.py`). Labels are method names, topics and outcome codes: never ids or values."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RPC_REQUESTS = Counter(
    "tessera_rpc_requests_total", "gRPC calls served", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "tessera_rpc_duration_seconds",
    "gRPC call duration",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
EVENTS_CONSUMED = Counter(
    "tessera_events_consumed_total", "Events handled", ["service", "topic", "outcome"]
)
EVENTS_PUBLISHED = Counter(
    "tessera_events_published_total", "Events published", ["service", "topic"]
)
EVENT_HANDLER_LATENCY = Histogram(
    "tessera_event_handler_duration_seconds",
    "Time to handle one event",
    ["service", "topic"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
DEAD_LETTERS = Counter(
    "tessera_dead_letters_total",
    "Events parked in a dead-letter topic",
    ["service", "topic", "reason"],
)
CONSUMER_LAG = Gauge(
    "tessera_consumer_lag",
    "Messages in a partition the consumer group has not committed yet",
    ["service", "topic", "partition"],
)
DEID_OUTCOMES = Counter(
    "tessera_deid_outcomes_total",
    "De-identification outcomes (reason: a stable code, OK when de-identified)",
    ["outcome", "reason"],
)
SERVICE_UP = Gauge("tessera_service_ready", "1 when the service is serving", ["service"])
