"""The Evertune processes: `evertune up` (everything on one port) and `evertune serve`
(serving only).

    evertune -w demo up                       # control API, pipeline, bucket watcher, serving
    evertune -w demo serve --stage prod --port 8001

`up` composes, on one port: the web console (`/`), the control API (`/api`, the OpenAI
fine-tuning API under `/v1/files` and `/v1/fine_tuning`), the OpenAI-compatible serving
endpoints (`/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/feedback`),
Prometheus metrics (`/metrics`), and in its lifespan the DBOS runtime (which resumes
interrupted pipeline runs) and the bucket watcher. Nothing durable lives in this process:
killing it loses nothing (see pipeline.py).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from evertune.workspace import Workspace


def create_app(
    ws: Workspace, *, control: bool = True, serving: bool = True,
    stages: tuple[str, ...] = ("prod", "qa"),
) -> FastAPI:
    """The ASGI app; `control=False` gives a serving-only process."""
    from fastapi import FastAPI

    from evertune.monitoring import metrics_router
    from evertune.serving import Gateway

    gateway = Gateway(ws, stages=stages) if serving else None
    watcher: Any = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal watcher
        # The finally also runs when start-up fails (serving cannot load a version, say), so
        # the pipeline's threads stop and the process exits with the error instead of lingering.
        try:
            if control:
                from evertune import pipeline
                from evertune.trigger import Watcher

                pipeline.launch(ws)
                watcher = Watcher(ws)
                watcher.start()
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
            if watcher is not None:
                watcher.stop()
            if gateway is not None:
                gateway.stop()
            if control:
                from evertune import pipeline

                pipeline.shutdown()

    app = FastAPI(title="Evertune", version=_version(), lifespan=lifespan)
    app.state.ready = False
    app.state.workspace = ws

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        return {
            "status": "ok" if app.state.ready else "starting", "workspace": str(ws.root),
            "model": ws.config.model.name,
        }

    if control:
        from evertune.api import create_router
        from evertune.web import console_router

        app.include_router(create_router(ws))
        app.include_router(console_router(ws))
    if gateway is not None:
        app.include_router(gateway.router)
        app.state.gateway = gateway
    app.include_router(metrics_router())
    return app


def run(
    ws: Workspace, *, host: str | None = None, port: int | None = None, control: bool = True,
    stages: tuple[str, ...] = ("prod", "qa"),
) -> None:
    """Serve the app with uvicorn until interrupted."""
    import uvicorn

    app = create_app(ws, control=control, stages=stages)
    uvicorn.run(
        app,
        host=host or ws.config.server.host,
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
