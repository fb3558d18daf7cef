"""Several `evertune up` replicas on one PostgreSQL state DB: pytest tests/scale/test_replicas.py

Two real `evertune up --no-serving` processes share a workspace folder and a Postgres server
started on loopback (tests/postgres.py). A drop starts exactly one run; the replica executing
it is killed with -9 mid-training; the other takes over the lead, recovers the run through
DBOS and finishes it; exactly one version is registered.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from evertune.registry import Registry
from evertune.workspace import Workspace
from tests.conftest import make_workspace
from tests.scale.procs import health, start, stop, training_executor, wait
from tests.test_pipeline import PIPELINE_SETTINGS, tickets

pytestmark = pytest.mark.slow


def test_replicas_start_one_run_per_drop_and_recover_a_killed_replicas_run(
    tmp_path: Path, tiny_model: Path, pg_url: str
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS,
                        storage={"state_db": pg_url},
                        train={"n_epochs": 2, "checkpoint_every": 2})
    ws = Workspace.open(ws.root)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for name, log in zip("ab", logs, strict=True):
            procs[name] = start(ws, log, "up", "--no-serving")
        status = {name: wait(lambda p=port: (h := health(p)) and h["status"] == "ok" and h,
                              240, f"replica {name} healthy", logs)
                  for name, (_, port) in procs.items()}
        roles = sorted(h["role"] for h in status.values())
        assert roles == ["follower", "leader"], status  # one watcher for the workspace
        executors = {h["replica"]: name for name, h in status.items()}

        drop = ws.root / ws.config.storage.bucket / "raw-data" / "tickets.jsonl"
        drop.write_bytes(tickets(40))
        engine = create_engine(pg_url)

        training = wait(lambda: training_executor(engine, executors), 240,
                        "a replica training the run",
                        logs)
        victim = executors[training]
        proc, _ = procs.pop(victim)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        survivor, (_, port) = next(iter(procs.items()))

        def finished() -> str | None:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT status FROM pipeline_runs")).scalars().all()
            return rows[0] if rows and rows[0] in ("succeeded", "failed") else None

        assert wait(finished, 300, "the run to finish on the survivor", logs) == "succeeded"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pipeline_runs")).scalar() == 1
        assert len(Registry(ws).list_versions()) == 1  # registered once, not per replica
        survivor_health = health(port)
        assert survivor_health is not None and survivor_health["role"] == "leader"
        with engine.connect() as conn:  # DBOS handed the run to the survivor's executor
            (executor,) = conn.execute(text(
                "SELECT executor_id FROM dbos.workflow_status w JOIN pipeline_runs r "
                "ON r.id = w.workflow_uuid")).scalars().all()
        assert executors.get(executor) == survivor, (executor, executors, victim)
    finally:
        stop(proc for proc, _ in procs.values())
