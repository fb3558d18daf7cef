"""Prometheus metrics of the serving gateway, on their own CollectorRegistry.

    from evertune.monitoring import metrics_router
    app.include_router(metrics_router())      # GET /metrics, Prometheus text format
    # scrape: curl localhost:8000/metrics | grep evertune_

Every series is labelled by the model `version` that answered (`v3`, `base`) and the `stage`
the client asked for (`prod`, `qa`, `base`, or `version` for a direct `NAME@vN` call), so a
dashboard can compare a new PROD version with the one before it across a swap.

| metric                                         | type      | labels                          |
|------------------------------------------------|-----------|---------------------------------|
| evertune_requests_total                        | counter   | endpoint, version, stage, status|
| evertune_request_errors_total                  | counter   | endpoint, version, stage, code  |
| evertune_time_to_first_token_seconds           | histogram | version, stage                  |
| evertune_time_per_output_token_seconds         | histogram | version, stage                  |
| evertune_request_duration_seconds              | histogram | endpoint, version, stage        |
| evertune_prompt_tokens_total                   | counter   | version, stage                  |
| evertune_completion_tokens_total               | counter   | version, stage                  |
| evertune_requests_in_flight                    | gauge     | version, stage                  |
| evertune_stage_version                         | gauge     | stage (version number; 0 = base)|
| evertune_batch_size                            | histogram | engine                          |

The registry is our own (not prometheus_client's global one) so that several gateways in one
test process, or a gateway beside other instrumented libraries, never collide on names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds. TTFT on a CPU spans milliseconds (tiny model) to seconds (a long prompt on 135M+).
if TYPE_CHECKING:
    from fastapi import APIRouter

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServingMetrics:
    """The gateway's metric families; `ServingMetrics()` makes a fresh registry.

    m = ServingMetrics()
    m.requests.labels(endpoint="chat", version="v3", stage="prod", status="ok").inc()
    m.render()    # bytes in the Prometheus text format
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "evertune_requests",
            "Completion requests answered (status ok or error).",
            ["endpoint", "version", "stage", "status"],
            registry=r,
        )
        self.errors = Counter(
            "evertune_request_errors",
            "Failed requests by OpenAI error code.",
            ["endpoint", "version", "stage", "code"],
            registry=r,
        )
        self.ttft = Histogram(
            "evertune_time_to_first_token_seconds",
            "From request arrival to the first generated token (queueing and prefill included).",
            ["version", "stage"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "evertune_time_per_output_token_seconds",
            "Decode time per generated token after the first one.",
            ["version", "stage"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "evertune_request_duration_seconds",
            "Whole request, arrival to last byte produced.",
            ["endpoint", "version", "stage"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "evertune_prompt_tokens",
            "Prompt tokens read.",
            ["version", "stage"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "evertune_completion_tokens",
            "Tokens generated.",
            ["version", "stage"],
            registry=r,
        )
        self.in_flight = Gauge(
            "evertune_requests_in_flight",
            "Requests being generated now.",
            ["version", "stage"],
            registry=r,
        )
        self.stage_version = Gauge(
            "evertune_stage_version",
            "Version number a stage serves (0 = the base model).",
            ["stage"],
            registry=r,
        )
        self.batch_size = Histogram(
            "evertune_batch_size",
            "Requests decoded together, observed at each decode step.",
            ["engine"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)


METRICS = ServingMetrics()
"""The process-wide metrics: what a `Gateway` records into unless given others."""


def metrics_router(metrics: ServingMetrics | None = None) -> APIRouter:
    """A router serving `GET /metrics` (Prometheus text) for `metrics` (default: `METRICS`).

        app.include_router(metrics_router())

    No authentication: it holds counts and timings only, never prompts, and Prometheus
    scrapers rarely carry tokens. Put it behind the network policy of the monitoring stack.
    """
    # fastapi is imported here, not at the top: `evertune logs` imports this package and
    # should stay a light command.
    from fastapi import APIRouter, Response

    source = metrics or METRICS
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(source.render(), media_type=CONTENT_TYPE_LATEST)

    return router
