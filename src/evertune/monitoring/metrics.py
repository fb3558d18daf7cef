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

Pipeline runs and fine-tuning jobs (`PipelineCollector`, on the control process's /metrics
only: read from the state DB at each scrape, so every `evertune up` replica exports the same
figures; aggregate with `max`, never `sum`):

| metric                                         | type      | labels                          |
|------------------------------------------------|-----------|---------------------------------|
| evertune_pipeline_runs                         | gauge     | status (every status, 0 if none)|
| evertune_pipeline_run_running_seconds          | gauge     | run, model (each running run)   |
| evertune_pipeline_run_oldest_running_seconds   | gauge     | (0 while none runs)             |
| evertune_jobs                                  | gauge     | status (every status, 0 if none)|
| evertune_job_failures_last_hour                | gauge     | (jobs now failed, failed < 1 h) |
| evertune_job_last_failure_timestamp_seconds    | gauge     | (absent until a job failed)     |
| evertune_state_db_up                           | gauge     | (0: this scrape could not read) |

The registry is our own (not prometheus_client's global one) so that several gateways in one
test process, or a gateway beside other instrumented libraries, never collide on names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fastapi import APIRouter

    from evertune.workspace import Workspace

log = logging.getLogger("evertune.monitoring")

# Seconds. TTFT on a CPU spans milliseconds (tiny model) to seconds (a long prompt on 135M+).
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


# Every status a run or a job can have (evertune.pipeline.RunStatus, evertune.training.jobs
# .JobStatus; tests/monitoring/test_dashboards.py keeps them equal). Listed here rather than
# imported: those modules pull in DBOS and the trainer, and this one stays light. Each status
# is exported, 0 when no row has it, so `evertune_jobs{status="failed"}` is a number rather
# than an absent series that alerts and `rate()` would silently skip.
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "skipped")
JOB_STATUSES = (
    "validating_files",
    "queued",
    "running",
    "paused",
    "succeeded",
    "failed",
    "cancelled",
)
RUNNING_RUNS_SHOWN = 20
"""Running runs exported one by one (runs of a model go one at a time: normally 0 or 1)."""


@dataclass
class _Figures:
    """What one read of the state DB found."""

    runs: dict[str, int] = field(default_factory=dict)  # status → count
    running: list[tuple[str, str, float]] = field(default_factory=list)  # (id, model, start)
    jobs: dict[str, int] = field(default_factory=dict)
    failures_last_hour: int = 0
    last_failure: float | None = None  # finished_at of the newest failed job


class PipelineCollector:
    """Pipeline-run and fine-tuning-job gauges, read from the state DB at each scrape.

        metrics_router(collectors=[PipelineCollector(ws)])   # what `evertune up` serves
        # curl localhost:8000/metrics | grep -E 'evertune_(pipeline|job|state_db)'

    Two or three small aggregate queries per scrape, on a thread of their own with a
    `timeout_s` deadline: a locked or unreachable state DB (a Postgres failover makes a new
    connection wait up to evertune.db.RECONNECT_S) costs these series one scrape, logged, and
    never the serving series beside them or Prometheus's scrape timeout. While a read is still
    hanging, later scrapes skip the DB instead of piling up threads on it.
    """

    def __init__(self, ws: Workspace, timeout_s: float = 3.0) -> None:
        self.ws = ws
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._inflight: threading.Thread | None = None
        self._failing = False  # log a failure once, and the recovery once, not every scrape

    def describe(self) -> Iterable[Metric]:
        """The families (their names are what the registry checks): registering reads nothing."""
        return self._families(None, 0.0)

    def collect(self) -> Iterable[Metric]:
        """The gauges from a fresh read; only `evertune_state_db_up` 0 when the read failed."""
        now = time.time()
        figures = self._read_in_time(now)
        families = self._families(figures, now)
        return families if figures is not None else families[:1]

    def _families(self, figures: _Figures | None, now: float) -> list[Metric]:
        up = GaugeMetricFamily(
            "evertune_state_db_up",
            "1 when this scrape read the pipeline and job figures from the state DB, 0 when "
            "the read failed or timed out (then the evertune_pipeline_* and evertune_job* "
            "series are missing from this scrape).",
        )
        up.add_metric([], 0.0 if figures is None else 1.0)
        runs = GaugeMetricFamily(
            "evertune_pipeline_runs",
            "Pipeline runs in the state DB by status.",
            labels=["status"],
        )
        running = GaugeMetricFamily(
            "evertune_pipeline_run_running_seconds",
            "Seconds since each running pipeline run started (queued time excluded).",
            labels=["run", "model"],
        )
        oldest = GaugeMetricFamily(
            "evertune_pipeline_run_oldest_running_seconds",
            "Seconds since the oldest running pipeline run started; 0 while none runs.",
        )
        jobs = GaugeMetricFamily(
            "evertune_jobs", "Fine-tuning jobs in the state DB by status.", labels=["status"]
        )
        failures = GaugeMetricFamily(
            "evertune_job_failures_last_hour",
            "Jobs whose status is failed and that failed in the last hour (a job resumed "
            "and failed again counts once).",
        )
        last_failure = GaugeMetricFamily(
            "evertune_job_last_failure_timestamp_seconds",
            "Unix time the most recently failed job (still failed) failed; absent if none.",
        )
        if figures is None:
            return [up, runs, running, oldest, jobs, failures, last_failure]
        for status in _with_extra(RUN_STATUSES, figures.runs):
            runs.add_metric([status], figures.runs.get(status, 0))
        for run_id, model, start in figures.running:
            running.add_metric([run_id, model], max(0.0, now - start))
        starts = [start for _, _, start in figures.running]
        oldest.add_metric([], max(0.0, now - min(starts)) if starts else 0.0)
        for status in _with_extra(JOB_STATUSES, figures.jobs):
            jobs.add_metric([status], figures.jobs.get(status, 0))
        failures.add_metric([], figures.failures_last_hour)
        if figures.last_failure is not None:
            last_failure.add_metric([], figures.last_failure)
        return [up, runs, running, oldest, jobs, failures, last_failure]

    def _read_in_time(self, now: float) -> _Figures | None:
        """`_read` on a daemon thread, waited for up to `timeout_s`; None if it failed."""
        box: dict[str, _Figures | BaseException] = {}

        def work() -> None:
            try:
                box["figures"] = self._read(now)
            except Exception as exc:  # noqa: BLE001 (any failure only costs this scrape)
                box["error"] = exc

        with self._lock:  # two concurrent scrapes must not both start a read
            if self._inflight is not None and self._inflight.is_alive():
                self._failed("the previous read is still waiting for the state DB")
                return None
            # A daemon thread, not an executor: a read hanging on a dead server must not
            # hold up the process's exit.
            thread = threading.Thread(target=work, name="evertune-metrics-db", daemon=True)
            self._inflight = thread
            thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            self._failed(f"no answer from the state DB within {self.timeout_s:g} s")
            return None
        found = box.get("figures")
        if not isinstance(found, _Figures):
            error = box.get("error")
            self._failed(" ".join(f"{type(error).__name__}: {error}".split())[:300])
            return None
        if self._failing:
            log.warning("/metrics reads the pipeline and job figures from the state DB again")
            self._failing = False
        return found

    def _failed(self, why: str) -> None:
        if not self._failing:
            log.warning(
                "/metrics: pipeline and job figures skipped (evertune_state_db_up 0, "
                "logged once until it recovers): %s",
                why,
            )
        self._failing = True

    def _read(self, now: float) -> _Figures:
        """The aggregate queries, in one connection."""
        from sqlalchemy import case, func, select

        from evertune.db import jobs, pipeline_runs

        runs, figures = pipeline_runs, _Figures()
        # A run is queued before it starts; one that started has started_at (created_at for a
        # row written before started_at existed).
        start = func.coalesce(runs.c.started_at, runs.c.created_at)
        failed_recently = func.sum(case((jobs.c.finished_at >= now - 3600, 1), else_=0))
        with self.ws.engine.connect() as conn:
            for status, count in conn.execute(
                select(runs.c.status, func.count()).group_by(runs.c.status)
            ):
                figures.runs[status] = int(count)
            if figures.runs.get("running"):
                figures.running = [
                    (str(r.id), str(r.model), float(r.start))
                    for r in conn.execute(
                        select(runs.c.id, runs.c.model, start.label("start"))
                        .where(runs.c.status == "running")
                        .order_by(start)
                        .limit(RUNNING_RUNS_SHOWN)
                    )
                ]
            for status, count, last, recent in conn.execute(
                select(
                    jobs.c.status, func.count(), func.max(jobs.c.finished_at), failed_recently
                ).group_by(jobs.c.status)
            ):
                figures.jobs[status] = int(count)
                if status == "failed":
                    figures.failures_last_hour = int(recent or 0)
                    figures.last_failure = None if last is None else float(last)
        return figures


def _with_extra(known: Sequence[str], found: dict[str, int]) -> list[str]:
    """The known statuses, then any other one a newer Evertune wrote into the shared DB."""
    return [*known, *sorted(set(found) - set(known))]


def metrics_router(
    metrics: ServingMetrics | None = None, collectors: Sequence[Collector] = ()
) -> APIRouter:
    """A router serving `GET /metrics` (Prometheus text) for `metrics` (default: `METRICS`)
    and `collectors` (e.g. `PipelineCollector`, only in the process that has the control plane).

        app.include_router(metrics_router())

    No authentication: it holds counts and timings only, never prompts, and Prometheus
    scrapers rarely carry tokens. Put it behind the network policy of the monitoring stack.
    """
    # fastapi is imported here, not at the top: `evertune logs` imports this package and
    # should stay a light command.
    from fastapi import APIRouter, Response

    source = metrics or METRICS
    # The collectors go on a registry of this router, not on `source`'s: `METRICS` is shared
    # by every app in the process (tests build several), and each app has its own workspace.
    extra = CollectorRegistry()
    for collector in collectors:
        extra.register(collector)
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        body = source.render() + (generate_latest(extra) if collectors else b"")
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
