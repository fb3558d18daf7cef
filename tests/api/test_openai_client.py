"""The official `openai` client against the fine-tuning API, served by uvicorn on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import uvicorn
from fastapi import FastAPI
from openai import OpenAI

from evertune.workspace import Workspace
from tests.api.conftest import RunRecorder, make_app
from tests.api.helpers import TICKETS, write_jsonl


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free loopback port; yield its /v1 base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves this very socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def openai_client(base_url: str, token: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=60)


def test_fine_tuning_with_the_official_client(
    api_ws: tuple[Workspace, str], tokens: dict[str, str], recorder: RunRecorder, tmp_path: Path
) -> None:
    ws, _ = api_ws
    data = write_jsonl(tmp_path / "upload.jsonl", TICKETS[:30])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n{"input": "d", "output": 7}\n')
    with serve(make_app(ws, recorder)) as url:
        client = openai_client(url, tokens["operator"])

        f = client.files.create(file=data.open("rb"), purpose="fine-tune")
        assert f.id.startswith("file-") and f.filename == "upload.jsonl" and f.bytes > 0
        assert f.purpose == "fine-tune" and f.status == "processed"
        assert client.files.retrieve(f.id).bytes == f.bytes
        assert [x.id for x in client.files.list()] == [f.id]

        with pytest.raises(openai.BadRequestError) as info:
            client.files.create(file=bad.open("rb"), purpose="fine-tune")
        err = info.value
        assert err.status_code == 400 and err.code == "invalid_file" and err.param == "file"
        assert "bad.jsonl has 2 invalid row(s) of 3" in err.message
        assert "line 2: output: missing field 'output'" in err.message
        assert "line 3: output" in err.message

        job = client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name,
                                             hyperparameters={"n_epochs": 2}, seed=7)
        assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
        assert job.status == "queued" and job.training_file.startswith("ds-")
        assert job.hyperparameters.n_epochs == 2 and job.model == ws.config.model.base
        assert job.fine_tuned_model is None
        # The run went to the pipeline with the file, dataset and overrides of this job.
        (trigger,) = recorder.triggers[:1]
        assert trigger["source"] == "api" and trigger["run_id"].startswith("run-api-")
        assert trigger["dataset"] == job.training_file and trigger["file_id"] == f.id
        assert trigger["overrides"] == ["train.n_epochs=2", "train.seed=7"]
        assert Path(trigger["file"]).read_bytes() == data.read_bytes()
        assert job.metadata == {"parent": None, "run_id": trigger["run_id"]}

        assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
        assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
        events = client.fine_tuning.jobs.list_events(job.id)
        assert events.data[0].object == "fine_tuning.job.event"
        assert "job queued" in events.data[0].message  # newest first, as OpenAI lists them
        assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []

        # A retried create with the same Idempotency-Key is the same run and the same job.
        once = {"Idempotency-Key": "retry-me"}
        first = client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name,
                                               extra_headers=once)
        again = client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name,
                                               extra_headers=once)
        assert again.id == first.id != job.id
        assert recorder.triggers[1]["run_id"] == recorder.triggers[2]["run_id"]
        page = client.fine_tuning.jobs.list(limit=1)
        assert [j.id for j in page.data] == [first.id] and page.has_more
        # Iterating a page follows the `after` cursor through every page, as with OpenAI.
        assert [j.id for j in page] == [first.id, job.id]

        cancelled = client.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled" and cancelled.finished_at is not None
        with pytest.raises(openai.ConflictError, match="already cancelled"):
            client.fine_tuning.jobs.cancel(job.id)

        with pytest.raises(openai.BadRequestError) as info:
            client.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini")
        assert info.value.param == "model" and "is not available" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:
            client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name,
                                           hyperparameters={"n_epochs": 0})
        assert "n_epochs" in (info.value.param or "")
        with pytest.raises(openai.NotFoundError) as info:
            client.fine_tuning.jobs.retrieve("ftjob-nope")
        assert "no fine-tuning job 'ftjob-nope'" in info.value.message
        with pytest.raises(openai.PermissionDeniedError, match="role viewer, which cannot start"):
            openai_client(url, tokens["viewer"]).fine_tuning.jobs.create(
                training_file=f.id, model=ws.config.model.name)
        with pytest.raises(openai.AuthenticationError, match="not recognised"):
            openai_client(url, "evt_wrong").fine_tuning.jobs.list()
        assert len(recorder.triggers) == 3  # refused requests started nothing


def test_a_job_runs_through_the_real_pipeline(
    api_ws: tuple[Workspace, str], tokens: dict[str, str], tmp_path: Path
) -> None:
    """No seam: the job's run is queued on the real DBOS pipeline, whose FineTuning step finds
    the job the API created (by run id). Cancelling it at once keeps the test short: the run
    ends failed with the job's cancellation, having trained nothing."""
    from evertune import pipeline

    ws, _ = api_ws
    data = write_jsonl(tmp_path / "upload.jsonl", TICKETS[:30])
    pipeline.launch(ws, warm=False)
    try:
        with serve(make_app(ws)) as url:
            client = openai_client(url, tokens["operator"])
            f = client.files.create(file=data.open("rb"), purpose="fine-tune")
            job = client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name)
            client.fine_tuning.jobs.cancel(job.id)
            run_id = job.metadata["run_id"]  # type: ignore[index]
            run = pipeline.wait_run(ws, run_id, timeout=120)
    finally:
        pipeline.shutdown()
    assert run.status == "failed" and run.trigger["source"] == "api"
    assert run.job_id == job.id
    assert "cancelled" in (run.error or "")
