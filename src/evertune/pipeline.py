"""The durable tuning pipeline: one DBOS workflow per new data object, crash-safe end to end.

    from evertune import pipeline
    pipeline.launch(ws)            # once per process; `evertune up` does it in its lifespan
    run_id = pipeline.start_run(ws, {"source": "bucket", "bucket": ws.bucket_url,
                                     "key": "raw-data/tickets.jsonl", "version": "<etag|sha256>"})
    run = pipeline.wait_run(ws, run_id, timeout=600)
    run.status, run.version, [(s.name, s.status, s.duration_s) for s in run.steps]
    pipeline.list_runs(ws)         # newest first, with their steps
    pipeline.retry_run(ws, run_id) # a failed run again, reusing the steps that succeeded
    pipeline.shutdown()

Workflow `tuning_pipeline(trigger)`, workflow id = run id, so one trigger never starts two runs
(`run_id_for`: "run-" + sha256 of bucket, key and object version; an API trigger brings its own
run id). Steps, each a DBOS step calling the same functions as the CLI (`evertune.steps`):

    DataPreprocessing  download the object, validate / dedup / split it into a dataset version
                       (content-addressed), pick the round's method(s) and training set(s)
                       (`steps.plan_round`: train.stages, else train.method, where auto is the
                       method of the drop's kind; an API run's named dataset, else per
                       data.mode, this drop or the cumulative data of each stage's kind); a
                       stage whose kind has no data fails the run here, before any training
    FineTuning         create the job keyed by run id (`create_job(run_id=…)` returns the one a
                       crashed attempt made), start it, or resume it from its last checkpoint if
                       its process died, or wait for it if it still runs; poll until it ends.
                       A chain (train.stages) runs one job per stage, keyed `<run id>/<n>-<method>`
                       and continuing from the previous stage's job (`steps.run_stages`): after
                       a crash the succeeded stages are found, not retrained; outputs list the
                       stages and `job` is the last stage's, which the next steps use
    ModelEvaluation    candidate vs PROD (if any) vs base + the quality gate → report id
    RegisterModel      one MLflow version per job (idempotent per job id), PendingManualApproval
                       or Rejected by the gate; then the webhook (`notify.webhook_url`)

A bucket run whose training set is unchanged (the dataset version the latest registered
version was trained on, same method and base) ends after DataPreprocessing as `skipped`, with
the reason (`Run.skip_reason`): a drop that adds no new record does not train a copy.

Retry (`retry_run`, `evertune runs retry RUN`, `POST /api/runs/{id}/retry`): a failed run is
run again as a new workflow `<run id>-retry<N>` whose trigger names the failed run
(`retry_of`). Each step first looks at the failed run's record of itself: a step that
succeeded there is not run again, its recorded outputs are reused (training's job id
included, so 127 s of training is not lost to an evaluation that hit a read-only MLflow DB);
the failed step and those after it run. A new workflow rather than DBOS's fork: our step
records are the outputs to reuse, they survive DBOS's own garbage collection, and the CLI can
enqueue it with a DBOS client while `evertune up` (another process) runs it.

Every step's status, start/end, outputs (small JSON) and log lines are rows in the state DB
(`pipeline_runs`, `pipeline_steps`), written before the workflow is even dequeued, so a run is
visible while it waits. One run per model name at a time: the DBOS queue `evertune-pipeline` is
partitioned by model name with concurrency 1; later drops queue up and start in the order they
were queued (to the second on SQLite, where DBOS stamps queue entries in whole seconds: two
drops within one second may start in either order; Postgres keeps milliseconds).

Crash safety: DBOS records each finished step. After `kill -9`, the next `launch()` resumes the
workflow: finished steps are not re-run, the interrupted one runs again, which is why every step
is idempotent (datasets are content-addressed, jobs keyed by run id, versions by job id). A clean
shutdown (`shutdown()`) interrupts a waiting step without recording it, so it too resumes on the
next launch. The DBOS application version is pinned (`APP_VERSION`): runs left by an older
Evertune with the same step sequence still resume after an upgrade; bump it when the steps change.

Test hook (for tests/e2e/test_crash_recovery.py; never set it in production):
`EVERTUNE_TEST_PAUSE_IN_STEP=STEP` makes STEP sleep once its work has started (FineTuning: once
the training process runs), `STEP:after` once its work is done but before the step is recorded
as finished; `EVERTUNE_TEST_PAUSE_S` (default 600) bounds the sleep. A test kills the process
during the pause and checks the restart resumes the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from dbos import DBOS, SetEnqueueOptions, SetWorkflowID
from pydantic import BaseModel, computed_field
from sqlalchemy import (
    insert,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from evertune import db
from evertune.db import pipeline_runs, pipeline_steps
from evertune.errors import DataError, EvertuneError, NotFoundError

if TYPE_CHECKING:
    from evertune.workspace import Workspace

log = logging.getLogger("evertune.pipeline")
T = TypeVar("T")

STEPS = ("DataPreprocessing", "FineTuning", "ModelEvaluation", "RegisterModel")
RunStatus = Literal["queued", "running", "succeeded", "failed", "skipped"]
StepStatus = Literal["pending", "running", "succeeded", "failed", "skipped"]
FINAL = frozenset({"succeeded", "failed", "skipped"})
RETRY_SUFFIX = re.compile(r"-retry(\d+)$")  # run-…-retry2: the second retry of run-…

QUEUE = "evertune-pipeline"
QUEUE_POLL_S = 0.25  # how often DBOS looks for a queued run to start (latency vs idle DB reads)
JOB_POLL_S = 0.2  # how often FineTuning reads the job's status (cheap SQLite read)
APP_VERSION = "evertune-pipeline-1"  # DBOS resumes only runs of the same version; see docstring
WORKFLOW_NAME = "tuning_pipeline"
MAX_LOG_LINES = 200  # per step; older lines are dropped (the job keeps its own full event log)
PROGRESS_EVERY_S = 5.0  # training / evaluation progress lines at most this often
PAUSE_ENV = "EVERTUNE_TEST_PAUSE_IN_STEP"
PAUSE_SECONDS_ENV = "EVERTUNE_TEST_PAUSE_S"


class PipelineError(EvertuneError):
    """A pipeline run or step failed, or the runtime is used wrongly (message says how to fix)."""


class _Interrupted(BaseException):
    """Raised inside a step on shutdown. A BaseException on purpose: DBOS records `Exception`s
    as step results, and an interrupted step must stay unrecorded so the next launch re-runs it."""


# -- state-DB tables ---------------------------------------------------------------------------

# -- public read models ------------------------------------------------------------------------


class StepRecord(BaseModel):
    """One step of a run as recorded: status, timings, outputs and log lines."""

    name: str
    status: StepStatus
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    outputs: dict[str, Any] = {}
    logs: list[dict[str, Any]] = []
    error: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def duration_s(self) -> float | None:
        """Seconds from the first start to the end (a running step: to now)."""
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at


class Run(BaseModel):
    """One pipeline run: its trigger, status, registered version and steps in order."""

    id: str
    model: str
    trigger: dict[str, Any]
    status: RunStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    version: int | None = None
    steps: list[StepRecord] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def step(self, name: str) -> StepRecord:
        """The step called `name` (one of STEPS)."""
        for s in self.steps:
            if s.name == name:
                return s
        raise NotFoundError(f"run {self.id} has no step {name!r}; steps: {', '.join(STEPS)}")

    @property
    def current_step(self) -> str | None:
        """The step running now, else the one that failed, else None."""
        for status in ("running", "failed"):
            for s in self.steps:
                if s.status == status:
                    return s.name
        return None

    @property
    def job_id(self) -> str | None:
        return next((s.outputs.get("job") for s in self.steps if s.outputs.get("job")), None)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def skip_reason(self) -> str | None:
        """Why a skipped run did not train (DataPreprocessing's `skipped` output)."""
        if self.status != "skipped":
            return None
        return next((str(s.outputs["skipped"]) for s in self.steps if s.outputs.get("skipped")),
                    "skipped")

    @property
    def retry_of(self) -> str | None:
        """The failed run this run retries, if it is a retry."""
        value = self.trigger.get("retry_of")
        return str(value) if value else None


def _row_to_run(row: Any, steps: list[StepRecord]) -> Run:
    m = row._mapping
    return Run(
        id=m["id"],
        model=m["model"],
        trigger=m["trigger"] or {},
        status=m["status"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        error=m["error"],
        version=m["version"],
        steps=steps,
    )


def _steps_of(conn: Any, run_ids: list[str]) -> dict[str, list[StepRecord]]:
    t = pipeline_steps
    out: dict[str, list[StepRecord]] = {r: [] for r in run_ids}
    if not run_ids:
        return out
    for r in conn.execute(select(t).where(t.c.run_id.in_(run_ids)).order_by(t.c.position)):
        out[r.run_id].append(
            StepRecord(
                name=r.name,
                status=r.status,
                started_at=r.started_at,
                finished_at=r.finished_at,
                attempts=r.attempts or 0,
                outputs=r.outputs or {},
                logs=r.logs or [],
                error=r.error,
            )
        )
    return out


def list_runs(ws: Workspace, limit: int = 50) -> list[Run]:
    """The newest runs first (all models of the workspace), each with its steps."""
    t = pipeline_runs
    with ws.engine.connect() as conn:
        rows = conn.execute(select(t).order_by(t.c.created_at.desc()).limit(limit)).all()
        steps = _steps_of(conn, [r.id for r in rows])
    return [_row_to_run(r, steps[r.id]) for r in rows]


def find_run(ws: Workspace, run_id: str) -> Run | None:
    """The run with this id, or None."""
    t = pipeline_runs
    with ws.engine.connect() as conn:
        row = conn.execute(select(t).where(t.c.id == run_id)).first()
        if row is None:
            return None
        steps = _steps_of(conn, [run_id])
    return _row_to_run(row, steps[run_id])


def get_run(ws: Workspace, run_id: str) -> Run:
    """The run with this id; NotFoundError lists recent run ids."""
    run = find_run(ws, run_id)
    if run is None:
        recent = [r.id for r in list_runs(ws, limit=5)]
        hint = f"recent runs: {', '.join(recent)}" if recent else "there are no runs yet"
        raise NotFoundError(f"no pipeline run {run_id!r}; {hint} (see `evertune runs list`)")
    return run


def wait_run(ws: Workspace, run_id: str, timeout: float = 600.0, poll: float = 0.2) -> Run:
    """Poll until the run succeeded or failed; PipelineError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        run = get_run(ws, run_id)
        if run.finished:
            return run
        if time.monotonic() > deadline:
            where = f" at {run.current_step}" if run.current_step else ""
            raise PipelineError(
                f"run {run_id} is still {run.status}{where} after {timeout:g} s; it keeps going "
                f"(check it with `evertune runs show {run_id}`)"
            )
        time.sleep(poll)


def retry_id(run_id: str) -> str:
    """The id of the retry of `run_id`: run-x → run-x-retry1, run-x-retry1 → run-x-retry2."""
    m = RETRY_SUFFIX.search(run_id)
    if m is None:
        return f"{run_id}-retry1"
    return f"{run_id[: m.start()]}-retry{int(m.group(1)) + 1}"


def retry_run(ws: Workspace, run_id: str, *, actor: str | None = None) -> str:
    """Run a failed run again from its failed step; the steps that succeeded are reused.

        new_id = pipeline.retry_run(ws, "run-3f2a…")   # → "run-3f2a…-retry1", queued

    The retry is a new run (`retry_id(run_id)`) with the same trigger plus `retry_of`. With the
    runtime in this process it is enqueued here; otherwise (the CLI beside `evertune up`) a
    DBOS client enqueues it for the process that runs the pipeline. Retrying the same run
    twice returns the retry already made. PipelineError when the run has not failed.
    """
    run = get_run(ws, run_id)
    new_id = retry_id(run.id)
    if run.status != "failed":
        what = {"succeeded": "it succeeded", "skipped": f"it was skipped ({run.skip_reason})"}
        raise PipelineError(
            f"run {run.id} is {run.status}; only a failed run can be retried"
            + (f" ({what[run.status]})" if run.status in what else
               " (wait for it: `evertune runs wait " + run.id + "`)")
        )
    existing = find_run(ws, new_id)
    if existing is not None:
        if existing.status == "queued":
            _enqueue(ws, new_id, existing.trigger)  # idempotent; a crash may have stopped it
        return new_id
    if len(new_id) > 64:  # the id column's width; a run retried this often has a real problem
        raise PipelineError(f"run {run.id} has been retried too often; start a new run instead")
    trigger = {k: v for k, v in run.trigger.items() if k not in ("run_id", "actor")}
    trigger.update(run_id=new_id, retry_of=run.id)
    if actor:
        trigger["actor"] = actor
    try:
        _insert_run(ws, new_id, run.model, trigger, "queued", started_at=None)
    except IntegrityError:  # another caller retried it a moment ago; that one enqueues
        return new_id
    _enqueue(ws, new_id, trigger)
    log.info("run %s queued to retry %s", new_id, run.id)
    return new_id


def _enqueue(ws: Workspace, run_id: str, trigger: dict[str, Any]) -> None:
    """Enqueue the run's workflow: here when the runtime runs in this process, else through a
    DBOS client on the system DB, for the `evertune up` process that runs the pipeline."""
    model = ws.config.model.name
    if _runtime is not None:
        def enqueue() -> None:
            with SetWorkflowID(run_id), SetEnqueueOptions(queue_partition_key=model):
                DBOS.enqueue_workflow(QUEUE, tuning_pipeline, trigger)

        _off_loop(enqueue)
        return
    from dbos import DBOSClient, EnqueueOptions

    options: EnqueueOptions = {
        "queue_name": QUEUE,
        "workflow_name": WORKFLOW_NAME,
        "workflow_id": run_id,
        "app_version": APP_VERSION,
        "queue_partition_key": model,
    }
    try:
        client = DBOSClient(system_database_url=system_database_url(ws),
                            application_name="evertune")
        try:
            client.enqueue(options, trigger)
        finally:
            client.destroy()
    except Exception as exc:
        # No pipeline has run in this workspace yet (a DBOS client does not create DBOS's
        # tables), or its DB is unreachable now: the run stays queued in our table and the
        # next `launch()` enqueues it (`_enqueue_queued`).
        log.info("run %s stays queued until the pipeline starts: %s", run_id, exc)


def _enqueue_queued(ws: Workspace) -> None:
    """Enqueue this model's runs recorded as queued (at launch): a retry queued while no
    pipeline ran, or a run whose enqueue a crash cut off. DBOS ignores ids it already has."""
    t = pipeline_runs
    with ws.engine.connect() as conn:
        rows = conn.execute(
            select(t.c.id, t.c.trigger)
            .where(t.c.status == "queued", t.c.model == ws.config.model.name)
            .order_by(t.c.created_at)
        ).all()
    for row in rows:
        try:
            _enqueue(ws, row.id, row.trigger or {})
        except Exception:  # one bad row must not stop the pipeline from starting
            log.exception("could not enqueue queued run %s", row.id)


def run_id_for_key(ws: Workspace, key: str) -> str:
    """The run id the watcher gives the object now at `key` in the workspace's bucket.

        pipeline.run_id_for_key(ws, "raw-data/tickets.jsonl")   # → "run-…" (maybe not yet started)

    The id is derived from the bucket, the key and the object's current version, so this
    names the run of *this* drop, not an older run of the same key. NotFoundError when no
    object is at `key`.
    """
    from evertune.bucket import Bucket

    bucket = Bucket.for_workspace(ws)
    info = bucket.info(key)
    return run_id_for({"bucket": bucket.url, "key": key, "version": info.version})


# -- runtime -----------------------------------------------------------------------------------


@dataclass
class _Runtime:
    ws: Workspace
    stop: threading.Event = field(default_factory=threading.Event)
    # Workspaces with per-run `--set` overrides (API runs), opened once each.
    variants: dict[tuple[str, ...], Workspace] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Steps executing now; shutdown waits (briefly) for interrupted ones to unwind.
    active: int = 0
    idle: threading.Condition = field(default_factory=threading.Condition)


_runtime: _Runtime | None = None
SHUTDOWN_WAIT_S = 5.0  # longest wait for running steps to stop before DBOS is torn down
_launch_lock = threading.Lock()


def system_database_url(ws: Workspace) -> str:
    """DBOS's system DB: SQLite `.evertune/dbos.db`, or the state DB itself when it is Postgres."""
    state = ws.state_db_url
    if state.startswith(("postgresql", "postgres")):
        return state
    return f"sqlite:///{ws.state_dir / 'dbos.db'}"


def launch(ws: Workspace, *, warm: bool = True, executor_id: str | None = None) -> None:
    """Start the DBOS runtime for `ws` in this process (resumes interrupted runs at once).

    Idempotent for the same workspace. DBOS is one per process: to switch workspaces (tests)
    call `shutdown()` first. `executor_id`: this process's id among several replicas sharing a
    Postgres state DB (evertune.replicas); DBOS's default "local" otherwise. `warm=True`
    imports the heavy libraries and opens the MLflow store in a background thread, so the
    first run does not pay for them inside its steps.
    """
    global _runtime
    with _launch_lock:
        if _runtime is not None:
            if _runtime.ws.root == ws.root:
                return
            raise PipelineError(
                f"the pipeline runtime already runs for workspace {_runtime.ws.root}; DBOS is one "
                f"per process: call pipeline.shutdown() before launching it for {ws.root}"
            )
        ws.engine  # noqa: B018 (opening it migrates the tables before a recovered workflow writes)
        ws.state_dir.mkdir(parents=True, exist_ok=True)
        if system_database_url(ws).startswith("sqlite"):
            # DBOS's system DB holds every run's trigger and step outputs: not for other users.
            db.create_private(ws.state_dir / "dbos.db", "the pipeline's system database")
        DBOS(
            config={
                "name": "evertune",
                "system_database_url": system_database_url(ws),
                "application_version": APP_VERSION,
                "log_level": os.environ.get("EVERTUNE_DBOS_LOG_LEVEL", "WARNING"),
                **({"executor_id": executor_id} if executor_id else {}),
            }
        )
        # Set before launch: DBOS starts recovered workflows during launch(), and they need it.
        _runtime = _Runtime(ws=ws)

        def start() -> None:
            DBOS.launch()
            # Partitioned by model name: runs of one model go one at a time, models in parallel.
            DBOS.register_queue(
                QUEUE,
                partition_concurrency=1,
                polling_interval_sec=QUEUE_POLL_S,
                on_conflict="always_update",
            )

        try:
            _off_loop(start)
        except BaseException:
            _runtime = None
            DBOS.destroy()
            raise
        _enqueue_queued(ws)
    if warm:
        threading.Thread(target=_warm_up, args=(ws,), name="evertune-warm-up", daemon=True).start()


def shutdown() -> None:
    """Stop the runtime: waiting steps are interrupted unrecorded and resume on the next launch."""
    global _runtime
    with _launch_lock:
        if _runtime is None:
            return
        rt = _runtime
        rt.stop.set()
        # Waiting steps notice within JOB_POLL_S and leave unrecorded; a step busy in a long
        # call (preprocessing, an MLflow write) may outlast the wait: DBOS then cannot record
        # it either, and the next launch runs it again (every step is idempotent).
        with rt.idle:
            rt.idle.wait_for(lambda: rt.active == 0, timeout=SHUTDOWN_WAIT_S)
        DBOS.destroy()
        _runtime = None


def _off_loop(fn: Callable[[], T]) -> T:
    """Call `fn` here, or in a helper thread when this thread runs an asyncio loop (FastAPI's
    lifespan, an async route): DBOS's blocking calls refuse to run on an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="evertune-dbos-call")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def recover_executors(executor_ids: list[str]) -> None:
    """Re-enqueue the pending runs of dead replicas' DBOS executors, to run here or on any
    live replica (evertune.replicas); DBOS admits one runner per workflow."""
    _off_loop(lambda: DBOS._recover_pending_workflows(executor_ids))


def launched() -> bool:
    """Whether the runtime runs in this process."""
    return _runtime is not None


def _warm_up(ws: Workspace) -> None:
    """Import transformers/torch and open the MLflow store now rather than inside a step."""
    try:
        from evertune import steps
        from evertune.registry import Registry

        reg = Registry(ws)
        reg.experiment_id  # noqa: B018 - creates the MLflow schema (~3 s on a new workspace)
        reg.list_versions()
        steps.base_tokenizer(ws)  # imports transformers, resolves the base model
        import evertune.evaluation  # noqa: F401
    except Exception as exc:  # warming is an optimisation; the steps report real problems
        log.debug("warm-up skipped: %s", exc)


def run_id_for(trigger: dict[str, Any]) -> str:
    """The run id of a trigger: its own `run_id`, or derived from bucket + key + version."""
    if trigger.get("run_id"):
        return str(trigger["run_id"])
    missing = [k for k in ("bucket", "key", "version") if not trigger.get(k)]
    if missing:
        raise PipelineError(
            f"trigger {trigger!r} lacks {', '.join(missing)}; a bucket trigger needs "
            "{'source': 'bucket', 'bucket': URL, 'key': KEY, 'version': ETAG_OR_SHA256}"
        )
    ident = "\n".join(str(trigger[k]) for k in ("bucket", "key", "version"))
    return "run-" + hashlib.sha256(ident.encode("utf-8")).hexdigest()[:20]


def _check_trigger(trigger: dict[str, Any]) -> None:
    source = trigger.get("source")
    if source == "bucket":
        run_id_for(trigger)
    elif source == "api":
        if not trigger.get("run_id") or not (trigger.get("file") or trigger.get("dataset")):
            raise PipelineError(
                f"api trigger {trigger!r} needs run_id and file or dataset: "
                "{'source': 'api', 'run_id': 'run-…', 'file': PATH, 'dataset': 'ds-…'}"
            )
    else:
        raise PipelineError(f"trigger source {source!r} is unknown; use 'bucket' or 'api'")


def start_run(ws: Workspace, trigger: dict[str, Any]) -> str:
    """Record the run (status queued) and enqueue its workflow; the same trigger twice → one run.

    Needs the runtime (`launch(ws)`) in this process.
    """
    _check_trigger(trigger)
    if _runtime is None:
        raise PipelineError(
            "the pipeline runtime is not running in this process; start `evertune up` (or call "
            "pipeline.launch(ws) first)"
        )
    run_id = run_id_for(trigger)
    model = ws.config.model.name
    with ws.engine.connect() as conn:
        row = conn.execute(
            select(pipeline_runs.c.status).where(pipeline_runs.c.id == run_id)
        ).first()
    if row is None:
        try:
            _insert_run(ws, run_id, model, trigger, "queued", started_at=None)
        except IntegrityError:  # another thread recorded it a moment ago: that one enqueues
            return run_id
    if row is not None and row.status != "queued":
        return run_id  # started or finished already; DBOS owns it now

    # A queued row is enqueued again on purpose: a crash between the insert above and this
    # enqueue must not strand it, and DBOS returns the existing workflow for a known id.
    def enqueue() -> None:
        with SetWorkflowID(run_id), SetEnqueueOptions(queue_partition_key=model):
            DBOS.enqueue_workflow(QUEUE, tuning_pipeline, trigger)

    _off_loop(enqueue)
    log.info("run %s queued for %s (%s)", run_id, model, trigger.get("key") or trigger.get("file"))
    return run_id


def _insert_run(
    ws: Workspace,
    run_id: str,
    model: str,
    trigger: dict[str, Any],
    status: RunStatus,
    started_at: float | None,
) -> None:
    """The run's row and its four pending step rows, in one transaction."""
    with ws.engine.begin() as conn:
        conn.execute(
            insert(pipeline_runs).values(
                id=run_id,
                model=model,
                trigger=trigger,
                status=status,
                created_at=time.time(),
                started_at=started_at,
            )
        )
        for i, name in enumerate(STEPS):
            conn.execute(
                insert(pipeline_steps).values(
                    run_id=run_id,
                    name=name,
                    position=i,
                    status="pending",
                    attempts=0,
                    outputs={},
                    logs=[],
                )
            )


def run_status(ws: Workspace, run_id: str) -> str | None:
    """Just the status of a run (None if unknown): a cheap read for the watcher."""
    with ws.engine.connect() as conn:
        return conn.execute(
            select(pipeline_runs.c.status).where(pipeline_runs.c.id == run_id)
        ).scalar()


def _run_ws(trigger: dict[str, Any]) -> Workspace:
    """The workspace a run works in: the runtime's, plus the trigger's `--set` overrides."""
    rt = _runtime
    if rt is None:
        raise _Interrupted()  # shut down under us; the step re-runs on the next launch
    overrides = tuple(trigger.get("overrides") or ())
    if not overrides:
        return rt.ws
    with rt.lock:
        ws = rt.variants.get(overrides)
        if ws is None:
            from evertune.workspace import Workspace

            ws = Workspace.open(rt.ws.root, [*rt.ws.overrides, *overrides])
            rt.variants[overrides] = ws
    return ws


# -- step recording ----------------------------------------------------------------------------


class _StepContext:
    """What a step body uses to log lines and set outputs; persisted as it goes."""

    def __init__(self, ws: Workspace, run_id: str, name: str) -> None:
        self.ws = ws
        self.run_id = run_id
        self.name = name
        self.outputs: dict[str, Any] = {}
        self._last_progress = 0.0

    def log(self, message: str, level: str = "info") -> None:
        level_no = logging.INFO if level == "info" else logging.WARNING
        log.log(level_no, "%s %s: %s", self.run_id, self.name, message)
        _append_log(self.ws, self.run_id, self.name, message, level)

    def progress(self, message: str) -> None:
        """A progress line, written at most every PROGRESS_EVERY_S seconds."""
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            self.log(message)

    def save_outputs(self) -> None:
        """Persist the outputs so far (the job id is visible while training runs)."""
        with self.ws.engine.begin() as conn:
            conn.execute(
                update(pipeline_steps)
                .where(pipeline_steps.c.run_id == self.run_id, pipeline_steps.c.name == self.name)
                .values(outputs=self.outputs)
            )


def _append_log(ws: Workspace, run_id: str, name: str, message: str, level: str = "info") -> None:
    t = pipeline_steps
    where = (t.c.run_id == run_id, t.c.name == name)
    with ws.engine.begin() as conn:
        logs = conn.execute(select(t.c.logs).where(*where)).scalar() or []
        logs = [*logs, {"t": time.time(), "level": level, "message": message}][-MAX_LOG_LINES:]
        conn.execute(update(t).where(*where).values(logs=logs))


@contextlib.contextmanager
def _recorded(ws: Workspace, run_id: str, name: str) -> Iterator[_StepContext]:
    """Mark the step running, yield its context, then record success or failure.

    A failure becomes PipelineError("<step>: <message>") — picklable, so DBOS records it and
    the run fails; an _Interrupted shutdown is left unrecorded (the step re-runs on launch).
    """
    t = pipeline_steps
    where = (t.c.run_id == run_id, t.c.name == name)
    now = time.time()
    with ws.engine.begin() as conn:
        row = conn.execute(select(t.c.attempts, t.c.started_at).where(*where)).first()
        attempts = (row.attempts if row else 0) + 1
        conn.execute(
            update(t)
            .where(*where)
            .values(
                status="running",
                attempts=attempts,
                started_at=row.started_at if row and row.started_at else now,
                finished_at=None,
                error=None,
            )
        )
    ctx = _StepContext(ws, run_id, name)
    ctx.log("started" if attempts == 1 else f"started again after a restart (attempt {attempts})")
    rt = _runtime
    if rt is not None:
        with rt.idle:
            rt.active += 1
    try:
        yield ctx
    except _Interrupted:
        ctx.log("interrupted by shutdown; it resumes when the pipeline starts again", "warn")
        raise
    except Exception as exc:
        message = str(exc) if isinstance(exc, EvertuneError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, EvertuneError):
            log.exception("%s %s failed unexpectedly", run_id, name)
        ctx.log(message, "error")
        with ws.engine.begin() as conn:
            conn.execute(
                update(t)
                .where(*where)
                .values(
                    status="failed", finished_at=time.time(), error=message, outputs=ctx.outputs
                )
            )
        raise PipelineError(f"{name}: {message}") from None
    finally:
        if rt is not None:
            with rt.idle:
                rt.active -= 1
                rt.idle.notify_all()
    with ws.engine.begin() as conn:
        conn.execute(
            update(t)
            .where(*where)
            .values(status="succeeded", finished_at=time.time(), outputs=ctx.outputs)
        )
    ctx.log("succeeded")


def _reused(
    ws: Workspace, run_id: str, trigger: dict[str, Any], name: str
) -> dict[str, Any] | None:
    """A retry's step that succeeded in the failed run: record it as reused, return its outputs.

    None when this run is not a retry or the step did not succeed there (then it runs).
    """
    prev = trigger.get("retry_of")
    if not prev:
        return None
    t = pipeline_steps
    with ws.engine.connect() as conn:
        row = conn.execute(
            select(t.c.status, t.c.outputs, t.c.started_at, t.c.finished_at)
            .where(t.c.run_id == str(prev), t.c.name == name)
        ).first()
    if row is None or row.status != "succeeded":
        return None
    outputs = dict(row.outputs or {})
    # The run that did the work, kept through a chain of retries.
    outputs.setdefault("reused_from", str(prev))
    took = (row.finished_at or 0) - (row.started_at or 0)
    message = (f"reused from run {outputs['reused_from']}, where it succeeded in {took:.1f} s; "
               "not run again")
    now = time.time()
    with ws.engine.begin() as conn:
        conn.execute(
            update(t)
            .where(t.c.run_id == run_id, t.c.name == name)
            .values(status="succeeded", started_at=now, finished_at=now, outputs=outputs,
                    error=None)
        )
    _append_log(ws, run_id, name, message)
    log.info("%s %s: %s", run_id, name, message)
    return outputs


def _test_pause(ctx: _StepContext, point: Literal["work", "after"]) -> None:
    """The crash-test hook (see the module docstring): sleep here if the env var says so."""
    wanted = os.environ.get(PAUSE_ENV, "")
    step, _, where = wanted.partition(":")
    if step != ctx.name or (where or "work") != point:
        return
    seconds = float(os.environ.get(PAUSE_SECONDS_ENV) or 600)
    ctx.log(f"test hook {PAUSE_ENV}={wanted}: pausing {seconds:g} s")
    rt = _runtime
    if rt is not None and rt.stop.wait(seconds):
        raise _Interrupted()


def _stopping() -> bool:
    rt = _runtime
    return rt is None or rt.stop.is_set()


# -- steps -------------------------------------------------------------------------------------


@DBOS.step(name="DataPreprocessing")
def data_preprocessing(run_id: str, trigger: dict[str, Any]) -> dict[str, Any]:
    """Fetch the trigger's file, store it as a dataset version, pick the training dataset."""
    from evertune import steps

    ws = _run_ws(trigger)
    if (reused := _reused(ws, run_id, trigger, "DataPreprocessing")) is not None:
        return reused
    with _recorded(ws, run_id, "DataPreprocessing") as ctx:
        _test_pause(ctx, "work")
        if trigger.get("source") == "bucket":
            path, label = _fetch_object(ws, run_id, trigger, ctx)
        elif trigger.get("file"):
            path = Path(trigger["file"])
            label = path.name
            if not path.is_file():
                raise DataError(
                    f"uploaded file {path} of run {run_id} is gone; upload it again "
                    "(POST /v1/files)"
                )
        else:
            path, label = None, str(trigger.get("dataset"))
        drop: list[Any] = []
        if path is not None:
            try:
                added = steps.preprocess(ws, [path])
            except DataError as exc:
                # Name the object, not the run folder's copy of it.
                message = str(exc).replace(str(path), label)
                raise DataError(message if label in message else f"{label}: {message}") from None
            drop = list(added.versions)
            ctx.outputs.update(
                file=label,
                versions=[v.id for v in added.versions],
                rejected=added.rejected,
                rejected_path=str(added.rejected_path) if added.rejected_path else None,
                duplicates_dropped=added.report.get("duplicates_dropped", 0),
            )
            stored = ", ".join(
                f"{v.id} ({v.kind}, {v.counts.get('total', 0)} records)" for v in added.versions
            )
            ctx.log(
                f"{label}: stored {stored}; {added.rejected} row(s) rejected"
                + (f" (see {added.rejected_path})" if added.rejected_path else "")
            )
        # The round's method(s) and the dataset of each: an API run's named dataset, else per
        # data.mode (this drop, or the cumulative data of each stage's kind with the bucket's
        # feedback folded in). A stage whose kind has no data fails here, before any training.
        plan = steps.plan_round(ws, method=trigger.get("method"), drop=drop,
                                dataset_ref=trigger.get("dataset"), log=ctx.log)
        training = plan[-1].dataset
        ctx.outputs.update(method=plan[-1].method, training_dataset=training.id,
                           counts=dict(training.counts))
        if len(plan) > 1:
            ctx.outputs["stages"] = [s.to_json(n) for n, s in enumerate(plan, 1)]
        # A drop with nothing new (bucket runs only: an API run names its dataset on purpose).
        bucket_run = trigger.get("source") == "bucket"
        skipped = (steps.unchanged_reason(ws, training, plan[-1].method, plan)
                   if bucket_run else None)
        if skipped:
            ctx.outputs["skipped"] = skipped
            ctx.log(skipped)
        else:
            ctx.log(f"training {' → '.join(s.method for s in plan)} on "
                    f"{', '.join(s.dataset.id for s in plan)} ({ws.config.data.mode}): "
                    f"{training.counts}")
        _test_pause(ctx, "after")
        return dict(ctx.outputs)


def _fetch_object(
    ws: Workspace, run_id: str, trigger: dict[str, Any], ctx: _StepContext
) -> tuple[Path, str]:
    """Download the object version the trigger names into the run's folder."""
    from evertune.bucket import Bucket, _sha256

    bucket = Bucket(trigger["bucket"])
    key, version = str(trigger["key"]), str(trigger["version"])
    label = key
    dest = ws.state_dir / "pipeline" / run_id / PurePosixPath(key).name
    if not bucket.is_local:
        current = bucket.info(key).version
        if current != version:
            raise DataError(_superseded(key, version, current))
    bucket.download(key, dest)
    if bucket.is_local:
        # The local version is the content hash: check the copy is the version detected.
        got = _sha256(dest)
        if got != version:
            raise DataError(_superseded(key, version, got))
    ctx.log(f"fetched {key} ({dest.stat().st_size} bytes) from {trigger['bucket']}")
    return dest, label


def _superseded(key: str, wanted: str, found: str) -> str:
    return (
        f"{key} changed since it was detected (version {wanted[:12]} is now {found[:12]}); the "
        "run started for the new version trains on it"
    )


@DBOS.step(name="FineTuning")
def fine_tuning(run_id: str, trigger: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Start (or find, resume, or keep waiting for) this run's training job(s) until they end:
    one job, or one per stage of a chain (`steps.run_stages`), each continuing from the last."""
    from evertune import steps
    from evertune.data.store import get_dataset

    ws = _run_ws(trigger)
    if (reused := _reused(ws, run_id, trigger, "FineTuning")) is not None:
        return reused
    with _recorded(ws, run_id, "FineTuning") as ctx:
        planned = data.get("stages") or [
            {"stage": 1, "method": data.get("method"), "dataset": data["training_dataset"]}
        ]
        plan = [
            steps.Stage(str(p["method"]) if p.get("method") else
                        steps.stage_method(ws, None, ds), ds)
            for p in planned
            for ds in [get_dataset(ws, str(p["dataset"]))]
        ]
        chain = len(plan) > 1
        ctx.outputs["method"] = plan[-1].method
        rows: list[dict[str, Any]] = [
            {**s.to_json(n), "job": None, "status": "pending"} for n, s in enumerate(plan, 1)
        ]

        def on_stage(number: int, stage: Any, job: Any, message: str) -> None:
            rows[number - 1].update(job=job.id, status=job.status)
            ctx.outputs["job"] = job.id  # the job training now: `runs wait` follows it
            if chain:
                ctx.outputs["stages"] = rows
            ctx.save_outputs()
            level = "warn" if "had died" in message else "info"
            ctx.log(message, level)

        def wait(job: Any) -> Any:
            _test_pause(ctx, "work")
            job = _follow(ws, job.id, ctx)
            row = next(r for r in rows if r["job"] == job.id)
            row["status"] = job.status
            if chain:
                ctx.outputs["stages"] = rows
            ctx.save_outputs()
            return job

        jobs_done = steps.run_stages(
            ws, plan, run_id=run_id, wait=wait, on_stage=on_stage,
            reuse_runs=_retried_runs(ws, trigger),
        )
        job = jobs_done[-1]
        ctx.outputs.update(
            job=job.id,
            adapter=(job.result or {}).get("path"),
            trained_tokens=sum(j.trained_tokens for j in jobs_done),
            job_started_at=job.started_at,
            job_finished_at=job.finished_at,
        )
        if chain:
            ctx.outputs["stages"] = rows
        _test_pause(ctx, "after")
        return dict(ctx.outputs)


def _retried_runs(ws: Workspace, trigger: dict[str, Any]) -> list[str]:
    """The runs this run retries, newest first (a retry of a retry: all of them)."""
    runs: list[str] = []
    prev = trigger.get("retry_of")
    while prev and str(prev) not in runs and len(runs) < 32:
        runs.append(str(prev))
        found = find_run(ws, str(prev))
        prev = found.trigger.get("retry_of") if found else None
    return runs


def _follow(ws: Workspace, job_id: str, ctx: _StepContext) -> Any:
    """Poll the job until it is final; log progress; stop (unrecorded) on shutdown."""
    from evertune.training import jobs

    t = db.job_metrics
    while True:
        try:
            job = jobs.check_alive(ws, job_id)
            if job.finished:
                return job
            with ws.engine.connect() as conn:
                row = conn.execute(
                    select(t.c.step, t.c["values"])
                    .where(t.c.job_id == job_id)
                    .order_by(t.c.id.desc())
                    .limit(1)
                ).first()
        except DBAPIError as exc:
            # The server dropped the connection under this poll (a restart): the job trains on
            # regardless; poll again (new connections wait for the server, db.RECONNECT_S).
            if not exc.connection_invalidated:
                raise
            log.warning("%s: lost the state DB connection while following %s; polling again",
                        ctx.run_id, job_id)
            row = None
        if row is not None:
            v = row[1] or {}
            loss = v.get("train_loss")
            ctx.progress(
                f"step {row.step}/{v.get('total_steps', '?')}"
                + (f", loss {loss:.4f}" if isinstance(loss, float) else "")
            )
        rt = _runtime
        if rt is None or rt.stop.wait(JOB_POLL_S):
            raise _Interrupted()


@DBOS.step(name="ModelEvaluation")
def model_evaluation(run_id: str, trigger: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the job's adapter against PROD (or base) and apply the gate."""
    from evertune import steps
    from evertune.training.jobs import get_job

    ws = _run_ws(trigger)
    if (reused := _reused(ws, run_id, trigger, "ModelEvaluation")) is not None:
        return reused
    with _recorded(ws, run_id, "ModelEvaluation") as ctx:
        _job_event(ws, tuned["job"], "Evaluating the fine-tuned model against PROD and the "
                   "base model")
        _test_pause(ctx, "work")

        def progress(label: str, done: int, total: int) -> None:
            if _stopping():
                raise _Interrupted()
            ctx.progress(f"{label}: {done}/{total}")

        report = steps.evaluate(ws, get_job(ws, tuned["job"]), progress=progress)
        candidate = {k: v for k, v in report.means.get("candidate", {}).items() if v is not None}
        ctx.outputs.update(
            report=report.id,
            verdict=report.verdict,
            reasons=list(report.reasons)[:10],
            reference=report.reference_role,
            candidate=candidate,
            eval_seconds=report.duration_s,
        )
        ctx.log(
            f"report {report.id}: gate {report.verdict}"
            + (f" ({'; '.join(report.reasons[:3])})" if report.reasons else "")
        )
        _test_pause(ctx, "after")
        return dict(ctx.outputs)


@DBOS.step(name="RegisterModel")
def register_model(
    run_id: str, trigger: dict[str, Any], tuned: dict[str, Any], evaluated: dict[str, Any]
) -> dict[str, Any]:
    """Register the job's adapter as a model version (the existing one on a re-run)."""
    from evertune import steps
    from evertune.evaluation.report import load_report
    from evertune.training.jobs import get_job

    ws = _run_ws(trigger)
    with _recorded(ws, run_id, "RegisterModel") as ctx:
        _job_event(ws, tuned["job"], "Registering the fine-tuned model")
        _test_pause(ctx, "work")
        report = load_report(ws.evals_dir / evaluated["report"] / "report.json")
        mv = steps.register(ws, get_job(ws, tuned["job"]), report)
        name = f"{mv.name}@v{mv.version}"
        if mv.gate == "fail":
            _job_event(ws, tuned["job"], f"Registered as {name}, rejected by the quality gate "
                       f"({'; '.join(mv.gate_reasons[:3])}): it can be called to inspect it, "
                       "but is never deployed without an admin's override", "warn")
        elif mv.gate == "inconclusive":
            _job_event(ws, tuned["job"], f"Registered as {name}, pending approval; the quality "
                       f"gate was inconclusive ({'; '.join(mv.gate_reasons[:3])}): a person "
                       "should review it", "warn")
        else:
            _job_event(ws, tuned["job"], f"Registered as {name}, pending approval")
        ctx.outputs.update(
            version=mv.version,
            approval_status=mv.approval_status,
            gate=mv.gate,
            gate_reasons=list(mv.gate_reasons)[:10],
            registered_at=mv.created_at,
        )
        ctx.log(f"registered {mv.name} v{mv.version}: {mv.approval_status} (gate {mv.gate})")
        _test_pause(ctx, "after")
        return dict(ctx.outputs)


def _job_event(ws: Workspace, job_id: str, message: str, level: str = "info") -> None:
    from evertune.training.jobs import record_event

    # The OpenAI job stays `running` until its version is registered (api/fine_tuning.py):
    # these events say what it is doing meanwhile.
    record_event(ws, job_id, message, level)  # type: ignore[arg-type]


@DBOS.step(name="RunStarted")
def _run_started(run_id: str, trigger: dict[str, Any]) -> None:
    ws = _run_ws(trigger)
    t = pipeline_runs
    with ws.engine.connect() as conn:
        row = conn.execute(select(t.c.started_at).where(t.c.id == run_id)).first()
    if row is None:  # enqueued without a row (a DBOS client in another process, a wiped table)
        _insert_run(ws, run_id, ws.config.model.name, trigger, "running", started_at=time.time())
        return
    values: dict[str, Any] = {"status": "running"}
    if row.started_at is None:
        values["started_at"] = time.time()
    with ws.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == run_id).values(**values))


@DBOS.step(name="RunFinished")
def _run_finished(
    run_id: str,
    trigger: dict[str, Any],
    registered: dict[str, Any] | None,
    error: str | None,
    skipped: str | None = None,
) -> None:
    """Record the run's outcome and send the webhook (at least once; see notify.py)."""
    from evertune import notify

    ws = _run_ws(trigger)
    status = "failed" if error else "skipped" if skipped else "succeeded"
    with ws.engine.begin() as conn:
        conn.execute(
            update(pipeline_runs)
            .where(pipeline_runs.c.id == run_id)
            .values(
                status=status,
                finished_at=time.time(),
                error=error,
                version=(registered or {}).get("version"),
            )
        )
        if skipped:
            # The steps after DataPreprocessing did not run, on purpose: say so, not "pending".
            conn.execute(
                update(pipeline_steps)
                .where(pipeline_steps.c.run_id == run_id, pipeline_steps.c.status == "pending")
                .values(status="skipped")
            )
    if skipped:
        return  # nothing was registered, nothing failed: no one needs paging
    base = {
        "run_id": run_id,
        "model": ws.config.model.name,
        "trigger": {k: v for k, v in trigger.items() if k in ("source", "bucket", "key", "file")},
    }
    if error:
        step, _, message = error.partition(": ")
        if step not in STEPS:  # not a step failure (a bug in the workflow itself)
            step, message = STEPS[0], error
        event = {"event": "run.failed", **base, "step": step, "error": message}
    else:
        step = "RegisterModel"
        event = {"event": "model.registered", **base, **(registered or {})}
    if ws.config.notify.webhook_url:
        ok = notify.send(ws, event)
        state = "sent" if ok else "not delivered (see the server log)"
        level = "info" if ok else "warn"
        _append_log(ws, run_id, step, f"webhook {state}: {event['event']}", level)


@DBOS.workflow(name=WORKFLOW_NAME)
def tuning_pipeline(trigger: dict[str, Any]) -> dict[str, Any]:
    """DataPreprocessing → FineTuning → ModelEvaluation → RegisterModel for one trigger."""
    run_id = DBOS.workflow_id
    assert run_id is not None, "tuning_pipeline runs only as a DBOS workflow"
    _run_started(run_id, trigger)
    try:
        data = data_preprocessing(run_id, trigger)
        if data.get("skipped"):
            _run_finished(run_id, trigger, None, None, str(data["skipped"]))
            return {"run_id": run_id, "status": "skipped", "reason": data["skipped"]}
        tuned = fine_tuning(run_id, trigger, data)
        evaluated = model_evaluation(run_id, trigger, tuned)
        registered = register_model(run_id, trigger, tuned, evaluated)
    except Exception as exc:
        # The run failed: record it and return normally. pipeline_runs is the authority on a
        # run's outcome; re-raising would only make DBOS log a traceback for every bad file.
        error = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
        _run_finished(run_id, trigger, None, error)
        return {"run_id": run_id, "status": "failed", "error": error}
    _run_finished(run_id, trigger, registered, None)
    return {"run_id": run_id, "status": "succeeded", **registered}


def dbos_status(run_id: str) -> str | None:
    """DBOS's own status of the run's workflow (ENQUEUED, PENDING, SUCCESS, ERROR, …)."""
    if _runtime is None:
        return None
    status = _off_loop(lambda: DBOS.get_workflow_status(run_id))
    return status.status if status else None
