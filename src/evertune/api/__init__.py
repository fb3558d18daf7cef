"""The control API: `/api/…` (runs, jobs, datasets, models, approvals, deployments, audit,
tokens) and the OpenAI fine-tuning API (`/v1/files`, `/v1/fine_tuning/jobs…`).

    from fastapi import FastAPI
    from evertune.api import create_router
    app = FastAPI()
    app.include_router(create_router(ws))          # what `evertune up` does (server.py)

Every route needs `Authorization: Bearer <token>` (evertune.auth: roles viewer, operator,
approver, admin); errors have the OpenAI shape `{"error": {"message", "type", "param",
"code"}}` (api/errors.py). State-changing routes call the same functions as the CLI
(`evertune.deploy`, `evertune.training.jobs`, `evertune.steps`), so both paths obey the same
checks and write the same audit records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

from evertune.api.control import control_router
from evertune.api.errors import ErrorRoute
from evertune.api.fine_tuning import StartRun, fine_tuning_router

if TYPE_CHECKING:
    from evertune.workspace import Workspace

__all__ = ["StartRun", "create_router"]


def create_router(ws: Workspace, start_run: StartRun | None = None) -> APIRouter:
    """All control-API routes for workspace `ws`.

    `start_run(ws, trigger) -> run_id` queues a pipeline run for a job created through
    `POST /v1/fine_tuning/jobs` and for `POST /api/runs`; the default is
    `evertune.pipeline.start_run` (which needs `pipeline.launch(ws)` in this process, as
    `evertune up` does). Tests pass a recorder.
    """
    router = APIRouter(route_class=ErrorRoute)
    router.include_router(control_router(ws, start_run))
    router.include_router(fine_tuning_router(ws, start_run))
    return router
