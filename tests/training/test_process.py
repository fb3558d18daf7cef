"""Real training child processes: cancel one mid-run; kill -9 one and resume it.

    pytest tests/training/test_process.py

The tiny model trains faster than a test can react, so these tests slow every step down
with EVERTUNE_TEST_STEP_DELAY_S (read by the recipe; the child inherits the environment).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from evertune.training import (
    cancel_job,
    create_job,
    get_job,
    list_checkpoints,
    list_events,
    list_metrics,
    resume_job,
    run_finetune,
    start_job,
    wait_job,
)
from evertune.training.jobs import job_dir, newest_checkpoint, process_alive
from evertune.workspace import Workspace

pytestmark = pytest.mark.slow  # each test starts real training processes (~5 s each)

DELAY = "EVERTUNE_TEST_STEP_DELAY_S"


def wait_for(predicate, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def last_step(ws: Workspace, job_id: str) -> int:
    return max((r["step"] for r in list_metrics(ws, job_id) if "train_loss" in r), default=0)


def test_cancel_stops_a_running_child_within_a_step(workspace, sft_dataset, monkeypatch):
    monkeypatch.setenv(DELAY, "0.3")
    ws = Workspace.open(workspace.root, [*workspace.overrides, "train.n_epochs=3"])
    job = start_job(ws, create_job(ws, sft_dataset).id)
    assert job.status == "running" and job.pid and process_alive(job)

    wait_for(lambda: last_step(ws, job.id) >= 2, "two training steps")
    assert cancel_job(ws, job.id).cancel_requested
    requested_at = last_step(ws, job.id)  # read after the request: a slow test can't skew it
    job = wait_job(ws, job.id, poll=0.1, timeout=60)

    assert job.status == "cancelled" and job.error is None
    # The step that was running when the cancel arrived finishes; no other starts.
    assert requested_at <= last_step(ws, job.id) <= requested_at + 1
    assert last_step(ws, job.id) < 3 * -(-sft_dataset.counts["train"] // 4)  # stopped early
    assert any("Job cancelled at step" in e.message for e in list_events(ws, job.id))
    wait_for(lambda: process_alive(job) is False, "the child to exit", timeout=15)


def test_kill_9_then_resume_continues_from_the_last_checkpoint(workspace, sft_dataset, monkeypatch):
    monkeypatch.setenv(DELAY, "0.2")
    ws = Workspace.open(
        workspace.root, [*workspace.overrides, "train.n_epochs=2"]
    )  # checkpoint_every = 2
    job = start_job(ws, create_job(ws, sft_dataset).id)
    total = 2 * -(-sft_dataset.counts["train"] // 4)

    wait_for(lambda: any(c.step_number >= 4 for c in list_checkpoints(ws, job.id)), "checkpoint 4")
    os.kill(job.pid, signal.SIGKILL)
    job = wait_job(ws, job.id, poll=0.1, timeout=30)
    assert job.status == "failed" and job.error["code"] == "process_died"
    assert f"evertune jobs resume {job.id}" in job.error["message"]
    killed_at = last_step(ws, job.id)
    ckpt = newest_checkpoint(job_dir(ws, job.id))
    resume_step = int(ckpt.name.removeprefix("step-"))
    assert 4 <= resume_step <= killed_at < total

    monkeypatch.delenv(DELAY)
    job = resume_job(ws, job.id)
    assert job.status == "running" and job.error is None
    job = wait_job(ws, job.id, poll=0.1, timeout=90)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in list_events(ws, job.id)]
    assert f"Job resumed from checkpoint step-{resume_step}" in messages
    per_epoch = total // 2
    epoch, batch = resume_step // per_epoch + 1, resume_step % per_epoch
    assert f"Resumed from checkpoint step {resume_step} (epoch {epoch}, batch {batch})" in messages
    # The resumed process logged exactly the steps after the checkpoint, up to the total.
    rows = [r["step"] for r in list_metrics(ws, job.id) if "train_loss" in r]
    assert rows[-(total - resume_step) :] == list(range(resume_step + 1, total + 1))
    assert get_job(ws, job.id).result["kind"] == "lora"
    # One log across both processes: two starts, one end (the killed one never reported).
    assert (job_dir(ws, job.id) / "train.log").read_text().count("[evertune] job") == 3


def test_run_finetune_is_idempotent_per_run_id(workspace, sft_dataset):
    seen: list[dict] = []
    job = run_finetune(workspace, sft_dataset, on_progress=seen.append, run_id="run-7")
    assert job.status == "succeeded" and job.run_id == "run-7", job.error
    assert seen and seen[-1]["step"] == seen[-1]["total_steps"] and seen[-1]["eta"] == 0
    assert {"loss", "tokens_per_s", "val_loss"} <= seen[-1].keys()
    again = run_finetune(workspace, sft_dataset, run_id="run-7")  # a re-run pipeline step
    assert again.id == job.id and again.finished_at == job.finished_at  # not trained twice


def test_a_child_checked_right_after_it_started_is_alive():
    """Right after exec the kernel shows an empty /proc/PID/cmdline for a moment: a check made
    then (a pipeline step polling a job it just resumed) must not call the job dead."""
    from evertune.training.jobs import _pid_alive

    children = []
    for _ in range(60):
        child = subprocess.Popen(["sh", "-c", "sleep 2", "evertune.training.run"],
                                 start_new_session=True)
        children.append(child)
        assert _pid_alive(child.pid)
    for child in children:
        child.kill()
        child.wait()
