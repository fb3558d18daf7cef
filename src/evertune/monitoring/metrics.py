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

Drift monitoring (`evertune.monitoring.drift`, set by the control process after each check,
labelled by the model name and the version; the drift gauges name the PROD version):

| metric                                         | type      | labels                          |
|------------------------------------------------|-----------|---------------------------------|
| evertune_drift_p_value                         | gauge     | model, version                  |
| evertune_drift_statistic                       | gauge     | model, version (MMD², RBF)      |
| evertune_drift_detected                        | gauge     | model, version (1 = drifted)    |
| evertune_drift_prompts                         | gauge     | model, version                  |
| evertune_drift_last_check_timestamp_seconds    | gauge     | model                           |
| evertune_output_responses                      | gauge     | model, version (in the window)  |
| evertune_output_answer_tokens_mean             | gauge     | model, version                  |
| evertune_output_empty_ratio                    | gauge     | model, version                  |
| evertune_output_refusal_ratio                  | gauge     | model, version                  |
| evertune_output_feedback_ratio                 | gauge     | model, version                  |
| evertune_output_rated_down_ratio               | gauge     | model, version (of rated ones)  |

A drift series is absent, not zero, while there is no figure (too few served prompts, no
version in PROD): a p-value of 0 or 1 would be a claim.

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
        drift = ["model", "version"]
        self.drift_p_value = Gauge(
            "evertune_drift_p_value",
            "Two-sample test p-value, served prompts vs the PROD version's training prompts "
            "(low = the prompts differ).",
            drift,
            registry=r,
        )
        self.drift_statistic = Gauge(
            "evertune_drift_statistic",
            "MMD² (RBF kernel) between the embeddings of served and training prompts.",
            drift,
            registry=r,
        )
        self.drift_detected = Gauge(
            "evertune_drift_detected",
            "1 while drift is reported (p-value below monitor.drift.threshold), else 0.",
            drift,
            registry=r,
        )
        self.drift_prompts = Gauge(
            "evertune_drift_prompts",
            "Served prompts compared in the last drift check.",
            drift,
            registry=r,
        )
        self.drift_checked = Gauge(
            "evertune_drift_last_check_timestamp_seconds",
            "Unix time of the last drift check (alert when it stops moving).",
            ["model"],
            registry=r,
        )
        self.output_responses = Gauge(
            "evertune_output_responses",
            "Logged answers of the version that the output signals cover.",
            drift,
            registry=r,
        )
        self.output_tokens = Gauge(
            "evertune_output_answer_tokens_mean",
            "Mean answer length in tokens.",
            drift,
            registry=r,
        )
        self.output_empty = Gauge(
            "evertune_output_empty_ratio",
            "Share of answers that are empty or whitespace.",
            drift,
            registry=r,
        )
        self.output_refusal = Gauge(
            "evertune_output_refusal_ratio",
            "Share of answers that open with a refusal phrase (evertune.monitoring.drift).",
            drift,
            registry=r,
        )
        self.output_feedback = Gauge(
            "evertune_output_feedback_ratio",
            "Share of responses that got feedback (a rating or a correction).",
            drift,
            registry=r,
        )
        self.output_rated_down = Gauge(
            "evertune_output_rated_down_ratio",
            "Share of the responses with feedback that were rated down.",
            drift,
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
