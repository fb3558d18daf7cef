"""kill -9 the control process in each long step; the restarted process finishes the same run.

    .venv/bin/pytest tests/e2e/test_crash_recovery.py -q

One run of the real pipeline on the tiny model, four processes in a row, each killed with
SIGKILL at a chosen point (the pipeline's test hook `EVERTUNE_TEST_PAUSE_IN_STEP` holds a step
there; slow training steps come from the training hook `EVERTUNE_TEST_STEP_DELAY_S`):

1. killed during FineTuning, after the job's first checkpoint, and the training child killed
   too: the restart resumes the job from that checkpoint;
2. killed during ModelEvaluation: the restart evaluates again;
3. killed during RegisterModel just after the version was created in MLflow, before the step
   was recorded: the restart must find that version, not register a second one;
4. runs to the end: one run, one job, exactly one registered version.

The process is the real `evertune up` (`python -m evertune.cli -w WS up --port P`): control
API, pipeline runtime, bucket watcher and serving gateway in one process, as deployed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from evertune import pipeline
from evertune.bucket import Bucket
from evertune.registry import Registry
from evertune.training import jobs
from evertune.workspace import Workspace
from tests.conftest import make_workspace
from tests.test_pipeline import PIPELINE_SETTINGS, tickets

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Control:
    """One `evertune up` process, its output appended to `log`."""

    def __init__(self, ws: Workspace, log: Path, pause: str | None, step_delay: float = 0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVERTUNE_TEST_")}
        if pause:
            env[pipeline.PAUSE_ENV] = pause
        if step_delay:
            env["EVERTUNE_TEST_STEP_DELAY_S"] = str(step_delay)  # inherited by the training child
        port = str(_free_port())
        cmd = [sys.executable, "-m", "evertune.cli", "-w", str(ws.root), "up", "--port", port]
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._out, stderr=subprocess.STDOUT, cwd=ws.root
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the process."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"control process exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
            )


def _wait(ctl: Control, predicate: Any, what: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ctl.check_alive()
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}:\n{ctl.log.read_text()[-4000:]}"
    )


def _run(ws: Workspace) -> pipeline.Run | None:
    runs = pipeline.list_runs(ws)
    assert len(runs) <= 1, f"one object must start one run, got {[r.id for r in runs]}"
    return runs[0] if runs else None


def _paused_in(ws: Workspace, step: str) -> bool:
    run = _run(ws)
    return (
        run is not None
        and any("test hook" in line["message"] for line in run.step(step).logs[-3:])
        and run.step(step).status == "running"
    )


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z")


def test_kill_9_in_each_step_resumes_the_same_run(tmp_path: Path, tiny_model: Path) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS)
    log = tmp_path / "control.log"
    Bucket.for_workspace(ws).write_bytes("raw-data/tickets.jsonl", tickets())
    controls: list[Control] = []
    try:
        # 1. FineTuning: kill the control process and the training child after a checkpoint.
        ctl = Control(ws, log, pause=None, step_delay=0.6)
        controls.append(ctl)
        job_id = _wait(ctl, lambda: (r := _run(ws)) and r.job_id, "the training job")
        _wait(ctl, lambda: jobs.list_checkpoints(ws, job_id), "the job's first checkpoint")
        job = jobs.get_job(ws, job_id)
        assert job.status == "running" and _run(ws).current_step == "FineTuning"
        ctl.kill()
        os.kill(job.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _pid_gone(job.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        checkpoint = jobs.list_checkpoints(ws, job_id)[0].step_number
        assert (
            checkpoint >= 2 and jobs.get_job(ws, job_id).status == "running"
        )  # nobody noticed yet

        # 2. ModelEvaluation: the restart resumes training from the checkpoint, then evaluates.
        ctl = Control(ws, log, pause="ModelEvaluation")
        controls.append(ctl)
        _wait(ctl, lambda: _paused_in(ws, "ModelEvaluation"), "ModelEvaluation (paused)")
        run = _run(ws)
        assert run.step("DataPreprocessing").attempts == 1  # finished steps are not re-run
        assert run.step("FineTuning").attempts == 2 and run.step("FineTuning").status == "succeeded"
        assert any(
            f"resumed from checkpoint step-{checkpoint}" in line["message"]
            for line in run.step("FineTuning").logs
        )
        job = jobs.get_job(ws, job_id)
        assert job.status == "succeeded"
        messages = [e.message for e in jobs.list_events(ws, job_id)]
        assert any(f"resumed from checkpoint step-{checkpoint}" in m for m in messages), messages
        ctl.kill()

        # 3. RegisterModel: killed after the MLflow version exists, before the step is recorded.
        ctl = Control(ws, log, pause="RegisterModel:after")
        controls.append(ctl)
        _wait(ctl, lambda: _paused_in(ws, "RegisterModel"), "RegisterModel (paused after work)")
        run = _run(ws)
        assert run.step("ModelEvaluation").attempts == 2
        assert run.step("ModelEvaluation").status == "succeeded"
        assert [v.version for v in Registry(ws).list_versions()] == [1]
        ctl.kill()

        # 4. The last restart finishes the run; nothing was done twice.
        ctl = Control(ws, log, pause=None)
        controls.append(ctl)
        run = _wait(ctl, lambda: (r := _run(ws)) and r.finished and r, "the run to finish")
        assert run.status == "succeeded", run.error
        assert run.version == 1
        assert [s.attempts for s in run.steps] == [1, 2, 2, 2]
        assert all(s.status == "succeeded" for s in run.steps)
        versions = Registry(ws).list_versions()
        assert [(v.version, v.job, v.pipeline_run) for v in versions] == [(1, job_id, run.id)]
        assert [j.id for j in jobs.list_jobs(ws)] == [job_id]
        time.sleep(0.5)  # a few more watcher scans: the object must not start a second run
        assert len(pipeline.list_runs(ws)) == 1
    finally:
        for ctl in controls:
            if ctl.proc.poll() is None:
                ctl.kill()
