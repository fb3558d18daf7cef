"""The official `openai` client against the rest of the fine-tuning API: training methods
(`method={"type": "dpo", …}`), pause / resume, file content and deletion.

pytest tests/api/test_openai_methods.py

The jobs here train for real (a child process on the tiny model) but without a pipeline run:
`JobStarter` stands in for `pipeline.start_run` and starts the job at once, so a job ends
`succeeded` after training, with no evaluation or registration (test_openai_client.py covers
the run the API queues).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from evertune.training import jobs
from evertune.workspace import Workspace
from tests.api.conftest import RunRecorder, make_app
from tests.api.helpers import TEAMS, TICKETS, write_jsonl
from tests.api.test_openai_client import openai_client, serve

# Preference pairs: the right team is chosen, the next one rejected.
PAIRS = [
    {"prompt": f"Ticket {i}: please route my {TEAMS[i % 5]} question",
     "chosen": TEAMS[i % 5], "rejected": TEAMS[(i + 1) % 5]}
    for i in range(24)
]
FINAL = ("succeeded", "failed", "cancelled")
STEP_DELAY = "EVERTUNE_TEST_STEP_DELAY_S"  # read by the training loop; the child inherits it


class JobStarter(RunRecorder):
    """Stands in for `pipeline.start_run`: records the trigger and starts its job at once."""

    def __call__(self, ws: Workspace, trigger: dict[str, Any]) -> str:
        run_id = super().__call__(ws, trigger)
        (job,) = [j for j in jobs.list_jobs(ws) if j.run_id == run_id]
        jobs.start_job(ws, job.id)
        return run_id


@pytest.fixture
def ws(api_ws: tuple[Workspace, str]) -> Workspace:
    """The API workspace, training on one thread (as tests/training does: on a busy 2-core
    machine a second thread waits at every op for a core another process holds)."""
    return Workspace.open(api_ws[0].root, [*api_ws[0].overrides, "train.threads=1"])


@pytest.fixture
def starter() -> JobStarter:
    return JobStarter()


@pytest.fixture
def client(ws: Workspace, tokens: dict[str, str], starter: JobStarter) -> Iterator[OpenAI]:
    with serve(make_app(ws, starter)) as url:
        yield openai_client(url, tokens["operator"])


def wait_status(client: OpenAI, job_id: str, wanted: tuple[str, ...], timeout: float = 240) -> Any:
    """Poll `retrieve` until the job's status is one of `wanted`; the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in wanted:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout} s"
        time.sleep(0.2)


def test_a_dpo_job_with_the_official_client(
    client: OpenAI, ws: Workspace, starter: JobStarter, tmp_path: Path
) -> None:
    f = client.files.create(file=write_jsonl(tmp_path / "pairs.jsonl", PAIRS).open("rb"),
                            purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        training_file=f.id, model=ws.config.model.name,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
    )
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    hp = job.method.dpo.hyperparameters
    assert hp.beta == 0.2 and hp.n_epochs == 1 and hp.learning_rate_multiplier == 1.0
    (trigger,) = starter.triggers
    assert trigger["overrides"] == ["train.method=dpo", "train.n_epochs=1", "train.dpo.beta=0.2"]

    job = wait_status(client, job.id, FINAL)
    assert job.status == "succeeded", job.error  # needs the DPO recipe (training/dpo.py)
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2  # type: ignore[union-attr]
    assert job.trained_tokens and job.trained_tokens > 0
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert all(e.object == "fine_tuning.job.event" for e in events)
    messages = [e.message for e in events]  # newest first
    assert any("job queued" in m for m in messages) and "started" in " ".join(messages)


def test_methods_and_their_hyperparameters_are_checked(
    client: OpenAI, ws: Workspace, starter: JobStarter, tmp_path: Path
) -> None:
    tickets = client.files.create(
        file=write_jsonl(tmp_path / "tickets.jsonl", TICKETS[:20]).open("rb"), purpose="fine-tune")
    create = client.fine_tuning.jobs.create

    def refused(method: dict[str, Any], file_id: str = tickets.id) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as info:
            create(training_file=file_id, model=ws.config.model.name, method=method)  # type: ignore[arg-type]
        return info.value

    err = refused({"type": "reinforcement"})
    assert err.param == "method.type" and "graders" in err.message and "dpo" in err.message
    err = refused({"type": "rlhf"})
    assert err.param == "method.type" and "supervised, pretrain, dpo, kto" in err.message
    err = refused({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}})
    assert err.param == "method.dpo.hyperparameters.beta" and "greater than 0" in err.message
    err = refused({"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}})
    assert err.param == "method.supervised.hyperparameters.beta"
    err = refused({"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    assert err.param == "method.supervised" and "method.dpo" in err.message
    err = refused({"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": "many"}}})
    assert err.param == "method.dpo.hyperparameters.n_epochs"
    # A supervised file cannot train DPO: the error says which records DPO needs.
    err = refused({"type": "dpo"})
    assert err.param == "training_file" and err.code == "invalid_file"
    assert '{"prompt", "chosen", "rejected"} preference pairs' in err.message
    assert "method type 'supervised'" in err.message
    assert starter.triggers == [] and client.fine_tuning.jobs.list().data == []

    # "auto" keeps the workspace's value; the job is supervised.
    job = create(training_file=tickets.id, model=ws.config.model.name, method={
        "type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}}})
    assert job.method is not None and job.method.type == "supervised"
    assert starter.triggers[0]["overrides"] == ["train.method=supervised"]
    client.fine_tuning.jobs.cancel(job.id)


def test_pause_and_resume_a_running_job(
    client: OpenAI, ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STEP_DELAY, "0.4")  # about 16 steps of 0.4 s: time to pause mid-way
    f = client.files.create(file=write_jsonl(tmp_path / "tickets.jsonl", TICKETS).open("rb"),
                            purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name,
                                         hyperparameters={"n_epochs": 2})
    assert job.status == "running"
    deadline = time.monotonic() + 120
    while not jobs.list_metrics(ws, job.id):  # wait for the first step to be trained
        assert time.monotonic() < deadline, "the job trained no step in 120 s"
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
        time.sleep(0.1)

    asked = client.fine_tuning.jobs.pause(job.id)
    assert asked.id == job.id and asked.status in ("running", "paused")
    paused = wait_status(client, job.id, ("paused", *FINAL), timeout=60)
    assert paused.status == "paused" and paused.finished_at is None
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints, "a paused job keeps a checkpoint to resume from"
    paused_at = checkpoints[0].step_number
    with pytest.raises(openai.ConflictError, match="already paused"):
        client.fine_tuning.jobs.pause(job.id)
    deadline = time.monotonic() + 60
    while jobs.process_alive(jobs.get_job(ws, job.id)):  # the child ends after pausing
        assert time.monotonic() < deadline, "the paused job's process did not end in 60 s"
        time.sleep(0.1)
    assert jobs.check_alive(ws, job.id).status == "paused"  # not taken for a dead process

    monkeypatch.setenv(STEP_DELAY, "0")
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "running"
    with pytest.raises(openai.ConflictError, match="still running"):
        client.fine_tuning.jobs.resume(job.id)
    done = wait_status(client, job.id, FINAL)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any("Pause requested" in m for m in messages)
    assert any(f"Job paused at step {paused_at}" in m for m in messages)
    assert any(f"Job resumed from checkpoint step-{paused_at}" in m for m in messages)
    with pytest.raises(openai.ConflictError, match="only a running job can be paused"):
        client.fine_tuning.jobs.pause(job.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.pause("ftjob-nope")


def test_file_content_and_deletion(
    ws: Workspace, tokens: dict[str, str], recorder: RunRecorder, tmp_path: Path
) -> None:
    from evertune.data.store import get_dataset

    data = write_jsonl(tmp_path / "tickets.jsonl", TICKETS[:20])
    with serve(make_app(ws, recorder)) as url:  # jobs stay queued: nothing trains here
        client = openai_client(url, tokens["operator"])
        f = client.files.create(file=data.open("rb"), purpose="fine-tune")
        assert client.files.content(f.id).content == data.read_bytes()

        job = client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name)
        with pytest.raises(openai.ConflictError) as info:
            client.files.delete(f.id)
        assert info.value.param == "file_id" and info.value.code == "file_in_use"
        assert f"{job.id} (queued)" in info.value.message and "cancel" in info.value.message
        assert client.files.retrieve(f.id).id == f.id  # still there

        client.fine_tuning.jobs.cancel(job.id)  # finished: the file may go
        deleted = client.files.delete(f.id)
        assert deleted.id == f.id and deleted.deleted and deleted.object == "file"
        for call in (client.files.retrieve, client.files.content, client.files.delete):
            with pytest.raises(openai.NotFoundError, match="no such file"):
                call(f.id)
        assert client.files.list().data == []
        assert get_dataset(ws, job.training_file).id == job.training_file  # the data stays
        assert client.fine_tuning.jobs.retrieve(job.id).training_file == job.training_file
        with pytest.raises(openai.NotFoundError) as info:
            client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name)
        assert info.value.param == "training_file"
        with pytest.raises(openai.PermissionDeniedError):
            openai_client(url, tokens["viewer"]).files.delete("file-" + "0" * 24)
