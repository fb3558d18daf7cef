"""The Evertune processes: `evertune up` (everything on one port) and `evertune serve`
(serving only).

    evertune -w demo up                       # control API, pipeline, bucket watcher, serving
    evertune -w demo serve --stage prod --port 8001

`up` composes, on one port: the web console (`/`), the control API (`/api`, the OpenAI
fine-tuning API under `/v1/files` and `/v1/fine_tuning`), the OpenAI-compatible serving
endpoints (`/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/feedback`),
Prometheus metrics (`/metrics`), and in its lifespan the DBOS runtime (which resumes
interrupted pipeline runs), the bucket watcher, the drift monitor and the canary monitor.
Nothing durable lives in this process: killing it loses nothing (see pipeline.py).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from evertune.workspace import Workspace


def create_app(
    ws: Workspace, *, control: bool = True, serving: bool = True,
    stages: tuple[str, ...] = ("prod", "qa"), replicas: bool = False,
    on_lost: Callable[[str], None] | None = None,
) -> FastAPI:
    """The ASGI app; `control=False` gives a serving-only process.

    `replicas=True` (a Postgres state DB shared by several `evertune up`): this process is one
    replica (evertune.replicas) and runs the bucket watcher and drift monitor only while it
    leads; `on_lost` is called if it loses a lock it held."""
    from fastapi import FastAPI

    from evertune.monitoring.metrics import PipelineCollector, metrics_router
    from evertune.serving import Gateway

    gateway = Gateway(ws, stages=stages) if serving else None
    watcher: Any = None
    drift: Any = None
    canary: Any = None
    replica: Any = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal replica
        # The finally also runs when start-up fails (serving cannot load a version, say), so
        # the pipeline's threads stop and the process exits with the error instead of lingering.
        try:
            if control:
                from evertune import pipeline

                if replicas:
                    from evertune.replicas import Replica

                    replica = Replica(ws, on_leader=lead, on_lost=on_lost)
                pipeline.launch(ws, executor_id=replica.executor_id if replica else None)
                if replica is not None:
                    replica.start()  # leads now if nobody else does; lead() runs then
                else:
                    lead()
            if gateway is not None:
                gateway.start()
            # Everything loaded so far (torch, MLflow, DBOS, the models) lives for the whole
            # process: freeze it out of the garbage collector, whose full passes over those
            # millions of objects otherwise stall a request for half a second
            # (bench/console_render.py).
            gc.collect()
            gc.freeze()
            app.state.ready = True
            yield
        finally:
            if replica is not None:
                replica.stop()
            if canary is not None:
                canary.stop()
            if drift is not None:
                drift.stop()
            if watcher is not None:
                watcher.stop()
            if gateway is not None:
                gateway.stop()
            if control:
                from evertune import pipeline

                pipeline.shutdown()

    def lead() -> None:
        """Start what runs once per workspace: the bucket watcher, the drift monitor and the
        canary monitor (which promotes or rolls back canaries: one decider)."""
        nonlocal watcher, drift, canary
        from evertune.canary import CanaryMonitor
        from evertune.monitoring.drift import DriftMonitor
        from evertune.trigger import Watcher

        watcher = Watcher(ws)
        watcher.start()
        drift = DriftMonitor(ws)  # writes audit events, starts rounds
        drift.start()  # no-op with monitor.drift.enabled: false
        canary = CanaryMonitor(ws)
        canary.start()

    app = FastAPI(title="Evertune", version=_version(), lifespan=lifespan)
    app.state.ready = False
    app.state.workspace = ws

    def problems() -> list[str]:
        """What keeps this process from doing its job right now (empty when all is well)."""
        found: list[str] = []
        if watcher is not None:
            if not watcher.running:
                found.append("the bucket watcher is not running: new data is not picked up")
            elif watcher.problem:
                found.append(f"bucket watcher: {watcher.problem}")
        return found

    app.state.health_problems = problems  # the console reads it too

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        """`status`: starting | ok | degraded; `problems` says what is degraded and why.
        Degraded still answers 200: the process is alive (a restart would not fix a deleted
        bucket folder); monitors should alert on the status field."""
        found = problems() if app.state.ready else []
        status = "starting" if not app.state.ready else ("degraded" if found else "ok")
        role = ("single" if replica is None else "leader" if replica.leader else "follower")
        return {
            "status": status, "problems": found, "workspace": str(ws.root),
            "model": ws.config.model.name, "role": role if control else "serving",
            "replica": replica.executor_id if replica is not None else None,
        }

    if control:
        from evertune.api import create_router
        from evertune.web import console_router

        app.include_router(create_router(ws))
        app.include_router(console_router(ws))
    if gateway is not None:
        app.include_router(gateway.router)
        app.state.gateway = gateway
    # Pipeline-run and job gauges where the control plane runs: a serving-only process has
    # no business reading the pipeline tables on every scrape.
    app.include_router(metrics_router(collectors=[PipelineCollector(ws)] if control else ()))
    return app


def preflight(ws: Workspace) -> None:
    """What the control plane needs from outside, checked at start (the MLflow server, the
    bucket, the Ray cluster of `train.backend: ray`): each failure is an error naming the
    setting and the fix, before anything starts (not a traceback minutes later)."""
    from evertune.bucket import Bucket
    from evertune.errors import StorageError
    from evertune.registry import check_tracking_server

    check_tracking_server(ws.tracking_uri)  # registry.tracking_uri: an MLflow server answers
    bucket = Bucket.for_workspace(ws)
    problem = bucket.check()
    if problem is None and not bucket.is_local:
        try:
            bucket.list("raw-data/")
        except Exception as exc:  # noqa: BLE001 (any failure of the store is the message)
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            hint = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or give the host an IAM "
                    "role), and AWS_ENDPOINT_URL for an S3-compatible store other than AWS"
                    if "credential" in detail.lower() else
                    "check the bucket name, the endpoint (AWS_ENDPOINT_URL) and this identity's "
                    "access to it")
            problem = f"cannot list {bucket.url} (storage.bucket): {detail}; {hint}"
    if problem:
        raise StorageError(problem)
    if ws.config.train.backend == "ray":  # rounds would train there: its head must answer
        from evertune.training.backends import check_reachable

        check_reachable(ws.config.train.ray)


def run(
    ws: Workspace, *, host: str | None = None, port: int | None = None, control: bool = True,
    serving: bool = True, stages: tuple[str, ...] = ("prod", "qa"), replicas: bool = False,
    on_lost: Callable[[str], None] | None = None,
) -> None:
    """Serve the app with uvicorn until interrupted.

    Raises `UnprotectedServingError` before starting anything when `host` is not a loopback
    address and the workspace has no serving key (the message says how to create one).
    """
    import uvicorn

    from evertune.serving.keys import require_keys_off_loopback

    bind = host or ws.config.server.host
    require_keys_off_loopback(ws, bind)
    app = create_app(ws, control=control, serving=serving, stages=stages, replicas=replicas,
                     on_lost=on_lost)
    uvicorn.run(
        app,
        host=bind,
        port=port or ws.config.server.port,
        log_level="warning",
        # One worker: DBOS and the bucket watcher must run once per workspace process; scale
        # serving out with more `evertune serve` processes instead.
        workers=1,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evertune")
    except PackageNotFoundError:
        return "0+unknown"
