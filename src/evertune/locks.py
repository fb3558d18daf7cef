"""Locks between processes and hosts that share one state DB.

    from evertune.locks import WorkspaceLock, exclusive
    with WorkspaceLock(ws, "evertune up"):  # WorkspaceLocked names the holder if one is alive
        server.run(ws)
    with exclusive(ws, "deploy", timeout=600):  # one deploy operation at a time, any host
        ...

`exclusive` is a mutex for short critical sections: a Postgres advisory lock when the state
DB is Postgres (held by a session, so a holder that dies, even by kill -9 or with its host,
releases it when its connection drops), else a file lock beside the SQLite file (which only
processes of one host can share anyway).

The workspace lock below is for the life of a process.

The lock is a row of the state DB's `locks` table (name, holder host, PID, started-at,
heartbeat, a random token per holder), so it works wherever the state lives: the default
SQLite file, or a Postgres server shared by several hosts. Every change is one conditional
statement (insert a new row; update or delete *where token = the one we read*), which is a
compare-and-swap on any SQL database: of two processes racing for a dead holder's lock,
exactly one update matches. (A Postgres advisory lock could replace the row later behind the
same class; the row is kept because it also tells a refused process who holds the lock.)

A holder counts as dead, and its lock is taken over, when

- it ran on this host and its PID is no longer alive (a kill -9 is noticed at once), or
- its heartbeat is older than the lease (`LEASE_S`): a holder on another host, whose PID we
  cannot check, or one on this host that stopped heartbeating (a PID reused by another program,
  a process frozen with SIGSTOP).

The holder refreshes its heartbeat every `HEARTBEAT_S` in a daemon thread. If it finds its row
gone or taken over (it was frozen past the lease), it has lost the lock: it logs an error and
calls `on_lost` (`evertune up` stops itself), so two processes never run the pipeline at once
for long. Clocks of hosts sharing one state DB must agree to well within the lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from evertune import db
from evertune.errors import WorkspaceLocked

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy import Engine

    from evertune.workspace import Workspace

log = logging.getLogger("evertune.locks")

WORKSPACE_LOCK = "workspace"  # the lock `evertune up` holds (one row per lock name)
HEARTBEAT_S = 5.0  # how often the holder refreshes its heartbeat
LEASE_S = 60.0  # a heartbeat older than this marks the holder dead (other hosts: the only test)
_ATTEMPTS = 5  # rounds of read → take over before giving up on a contended lock


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as recorded in its row."""

    name: str
    token: str
    host: str
    pid: int
    purpose: str
    started_at: float
    heartbeat_at: float

    def describe(self, now: float | None = None) -> str:
        """"`evertune up` on host h1, PID 42, since 2026-12-02 05:40:12 (heartbeat 3 s ago)"."""
        now = time.time() if now is None else now
        since = datetime.fromtimestamp(self.started_at).strftime("%Y-%m-%d %H:%M:%S")
        return (
            f"{self.purpose} on host {self.host}, PID {self.pid}, since {since} "
            f"(last heartbeat {max(0.0, now - self.heartbeat_at):.0f} s ago)"
        )


@contextlib.contextmanager
def exclusive(
    ws: Workspace, name: str, timeout: float, busy: Callable[[float], Exception] | None = None
) -> Iterator[None]:
    """Hold lock `name` among every process using this workspace's state DB (any host with
    Postgres); waits up to `timeout` seconds, then raises `busy(timeout)` (or TimeoutError)."""
    engine = ws.engine
    deadline = time.monotonic() + timeout

    def give_up() -> Exception:
        return busy(timeout) if busy else TimeoutError(f"lock {name!r} held over {timeout:g} s")

    if engine.dialect.name == "postgresql":
        key = advisory_key(name)
        with engine.connect() as conn:
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                conn.commit()
                if time.monotonic() > deadline:
                    raise give_up()
                time.sleep(0.1)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    with open(ws.state_dir / f"{name}.lock", "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise give_up() from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def advisory_key(name: str) -> int:
    """The Postgres advisory-lock key of lock `name` (a stable 32-bit hash)."""
    return zlib.crc32(f"evertune:{name}".encode())


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    stat = Path(f"/proc/{pid}/stat")
    try:
        # Killed but not yet reaped by its parent: the state field after "(comm) " is Z.
        return not stat.read_text().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def holder_dead(
    holder: Holder, *, now: float | None = None, lease_s: float = LEASE_S
) -> str | None:
    """Why `holder` counts as dead ("PID 42 is not running", …), or None while it lives."""
    now = time.time() if now is None else now
    if holder.host == socket.gethostname() and not pid_alive(holder.pid):
        return f"PID {holder.pid} is not running on this host"
    if now - holder.heartbeat_at > lease_s:
        return f"no heartbeat for {now - holder.heartbeat_at:.0f} s (lease {lease_s:g} s)"
    return None


def read_holder(engine: Engine, name: str = WORKSPACE_LOCK) -> Holder | None:
    """The current holder of lock `name`, or None when nobody holds it."""
    t = db.locks
    with engine.connect() as conn:
        row = conn.execute(select(t).where(t.c.name == name)).first()
    if row is None:
        return None
    return Holder(
        name=row.name, token=row.token, host=row.host, pid=row.pid, purpose=row.purpose,
        started_at=row.started_at, heartbeat_at=row.heartbeat_at,
    )


class WorkspaceLock:
    """Hold lock `name` in the workspace's state DB for the life of a process (or a `with`)."""

    def __init__(
        self,
        ws: Workspace,
        purpose: str = "evertune up",
        *,
        name: str = WORKSPACE_LOCK,
        heartbeat_s: float = HEARTBEAT_S,
        lease_s: float = LEASE_S,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.ws = ws
        self.purpose = purpose
        self.name = name
        self.heartbeat_s = heartbeat_s
        self.lease_s = lease_s
        self.on_lost = on_lost
        self.token = secrets.token_hex(16)
        self.taken_over: Holder | None = None  # the dead holder we replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def __repr__(self) -> str:
        return f"WorkspaceLock({str(self.ws.root)!r}, {self.name!r}, held={self.held})"

    # -- acquire / release -------------------------------------------------------------------
    def acquire(self) -> WorkspaceLock:
        """Take the lock, or take it over from a dead holder; WorkspaceLocked names a live one."""
        engine = self.ws.engine
        t = db.locks
        for _ in range(_ATTEMPTS):
            now = time.time()
            mine: dict[str, Any] = {
                "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "purpose": self.purpose, "started_at": now, "heartbeat_at": now,
            }
            try:
                with engine.begin() as conn:
                    conn.execute(insert(t).values(name=self.name, **mine))
                return self._held()
            except IntegrityError:
                pass  # a row exists: somebody holds (or held) the lock
            holder = read_holder(engine, self.name)
            if holder is None:
                continue  # released between our insert and our read: try again
            if holder.token == self.token:
                return self._held()
            why = holder_dead(holder, now=now, lease_s=self.lease_s)
            if why is None:
                raise WorkspaceLocked(
                    f"workspace {self.ws.root} is already in use by {holder.describe(now)}; "
                    "stop that process first (Ctrl-C, or `kill "
                    f"{holder.pid}` on {holder.host}). A holder that dies without stopping is "
                    "replaced automatically: at once on the same host, after "
                    f"{self.lease_s:g} s without a heartbeat from another host"
                )
            # Compare-and-swap on the dead holder's token: of two racing processes one wins.
            with engine.begin() as conn:
                taken = conn.execute(
                    update(t).where(t.c.name == self.name, t.c.token == holder.token).values(**mine)
                ).rowcount
            if taken == 1:
                self.taken_over = holder
                log.warning(
                    "took over the workspace lock of %s: %s", holder.describe(now), why
                )
                return self._held()
        raise WorkspaceLocked(
            f"could not take the lock of workspace {self.ws.root}: other processes kept taking "
            "it; is `evertune up` being started in a loop? Try again"
        )

    def _held(self) -> WorkspaceLock:
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat_loop, name="evertune-lock-heartbeat", daemon=True
        )
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop heartbeating and delete our row (only ours: a successor's row stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.heartbeat_s + 5)
            self._thread = None
        if not self.held:
            return
        self.held = False
        t = db.locks
        try:
            with self.ws.engine.begin() as conn:
                conn.execute(delete(t).where(t.c.name == self.name, t.c.token == self.token))
        except Exception as exc:  # the next process takes the row over as a dead holder's
            log.warning("could not release the workspace lock (%s); it expires by itself", exc)

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- heartbeat ---------------------------------------------------------------------------
    def heartbeat(self) -> bool:
        """Refresh our heartbeat now; False when the row is no longer ours (lock lost)."""
        t = db.locks
        with self.ws.engine.begin() as conn:
            n = conn.execute(
                update(t)
                .where(t.c.name == self.name, t.c.token == self.token)
                .values(heartbeat_at=time.time())
            ).rowcount
        return n == 1

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                still_ours = self.heartbeat()
            except Exception as exc:  # the DB may be briefly busy or unreachable: retry
                log.warning("could not refresh the workspace lock's heartbeat: %s", exc)
                continue
            if not still_ours:
                self.held = False
                holder = read_holder(self.ws.engine, self.name)
                reason = (
                    f"the lock of workspace {self.ws.root} was taken over by "
                    f"{holder.describe()}" if holder else
                    f"the lock row of workspace {self.ws.root} was deleted"
                ) + " while this process was not heartbeating; stopping"
                log.error("%s", reason)
                if self.on_lost is not None:
                    self.on_lost(reason)
                return
