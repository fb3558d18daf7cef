"""The `/api` routes: runs, jobs, datasets, models, approvals, deployments, audit, evals, tokens.

    curl -H "Authorization: Bearer $EVERTUNE_TOKEN" localhost:8000/api/models
    curl -X POST -H "Authorization: Bearer $T" -H 'content-type: application/json' \\
         -d '{"comment": "better on billing"}' localhost:8000/api/models/v3/approve

Reads need the `read` permission (every role but serving keys). Changes: `data` (upload a
dataset), `runs` (start a pipeline run on a stored dataset), `jobs` (cancel / resume a job),
`approve` / `reject` / `promote` / `rollback` (the deploy routes call `evertune.deploy`, the
same functions as the CLI), `tokens` (admin). Approving runs the QA system tests before it
answers, so it takes as long as they do (seconds on a small model); the response is the
`DeployResult` with the test report.

Limits: a request body declared over `data.max_file_mb` (plus 1 MiB for the form) is refused
with 413 before it is read, and a dataset upload streams to disk under the same cap (413
beyond it, nothing kept); `POST /api/runs` answers 429 once `api.max_queued_runs` runs are
queued or running.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, File, Path, Query, UploadFile
from pydantic import BaseModel, Field

from evertune import auth, deploy
from evertune.api import files as file_store
from evertune.api.errors import ApiError, capped_route
from evertune.api.security import Auth
from evertune.auth import Principal
from evertune.errors import ConfigError, DataError, NotFoundError

if TYPE_CHECKING:
    from evertune.api.fine_tuning import StartRun
    from evertune.workspace import Workspace

_EVAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NUMBER_REF = re.compile(r"\s*[vV]?(\d+)\s*")
MAX_VERSION = 2**31 - 1  # MLflow keeps version numbers in an SQL INTEGER column
MAX_ID = 2**63 - 1  # SQLite's largest INTEGER: a bigger id cannot even be looked up


# -- request / response models -----------------------------------------------------------------
class Comment(BaseModel):
    """Body of reject / promote: why (written to the audit log)."""

    comment: str = Field("", max_length=2000)


class ApproveRequest(Comment):
    """Body of approve: why, and `force` (admin) to override a gate or system-test rejection."""

    force: bool = False


class PromoteRequest(Comment):
    """Body of promote: why, and `canary` (1–99) to give the version that percent of the
    callers first instead of all of them (evertune.canary decides the rest)."""

    canary: int | None = None


class RollbackRequest(Comment):
    """Body of rollback: why, and optionally which retired version to return to."""

    to: str | None = None


class RunRequest(BaseModel):
    """Body of `POST /api/runs`: train on `dataset` (default: per data.mode) with overrides."""

    dataset: str | None = None
    overrides: list[str] = Field(default_factory=list, max_length=50)


class TokenRequest(BaseModel):
    """Body of token creation."""

    name: str = Field(..., min_length=1, max_length=128)
    role: auth.Role


class TokenOut(BaseModel):
    """A token as listed; `token` (the secret) only in the creation response."""

    id: int
    name: str
    role: str
    created_at: float
    revoked: bool
    token: str | None = None


class WhoAmI(BaseModel):
    """The caller and what their role may do."""

    name: str
    role: str
    permissions: list[str]


class AuditOut(BaseModel):
    """One audit row: who moved which version from where to where, when, and why."""

    id: int
    created_at: float
    model: str
    version: int
    action: str
    from_stage: str | None
    to_stage: str | None
    actor: str
    reason: str
    data: dict[str, Any]


class DeploymentsOut(deploy.Deployments):
    """What serves now plus the stage history."""

    history: list[AuditOut]


def control_router(ws: Workspace, start_run: StartRun | None = None) -> APIRouter:
    """The `/api` routes for `ws` (`start_run`: see `evertune.api.create_router`)."""
    router = APIRouter(prefix="/api", tags=["control"],
                       route_class=capped_route(lambda: file_store.max_upload_bytes(ws)))
    needs = Auth(ws)
    registry = _Lazy(ws)  # one Registry (one MLflow client) for every request of this router

    @router.get("/whoami", response_model=WhoAmI)
    def whoami(me: Principal = Depends(needs("read"))) -> WhoAmI:  # noqa: B008
        return WhoAmI(name=me.name, role=me.role,
                      permissions=sorted(auth.PERMISSIONS[me.role]))

    # -- pipeline runs -------------------------------------------------------------------
    @router.get("/runs")
    def list_runs(
        limit: int = Query(50, ge=1, le=1000), _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> list[dict[str, Any]]:
        from evertune import pipeline

        return [r.model_dump(mode="json") for r in pipeline.list_runs(ws, limit=limit)]

    @router.post("/runs", status_code=201)
    def start_run_route(
        body: RunRequest, me: Principal = Depends(needs("runs"))  # noqa: B008
    ) -> dict[str, Any]:
        """Start a pipeline run on a stored dataset (training → evaluation → registration)."""
        from evertune import pipeline, steps
        from evertune.data.store import get_dataset
        from evertune.workspace import Workspace

        check_run_capacity(ws)
        try:
            run_ws = Workspace.open(ws.root, [*ws.overrides, *body.overrides])
        except ConfigError as exc:
            raise ApiError(400, "; ".join(exc.problems), param="overrides",
                           code="invalid_config") from None
        # The round's plan (method per the dataset's kind or train.stages, the data of each
        # stage), checked before queueing: a stage with no data is a 400, not a failed run.
        try:
            plan = steps.plan_round(run_ws, dataset_ref=body.dataset)
        except DataError as exc:
            raise ApiError(400, str(exc), param="dataset", code="invalid_dataset") from None
        trigger = {"source": "api", "run_id": "run-api-" + secrets.token_hex(8),
                   "dataset": (get_dataset(run_ws, body.dataset).id if body.dataset
                               else plan[-1].dataset.id),
                   "overrides": list(body.overrides), "actor": me.name}
        run_id = (start_run or pipeline.start_run)(ws, trigger)
        found = pipeline.find_run(ws, run_id)
        return found.model_dump(mode="json") if found else {"id": run_id, "trigger": trigger}

    @router.get("/runs/{run_id}")
    def get_run(run_id: str, _: Principal = Depends(needs("read"))) -> dict[str, Any]:  # noqa: B008
        from evertune import pipeline

        return pipeline.get_run(ws, run_id).model_dump(mode="json")

    @router.post("/runs/{run_id}/retry", status_code=201)
    def retry_run_route(
        run_id: str, me: Principal = Depends(needs("runs"))  # noqa: B008
    ) -> dict[str, Any]:
        """Run a failed run again from its failed step, reusing the steps that succeeded
        (`evertune runs retry`); answers the new run (id `<run id>-retry<N>`), queued."""
        from evertune import pipeline

        if pipeline.find_run(ws, pipeline.retry_id(run_id)) is None:
            check_run_capacity(ws)  # a new run; asking again for one made is never refused
        try:
            new_id = pipeline.retry_run(ws, run_id, actor=me.name)
        except pipeline.PipelineError as exc:  # not failed (yet): a conflict, not a fault
            raise ApiError(409, str(exc), param="run_id", code="run_not_failed") from None
        return pipeline.get_run(ws, new_id).model_dump(mode="json")

    # -- jobs ----------------------------------------------------------------------------
    @router.get("/jobs")
    def list_jobs(
        limit: int = Query(50, ge=1, le=1000), _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> list[dict[str, Any]]:
        from evertune.training import jobs

        return [_job(j) for j in jobs.list_jobs(ws, limit=limit)]

    @router.get("/jobs/{job_id}")
    def get_job(job_id: str, _: Principal = Depends(needs("read"))) -> dict[str, Any]:  # noqa: B008
        from evertune.training import jobs

        return _job(jobs.get_job(ws, job_id))

    @router.get("/jobs/{job_id}/events")
    def job_events(
        job_id: str, _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> list[dict[str, Any]]:
        from evertune.training import jobs

        jobs.get_job(ws, job_id)
        return [e.model_dump(mode="json") for e in jobs.list_events(ws, job_id)]

    @router.get("/jobs/{job_id}/metrics")
    def job_metrics(
        job_id: str, _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> list[dict[str, Any]]:
        from evertune.training import jobs

        jobs.get_job(ws, job_id)
        return jobs.list_metrics(ws, job_id)

    @router.get("/jobs/{job_id}/checkpoints")
    def job_checkpoints(
        job_id: str, _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> list[dict[str, Any]]:
        from evertune.training import jobs

        jobs.get_job(ws, job_id)
        return [c.model_dump(mode="json") for c in jobs.list_checkpoints(ws, job_id)]

    @router.post("/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, _: Principal = Depends(needs("jobs"))) -> dict[str, Any]:  # noqa: B008
        from evertune.training import jobs

        return _job(jobs.cancel_job(ws, job_id))

    @router.post("/jobs/{job_id}/resume")
    def resume_job(job_id: str, _: Principal = Depends(needs("jobs"))) -> dict[str, Any]:  # noqa: B008
        from evertune.training import jobs

        return _job(jobs.resume_job(ws, job_id))

    # -- datasets ------------------------------------------------------------------------
    @router.get("/datasets")
    def list_datasets(_: Principal = Depends(needs("read"))) -> list[dict[str, Any]]:  # noqa: B008
        from evertune.data.store import list_datasets

        return [_dataset(v) for v in list_datasets(ws)]

    @router.get("/datasets/{dataset_id}")
    def get_dataset(
        dataset_id: str, _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> dict[str, Any]:
        from evertune.data.store import get_dataset

        return _dataset(get_dataset(ws, dataset_id), full=True)

    @router.post("/datasets")
    def add_dataset(
        file: UploadFile = File(...),  # noqa: B008
        _: Principal = Depends(needs("data")),  # noqa: B008
    ) -> dict[str, Any]:
        """Upload a data file: validated, deduplicated, split and stored as dataset version(s).

        Unlike `POST /v1/files`, bad rows do not refuse the file: they are counted and kept in
        the version's rejected.jsonl, as a bucket drop would be (`evertune data add`).
        """
        import shutil

        from evertune import steps

        # A folder per upload: two uploads of the same file name never overwrite each other.
        folder = ws.state_dir / file_store.FILES_DIR / "datasets" / secrets.token_hex(8)
        folder.mkdir(parents=True)
        path = folder / file_store.safe_filename(file.filename)
        try:
            # The same cap as POST /v1/files, checked while streaming (413 past it).
            file_store.copy_capped(file.file, path, ws.config.data.max_file_mb, path.name)
            added = steps.preprocess(ws, [path])
        except DataError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ApiError(400, str(exc).replace(str(path), path.name), param="file",
                           code="invalid_file") from None
        except BaseException:
            # A refused or failed upload leaves nothing behind (a 51 MB refusal stayed before).
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"versions": [_dataset(v) for v in added.versions], "report": added.report,
                "rejected": added.rejected}

    # -- models and approvals ------------------------------------------------------------
    @router.get("/models")
    def list_models(_: Principal = Depends(needs("read"))) -> list[dict[str, Any]]:  # noqa: B008
        return [mv.to_dict() for mv in registry().list_versions()]

    @router.get("/models/{version}")
    def get_model(version: str, _: Principal = Depends(needs("read"))) -> dict[str, Any]:  # noqa: B008
        reg = registry()
        mv = reg.resolve(version_ref(version))
        return {**mv.to_dict(), "audit": [_audit(r) for r in reg.audit_log(mv.version)]}

    @router.post("/models/{version}/approve", response_model=deploy.DeployResult)
    def approve(
        version: str, body: ApproveRequest, me: Principal = Depends(needs("approve"))  # noqa: B008
    ) -> deploy.DeployResult:
        """Approve → QA → system tests → PROD (deploy.auto_promote) or rejected."""
        return deploy.approve(ws, version_ref(version), me, body.comment, force=body.force)

    @router.post("/models/{version}/retry", response_model=deploy.DeployResult)
    def retry_qa(
        version: str,
        body: Comment | None = None,
        me: Principal = Depends(needs("approve")),  # noqa: B008
    ) -> deploy.DeployResult:
        """Rerun the QA system tests of an approved version whose last attempt failed because
        of the environment (`evertune approve N --retry`); the comment is optional."""
        return deploy.approve(ws, version_ref(version), me, body.comment if body else "",
                              retry=True)

    @router.post("/models/{version}/reject", response_model=deploy.DeployResult)
    def reject(
        version: str, body: Comment, me: Principal = Depends(needs("reject"))  # noqa: B008
    ) -> deploy.DeployResult:
        return deploy.reject(ws, version_ref(version), me, body.comment)

    @router.post("/models/{version}/promote", response_model=deploy.DeployResult)
    def promote(
        version: str,
        body: PromoteRequest | None = None,
        me: Principal = Depends(needs("promote")),  # noqa: B008
    ) -> deploy.DeployResult:
        """Promote to PROD, or with `{"canary": 10}` start a canary at 10%."""
        return deploy.promote(ws, version_ref(version), me, body.comment if body else "",
                              canary=body.canary if body else None)

    # -- deployments and audit -----------------------------------------------------------
    @router.get("/deployments", response_model=DeploymentsOut)
    def deployments(
        limit: int = Query(100, ge=1, le=10_000),
        _: Principal = Depends(needs("read")),  # noqa: B008
    ) -> DeploymentsOut:
        now = deploy.current(ws)
        history = [AuditOut(**_audit(r)) for r in deploy.history(ws, limit=limit)]
        return DeploymentsOut(**now.model_dump(), history=history)

    @router.post("/deployments/rollback", response_model=deploy.DeployResult)
    def rollback(
        body: RollbackRequest | None = None,
        me: Principal = Depends(needs("rollback")),  # noqa: B008
    ) -> deploy.DeployResult:
        if body is None:
            return deploy.rollback(ws, me)
        to = version_ref(body.to, param="to") if body.to is not None else None
        return deploy.rollback(ws, me, body.comment, to=to)

    @router.get("/audit", response_model=list[AuditOut])
    def audit(
        version: str | None = None,
        limit: int = Query(100, ge=1, le=10_000),
        _: Principal = Depends(needs("read")),  # noqa: B008
    ) -> list[AuditOut]:
        ref = version_ref(version, param="version") if version is not None else None
        return [AuditOut(**_audit(r)) for r in registry().audit_log(ref, limit=limit)]

    @router.get("/evals/{eval_id}")
    def get_eval(eval_id: str, _: Principal = Depends(needs("read"))) -> dict[str, Any]:  # noqa: B008
        # The id becomes a path: only plain names, so no traversal out of evals/.
        path = ws.evals_dir / eval_id / "report.json"
        if not _EVAL_ID.fullmatch(eval_id) or not path.is_file():
            raise ApiError(404, f"no evaluation report {eval_id!r} in {ws.evals_dir}",
                           param="eval_id", code="not_found")
        data: dict[str, Any] = json.loads(path.read_text("utf-8"))
        return data

    # -- tokens (admin) ------------------------------------------------------------------
    @router.get("/tokens", response_model=list[TokenOut])
    def list_tokens(me: Principal = Depends(needs("tokens"))) -> list[TokenOut]:  # noqa: B008
        return [TokenOut(**asdict(t)) for t in auth.list_tokens(ws, me)]

    @router.post("/tokens", response_model=TokenOut, status_code=201)
    def create_token(
        body: TokenRequest, me: Principal = Depends(needs("tokens"))  # noqa: B008
    ) -> TokenOut:
        """Mint a token; the secret is in this response only (the DB keeps its sha256)."""
        secret, info = auth.create_token(ws, body.name, body.role, me)
        return TokenOut(**asdict(info), token=secret)

    @router.post("/tokens/{token_id}/revoke", response_model=TokenOut)
    def revoke_token(
        token_id: int = Path(..., ge=1, le=MAX_ID),  # noqa: B008
        me: Principal = Depends(needs("tokens")),  # noqa: B008
    ) -> TokenOut:
        return TokenOut(**asdict(auth.revoke_token(ws, token_id, me)))

    return router


# -- helpers ---------------------------------------------------------------------------------
def version_ref(ref: str, param: str = "version") -> str:
    """`ref` unchanged, or NotFoundError for a version number no registry can hold.

    "v99999999999" would reach MLflow's SQL lookup as an integer too large for its column and
    fail there as a server error; no such version can exist, so it is simply not found.
    """
    m = _NUMBER_REF.fullmatch(ref)
    if m and (len(m.group(1)) > 10 or int(m.group(1)) > MAX_VERSION):
        raise NotFoundError(f"{param}: no model version {ref[:40]!r}; version numbers are "
                            f"1 to {MAX_VERSION} (`GET /api/models` lists them)")
    return ref


def count_active_runs(ws: Workspace) -> int:
    """Pipeline runs of the workspace that are queued or running."""
    from sqlalchemy import func, select

    from evertune import pipeline

    t = pipeline.pipeline_runs
    with ws.engine.connect() as conn:
        return int(conn.execute(
            select(func.count()).select_from(t).where(t.c.status.in_(("queued", "running")))
        ).scalar_one())


def check_run_capacity(ws: Workspace) -> None:
    """ApiError 429 when `api.max_queued_runs` runs are already queued or running."""
    limit = ws.config.api.max_queued_runs
    active = count_active_runs(ws)
    if active >= limit:
        raise ApiError(
            429,
            f"{active} pipeline runs are already queued or running, the limit "
            f"(api.max_queued_runs={limit}); wait for some to finish (GET /api/runs), or raise "
            "api.max_queued_runs in evertune.yaml",
            code="too_many_queued_runs", type="rate_limit_error",
        )


class _Lazy:
    """The workspace Registry, made on first use (importing MLflow takes seconds)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.registry: Any = None

    def __call__(self) -> Any:
        if self.registry is None:
            from evertune.registry import Registry

            self.registry = Registry(self.ws)
        return self.registry


def _job(job: Any) -> dict[str, Any]:
    # The config snapshot is large and internal; `evertune jobs show` reads it from the DB.
    data: dict[str, Any] = job.model_dump(mode="json", exclude={"config"})
    return data


def _dataset(v: Any, full: bool = False) -> dict[str, Any]:
    out = {"id": v.id, "kind": v.kind, "sha256": v.sha256, "created_at": v.created_at,
           "counts": v.counts, "origin": v.origin}
    if full:
        out["report"] = v.report
    return out


def _audit(rec: Any) -> dict[str, Any]:
    return asdict(rec)
