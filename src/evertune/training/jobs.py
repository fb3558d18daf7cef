"""Fine-tuning jobs: the record, its lifecycle, and starting / waiting / cancelling / resuming.

    from evertune.training import create_job, start_job, wait_job, run_finetune
    job = run_finetune(ws, dataset)                      # create + start + wait, in one call
    job = create_job(ws, dataset, run_id="run-42")       # the same run_id returns the same job
    job = start_job(ws, job.id)                          # python -m evertune.training.run JOB_DIR
    job = wait_job(ws, job.id, on_progress=print)        # polls the state DB
    job = pause_job(ws, job.id)                          # checkpoint and pause after this step
    evertune jobs cancel ftjob-…  /  evertune jobs pause ftjob-…  /  evertune jobs resume ftjob-…

A job has the shape of the OpenAI fine-tuning API (`Job.to_openai()` gives the wire form) and
lives in the state DB (`jobs`, `job_events`, `job_metrics`, `job_checkpoints`), never in
process memory: the CLI, the control API and the training child each read and write the same
rows, and any of them may be restarted.

Lifecycle (anything else raises JobError naming the allowed moves):

    validating_files ──▶ queued ──▶ running ──▶ succeeded
          │                │          │  ╲──▶ failed ────╮
          │                │          │  ╲──▶ paused ────┤──▶ queued   (resume_job)
          ╰────────────────┴──────────┴───▶ cancelled ──╯
                                      paused ──▶ cancelled

The training child owns `running → succeeded | failed | cancelled | paused`; the caller owns
the rest. A pause is asked for (`pause_job`: a `pause_requested` marker file in the job's
folder, so no schema change) and honoured by the child's loop, which sees "paused" from
`stop_requested`, saves a checkpoint and ends its process; `resume_job` starts it again from
that checkpoint. A paused job has no process, and is not final.
A child that dies without saying so (kill -9, OOM killer, reboot) is noticed by `wait_job`,
`cancel_job`, `resume_job` and `check_alive`, which mark it `failed` with code
`process_died` and say how to resume it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, insert, select, update

from evertune import db
from evertune.config import Config
from evertune.errors import DataError, JobError, NotFoundError

if TYPE_CHECKING:
    from evertune.data.store import DatasetVersion
    from evertune.workspace import Workspace

JobStatus = Literal[
    "validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"
]
EventLevel = Literal["info", "warn", "error"]
ProgressFn = Callable[[dict[str, Any]], None]

# Every legal move. `running → queued` is deliberately absent: a running job is resumed only
# after it has been marked failed (dead process), cancelled or paused, so the reason stays on
# record. A paused job has no process: it is resumed (queued, or running for a backend that
# restarts it in place) or cancelled at once.
TRANSITIONS: dict[str, frozenset[str]] = {
    "validating_files": frozenset({"queued", "failed", "cancelled"}),
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "paused"}),
    "paused": frozenset({"queued", "running", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
}
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class Job(BaseModel):
    """One fine-tuning job, as stored; `to_openai()` renders the OpenAI API object."""

    model_config = ConfigDict(frozen=True)

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: float  # unix seconds
    started_at: float | None = None
    finished_at: float | None = None
    status: JobStatus
    model: str  # the base-model spec
    method: str  # supervised | pretrain | dpo | kto (training.recipes)
    training_file: str  # dataset version id
    hyperparameters: dict[str, Any]
    result: dict[str, Any] | None = None  # {"path": abs path, "kind": "lora" | "full"}
    error: dict[str, Any] | None = None  # {"code": …, "message": …}
    trained_tokens: int = 0
    parent: str | None = None  # registered model version this continues from
    run_id: str | None = None  # pipeline run that created it (idempotency key)
    pid: int | None = None
    host: str | None = None
    cancel_requested: bool = False
    config: dict[str, Any] = Field(default_factory=dict, repr=False)  # resolved config snapshot

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def to_openai(self) -> dict[str, Any]:
        """The job as the OpenAI fine-tuning API returns it (integer timestamps, method object).

        `method` is OpenAI's `{"type": "dpo", "dpo": {"hyperparameters": {n_epochs, batch_size,
        learning_rate_multiplier, beta}}}`, followed by the rest of the job's own record
        (learning rate, LoRA settings, …), which OpenAI clients ignore.
        """
        hp = self.hyperparameters
        own = {"n_epochs": hp.get("n_epochs"), "batch_size": hp.get("batch_size"),
               "learning_rate_multiplier": "auto"}
        if self.method in ("dpo", "kto"):
            own["beta"] = hp.get("beta")
        return {
            "id": self.id,
            "object": self.object,
            "created_at": int(self.created_at),
            "finished_at": int(self.finished_at) if self.finished_at else None,
            "model": self.model,
            "fine_tuned_model": self.result["path"] if self.result else None,
            "organization_id": "evertune",
            "result_files": [],
            "status": self.status,
            "validation_file": None,
            "training_file": self.training_file,
            "hyperparameters": {
                "n_epochs": hp.get("n_epochs"),
                "batch_size": hp.get("batch_size"),
                "learning_rate_multiplier": "auto",
            },
            "trained_tokens": self.trained_tokens if self.status == "succeeded" else None,
            "error": {**self.error, "param": None} if self.error else None,
            "seed": hp.get("seed"),
            "estimated_finish": None,
            "integrations": [],
            "method": {"type": self.method, self.method: {"hyperparameters": own | {
                k: v for k, v in hp.items() if k not in own}}},
            "metadata": {"parent": self.parent, "run_id": self.run_id}
            if self.parent or self.run_id
            else None,
        }


class JobEvent(BaseModel):
    """A timestamped, levelled message (OpenAI `fine_tuning.job.event`)."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: float
    level: EventLevel
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class JobCheckpoint(BaseModel):
    """A saved training state (OpenAI `fine_tuning.job.checkpoint`); `path` is its folder."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: float
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
    path: str


# -- helpers ----------------------------------------------------------------------------------


def hyperparameters_from(cfg: Config, method: str = "supervised") -> dict[str, Any]:
    """The flat hyperparameter record of a job (also logged as MLflow params by the registry),
    with the method's own settings (beta, loss type, block size) where it has any."""
    t = cfg.train
    own: dict[str, Any] = {}
    if method == "dpo":
        own = {"beta": t.dpo.beta, "loss_type": t.dpo.loss_type,
               "label_smoothing": t.dpo.label_smoothing, "rpo_alpha": t.dpo.rpo_alpha}
    elif method == "kto":
        own = {"beta": t.kto.beta, "desirable_weight": t.kto.desirable_weight,
               "undesirable_weight": t.kto.undesirable_weight}
    elif method == "pretrain":
        own = {"block_size": t.pretrain.block_size or cfg.data.max_seq_len,
               "packing": t.pretrain.packing}
    return own | {
        "n_epochs": t.n_epochs,
        "batch_size": t.batch_size,
        "learning_rate": t.learning_rate,
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "full_finetune": t.full_finetune,
        "lora_r": t.lora.r,
        "lora_alpha": t.lora.alpha,
        "lora_dropout": t.lora.dropout,
        "lora_target_modules": t.lora.target_modules,
        "max_seq_len": cfg.data.max_seq_len,
        "batching": t.batching,
        "seed": t.seed,
    }


def job_dir(ws: Workspace, job_id: str) -> Path:
    """The job's folder: job.json, train.log, checkpoints/, result/."""
    return ws.jobs_dir / job_id


def _row_to_job(row: Any) -> Job:
    m = row._mapping
    return Job(
        id=m["id"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        status=m["status"],
        model=m["model"],
        method=m["method"],
        training_file=m["dataset"],
        hyperparameters=m["hyperparameters"] or {},
        result=m["result"],
        error=m["error"],
        trained_tokens=m["trained_tokens"] or 0,
        parent=m["parent"],
        run_id=m["run_id"],
        pid=m["pid"],
        host=m["host"],
        cancel_requested=bool(m["cancel_requested"]),
        config=m["config"] or {},
    )


def _not_found(ws: Workspace, job_id: str) -> NotFoundError:
    recent = [j.id for j in list_jobs(ws, limit=5)]
    hint = f"recent jobs: {', '.join(recent)}" if recent else "there are no jobs yet"
    return NotFoundError(f"no fine-tuning job {job_id!r}; {hint} (see `evertune jobs list`)")


def get_job(ws: Workspace, job_id: str) -> Job:
    """The job with this id (NotFoundError lists recent ids)."""
    with ws.engine.connect() as conn:
        row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).first()
    if row is None:
        raise _not_found(ws, job_id)
    return _row_to_job(row)


def list_jobs(ws: Workspace, limit: int = 50) -> list[Job]:
    """The newest jobs first."""
    q = select(db.jobs).order_by(db.jobs.c.created_at.desc()).limit(limit)
    with ws.engine.connect() as conn:
        return [_row_to_job(r) for r in conn.execute(q)]


def list_events(ws: Workspace, job_id: str, after: int = 0) -> list[JobEvent]:
    """The job's events, oldest first (`after` = the numeric part of the last event id seen)."""
    t = db.job_events
    q = select(t).where(t.c.job_id == job_id, t.c.id > after).order_by(t.c.id)
    with ws.engine.connect() as conn:
        return [
            JobEvent(
                id=f"ftevent-{r.id}",
                created_at=r.created_at,
                level=r.level,
                message=r.message,
                type="metrics" if (r.data or {}).get("type") == "metrics" else "message",
                data=r.data,
            )
            for r in conn.execute(q)
        ]


def list_metrics(ws: Workspace, job_id: str) -> list[dict[str, Any]]:
    """Metric rows, oldest first: `{"step", "created_at", **values}` (train_loss, lr, …)."""
    t = db.job_metrics
    q = select(t).where(t.c.job_id == job_id).order_by(t.c.id)
    with ws.engine.connect() as conn:
        return [{**r.values, "step": r.step, "created_at": r.created_at} for r in conn.execute(q)]


def list_checkpoints(ws: Workspace, job_id: str) -> list[JobCheckpoint]:
    """Checkpoints still on disk, newest first (older ones are pruned per keep_checkpoints)."""
    t = db.job_checkpoints
    q = select(t).where(t.c.job_id == job_id).order_by(t.c.step.desc())
    with ws.engine.connect() as conn:
        return [
            JobCheckpoint(
                id=f"ftckpt-{r.id}",
                created_at=r.created_at,
                fine_tuning_job_id=job_id,
                step_number=r.step,
                metrics=r.metrics,
                path=r.path,
            )
            for r in conn.execute(q)
        ]


def record_event(
    ws: Workspace,
    job_id: str,
    message: str,
    level: EventLevel = "info",
    data: dict[str, Any] | None = None,
) -> None:
    with ws.engine.begin() as conn:
        conn.execute(
            insert(db.job_events).values(
                job_id=job_id, created_at=time.time(), level=level, message=message, data=data
            )
        )


def record_metrics(ws: Workspace, job_id: str, step: int, values: dict[str, Any]) -> None:
    with ws.engine.begin() as conn:
        conn.execute(
            insert(db.job_metrics).values(
                job_id=job_id, step=step, created_at=time.time(), values=values
            )
        )


def record_checkpoint(
    ws: Workspace,
    job_id: str,
    step: int,
    path: Path,
    metrics: dict[str, Any],
    pruned: list[Path] = (),  # type: ignore[assignment]
) -> None:
    """Add a checkpoint row and drop the rows of checkpoints whose folders were pruned."""
    t = db.job_checkpoints
    with ws.engine.begin() as conn:
        if pruned:
            conn.execute(
                delete(t).where(t.c.job_id == job_id, t.c.path.in_([str(p) for p in pruned]))
            )
        conn.execute(
            insert(t).values(
                job_id=job_id, step=step, created_at=time.time(), metrics=metrics, path=str(path)
            )
        )


def cancel_requested(ws: Workspace, job_id: str) -> bool:
    """Whether someone asked this job to stop (read by the training loop every step)."""
    with ws.engine.connect() as conn:
        value = conn.execute(
            select(db.jobs.c.cancel_requested).where(db.jobs.c.id == job_id)
        ).scalar()
    return bool(value)


PAUSE_MARKER = "pause_requested"  # a file in the job's folder: pause_job asked for a pause


def pause_requested(ws: Workspace, job_id: str) -> bool:
    """Whether someone asked this job to pause (and no resume has cleared it since)."""
    return (job_dir(ws, job_id) / PAUSE_MARKER).is_file()


def _clear_pause(ws: Workspace, job_id: str) -> None:
    (job_dir(ws, job_id) / PAUSE_MARKER).unlink(missing_ok=True)


def stop_requested(ws: Workspace, job_id: str) -> str | None:
    """What the training loop should stop for (read every step): "cancelled", "paused" (save a
    checkpoint, then `transition(ws, job_id, "paused", …)` and end), or None. A cancel wins
    over a pause."""
    if cancel_requested(ws, job_id):
        return "cancelled"
    return "paused" if pause_requested(ws, job_id) else None


def transition(
    ws: Workspace,
    job_id: str,
    to: JobStatus,
    *,
    message: str | None = None,
    level: EventLevel = "info",
    **fields: Any,
) -> Job:
    """Move the job to status `to` (setting `fields` on the row) or raise JobError.

    The update is a compare-and-set on the status read, so two processes racing (the child
    finishing while the CLI cancels) cannot both win; the loser sees the new status.
    """
    now = time.time()
    with ws.engine.begin() as conn:
        row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).first()
        if row is None:
            raise _not_found(ws, job_id)
        current = row.status
        if to not in TRANSITIONS[current]:
            allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (it is final)"
            raise JobError(
                f"job {job_id} is {current}; it cannot become {to}. "
                f"From {current} it can become: {allowed}"
            )
        values = dict(fields)
        values["status"] = to
        if to in TERMINAL:
            values.setdefault("finished_at", now)
        if to == "running":
            values.setdefault("started_at", now)
        done = conn.execute(
            update(db.jobs)
            .where(db.jobs.c.id == job_id, db.jobs.c.status == current)
            .values(**values)
        )
        if done.rowcount != 1:
            raise JobError(
                f"job {job_id} changed status while moving it to {to}; read it again and retry"
            )
        if message:
            data = {"status": to, **({"error": fields["error"]} if fields.get("error") else {})}
            conn.execute(
                insert(db.job_events).values(
                    job_id=job_id, created_at=now, level=level, message=message, data=data
                )
            )
    return get_job(ws, job_id)


def fail_job(ws: Workspace, job_id: str, code: str, message: str) -> Job:
    """Mark the job failed with `{code, message}` (and an error event)."""
    return transition(
        ws,
        job_id,
        "failed",
        error={"code": code, "message": message},
        message=f"Job failed: {message}",
        level="error",
    )


# -- create / start / wait / cancel / resume --------------------------------------------------


def _validate_dataset(ws: Workspace, dataset: DatasetVersion, method: str) -> str:
    """The method the job runs (`auto` resolved by the dataset's kind); refuses a dataset that
    cannot train with it before any row is written (no half-made jobs)."""
    from evertune.training.recipes import RECIPES, available, resolve_method

    try:
        method = resolve_method(method, dataset.kind)
    except KeyError:
        raise DataError(
            f"dataset {dataset.id} holds {dataset.kind!r} records, which no training method reads"
        ) from None
    recipe = RECIPES.get(method)
    if recipe is None:
        raise JobError(
            f"train.method={method!r} is not a training method; use one of: auto, "
            f"{', '.join(available())}"
        )
    if recipe.kind != dataset.kind:
        raise DataError(
            f"dataset {dataset.id} holds {dataset.kind} records, but method {method!r} trains on "
            f"{recipe.data}; add such records (`evertune data add FILE`), pick a dataset of kind "
            f"{recipe.kind}, or set train.method=auto to let the data decide"
        )
    if int(dataset.counts.get("train", 0)) <= 0:
        raise DataError(
            f"dataset {dataset.id} has no training examples (counts: {dataset.counts}); "
            "add more rows or lower data.split.validation / data.split.test"
        )
    return method


def create_job(
    ws: Workspace,
    dataset: DatasetVersion,
    parent: str | None = None,
    run_id: str | None = None,
    method: str | None = None,
) -> Job:
    """Create a job for `dataset` (status `queued` once its files check out).

    `method`: the recipe (default `train.method`; `auto` picks the dataset kind's own).
    `parent`: a registered version ("3") or a succeeded job ("ftjob-…", the previous stage of
    a chain) whose weights this job continues from.

    Idempotent per `run_id`: a pipeline step that is re-run after a crash gets the job it
    already created instead of training twice (a stage chain keys each stage's job by
    `<run id>/<stage>`). The job snapshots the fully resolved config, so a later edit of
    evertune.yaml cannot change what a resumed job trains.
    """
    if run_id is not None:
        with ws.engine.connect() as conn:
            row = conn.execute(
                select(db.jobs).where(db.jobs.c.run_id == run_id).order_by(db.jobs.c.created_at)
            ).first()
        if row is not None:
            return _row_to_job(row)

    cfg = ws.config
    method = _validate_dataset(ws, dataset, method or cfg.train.method)
    if parent is not None and parent.startswith("ftjob-"):
        previous = get_job(ws, parent)
        if previous.status != "succeeded" or not previous.result:
            raise JobError(
                f"job {parent} is {previous.status}; a job can only continue from a succeeded one"
            )
    job_id = "ftjob-" + secrets.token_hex(12)
    now = time.time()
    with ws.engine.begin() as conn:
        conn.execute(
            insert(db.jobs).values(
                id=job_id,
                created_at=now,
                status="validating_files",
                method=method,
                model=cfg.model.base,
                dataset=dataset.id,
                parent=parent,
                hyperparameters=hyperparameters_from(cfg, method),
                config=cfg.model_dump(mode="json"),
                cancel_requested=False,
                trained_tokens=0,
                run_id=run_id,
            )
        )
        conn.execute(
            insert(db.job_events).values(
                job_id=job_id,
                created_at=now,
                level="info",
                message=f"Validating training file: {dataset.id}",
            )
        )
    train_file = Path(dataset.path) / "train.jsonl"
    if not train_file.is_file():
        msg = (
            f"training file {train_file} of dataset {dataset.id} is missing; re-add the data with "
            "`evertune data add FILE`"
        )
        fail_job(ws, job_id, "bad_dataset", msg)
        raise DataError(f"job {job_id} failed: {msg}")
    job_dir(ws, job_id).mkdir(parents=True, exist_ok=True)
    return transition(
        ws,
        job_id,
        "queued",
        message=f"Files validated ({dataset.counts.get('train')} training examples), job queued",
    )


def start_job(ws: Workspace, job_id: str) -> Job:
    """Start a queued job on its backend (config `train.backend`); returns it `running`."""
    from evertune.training.backends import get_backend

    job = get_job(ws, job_id)
    if job.status != "queued":
        hint = ""
        if job.status in ("failed", "cancelled", "paused"):
            hint = f"; resume it with `evertune jobs resume {job_id}`"
        raise JobError(f"job {job_id} is {job.status}; only a queued job can start{hint}")
    folder = job_dir(ws, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    _clear_pause(ws, job_id)  # a pause asked of an earlier process is not one asked of this
    spec = {"workspace": str(ws.root), "job_id": job_id, "overrides": list(ws.overrides)}
    (folder / "job.json").write_text(json.dumps(spec, indent=2) + "\n", "utf-8")
    backend = get_backend(job.config.get("train", {}).get("backend", "local"))
    try:
        pid, host = backend.start(ws, job, folder)
    except Exception as exc:
        fail_job(ws, job_id, "start_failed", f"could not start the training process: {exc}")
        raise
    return transition(
        ws,
        job_id,
        "running",
        pid=pid,
        host=host,
        cancel_requested=False,
        message=f"Fine-tuning job started (pid {pid} on {host}, log {folder / 'train.log'})",
    )


def _pid_alive(pid: int) -> bool:
    """Whether `pid` is a live training child (reaps it if it is our own exited child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:  # our child and it has exited: reaped now
            return False
    except ChildProcessError:
        pass  # not our child (started by another process): fall through
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else: a reused pid is unlikely but possible
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            if proc.joinpath("stat").read_text().split(") ", 1)[1].startswith("Z"):
                return False  # a zombie is dead, its parent has just not reaped it yet
            # A recycled pid belongs to some other program: not our job.
            return b"evertune.training.run" in _cmdline(proc)
        except (OSError, IndexError):
            return False
    return True


CMDLINE_WAIT_S = 0.5  # how long an empty /proc/PID/cmdline may last before it counts as final


def _cmdline(proc: Path) -> bytes:
    """The process's argv. Right after exec the kernel shows an empty cmdline for a moment
    (seen in ~15 % of checks made just after `Popen` returned): read again until it has one."""
    deadline = time.monotonic() + CMDLINE_WAIT_S
    while True:
        cmdline = proc.joinpath("cmdline").read_bytes()
        if cmdline or time.monotonic() > deadline:
            return cmdline
        time.sleep(0.005)


def process_alive(job: Job) -> bool | None:
    """Whether the job's process runs: True / False, or None when it cannot be told here
    (no pid recorded, or it runs on another host)."""
    if job.pid is None or (job.host and job.host != socket.gethostname()):
        return None
    return _pid_alive(job.pid)


def _died_message(job_id: str) -> str:
    return (
        f"the training process of {job_id} ended without reporting (killed, out of host memory, "
        f"or the machine restarted); continue from its last checkpoint with "
        f"`evertune jobs resume {job_id}`"
    )


def check_alive(ws: Workspace, job_id: str) -> Job:
    """The job, marked failed with code `process_died` if it is running but its process is gone."""
    job = get_job(ws, job_id)
    if job.status == "running" and process_alive(job) is False:
        # The child may have written its final status a moment ago: read again before judging.
        job = get_job(ws, job_id)
        if job.status == "running":
            try:
                return fail_job(ws, job_id, "process_died", _died_message(job_id))
            except JobError:
                return get_job(ws, job_id)
    return job


def progress_of(rows: list[dict[str, Any]], job: Job) -> dict[str, Any]:
    """The job's latest progress from its metric rows (see `wait_job` for the keys)."""
    empty: dict[str, Any] = {}
    train = next((r for r in reversed(rows) if "train_loss" in r), empty)
    val = next((r for r in reversed(rows) if "val_loss" in r), empty)
    return {
        "job_id": job.id,
        "status": job.status,
        "step": train.get("step", 0),
        "total_steps": train.get("total_steps"),
        "epoch": train.get("epoch"),
        "loss": train.get("train_loss"),
        "lr": train.get("lr"),
        "tokens_per_s": train.get("tokens_per_s"),
        "eta": train.get("eta_s"),
        "val_loss": val.get("val_loss"),
    }


def wait_job(
    ws: Workspace,
    job_id: str,
    on_progress: ProgressFn | None = None,
    poll: float = 0.5,
    timeout: float | None = None,
) -> Job:
    """Poll until the job is final; call `on_progress` with each new metrics row.

    `on_progress` gets `{step, total_steps, epoch, loss, lr, tokens_per_s, eta (s), val_loss,
    status, job_id}`. A running job whose process is gone is marked failed (`process_died`).
    `timeout` (seconds) raises JobError when exceeded; the job keeps running.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    t = db.job_metrics
    while True:
        job = check_alive(ws, job_id)
        if on_progress is not None:
            with ws.engine.connect() as conn:
                new = conn.execute(
                    select(t.c.id)
                    .where(t.c.job_id == job_id, t.c.id > seen)
                    .order_by(t.c.id.desc())
                ).first()
            if new is not None:
                seen = new.id
                on_progress(progress_of(list_metrics(ws, job_id), job))
        if job.finished:
            return job
        if (
            job.status in ("queued", "validating_files")
            and job.pid is None
            and job.config.get("train", {}).get("backend", "local") == "local"
        ):
            raise JobError(
                f"job {job_id} is {job.status} but was never started; start it with "
                f"`evertune jobs resume {job_id}`"
            )
        if deadline is not None and time.monotonic() > deadline:
            raise JobError(
                f"job {job_id} is still {job.status} after {timeout:g} s; wait again with "
                f"`evertune jobs wait {job_id}`"
            )
        time.sleep(poll)


def cancel_job(ws: Workspace, job_id: str) -> Job:
    """Stop a job: one that never started, or a paused one, is cancelled at once; a running one
    is asked to stop and its training loop ends `cancelled` within one step. A finished job
    raises JobError."""
    job = check_alive(ws, job_id)
    if job.finished:
        raise JobError(
            f"job {job_id} is already {job.status}; only validating_files, queued, running or "
            "paused jobs can be cancelled"
        )
    if job.status in ("validating_files", "queued", "paused"):
        _clear_pause(ws, job_id)
        when = "while paused" if job.status == "paused" else "before it started"
        return transition(
            ws,
            job_id,
            "cancelled",
            cancel_requested=True,
            message=f"Job cancelled {when}",
        )
    with ws.engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(cancel_requested=True))
    record_event(ws, job_id, "Cancellation requested; the job stops after the current step")
    return get_job(ws, job_id)


def pause_job(ws: Workspace, job_id: str) -> Job:
    """Ask a running job to pause: its training loop saves a checkpoint after the current step
    and ends `paused`; `resume_job` continues it from there. Returns the job (still `running`
    until the loop has stopped). Any other status raises JobError saying what can be done."""
    job = check_alive(ws, job_id)
    if job.status == "paused":
        raise JobError(
            f"job {job_id} is already paused; resume it with `evertune jobs resume {job_id}` "
            f"or POST /v1/fine_tuning/jobs/{job_id}/resume"
        )
    if job.status != "running":
        hint = {
            "validating_files": "it has not started; cancel it instead if it should not run",
            "queued": "it has not started; cancel it instead if it should not run",
            "failed": f"resume it with `evertune jobs resume {job_id}`",
            "cancelled": f"resume it with `evertune jobs resume {job_id}`",
            "succeeded": "it has finished",
        }.get(job.status, "")
        raise JobError(
            f"job {job_id} is {job.status}; only a running job can be paused"
            + (f" ({hint})" if hint else "")
        )
    if job.cancel_requested:
        raise JobError(f"job {job_id} is being cancelled; it cannot be paused as well")
    if not pause_requested(ws, job_id):
        marker = job_dir(ws, job_id) / PAUSE_MARKER
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{time.time()}\n", "utf-8")
        record_event(ws, job_id, "Pause requested; the job saves a checkpoint and pauses after "
                     "the current step")
    return get_job(ws, job_id)


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under JOB_DIR/checkpoints (complete = renamed into place)."""
    root = folder / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def resume_job(ws: Workspace, job_id: str) -> Job:
    """Start a paused, failed, cancelled or dead job again from its newest checkpoint (or from
    scratch when it saved none). A queued job that never started is simply started.
    """
    job = check_alive(ws, job_id)
    if job.status == "running":
        paused = " (a pause was asked for: it pauses after this step)" if pause_requested(
            ws, job_id) else ""
        raise JobError(
            f"job {job_id} is still running (pid {job.pid} on {job.host}){paused}; only a "
            "paused, failed or cancelled job can be resumed: pause or cancel it first, or wait"
        )
    if job.status == "succeeded":
        raise JobError(
            f"job {job_id} already succeeded; start a new job with `evertune tune` instead"
        )
    if job.status in ("failed", "cancelled", "paused"):
        _clear_pause(ws, job_id)
        ckpt = newest_checkpoint(job_dir(ws, job_id))
        where = (
            f"from checkpoint {ckpt.name}" if ckpt else "from the start (no checkpoint was saved)"
        )
        transition(
            ws,
            job_id,
            "queued",
            error=None,
            finished_at=None,
            cancel_requested=False,
            pid=None,
            message=f"Job resumed {where}",
        )
    return start_job(ws, job_id)


def run_finetune(
    ws: Workspace,
    dataset: DatasetVersion,
    parent: str | None = None,
    on_progress: ProgressFn | None = None,
    run_id: str | None = None,
) -> Job:
    """Create, start and wait for a job; returns it final (check `status`).

    Re-run with the same `run_id` after a crash it finds its job: one still running is waited
    for, one whose process died is resumed from its checkpoint, a finished one is returned.
    """
    job = create_job(ws, dataset, parent=parent, run_id=run_id)
    job = check_alive(ws, job.id)
    if job.status == "queued":
        job = start_job(ws, job.id)
    elif job.status == "failed" and (job.error or {}).get("code") == "process_died":
        job = resume_job(ws, job.id)
    if job.finished:
        return job
    return wait_job(ws, job.id, on_progress=on_progress)
