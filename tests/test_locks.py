"""The workspace lock: one `evertune up` per workspace; a dead holder's lock is taken over.

    .venv/bin/pytest tests/test_locks.py -q

The lock is a row in the real state DB; "another host" is a row written with another host
name, as a process on that host would write it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert, update

from evertune import db
from evertune.errors import WorkspaceLocked
from evertune.locks import LEASE_S, WorkspaceLock, pid_alive, read_holder
from evertune.workspace import Workspace
from tests.conftest import make_workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "ws")[0]


def _insert_holder(ws: Workspace, *, host: str, pid: int, heartbeat_age: float) -> None:
    now = time.time()
    with ws.engine.begin() as conn:
        conn.execute(
            insert(db.locks).values(
                name="workspace", token="t-other", host=host, pid=pid, purpose="evertune up",
                started_at=now - 3600, heartbeat_at=now - heartbeat_age,
            )
        )


def test_a_second_holder_is_refused_with_the_holder_named(ws: Workspace) -> None:
    first = WorkspaceLock(ws).acquire()
    try:
        with pytest.raises(WorkspaceLocked) as err:
            WorkspaceLock(ws).acquire()
        message = str(err.value)
        assert f"host {socket.gethostname()}, PID {os.getpid()}, since " in message
        assert str(ws.root) in message and "stop that process first" in message
    finally:
        first.release()
    assert read_holder(ws.engine) is None
    with WorkspaceLock(ws) as second:  # released: free for the next one
        assert second.held and second.taken_over is None


def test_the_lock_of_a_killed_process_on_this_host_is_taken_over(ws: Workspace) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from evertune.locks import WorkspaceLock\n"
        "from evertune.workspace import Workspace\n"
        "WorkspaceLock(Workspace.open(Path(sys.argv[1]))).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(ws.root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceLocked, match=f"PID {child.pid}"):
            WorkspaceLock(ws).acquire()
        child.send_signal(signal.SIGKILL)  # no cleanup runs: the row stays behind
        child.wait(10)
        assert read_holder(ws.engine).pid == child.pid  # type: ignore[union-attr]
        assert not pid_alive(child.pid)
        lock = WorkspaceLock(ws).acquire()
        try:
            assert lock.taken_over is not None and lock.taken_over.pid == child.pid
            holder = read_holder(ws.engine)
            assert holder is not None and holder.pid == os.getpid()
        finally:
            lock.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_another_hosts_lock_is_kept_while_its_lease_lasts(ws: Workspace) -> None:
    # PID 1 exists here, but on "build-7" it is another process: only the heartbeat counts.
    _insert_holder(ws, host="build-7", pid=1, heartbeat_age=5)
    with pytest.raises(WorkspaceLocked) as err:
        WorkspaceLock(ws).acquire()
    assert "host build-7, PID 1, since" in str(err.value)
    assert "last heartbeat 5 s ago" in str(err.value)


def test_another_hosts_lock_with_an_expired_lease_is_taken_over(ws: Workspace) -> None:
    _insert_holder(ws, host="build-7", pid=os.getpid(), heartbeat_age=LEASE_S + 5)
    with WorkspaceLock(ws) as lock:
        assert lock.taken_over is not None and lock.taken_over.host == "build-7"
        assert read_holder(ws.engine).token == lock.token  # type: ignore[union-attr]


def test_a_holder_that_loses_its_lock_is_told_and_leaves_the_successor_alone(
    ws: Workspace,
) -> None:
    lost = threading.Event()
    reasons: list[str] = []

    def on_lost(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    lock = WorkspaceLock(ws, heartbeat_s=0.05, on_lost=on_lost).acquire()
    # A successor took the row over while this holder was frozen past its lease.
    with ws.engine.begin() as conn:
        conn.execute(
            update(db.locks).values(token="successor", host="build-7", pid=4242)
        )
    assert lost.wait(30)
    assert "taken over by evertune up on host build-7, PID 4242" in reasons[0]
    assert not lock.held
    lock.release()
    assert read_holder(ws.engine).token == "successor"  # type: ignore[union-attr]


def test_heartbeats_keep_the_lease_fresh(ws: Workspace) -> None:
    with WorkspaceLock(ws, heartbeat_s=0.05) as lock:
        first = read_holder(ws.engine).heartbeat_at  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while read_holder(ws.engine).heartbeat_at == first:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.02)
        assert lock.held


# -- real `evertune up` processes ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up(ws: Workspace, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERTUNE_TEST_")}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evertune.cli", "-w", str(ws.root), "up", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ws.root,
        )
    return proc, port


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`evertune up` exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["status"] == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"`evertune up` not healthy after 300 s:\n{log.read_text()}")


@pytest.mark.slow
def test_evertune_up_is_one_per_workspace_and_a_killed_one_is_replaced(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        first, port = _up(ws, tmp_path / "first.log")
        procs.append(first)
        _wait_healthy(first, port, tmp_path / "first.log")

        second, _ = _up(ws, tmp_path / "second.log")
        procs.append(second)
        assert second.wait(120) == 1
        refused = (tmp_path / "second.log").read_text()
        assert "is already in use by evertune up" in refused
        assert f"host {socket.gethostname()}, PID {first.pid}, since " in refused

        first.send_signal(signal.SIGKILL)  # its lock row stays behind, holder dead
        first.wait(30)
        third, port = _up(ws, tmp_path / "third.log")
        procs.append(third)
        _wait_healthy(third, port, tmp_path / "third.log")
        assert f"PID {first.pid}" in (tmp_path / "third.log").read_text()  # "took over from"
        assert read_holder(ws.engine).pid == third.pid  # type: ignore[union-attr]

        third.send_signal(signal.SIGTERM)  # a clean stop releases the lock
        assert third.wait(120) == 128 + signal.SIGTERM, (tmp_path / "third.log").read_text()
        assert read_holder(ws.engine) is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


HOLD = """
import sys, time
from evertune.locks import exclusive
from evertune.workspace import Workspace
ws = Workspace.open(__import__("pathlib").Path(sys.argv[1]), sys.argv[2:])
with exclusive(ws, "deploy", timeout=30):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_the_deploy_lock_queues_holders_and_a_killed_holder_releases_it(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """One deploy operation at a time across processes (hosts, with Postgres: an advisory
    lock); a holder killed with -9 mid-operation does not leave the lock held."""
    from evertune.deploy import _locked
    from evertune.errors import LifecycleError

    Workspace.init(tmp_path / "ws")
    sets = [] if store == "sqlite" else [f"storage.state_db={request.getfixturevalue('pg_url')}"]
    ws = Workspace.open(tmp_path / "ws", sets)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ws.root), *sets],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with (pytest.raises(LifecycleError, match="held the deploy lock for over 0.5 s"),
              _locked(ws, timeout=0.5)):
            pass
        holder.kill()  # kill -9 while holding it
        holder.wait()
        started = time.monotonic()
        with _locked(ws, timeout=10):
            waited = time.monotonic() - started
        assert waited < 5
    finally:
        holder.kill()
