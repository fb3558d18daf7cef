"""The web console: server-rendered pages for runs, jobs, datasets, model versions,
deployments and serving, served by `evertune up` at `/`.

    from evertune.web import console_router
    app.include_router(console_router(ws))      # what server.create_app does

Pages are Jinja2 templates (`web/templates/`) with SVG charts drawn on the server
(`web/charts.py`); a little plain JavaScript (`web/static/console.js`) refreshes live parts
(a running pipeline's DAG) and is not needed to read anything. Sign-in takes an API token
(`web/session.py`); the role decides which actions show, and every action goes through
`auth.require` and the same functions as the API and CLI (`evertune.deploy`), so a forged
POST is refused exactly as the API would refuse it.

One module per group of pages, each adding its routes to the router:
    overview.py   sign-in, sign-out, the overview
    pipeline.py   runs (live DAG), jobs (loss curves), datasets (rejects, token lengths)
    models.py     model versions (metrics vs PROD and base, gate CIs, regressions, lineage,
                  approve / reject), deployments (promote, rollback)
    serving.py    serving health charts, the request log, feedback
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

if TYPE_CHECKING:
    from evertune.workspace import Workspace

__all__ = ["console_router"]


def console_router(ws: Workspace) -> APIRouter:
    """Every console page and its static files, for workspace `ws`."""
    from evertune.web import models, overview, pipeline, serving
    from evertune.web.deps import Console
    from evertune.web.render import ConsoleRoute

    router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
    console = Console(ws)
    for module in (overview, pipeline, models, serving):
        module.add_routes(router, console)
    return router
