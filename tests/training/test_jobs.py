"""The job record and its lifecycle, without training anything.

pytest tests/training/test_jobs.py
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from evertune.errors import DataError, JobError, NotFoundError
from evertune.training import (
    TRANSITIONS,
    backends,
    cancel_job,
    create_job,
    get_job,
    jobs,
    list_events,
    list_jobs,
    resume_job,
    start_job,
    wait_job,
)
from evertune.workspace import Workspace


def test_create_job_snapshots_config_and_hyperparameters(workspace, sft_dataset):
    job = create_job(workspace, sft_dataset)
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status == "queued"
    assert job.training_file == sft_dataset.id
    assert job.model == workspace.config.model.base
    assert job.config == workspace.config.model_dump(mode="json")
    hp = job.hyperparameters
    assert hp["n_epochs"] == 1 and hp["batch_size"] == 4 and hp["learning_rate"] == 0.01
    assert hp["lora_r"] == 16 and hp["lora_target_modules"] == "all-linear"
    assert hp["max_seq_len"] == 128 and hp["batching"] == "group_by_length"
    messages = [e.message for e in list_events(workspace, job.id)]
    assert messages[0] == f"Validating training file: {sft_dataset.id}"
    assert "job queued" in messages[-1]
    assert all(e.level == "info" and e.created_at > 0 for e in list_events(workspace, job.id))
    wire = job.to_openai()
    assert wire["object"] == "fine_tuning.job" and isinstance(wire["created_at"], int)
    assert wire["method"]["type"] == "supervised" and wire["hyperparameters"]["n_epochs"] == 1
    json.dumps(wire)  # plain JSON


def test_create_job_is_idempotent_per_run_id(workspace, sft_dataset):
    first = create_job(workspace, sft_dataset, run_id="run-1")
    again = create_job(workspace, sft_dataset, run_id="run-1")
    other = create_job(workspace, sft_dataset, run_id="run-2")
    assert again.id == first.id and other.id != first.id
    assert {j.id for j in list_jobs(workspace)} == {first.id, other.id}


def test_create_job_refuses_unusable_datasets(workspace, sft_dataset):
    with pytest.raises(DataError, match="no training examples"):
        create_job(
            workspace, dataclasses.replace(sft_dataset, counts={**sft_dataset.counts, "train": 0})
        )
    sft_ws = Workspace.open(workspace.root, [*workspace.overrides, "train.method=supervised"])
    with pytest.raises(DataError, match="method 'supervised' trains on input/output"):
        create_job(sft_ws, dataclasses.replace(sft_dataset, kind="dpo"))
    dpo_ws = Workspace.open(workspace.root, [*workspace.overrides, "train.method=dpo"])
    with pytest.raises(DataError, match="preference pairs"):
        create_job(dpo_ws, sft_dataset)
    with pytest.raises(JobError, match="not a training method"):
        create_job(workspace, sft_dataset, method="rlhf")
    assert list_jobs(workspace) == []  # nothing half-made


def test_illegal_transitions_name_the_allowed_ones(workspace, sft_dataset):
    job = create_job(workspace, sft_dataset)
    with pytest.raises(
        JobError, match=r"queued; it cannot become succeeded.*cancelled, failed, running"
    ):
        jobs.transition(workspace, job.id, "succeeded")
    jobs.transition(workspace, job.id, "running")
    jobs.transition(workspace, job.id, "succeeded", result={"path": "/x", "kind": "lora"})
    for to in TRANSITIONS:
        with pytest.raises(JobError, match="nothing \\(it is final\\)"):
            jobs.transition(workspace, job.id, to)  # type: ignore[arg-type]
    with pytest.raises(JobError, match="already succeeded"):
        cancel_job(workspace, job.id)
    with pytest.raises(JobError, match="already succeeded"):
        resume_job(workspace, job.id)
    with pytest.raises(JobError, match="only a queued job can start"):
        start_job(workspace, job.id)
    with pytest.raises(NotFoundError, match=job.id):  # the hint lists recent jobs
        get_job(workspace, "ftjob-nope")


def test_cancel_a_job_that_never_started(workspace, sft_dataset, monkeypatch):
    job = create_job(workspace, sft_dataset)
    job = cancel_job(workspace, job.id)
    assert job.status == "cancelled" and job.finished_at is not None
    with pytest.raises(JobError, match="already cancelled"):
        cancel_job(workspace, job.id)
    # resume = queued again, then started on the backend
    started = []
    monkeypatch.setattr(
        backends.LocalBackend,
        "start",
        lambda self, ws, j, folder: started.append(j.id) or (None, "h"),
    )
    job = resume_job(workspace, job.id)
    assert started == [job.id] and job.status == "running" and job.error is None
    assert (
        json.loads((jobs.job_dir(workspace, job.id) / "job.json").read_text())["job_id"] == job.id
    )
    assert "Job resumed from the start" in [e.message for e in list_events(workspace, job.id)][-2]


def test_wait_notices_a_dead_child(workspace, sft_dataset, monkeypatch):
    # A "training process" that exits at once without touching the DB, like a kill -9.
    def start(self, ws, job, folder):
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        return proc.pid, jobs.socket.gethostname()

    monkeypatch.setattr(backends.LocalBackend, "start", start)
    job = start_job(workspace, create_job(workspace, sft_dataset).id)
    assert job.status == "running"
    job = wait_job(workspace, job.id, poll=0.05, timeout=20)
    assert job.status == "failed" and job.error["code"] == "process_died"
    assert f"evertune jobs resume {job.id}" in job.error["message"]
    assert list_events(workspace, job.id)[-1].level == "error"


def test_wait_times_out_and_refuses_a_job_nobody_started(workspace, sft_dataset, monkeypatch):
    job = create_job(workspace, sft_dataset)
    with pytest.raises(JobError, match="never started"):
        wait_job(workspace, job.id)
    monkeypatch.setattr(
        backends.LocalBackend, "start", lambda self, ws, j, folder: (None, "elsewhere")
    )
    start_job(workspace, job.id)
    with pytest.raises(JobError, match="still running after"):
        wait_job(workspace, job.id, poll=0.01, timeout=0.05)


def test_ray_backend_says_how_to_install(workspace, sft_dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    ws = Workspace.open(workspace.root, [*workspace.overrides, "train.backend=ray"])
    job = create_job(ws, sft_dataset)
    with pytest.raises(JobError, match=r"evertune\[ray\]"):
        start_job(ws, job.id)
    job = get_job(ws, job.id)
    assert job.status == "failed" and job.error["code"] == "start_failed"


def _start_elsewhere(monkeypatch):
    """Backends start nothing: the job runs "on another host", so no process is checked."""
    monkeypatch.setattr(
        backends.LocalBackend, "start", lambda self, ws, j, folder: (None, "elsewhere")
    )


def test_pause_then_resume_from_the_newest_checkpoint(workspace, sft_dataset, monkeypatch):
    _start_elsewhere(monkeypatch)
    job = create_job(workspace, sft_dataset)
    with pytest.raises(JobError, match="queued; only a running job can be paused"):
        jobs.pause_job(workspace, job.id)
    job = start_job(workspace, job.id)
    assert jobs.stop_requested(workspace, job.id) is None

    job = jobs.pause_job(workspace, job.id)
    assert job.status == "running"  # until the training loop honours it
    assert jobs.stop_requested(workspace, job.id) == "paused"
    jobs.pause_job(workspace, job.id)  # asking twice is one request
    messages = [e.message for e in list_events(workspace, job.id)]
    assert sum("Pause requested" in m for m in messages) == 1
    with pytest.raises(JobError, match="still running.*a pause was asked for"):
        resume_job(workspace, job.id)

    # What the training loop does on "paused": a checkpoint, then the transition.
    ckpt = jobs.job_dir(workspace, job.id) / "checkpoints" / "step-3"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    job = jobs.transition(workspace, job.id, "paused", message="Job paused at step 3")
    assert job.status == "paused" and not job.finished and job.finished_at is None
    assert jobs.check_alive(workspace, job.id).status == "paused"
    assert job.to_openai()["status"] == "paused"
    with pytest.raises(JobError, match="already paused"):
        jobs.pause_job(workspace, job.id)
    with pytest.raises(JobError, match="paused; only a queued job can start.*jobs resume"):
        start_job(workspace, job.id)

    job = resume_job(workspace, job.id)
    assert job.status == "running" and jobs.stop_requested(workspace, job.id) is None
    assert [e.message for e in list_events(workspace, job.id)][-2] == (
        "Job resumed from checkpoint step-3"
    )


def test_cancel_wins_over_pause_and_a_paused_job_cancels_at_once(
    workspace, sft_dataset, monkeypatch
):
    _start_elsewhere(monkeypatch)
    job = start_job(workspace, create_job(workspace, sft_dataset).id)
    jobs.pause_job(workspace, job.id)
    cancel_job(workspace, job.id)
    assert jobs.stop_requested(workspace, job.id) == "cancelled"
    with pytest.raises(JobError, match="being cancelled"):
        jobs.pause_job(workspace, job.id)

    job = start_job(workspace, create_job(workspace, sft_dataset).id)
    jobs.transition(workspace, job.id, "paused", message="Job paused at step 1")
    job = cancel_job(workspace, job.id)
    assert job.status == "cancelled" and job.finished_at is not None
    assert list_events(workspace, job.id)[-1].message == "Job cancelled while paused"
    with pytest.raises(JobError, match="cancelled; only a running job can be paused"):
        jobs.pause_job(workspace, job.id)


def test_to_openai_renders_the_method_like_openai(workspace, sft_dataset):
    dpo = dataclasses.replace(sft_dataset, kind="dpo")  # only the kind is read here
    job = create_job(workspace, dpo, method="dpo")
    method = job.to_openai()["method"]
    assert method["type"] == "dpo" and list(method) == ["type", "dpo"]
    hp = method["dpo"]["hyperparameters"]
    assert list(hp)[:4] == ["n_epochs", "batch_size", "learning_rate_multiplier", "beta"]
    assert hp["beta"] == 0.1 and hp["n_epochs"] == 1 and hp["learning_rate_multiplier"] == "auto"
    assert hp["loss_type"] == "sigmoid" and hp["lora_r"] == 16  # our own record follows
    sft = create_job(workspace, sft_dataset).to_openai()["method"]
    assert sft["type"] == "supervised" and "beta" not in sft["supervised"]["hyperparameters"]
