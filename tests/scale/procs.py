"""Evertune processes for the scale tests: start `evertune …` children, poll, stop them.

    proc, port = start(ws, log, "up", "--no-serving", env={"AWS_ENDPOINT_URL": …})
    wait(lambda: healthy(port), 240, "replica a", [log])
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, text

from evertune.workspace import Workspace
from tests.postgres import free_port

# Slow training steps so a kill lands mid-training (the tiny model trains in a second).
STEP_DELAY = {"EVERTUNE_TEST_STEP_DELAY_S": "0.5"}


def start(ws: Workspace, log: Path, *args: str,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """`evertune -w WS ARGS --port P` as a child writing to `log`; returns it and its port."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evertune.cli", "-w", str(ws.root), *args, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **STEP_DELAY, **(env or {})},
            cwd=ws.root,
        )
    return proc, port


def health(port: int) -> dict[str, Any] | None:
    """The process's /healthz body, or None while it does not answer."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None


def wait(predicate: Callable[[], Any], timeout: float, what: str, logs: Iterable[Path]) -> Any:
    """Poll `predicate` until it returns something truthy; on timeout fail with the logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n"
                         + "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs))


def stop(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each live process (a clean shutdown), SIGKILL after 60 s."""
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGTERM)
    for proc in live:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def training_executor(engine: Engine, executors: Collection[str]) -> str | None:
    """The DBOS executor (one of `executors`) running a pipeline run whose job is training."""
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT w.executor_id FROM dbos.workflow_status w JOIN pipeline_runs r "
            "ON r.id = w.workflow_uuid JOIN jobs j ON j.run_id = r.id "
            "WHERE w.status = 'PENDING' AND j.status = 'running'")).first()
    return row[0] if row and row[0] in executors else None
