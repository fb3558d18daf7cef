"""The state DB schema, every table of Evertune in one place: jobs and their events, metrics and
checkpoints; API tokens; locks; the request log and served responses; drift checks; the audit log.

    from evertune.workspace import Workspace
    engine = Workspace.open().engine       # SQLite file by default, any SQLAlchemy URL at scale

SQLAlchemy Core rather than an ORM: the rows are plain records read by several processes
(the CLI, the training child, the control API), and Core keeps each query visible.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.exc import OperationalError

from evertune.errors import StorageError, as_storage_error

log = logging.getLogger("evertune.db")

# How long a server state DB may be unreachable before callers see the error (a restart or a
# managed failover takes seconds to a minute or two).
RECONNECT_S = 300.0

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),  # ftjob-…
    Column("created_at", Float, nullable=False),  # unix seconds, as in the OpenAI API
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("status", String(32), nullable=False),
    Column("method", String(32), nullable=False),  # supervised | dpo | pretrain
    Column("model", String(512), nullable=False),  # base model spec
    Column("dataset", String(128), nullable=False),  # dataset version id
    Column("parent", String(64)),  # registered version this continues from
    Column("hyperparameters", JSON, nullable=False),
    Column("config", JSON, nullable=False),  # fully resolved config snapshot
    Column("result", JSON),  # {"path": …, "kind": "lora" | "full"}
    Column("error", JSON),  # {"code": …, "message": …}
    Column("pid", Integer),
    Column("host", String(255)),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("trained_tokens", Integer, nullable=False, default=0),
    Column("run_id", String(128)),  # pipeline run that started it, if any (idempotency key)
    Index("ix_jobs_run_id", "run_id"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("level", String(8), nullable=False),  # info | warn | error
    Column("message", Text, nullable=False),
    Column("data", JSON),
)

job_metrics = Table(
    "job_metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("step", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("values", JSON, nullable=False),  # train_loss, lr, tokens_per_s, epoch, val_loss …
)

job_checkpoints = Table(
    "job_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("step", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("path", String(1024), nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),  # viewer | operator | approver | admin
    Column("sha256", String(64), nullable=False, unique=True),  # only the hash is stored
    Column("created_at", Float, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)


locks = Table(
    "locks",
    metadata,
    Column("name", String(64), primary_key=True),  # "workspace": held by `evertune up`
    Column("token", String(64), nullable=False),  # random per holder: the compare-and-swap key
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("purpose", String(128), nullable=False),  # "evertune up"
    Column("started_at", Float, nullable=False),  # unix seconds
    Column("heartbeat_at", Float, nullable=False),  # refreshed by the holder (evertune.locks)
)


# -- pipeline runs and their steps (evertune.pipeline) --------------------------------------

pipeline_runs = Table(
    "pipeline_runs",
    metadata,
    Column("id", String(64), primary_key=True),  # = DBOS workflow id
    Column("model", String(128), nullable=False, index=True),  # registered model name
    Column("trigger", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # queued|running|succeeded|failed|skipped
    Column("created_at", Float, nullable=False),  # unix seconds; when it was queued
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("error", Text),
    Column("version", Integer),  # registered model version
)

pipeline_steps = Table(
    "pipeline_steps",
    metadata,
    Column("run_id", String(64), nullable=False),
    Column("name", String(32), nullable=False),
    Column("position", Integer, nullable=False),  # 0..3, the order in STEPS
    Column("status", String(16), nullable=False),  # pending|running|succeeded|failed|skipped
    Column("started_at", Float),  # first attempt
    Column("finished_at", Float),
    Column("attempts", Integer, nullable=False, default=0),  # >1: re-run after a restart
    Column("outputs", JSON),
    Column("logs", JSON),  # [{"t": unix s, "level": info|warn|error, "message": str}]
    Column("error", Text),
    PrimaryKeyConstraint("run_id", "name"),
)


# -- serving and monitoring (evertune.monitoring) ------------------------------------------

request_log = Table(
    "request_log",
    metadata,
    Column("id", String(64), primary_key=True),  # the response id: chatcmpl-… / cmpl-…
    Column("created_at", Float, nullable=False),  # unix seconds, request arrival
    Column("model", String(160), nullable=False),  # the name the client asked for
    Column("version", String(32), nullable=False),  # who answered: v3 | base
    Column("stage", String(16), nullable=False),  # prod | qa | base | version
    Column("endpoint", String(32), nullable=False),  # chat | completions
    Column("status", String(16), nullable=False),  # ok | error
    Column("prompt", JSON),  # chat: the messages; completions: the prompt (list if several)
    Column("completion", JSON),  # the text (a list when a request had several prompts)
    Column("finish_reason", String(16)),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("ttft_s", Float),
    Column("duration_s", Float),
    Column("params", JSON),  # temperature, top_p, max_tokens, stop, seed, stream
    Column("error", Text),
    Column("receiver", String(128)),  # serving key name | "anonymous"; null on older rows
    Index("ix_request_log_created_at", "created_at"),
)
"""Served requests (a sample), redacted."""

served_responses = Table(
    "served_responses",
    metadata,
    Column("id", String(64), primary_key=True),  # the response id: chatcmpl-… / cmpl-…
    Column("created_at", Float, nullable=False),  # unix seconds, when the answer was complete
    Column("endpoint", String(32), nullable=False),  # chat | completions
    Column("model", String(160), nullable=False),  # the name the client asked for
    Column("version", String(32), nullable=False),  # who answered: v3 | base
    Column("prompt", JSON),  # redacted like the request log; null with serve.log_prompts: false
    Column("completion", JSON),
    Column("digest", String(64), nullable=False),  # response_digest(prompt, completion)
    Column("receiver", String(128)),  # serving key name | "anonymous"; null on older rows
    Index("ix_served_responses_created_at", "created_at"),
)
"""Every answered response (the newest `serve.responses_kept`): what feedback may train on."""

drift_checks = Table(
    "drift_checks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False),  # unix seconds
    Column("model", String(128), nullable=False),
    Column("version", String(32)),  # the PROD version compared ("v3"); None: none in PROD
    Column("dataset", String(64)),  # its training dataset version
    Column("prompts", Integer, nullable=False, default=0),  # served prompts compared
    Column("reference", Integer, nullable=False, default=0),  # training prompts compared
    Column("statistic", Float),  # MMD²; None when there was no figure
    Column("p_value", Float),
    Column("threshold", Float, nullable=False),
    Column("drifted", Boolean),  # the state after this check; None: no figure
    Column("event", String(32)),  # drift | drift_cleared when this check flipped the state
    Column("round", String(128)),  # the pipeline run it started, if any
    Column("note", Text),  # why there is no figure, why no round, or the error
    Column("signals", JSON),  # [OutputSignals as dicts]
    Index("ix_drift_checks_model_created_at", "model", "created_at"),
)
"""One row per drift check."""

# -- the registry's audit log (evertune.registry) -------------------------------------------

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False),  # unix seconds
    Column("model", String(128), nullable=False),  # registered model name
    Column("version", Integer, nullable=False),
    Column("action", String(32), nullable=False),  # register | transition | alias
    Column("from_stage", String(16)),  # None for a registration
    Column("to_stage", String(16)),
    Column("actor", String(128), nullable=False),  # user or component ("pipeline", "deploy")
    Column("reason", Text, nullable=False, default=""),
    Column("data", JSON),  # forced, role, alias moved, version replaced, …
    Index("ix_audit_model_version", "model", "version"),
)
"""Who moved which version where, and why."""


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def create_private(path: Path, what: str = "the database") -> None:
    """Create `path` empty with mode 0600 if it does not exist (an empty file is a valid, empty
    SQLite database). It holds tokens' hashes, prompts and job data: not for other users.
    SQLite gives its -wal and -shm files the mode of the database file. An existing file keeps
    its mode: someone may have opened it up on purpose.

    StorageError when the file cannot be created (a read-only folder, a full disk): said now,
    rather than by SQLite's "unable to open database file" (after MLflow's ~100 s of retries).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except (FileExistsError, FileNotFoundError):
        return  # exists, or no folder yet (whoever opens it creates the folder)
    except OSError as exc:
        raise storage_error(f"{what} {path}", exc) from exc
    os.close(fd)


def connect(url: str, *, migrate: bool = True) -> Engine:
    """Open the state DB at a SQLAlchemy URL, creating it if needed and migrating its tables to
    the newest schema (evertune.migrations)."""
    path = sqlite_path(url)
    if path is not None:
        create_private(path, "the state DB")
    if not url.startswith("sqlite"):
        # pre_ping: a pooled connection the server dropped (a restart, a failover) is replaced
        # at checkout instead of failing the caller's next statement.
        engine = create_engine(url, pool_pre_ping=True)
        _ride_out_outages(engine)
    else:
        engine = create_engine(url, connect_args={"timeout": 30})
        # WAL lets the CLI read while a training child writes; the busy timeout covers the
        # short write locks between them.
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    if not migrate:
        return engine
    from evertune import migrations

    try:
        migrations.upgrade(engine)  # the tables, at the newest revision (Alembic)
    except OperationalError as exc:
        if path is None:
            raise server_error(url, exc) from exc
        storage = as_storage_error(exc, f"the state DB {path}")
        if storage is None:
            raise
        raise storage from exc
    return engine


def _ride_out_outages(engine: Engine, patience_s: float | None = None) -> None:
    """Once the server has answered, a new connection that fails (the server restarting, a
    failover) is retried for up to `patience_s` (default `RECONNECT_S`) before the caller sees
    the error: a pipeline step following a job, or a training job writing its metrics, waits for
    the database rather than failing a run that lost nothing. Before the first success an error
    comes at once, so a wrong URL is still reported at start."""
    patience = RECONNECT_S if patience_s is None else patience_s
    reached = threading.Event()

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        deadline, delay, warned = time.monotonic() + patience, 0.2, False
        while True:
            try:
                conn = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                if not reached.is_set() or time.monotonic() > deadline:
                    raise
                if not warned:
                    log.warning("the state DB does not answer (%s); retrying for up to %.0f s",
                                " ".join(str(exc).split())[:200], patience)
                    warned = True
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if warned:
                log.warning("the state DB answers again")
            reached.set()
            return conn


def server_error(url: str, exc: BaseException, setting: str = "storage.state_db") -> StorageError:
    """A StorageError for a database server that cannot be reached or refuses us."""
    shown = make_url(url).render_as_string(hide_password=True)
    detail = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
    return StorageError(
        f"cannot connect to the state DB {shown} ({setting}): {detail}; check the URL (user, "
        "password, host, port, database name) and that the server is running and reachable "
        "from this host"
    )


def storage_error(what: str, exc: BaseException) -> StorageError:
    """A StorageError for a database that cannot be opened or written, naming it and the fix."""
    found = as_storage_error(exc, what)
    if found is not None:
        return found
    detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return StorageError(
        f"cannot open or write {what}: {detail}; check that this user may write the file "
        "and its folder (permissions, a read-only mount) and that the disk is not full"
    )
