"""Several `evertune up` replicas on one Postgres state DB: members, one leader, recovery.

    evertune up --no-serving --set storage.state_db=postgresql+psycopg://…   # on each host

Every replica serves the control API and the console (and the models, without
--no-serving) and executes pipeline runs from the shared DBOS queue. One replica, the leader,
also runs the bucket watcher, the drift monitor and the canary monitor: once per workspace,
since two watchers would both see a drop (DBOS's workflow ids would still start its run once,
but events and drift rounds would double; two canary monitors would both decide). The leader
is whoever holds the workspace lock (`evertune.locks.WorkspaceLock`); the others try to take
it every `CHECK_S`, so a dead leader is replaced: at once by a replica on its host, after the
lease (`LEASE_S`) from another host.

Each replica is a DBOS executor with its own id and holds a `replica:<id>` lock row that it
heartbeats. A replica that finds another's row dead deletes it (a compare-and-swap: of several
finders one wins) and asks DBOS to recover that executor's pending workflows, so a run whose
replica was killed -9 goes on elsewhere from its last completed step (each step is idempotent:
the job, the evaluation and the version are found again, not made twice).

With a SQLite state DB there is one `up` per workspace (the workspace lock refuses a second),
which is leader from the start.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from evertune import db
from evertune.errors import WorkspaceLocked
from evertune.locks import LEASE_S, Holder, WorkspaceLock, holder_dead

if TYPE_CHECKING:
    from evertune.workspace import Workspace

log = logging.getLogger("evertune.replicas")

MEMBER_PREFIX = "replica:"  # lock rows of live replicas: replica:<DBOS executor id>
CHECK_S = 5.0  # how often a replica looks for a dead leader or dead peers


def shared_state(ws: Workspace) -> bool:
    """Whether several processes on several hosts may share this workspace's state (a server
    database), so `up` runs as one of several replicas."""
    return ws.engine.dialect.name != "sqlite"


class Replica:
    """This process as one replica: its membership row, leadership, and peer recovery."""

    def __init__(
        self,
        ws: Workspace,
        on_leader: Callable[[], None],
        on_lost: Callable[[str], None] | None = None,
        *,
        check_s: float = CHECK_S,
        lease_s: float = LEASE_S,
        recover: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.ws = ws
        self.executor_id = "up-" + secrets.token_hex(6)
        self.on_leader = on_leader
        self.on_lost = on_lost
        self.check_s = check_s
        self.lease_s = lease_s
        self.recover = recover or _dbos_recover
        self.member = WorkspaceLock(ws, "evertune up replica", name=MEMBER_PREFIX +
                                    self.executor_id, lease_s=lease_s, on_lost=on_lost)
        self.leadership = WorkspaceLock(ws, f"evertune up (leader, {self.executor_id})",
                                        lease_s=lease_s, on_lost=on_lost)
        self.recovered: list[str] = []  # executor ids this replica recovered runs of
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def leader(self) -> bool:
        return self.leadership.held

    def start(self) -> Replica:
        """Join (membership row), try to lead once now, then keep checking in a thread."""
        self.member.acquire()
        self.check()
        self._thread = threading.Thread(target=self._loop, name="evertune-replica",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.check_s + 5)
        self.leadership.release()
        self.member.release()

    def check(self) -> None:
        """One round: take the lead if it is free (or its holder dead); recover dead peers."""
        if not self.leader:
            try:
                self.leadership.acquire()
            except WorkspaceLocked:
                pass
            else:
                log.info("replica %s leads: runs the bucket watcher, drift and canary monitors",
                         self.executor_id)
                self.on_leader()
        for holder in self.dead_peers():
            if self._claim(holder):
                dead = holder.name.removeprefix(MEMBER_PREFIX)
                log.warning("replica %s recovers the runs of dead replica %s (%s)",
                            self.executor_id, dead, holder.describe())
                self.recover([dead])
                self.recovered.append(dead)

    def dead_peers(self) -> list[Holder]:
        t = db.locks
        with self.ws.engine.connect() as conn:
            rows = conn.execute(select(t).where(t.c.name.startswith(MEMBER_PREFIX))).all()
        peers = [Holder(name=r.name, token=r.token, host=r.host, pid=r.pid, purpose=r.purpose,
                        started_at=r.started_at, heartbeat_at=r.heartbeat_at) for r in rows]
        return [h for h in peers if h.token != self.member.token
                and holder_dead(h, lease_s=self.lease_s) is not None]

    def _claim(self, holder: Holder) -> bool:
        """Delete a dead peer's row if it is still the one we read: True for the one winner."""
        t = db.locks
        with self.ws.engine.begin() as conn:
            gone = conn.execute(delete(t).where(t.c.name == holder.name,
                                                t.c.token == holder.token)).rowcount
        return gone == 1

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                self.check()
            except Exception as exc:  # the DB may be briefly unreachable: try next round
                log.warning("replica check failed (retrying in %.0f s): %s", self.check_s, exc)


def _dbos_recover(executor_ids: list[str]) -> None:
    from evertune import pipeline

    pipeline.recover_executors(executor_ids)
