"""The state DB going away mid-run: pytest tests/scale/test_outage.py

An `evertune up` on its own PostgreSQL server trains a run; the server is stopped for a few
seconds mid-training and started again on the same data folder. The run must not be lost:
it ends succeeded with exactly one job and one version, and `up` keeps answering.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from evertune.registry import Registry
from evertune.workspace import Workspace
from tests.conftest import make_workspace
from tests.postgres import INSTALL_HINT, PostgresServer, pg_bin
from tests.scale.procs import health, start, stop, wait
from tests.test_pipeline import PIPELINE_SETTINGS, tickets

pytestmark = pytest.mark.slow


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own: stopping it must not touch the session's."""
    if pg_bin() is None:
        pytest.fail(f"the Postgres tests need Debian's postgresql; {INSTALL_HINT}")
    with PostgresServer() as server:
        yield server


def test_a_postgres_outage_mid_run_leaves_the_run_to_finish(
    tmp_path: Path, tiny_model: Path, own_postgres: PostgresServer
) -> None:
    url = own_postgres.create_database("evertune")
    ws = make_workspace(tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS,
                        storage={"state_db": url},
                        train={"n_epochs": 3, "checkpoint_every": 2})
    ws = Workspace.open(ws.root)
    log = tmp_path / "up.log"
    proc, port = start(ws, log, "up", "--no-serving")
    engine = create_engine(url, pool_pre_ping=True)

    def query(sql: str) -> list[tuple]:
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(sql))]
        except OperationalError:
            return []  # the server is down or just back

    procs: list[subprocess.Popen[bytes]] = [proc]
    try:
        wait(lambda: (h := health(port)) and h["status"] == "ok", 240, "up healthy", [log])
        (ws.root / ws.config.storage.bucket / "raw-data" / "tickets.jsonl").write_bytes(tickets(40))
        # Mid-training: the job has written a few steps' metrics.
        wait(lambda: query("SELECT count(*) FROM job_metrics WHERE step >= 2")[0][0] > 0,
             240, "training to be under way", [log])
        own_postgres.restart(down_s=5.0)

        def finished() -> str | None:
            rows = query("SELECT status FROM pipeline_runs")
            return rows[0][0] if rows and rows[0][0] in ("succeeded", "failed") else None

        assert wait(finished, 300, "the run to finish after the outage", [log]) == "succeeded", \
            log.read_text()[-4000:]
        assert query("SELECT count(*) FROM jobs") == [(1,)]
        assert len(Registry(ws).list_versions()) == 1
        assert proc.poll() is None, "up exited during the outage:\n" + log.read_text()[-4000:]
        assert wait(lambda: (h := health(port)) and h["status"] == "ok", 30, "up healthy again",
                    [log])
    finally:
        stop(procs)
