"""The request log: a sample of served prompts and completions, redacted, in the state DB.

    from evertune.monitoring import list_requests
    for r in list_requests(ws, limit=20):          # what `evertune logs` prints
        print(r.created_at, r.version, r.prompt_tokens, r.completion_tokens, r.completion)

The gateway writes one row per answered request, for a share `serve.request_log_sample` of
requests (1.0 = all), after the redactors ran (secrets, card numbers, e-mail addresses and
phone numbers by default, see `evertune.monitoring.redact`): nothing unredacted is queued,
let alone written. With `serve.log_prompts: false` no prompt or completion text is stored.

Separately, every answered response — sampled or not — goes to `served_responses`, the
newest `serve.responses_kept` of them: what /v1/feedback checks a response id against, so
feedback trains on what this server really answered (`get_served`), never on text a client
claims it was answered. Its text is redacted like the log's; with `log_prompts: false` only a
digest of it is kept (`response_digest`), which a client's copy of the text must match. Both
tables name the `receiver` of each response (the serving key that asked, "anonymous" while
serving is open), so feedback is trusted only from the caller who got the answer. A state DB
made before that column existed gets it added (nullable: older rows have no receiver).

Rows are written by a background thread in small batches, so a slow or locked state DB never
adds latency to a request; `RequestLog.flush()` waits for the queue to drain (tests, shutdown).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Table,
    delete,
    select,
)

from evertune.db import request_log, served_responses
from evertune.monitoring.redact import DEFAULT_REDACTORS, Redactor, redact

if TYPE_CHECKING:
    from evertune.workspace import Workspace

log = logging.getLogger(__name__)



def response_digest(prompt: Any, completion: Any) -> str:
    """sha256 of a (redacted) prompt and completion, canonically serialised.

    Lets feedback check that text a client sends is what was served, where the text itself
    was not stored (`serve.log_prompts: false`)."""
    canon = json.dumps([prompt, completion], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ServedResponse:
    """One answered response as `served_responses` keeps it."""

    id: str
    created_at: float
    endpoint: str
    model: str
    version: str
    prompt: Any  # None when prompts are not stored
    completion: Any
    digest: str
    receiver: str | None  # who received it: a serving key name or "anonymous"; None if unknown


def get_served(ws: Workspace, response_id: str) -> ServedResponse | None:
    """The served response with this id, or None (never served here, or pruned since)."""
    with ws.engine.connect() as conn:
        row = (
            conn.execute(select(served_responses).where(served_responses.c.id == response_id))
            .mappings()
            .first()
        )
    if row is None:
        return None
    return ServedResponse(**{c.name: row[c.name] for c in served_responses.columns})


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
    receiver: str | None = None  # the serving key that asked, "anonymous"; None on older rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for `evertune logs --json` and the control API)."""
        return asdict(self)


def list_requests(
    ws: Workspace, limit: int = 50, *, version: str | None = None
) -> list[LoggedRequest]:
    """The newest `limit` logged requests, newest first (optionally of one version, "v3")."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    query = select(request_log).order_by(request_log.c.created_at.desc()).limit(limit)
    if version is not None:
        query = query.where(request_log.c.version == version)
    with ws.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [_row(r) for r in rows]


def get_request(ws: Workspace, request_id: str) -> LoggedRequest | None:
    """The logged request with this response id, or None (not sampled, or never served)."""
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
        receiver=r["receiver"],
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
        rl.served({"id": "chatcmpl-…", "endpoint": "chat", "prompt": messages, …})  # every one
        rl.flush(); rl.close()

    `record` and `served` redact the text (or drop it: `log_prompts=False`) and queue the row;
    a daemon thread inserts queued rows in batches. A failed insert is logged and dropped: the
    request log is monitoring data, and serving must not stop because the state DB is
    unavailable. `log_prompts` and `responses_kept` default to the workspace's `serve` config.
    """

    _BATCH = 64  # rows per insert: one transaction per batch keeps SQLite fsyncs rare
    _PRUNE_EVERY = 512  # served rows between prunes of served_responses to `responses_kept`

    def __init__(
        self,
        ws: Workspace,
        sample: float = 1.0,
        redactors: Sequence[Redactor] = DEFAULT_REDACTORS,
        *,
        log_prompts: bool | None = None,
        responses_kept: int | None = None,
    ) -> None:
        if not 0 <= sample <= 1:
            raise ValueError(f"sample must be within [0, 1], got {sample}")
        cfg = ws.config.serve
        self.ws = ws
        self.sample = sample
        self.redactors = tuple(redactors)
        self.log_prompts = cfg.log_prompts if log_prompts is None else log_prompts
        self.responses_kept = cfg.responses_kept if responses_kept is None else responses_kept
        if self.responses_kept < 1:
            raise ValueError(f"responses_kept must be >= 1, got {self.responses_kept}")
        # Items: (table, row); None stops the writer.
        self._queue: queue.Queue[tuple[Table, dict[str, Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._served_since_prune = 0

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
        if not self.log_prompts:
            row["prompt"] = row["completion"] = None
        row["prompt_tokens"] = row["prompt_tokens"] or 0
        row["completion_tokens"] = row["completion_tokens"] or 0
        self._start()
        self._queue.put((request_log, row))

    def served(self, entry: dict[str, Any], *, redacted: bool = False) -> None:
        """Queue one answered response for `served_responses` (every response, not a sample).

        `entry`: id, endpoint, model, version, prompt, completion, receiver (the serving key
        name, or "anonymous"; created_at: now). Pass
        `redacted=True` when prompt and completion already went through `self.redact`."""
        prompt, completion = entry.get("prompt"), entry.get("completion")
        if not redacted:
            prompt, completion = self.redact(prompt), self.redact(completion)
        row = {
            "id": entry["id"],
            "created_at": entry.get("created_at") or time.time(),
            "endpoint": entry["endpoint"],
            "model": entry.get("model") or "",
            "version": entry.get("version") or "",
            "prompt": prompt if self.log_prompts else None,
            "completion": completion if self.log_prompts else None,
            "digest": response_digest(prompt, completion),
            "receiver": entry.get("receiver"),
        }
        self._start()
        self._queue.put((served_responses, row))

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
            for table in (request_log, served_responses):
                rows = [item[1] for item in batch if item is not None and item[0] is table]
                if rows:
                    self._write(table, rows)
            for _ in batch:
                self._queue.task_done()
            if any(r is None for r in batch):
                return

    def _write(self, table: Table, rows: list[dict[str, Any]]) -> None:
        try:
            with self.ws.engine.begin() as conn:
                if table is served_responses:
                    # A response id is written once; a repeat (a retried insert) is skipped
                    # rather than failing the whole batch on the primary key.
                    ids = [r["id"] for r in rows]
                    have = set(
                        conn.execute(select(table.c.id).where(table.c.id.in_(ids))).scalars()
                    )
                    fresh: dict[str, dict[str, Any]] = {}
                    for r in rows:
                        if r["id"] not in have:
                            fresh.setdefault(r["id"], r)
                    rows = list(fresh.values())
                if rows:
                    conn.execute(table.insert(), rows)
        except Exception as exc:  # any DB error: drop this batch, keep serving
            log.warning("%s: could not write %d row(s): %s", table.name, len(rows), exc)
            return
        if table is served_responses:
            self._served_since_prune += len(rows)
            if self._served_since_prune >= min(self._PRUNE_EVERY, self.responses_kept):
                self._served_since_prune = 0
                self._prune()

    def _prune(self) -> None:
        """Delete served responses older than the newest `responses_kept`."""
        t = served_responses
        try:
            with self.ws.engine.begin() as conn:
                cutoff = conn.execute(
                    select(t.c.created_at)
                    .order_by(t.c.created_at.desc())
                    .offset(self.responses_kept - 1)
                    .limit(1)
                ).scalar()
                if cutoff is not None:
                    conn.execute(delete(t).where(t.c.created_at < cutoff))
        except Exception as exc:  # pruning is housekeeping: retried at the next prune
            log.warning("served_responses: could not prune: %s", exc)
