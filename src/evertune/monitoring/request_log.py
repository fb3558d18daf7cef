"""The request log: a sample of served prompts and completions, redacted, in the state DB.

    from evertune.monitoring import list_requests
    for r in list_requests(ws, limit=20):          # what `evertune logs` prints
        print(r.created_at, r.version, r.prompt_tokens, r.completion_tokens, r.completion)

The gateway writes one row per answered request, for a share `serve.request_log_sample` of
requests (1.0 = all), after the redactors ran (e-mail addresses and phone numbers by
default, see `evertune.monitoring.redact`). Rows are written by a background thread in small
batches, so a slow or locked state DB never adds latency to a request; `RequestLog.flush()`
waits for the queue to drain (tests, shutdown).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Column, Engine, Float, Index, Integer, String, Table, Text, select

from evertune import db
from evertune.monitoring.redact import DEFAULT_REDACTORS, Redactor, redact

if TYPE_CHECKING:
    from evertune.workspace import Workspace

log = logging.getLogger(__name__)

request_log = Table(
    "request_log",
    db.metadata,
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
    Index("ix_request_log_created_at", "created_at"),
)
"""Served requests (a sample), redacted; defined here against `evertune.db.metadata`."""

_READY: set[str] = set()  # state DB URLs whose request_log table is known to exist
_READY_LOCK = threading.Lock()


def _ensure_table(engine: Engine) -> None:
    # db.connect creates the tables known when it ran; this module may be imported later.
    url = str(engine.url)
    with _READY_LOCK:
        if url not in _READY:
            request_log.create(engine, checkfirst=True)
            _READY.add(url)


@dataclass(frozen=True)
class LoggedRequest:
    """One row of the request log."""

    id: str
    created_at: float
    model: str
    version: str
    stage: str
    endpoint: str
    status: str
    prompt: Any
    completion: Any
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    duration_s: float | None
    params: dict[str, Any]
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for `evertune logs --json` and the control API)."""
        return asdict(self)


def list_requests(
    ws: Workspace, limit: int = 50, *, version: str | None = None
) -> list[LoggedRequest]:
    """The newest `limit` logged requests, newest first (optionally of one version, "v3")."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    _ensure_table(ws.engine)
    query = select(request_log).order_by(request_log.c.created_at.desc()).limit(limit)
    if version is not None:
        query = query.where(request_log.c.version == version)
    with ws.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [_row(r) for r in rows]


def get_request(ws: Workspace, request_id: str) -> LoggedRequest | None:
    """The logged request with this response id, or None (not sampled, or never served)."""
    _ensure_table(ws.engine)
    with ws.engine.connect() as conn:
        row = (
            conn.execute(select(request_log).where(request_log.c.id == request_id))
            .mappings()
            .first()
        )
    return _row(row) if row is not None else None


def _row(r: Any) -> LoggedRequest:
    return LoggedRequest(
        id=r["id"],
        created_at=r["created_at"],
        model=r["model"],
        version=r["version"],
        stage=r["stage"],
        endpoint=r["endpoint"],
        status=r["status"],
        prompt=r["prompt"],
        completion=r["completion"],
        finish_reason=r["finish_reason"],
        prompt_tokens=r["prompt_tokens"] or 0,
        completion_tokens=r["completion_tokens"] or 0,
        ttft_s=r["ttft_s"],
        duration_s=r["duration_s"],
        params=r["params"] or {},
        error=r["error"],
    )


def redact_value(value: Any, redactors: Sequence[Redactor]) -> Any:
    """Redact every string inside `value` (a string, a message list, nested dicts/lists)."""
    if isinstance(value, str):
        return redact(value, redactors)
    if isinstance(value, list):
        return [redact_value(v, redactors) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v, redactors) for k, v in value.items()}
    return value


class RequestLog:
    """Sampled, redacted, asynchronous writes of served requests.

        rl = RequestLog(ws, sample=0.1)            # log one request in ten
        if rl.sampled():
            rl.record({"id": "chatcmpl-…", "prompt": messages, "completion": text, …})
        rl.flush(); rl.close()

    `record` redacts `prompt`, `completion` and `error` and queues the row; a daemon thread
    inserts queued rows in batches. A failed insert is logged and dropped: the request log
    is monitoring data, and serving must not stop because the state DB is unavailable.
    """

    _BATCH = 64  # rows per insert: one transaction per batch keeps SQLite fsyncs rare

    def __init__(
        self,
        ws: Workspace,
        sample: float = 1.0,
        redactors: Sequence[Redactor] = DEFAULT_REDACTORS,
    ) -> None:
        if not 0 <= sample <= 1:
            raise ValueError(f"sample must be within [0, 1], got {sample}")
        self.ws = ws
        self.sample = sample
        self.redactors = tuple(redactors)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sampled(self) -> bool:
        """Whether to log the next request (decided per request, `sample` of the time)."""
        return self.sample >= 1 or (self.sample > 0 and random.random() < self.sample)

    def redact(self, value: Any) -> Any:
        """`value` with this log's redactors applied to every string inside it."""
        return redact_value(value, self.redactors)

    def record(self, entry: dict[str, Any]) -> None:
        """Queue one row (keys: the `request_log` columns; missing ones get defaults)."""
        row = {c.name: entry.get(c.name) for c in request_log.columns}
        row["created_at"] = row["created_at"] or time.time()
        for key in ("prompt", "completion", "error"):
            row[key] = self.redact(row[key])
        row["prompt_tokens"] = row["prompt_tokens"] or 0
        row["completion_tokens"] = row["completion_tokens"] or 0
        self._start()
        self._queue.put(row)

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every queued row is written (or `timeout` seconds passed)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=10)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                _ensure_table(self.ws.engine)
                self._thread = threading.Thread(
                    target=self._run, name="evertune-request-log", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < self._BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [r for r in batch if r is not None]
            if rows:
                try:
                    with self.ws.engine.begin() as conn:
                        conn.execute(request_log.insert(), rows)
                except Exception as exc:  # any DB error: drop this batch, keep serving
                    log.warning("request log: could not write %d row(s): %s", len(rows), exc)
            for _ in batch:
                self._queue.task_done()
            if any(r is None for r in batch):
                return
