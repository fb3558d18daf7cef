"""The OpenAI fine-tuning API over Evertune's pipeline, so the official `openai` client works.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="evt_…")   # an operator token
    f = client.files.create(file=open("tickets.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=f.id, model="evertune",
                                         hyperparameters={"n_epochs": 2})
    job = client.fine_tuning.jobs.create(training_file=pairs.id, model="evertune", method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})   # or pretrain, kto
    client.fine_tuning.jobs.retrieve(job.id).status      # queued → running → succeeded
    client.fine_tuning.jobs.list_events(job.id)
    client.fine_tuning.jobs.pause(job.id); client.fine_tuning.jobs.resume(job.id)
    client.fine_tuning.jobs.cancel(job.id)

Routes: `POST /v1/files` (multipart, purpose fine-tune), `GET /v1/files[/{id}]`,
`GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`, `POST /v1/fine_tuning/jobs`,
`GET /v1/fine_tuning/jobs[/{id}]`, `…/{id}/events`, `…/{id}/checkpoints`,
`POST …/{id}/cancel`, `…/{id}/pause`, `…/{id}/resume`.

`method.type` is a training method of `training.recipes` (OpenAI's `supervised` and `dpo`,
and Evertune's `pretrain` and `kto`); its hyperparameters (`n_epochs`, `batch_size`,
`learning_rate_multiplier`, and `beta` for dpo and kto) become config overrides of the job,
"auto" (or leaving one out) keeps the workspace's value. Without `method` the workspace's
`train.method` decides (`auto`: the file's records do).

A job created here runs through the same pipeline as a bucket drop: the file becomes a dataset
version (`steps.preprocess`), the job is created keyed by a new run id
(`create_job(ws, dataset, run_id=…)`), and `pipeline.start_run(ws, {"source": "api", …})`
queues the durable run, whose FineTuning step finds that job by its run id, then evaluates and
registers the result like any other. `model` may be the workspace model name (or the base
model spec): train from the base; or `NAME@vN` / `NAME@prod`: continue from that version.
Once registered, `fine_tuned_model` is `NAME@vN`, the name serving answers to.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Query, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evertune.api import files as file_store
from evertune.api.control import check_run_capacity, version_ref
from evertune.api.errors import ApiError, ErrorResponse, capped_route
from evertune.api.security import Auth
from evertune.auth import Principal
from evertune.errors import ConfigError, DataError, EvertuneError

if TYPE_CHECKING:
    from evertune.registry import ModelVersion
    from evertune.training.jobs import Job
    from evertune.workspace import Workspace

StartRun = Callable[["Workspace", dict[str, Any]], str]
MAX_LIST = 100  # OpenAI's page limit


class Hyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters; "auto" means the workspace's configured value."""

    # A misspelt hyperparameter must not be silently ignored: refuse unknown keys.
    model_config = ConfigDict(extra="forbid")

    # The bounds sit on the number alone: on the whole union Pydantic would also compare
    # "auto" with them (a TypeError, a 500 for OpenAI's documented default).
    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Literal["auto"] | None = None
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] | None = None


class PreferenceHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters (KTO takes the same): `beta` as train.dpo.beta / kto.beta."""

    beta: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] | None = None


# The hyperparameters each `method.type` accepts (the keys are training.recipes' methods).
METHOD_HYPERPARAMETERS: dict[str, type[Hyperparameters]] = {
    "supervised": Hyperparameters,
    "pretrain": Hyperparameters,
    "dpo": PreferenceHyperparameters,
    "kto": PreferenceHyperparameters,
}


class Method(BaseModel):
    """OpenAI's `method` object: {"type": "dpo", "dpo": {"hyperparameters": …}}; the block is
    named after the type (checked in `_method_overrides`, which names the wrong field)."""

    model_config = ConfigDict(extra="allow")

    type: str = "supervised"


class CreateJobRequest(BaseModel):
    """`POST /v1/fine_tuning/jobs`; fields OpenAI may add later are ignored, not refused."""

    model_config = ConfigDict(extra="ignore")

    training_file: str
    model: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)  # numpy's seed range
    validation_file: str | None = None
    metadata: dict[str, str] | None = None


class ListPage(BaseModel):
    """An OpenAI list page."""

    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


def fine_tuning_router(ws: Workspace, start_run: StartRun | None = None) -> APIRouter:
    """The `/v1/files` and `/v1/fine_tuning` routes for `ws`.

    `start_run` queues the pipeline run (default: `evertune.pipeline.start_run`, imported on
    first use so this module stays light); tests pass a recorder.
    """
    router = APIRouter(prefix="/v1", tags=["openai fine-tuning"],
                       route_class=capped_route(lambda: file_store.max_upload_bytes(ws)))
    needs = Auth(ws)

    def _start(trigger: dict[str, Any]) -> str:
        if start_run is not None:
            return start_run(ws, trigger)
        from evertune import pipeline

        return pipeline.start_run(ws, trigger)

    # -- files ---------------------------------------------------------------------------
    @router.post("/files", response_model=file_store.FileObject)
    def create_file(
        file: UploadFile = File(...),  # noqa: B008
        purpose: str = Form(...),
        _: Principal = Depends(needs("data")),  # noqa: B008
    ) -> file_store.FileObject:
        """Upload a JSON Lines training file (purpose `fine-tune`); bad rows → 400 naming them."""
        return file_store.store_upload(ws, file.filename, file.file, purpose)

    @router.get("/files", response_model=ListPage)
    def list_files(
        purpose: str | None = None, _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> ListPage:
        objs = [o for o in file_store.list_files(ws) if purpose is None or o.purpose == purpose]
        return ListPage(data=[o.model_dump() for o in objs])

    @router.get(
        "/files/{file_id}/content",
        response_class=FileResponse,
        responses={200: {"content": {"application/octet-stream": {}},
                         "description": "The file's bytes"}},
    )
    def file_content(
        file_id: str, _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> FileResponse:
        """The stored bytes of an uploaded file or of a job's result file (its evaluation
        report): `client.files.content(file_id)`."""
        path = file_store.file_path(ws, file_id)
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    @router.get("/files/{file_id}", response_model=file_store.FileObject)
    def retrieve_file(
        file_id: str, _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> file_store.FileObject:
        return file_store.get_file(ws, file_id)

    @router.delete("/files/{file_id}", response_model=file_store.FileDeleted)
    def delete_file(
        file_id: str, _: Principal = Depends(needs("data"))  # noqa: B008
    ) -> file_store.FileDeleted:
        """Delete a file (409 while a job made from it is not finished); the dataset versions
        it made stay, as other files, jobs and registered versions may share them."""
        return file_store.delete_file(ws, file_id)

    # -- jobs ----------------------------------------------------------------------------
    @router.post(
        "/fine_tuning/jobs",
        responses={503: {"model": ErrorResponse,
                         "description": "The job was created but its run could not be queued"}},
    )
    def create_job(
        body: CreateJobRequest,
        idempotency_key: str | None = Header(None),
        me: Principal = Depends(needs("jobs")),  # noqa: B008
    ) -> dict[str, Any]:
        """Create a fine-tuning job from an uploaded file and queue its pipeline run."""
        from evertune import steps
        from evertune.training import jobs
        from evertune.workspace import Workspace

        if body.validation_file:
            raise ApiError(400, "validation_file is not supported: Evertune splits the training "
                           "file into train/validation/test by content hash (data.split); "
                           "leave it out", param="validation_file", code="unsupported")
        overrides = _overrides(ws, body)  # the request's own shape first, then what it names
        path = _training_file(ws, body.training_file)
        parent = _parent(ws, body.model)
        try:
            job_ws = Workspace.open(ws.root, [*ws.overrides, *overrides]) if overrides else ws
        except ConfigError as exc:
            raise ApiError(400, f"hyperparameters: {'; '.join(exc.problems)}",
                           param="hyperparameters", code="invalid_hyperparameters") from None
        # A retried request with the same Idempotency-Key maps to the same run, job and
        # dataset (each is idempotent in its key), so a client retry never trains twice.
        if idempotency_key:
            run_id = "run-api-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:16]
        else:
            run_id = "run-api-" + secrets.token_hex(8)
        if not idempotency_key or not _run_exists(ws, run_id):  # a retry is never refused
            check_run_capacity(ws)
        method = body.method.type if body.method is not None else job_ws.config.train.method
        # The file may not be deleted between here and the record of the job made from it.
        with file_store.file_guard(ws, body.training_file):
            path = _training_file(ws, body.training_file)  # deleted while this waited: 404
            try:
                added = steps.preprocess(job_ws, [path])
            except DataError as exc:
                raise ApiError(400, str(exc).replace(str(path), path.name),
                               param="training_file", code="invalid_file") from None
            dataset = _pick_dataset(added.versions, method, body.training_file)
            job = jobs.create_job(job_ws, dataset, parent=parent, run_id=run_id, method=method)
            file_store.record_use(ws, body.training_file, job.id)
        trigger: dict[str, Any] = {
            "source": "api", "run_id": run_id, "file": str(path), "dataset": dataset.id,
            "overrides": overrides, "file_id": body.training_file, "actor": me.name,
            # The job above is the run's one stage, whatever train.stages says: a hosted-API
            # job trains the method it asked for, and its run must find that very job.
            "method": job.method,
        }
        if body.suffix:
            trigger["suffix"] = body.suffix
        try:
            _start(trigger)
        except EvertuneError as exc:
            if not job.finished:
                jobs.fail_job(ws, job.id, "start_failed", f"the pipeline run did not start: {exc}")
            raise ApiError(503, f"job {job.id} was created but its pipeline run could not be "
                           f"queued: {exc}", code="pipeline_unavailable",
                           type="server_error") from None
        return _job_out(ws, jobs.get_job(ws, job.id))

    @router.get("/fine_tuning/jobs", response_model=ListPage)
    def list_jobs(
        after: str | None = None,
        limit: int = Query(20, ge=1, le=MAX_LIST),
        _: Principal = Depends(needs("read")),  # noqa: B008
    ) -> ListPage:
        from evertune.training import jobs

        all_jobs = jobs.list_jobs(ws, limit=100_000)
        page, more = _page(all_jobs, after, limit, "job")
        versions = _versions_by_job(ws) if any(j.status == "succeeded" for j in page) else {}
        return _list([_job_out(ws, j, versions) for j in page], more)

    @router.get("/fine_tuning/jobs/{job_id}")
    def retrieve_job(
        job_id: str, _: Principal = Depends(needs("read"))  # noqa: B008
    ) -> dict[str, Any]:
        from evertune.training import jobs

        return _job_out(ws, jobs.get_job(ws, job_id))

    @router.get("/fine_tuning/jobs/{job_id}/events", response_model=ListPage)
    def list_events(
        job_id: str,
        after: str | None = None,
        limit: int = Query(20, ge=1, le=MAX_LIST),
        _: Principal = Depends(needs("read")),  # noqa: B008
    ) -> ListPage:
        from evertune.training import jobs

        jobs.get_job(ws, job_id)  # 404 for an unknown job rather than an empty list
        events = list(reversed(jobs.list_events(ws, job_id)))  # OpenAI lists newest first
        page, more = _page(events, after, limit, "event")
        data = [{**e.model_dump(mode="json"), "created_at": int(e.created_at)} for e in page]
        return _list(data, more)

    @router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=ListPage)
    def list_checkpoints(
        job_id: str,
        after: str | None = None,
        limit: int = Query(10, ge=1, le=MAX_LIST),
        _: Principal = Depends(needs("read")),  # noqa: B008
    ) -> ListPage:
        from evertune.training import jobs

        jobs.get_job(ws, job_id)
        page, more = _page(jobs.list_checkpoints(ws, job_id), after, limit, "checkpoint")
        name = ws.config.model.name
        data = [
            {
                "id": c.id,
                "object": c.object,
                "created_at": int(c.created_at),
                "fine_tuning_job_id": c.fine_tuning_job_id,
                "fine_tuned_model_checkpoint": f"{name}@{job_id}:step-{c.step_number}",
                "step_number": c.step_number,
                "metrics": {"step": c.step_number, **c.metrics},
            }
            for c in page
        ]
        return _list(data, more)

    @router.post("/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(
        job_id: str, _: Principal = Depends(needs("jobs"))  # noqa: B008
    ) -> dict[str, Any]:
        """Cancel a job: at once if it has not started, else within one training step."""
        from evertune.training import jobs

        return _job_out(ws, jobs.cancel_job(ws, job_id))

    @router.post("/fine_tuning/jobs/{job_id}/pause")
    def pause_job(
        job_id: str, _: Principal = Depends(needs("jobs"))  # noqa: B008
    ) -> dict[str, Any]:
        """Pause a running job: it saves a checkpoint after the current step and turns
        `paused` (the answer may still say `running`); 409 for a job that is not running."""
        from evertune.training import jobs

        return _job_out(ws, jobs.pause_job(ws, job_id))

    @router.post("/fine_tuning/jobs/{job_id}/resume")
    def resume_job(
        job_id: str, _: Principal = Depends(needs("jobs"))  # noqa: B008
    ) -> dict[str, Any]:
        """Resume a paused job from its newest checkpoint; its pipeline run, still waiting,
        then evaluates and registers it. 409 for a job in any other status."""
        from evertune.errors import JobError
        from evertune.training import jobs

        job = jobs.check_alive(ws, job_id)
        if job.status in ("failed", "cancelled", "queued", "validating_files"):
            # Its pipeline run has ended (or not begun): training it here would leave nobody to
            # evaluate and register the result.
            raise JobError(
                f"job {job_id} is {job.status}; only a paused job can be resumed through the "
                f"API (`evertune jobs resume {job_id}` resumes a failed or cancelled one and "
                "evaluates and registers it)"
            )
        return _job_out(ws, jobs.resume_job(ws, job_id))

    return router


# -- helpers ---------------------------------------------------------------------------------
def _training_file(ws: Workspace, file_id: str) -> Any:
    try:
        return file_store.file_path(ws, file_id)
    except ApiError as exc:
        exc.param = "training_file"
        raise


def _overrides(ws: Workspace, body: CreateJobRequest) -> list[str]:
    """`--set` overrides for the job from OpenAI hyperparameters, method and seed."""
    hp: dict[str, Any] = {}
    if body.method is not None:
        hp.update(_method_hyperparameters(body.method))
    if body.hyperparameters is not None:
        hp.update(body.hyperparameters.model_dump(exclude_none=True))
    out: list[str] = []
    if body.method is not None and body.method.type != ws.config.train.method:
        out.append(f"train.method={body.method.type}")
    if hp.get("n_epochs") not in (None, "auto"):
        out.append(f"train.n_epochs={hp['n_epochs']}")
    if hp.get("batch_size") not in (None, "auto"):
        out.append(f"train.batch_size={hp['batch_size']}")
    if hp.get("learning_rate_multiplier") not in (None, "auto"):
        rate = ws.config.train.learning_rate * float(hp["learning_rate_multiplier"])
        out.append(f"train.learning_rate={rate:.6g}")
    if hp.get("beta") not in (None, "auto"):
        assert body.method is not None  # beta is only accepted inside a dpo / kto method
        out.append(f"train.{body.method.type}.beta={hp['beta']}")
    if body.seed is not None:
        out.append(f"train.seed={body.seed}")
    return out


def _method_hyperparameters(method: Method) -> dict[str, Any]:
    """The hyperparameters of OpenAI's `method` object, checked: ApiError 400 naming the
    field for an unknown type, a block under the wrong name or a bad value."""
    kind = method.type
    if kind not in METHOD_HYPERPARAMETERS:
        hint = ("reinforcement fine-tuning needs graders Evertune does not run; "
                if kind == "reinforcement" else "")
        raise ApiError(400, f"method.type {kind!r} is not a training method here; {hint}use "
                       f"one of: {', '.join(METHOD_HYPERPARAMETERS)}", param="method.type",
                       code="unsupported_method")
    extra = dict(method.model_extra or {})
    block = extra.pop(kind, None)
    if extra:
        name = next(iter(extra))
        raise ApiError(400, f"method.{name} does not belong to method.type {kind!r}; put the "
                       f"settings under method.{kind} (or set method.type to {name!r})",
                       param=f"method.{name}", code="invalid_method")
    if block is None:
        return {}
    if not isinstance(block, dict) or set(block) - {"hyperparameters"}:
        raise ApiError(400, f"method.{kind} must be an object "
                       '{"hyperparameters": {…}} and nothing else', param=f"method.{kind}",
                       code="invalid_method")
    nested = block.get("hyperparameters") or {}
    where = f"method.{kind}.hyperparameters"
    try:
        parsed = METHOD_HYPERPARAMETERS[kind].model_validate(nested)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in errors
        )
        # Name the first bad field, as OpenAI's `param` does (`….hyperparameters.beta`).
        first = next((str(e["loc"][0]) for e in errors if e["loc"]), None)
        raise ApiError(400, f"{where}: {problems}", param=f"{where}.{first}" if first else where,
                       code="invalid_hyperparameters") from None
    return parsed.model_dump(exclude_none=True)


def _run_exists(ws: Workspace, run_id: str) -> bool:
    from evertune import pipeline

    return pipeline.find_run(ws, run_id) is not None


def _parent(ws: Workspace, model: str | None) -> str | None:
    """The registered version a job continues from, per the request's `model`."""
    name, base = ws.config.model.name, ws.config.model.base
    if model in (None, "", name, base):
        return None
    assert model is not None  # narrowed above
    if model.startswith(name + "@"):
        from evertune.registry import Registry

        ref = model.split("@", 1)[1]
        try:
            return str(Registry(ws).resolve(version_ref(ref, param="model")).version)
        except EvertuneError as exc:
            raise ApiError(400, f"model {model!r}: {exc}", param="model",
                           code="model_not_found") from None
    raise ApiError(
        400,
        f"model {model!r} is not available in this workspace; use {name!r} (fine-tunes the base "
        f"model {base}) or {name}@vN / {name}@prod (continues from a registered version)",
        param="model", code="model_not_found",
    )


def _pick_dataset(versions: Sequence[Any], method: str, file_id: str) -> Any:
    """The dataset version of the file that `method` trains on (`auto`: the first one any
    method reads); ApiError 400 saying which records the method needs."""
    from evertune.training.recipes import RECIPES, method_for_kind

    if method == "auto":
        found = next((v for v in versions if method_for_kind(v.kind)), None)
    else:
        found = next((v for v in versions if v.kind == RECIPES[method].kind), None)
    if found is not None:
        return found
    kinds = sorted({v.kind for v in versions})
    if method == "auto":
        needs = "; ".join(f"{r.method} trains on {r.data}" for r in RECIPES.values())
    else:
        needs = f"{method} trains on {RECIPES[method].data}"
    others = [m for k in kinds if (m := method_for_kind(k))]
    hint = f", or create the job with method type {others[0]!r}" if others else ""
    raise ApiError(400, f"{file_id} holds no records for method {method!r} (found: "
                   f"{', '.join(kinds) or 'none'}); {needs}: upload such a file{hint}",
                   param="training_file", code="invalid_file")


def _versions_by_job(ws: Workspace) -> dict[str, ModelVersion]:
    from evertune.registry import Registry

    return {mv.job: mv for mv in Registry(ws).list_versions() if mv.job}


def _job_out(
    ws: Workspace, job: Job, versions: dict[str, ModelVersion] | None = None
) -> dict[str, Any]:
    """The OpenAI job object.

    As in the hosted API, `succeeded` means `fine_tuned_model` can be called: a job whose
    training finished stays `running` while its run evaluates and registers it (its events
    say so), then turns `succeeded` with `fine_tuned_model` (`NAME@vN`) and `result_files`
    (the evaluation report) in the same answer. A version the quality gate rejected is still
    `succeeded` and callable, marked in the `evertune` field (`gate: fail`, the reasons) and
    in a warning event; it is never deployed without an admin's override. A run that fails
    after training makes the job `failed` with the run's error.
    """
    out = job.to_openai()
    out["fine_tuned_model"] = None
    # "auto" resolved: the multiplier that gave the job's learning rate (the record keeps only
    # the rate), against the workspace's configured rate.
    rate = job.hyperparameters.get("learning_rate")
    if isinstance(rate, (int, float)):
        multiplier = float(f"{rate / ws.config.train.learning_rate:.6g}")
        out["hyperparameters"]["learning_rate_multiplier"] = multiplier
        out["method"][job.method]["hyperparameters"]["learning_rate_multiplier"] = multiplier
    if job.status != "succeeded":
        return out
    if versions is None:
        from evertune.registry import Registry

        mv = Registry(ws).find_by_job(job.id)
    else:
        mv = versions.get(job.id)
    if mv is not None:
        out["fine_tuned_model"] = f"{mv.name}@v{mv.version}"
        out["finished_at"] = max(out["finished_at"] or 0, int(mv.created_at)) or None
        out["result_files"] = _result_files(ws, mv)
        out["evertune"] = {
            "version": mv.version, "stage": mv.stage.value,
            "approval_status": mv.approval_status, "gate": mv.gate,
            "gate_reasons": list(mv.gate_reasons), "eval_report": mv.eval_report,
        }
        return out
    from evertune import pipeline
    from evertune.steps import run_of_job

    run_id = run_of_job(job.run_id)
    run = pipeline.find_run(ws, run_id) if run_id else None
    if run is None:
        return out  # trained outside a pipeline run: nothing more will happen to it
    if run.status == "failed":
        failed = next((s.name for s in run.steps if s.status == "failed"), "a step")
        out["status"] = "failed"
        out["error"] = {
            "code": "run_failed",
            "message": f"training finished, but run {run.id} failed in {failed}: "
                       f"{run.error or 'see its log'}; `evertune runs retry {run.id}` "
                       "resumes it without training again",
            "param": None,
        }
    else:
        out["status"] = "running"  # evaluating and registering; see the job's events
        out["finished_at"] = None
    return out


def _result_files(ws: Workspace, mv: ModelVersion) -> list[str]:
    """The version's evaluation report as a downloadable file id (none without a report)."""
    if not mv.eval_report:
        return []
    report = ws.evals_dir / mv.eval_report / "report.json"
    if not report.is_file():
        return []
    return [file_store.result_file(ws, report, f"{mv.eval_report}.json").id]


def _page(items: Sequence[Any], after: str | None, limit: int, what: str) -> tuple[list[Any], bool]:
    """Items after the one with id `after` (cursor pagination, as OpenAI pages lists)."""
    start = 0
    if after:
        ids = [i.id for i in items]
        if after not in ids:
            raise ApiError(400, f"after={after!r} is not a {what} id of this list",
                           param="after", code="invalid_cursor")
        start = ids.index(after) + 1
    page = list(items[start : start + limit])
    return page, start + limit < len(items)


def _list(data: list[dict[str, Any]], more: bool) -> ListPage:
    return ListPage(data=data, has_more=more, first_id=data[0]["id"] if data else None,
                    last_id=data[-1]["id"] if data else None)
