"""The console's job page for the training methods: a DPO stage's rewards chart and lineage,
and pausing / resuming a job from the page.

    .venv/bin/pytest tests/web/test_job_pages.py -q
"""

from __future__ import annotations

import re
import time

import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from evertune.training import create_job, get_job, jobs
from evertune.training.dpo import run_dpo
from evertune.training.sft import run_sft
from evertune.web import console_router
from evertune.workspace import Workspace
from tests.training.conftest import add_sft_dataset
from tests.training.test_methods import _add, preference_rows
from tests.web.test_pipeline_pages import element


def _client(ws: Workspace, role: str) -> TestClient:
    app = FastAPI()
    app.include_router(console_router(ws))
    app.state.workspace = ws
    client = TestClient(app)
    token = ws.create_token(f"ana-{role}", role)
    assert client.post("/login", data={"token": token}, follow_redirects=False).status_code == 303
    return client


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]


def _run(ws: Workspace, job_id: str, recipe) -> None:
    jobs.transition(ws, job_id, "running", message="Started in-process (test)")
    threads = torch.get_num_threads()
    try:
        recipe(ws, job_id)
    finally:
        torch.set_num_threads(threads)


def test_a_dpo_stage_page_charts_rewards_and_links_the_previous_stage(workspace):
    ws = Workspace.open(workspace.root, ["train.threads=1"])
    first = create_job(ws, add_sft_dataset(ws, n=24))
    _run(ws, first.id, run_sft)
    second = create_job(ws, _add(ws, "pairs.jsonl", preference_rows(16)), parent=first.id)
    _run(ws, second.id, run_dpo)
    assert get_job(ws, second.id).status == "succeeded"
    with _client(ws, "viewer") as client:
        html = client.get(f"/jobs/{second.id}").text
        chart = element(html, "reward-chart")
        assert "reward accuracy" in chart and "<svg" in chart
        details = element(html, "job-details")
        assert f'href="/jobs/{first.id}"' in details and "previous stage" in details
        assert "job-pause-form" not in html  # finished: nothing to pause
        sft_page = client.get(f"/jobs/{first.id}").text
        assert 'data-testid="reward-chart"' not in sft_page  # SFT has no rewards


def test_an_operator_pauses_a_running_job_and_resumes_it_from_the_page(workspace, monkeypatch):
    ws = Workspace.open(workspace.root, ["train.threads=1", "train.checkpoint_every=1"])
    monkeypatch.setenv("EVERTUNE_TEST_STEP_DELAY_S", "0.3")
    job = create_job(ws, add_sft_dataset(ws, n=40))
    jobs.start_job(ws, job.id)
    deadline = time.monotonic() + 120
    while not jobs.list_metrics(ws, job.id) and time.monotonic() < deadline:
        time.sleep(0.2)  # a job paused before its first step has nothing to checkpoint
    with _client(ws, "viewer") as viewer:
        assert "job-pause-form" not in viewer.get(f"/jobs/{job.id}").text  # reading only
    with _client(ws, "operator") as client:
        page = client.get(f"/jobs/{job.id}").text
        assert 'data-testid="job-pause-form"' in page
        r = client.post(f"/jobs/{job.id}/pause", data={"csrf": _csrf(page)})
        assert r.status_code == 200 and "pauses after its current step" in r.text
        deadline = time.monotonic() + 120
        while get_job(ws, job.id).status != "paused" and time.monotonic() < deadline:
            time.sleep(0.2)
        paused = get_job(ws, job.id)
        assert paused.status == "paused" and jobs.list_checkpoints(ws, job.id)
        page = client.get(f"/jobs/{job.id}").text
        assert 'data-testid="job-resume-form"' in page
        again = client.post(f"/jobs/{job.id}/pause", data={"csrf": _csrf(page)})
        assert "already paused" in again.text  # said on the page, nothing changes
        monkeypatch.setenv("EVERTUNE_TEST_STEP_DELAY_S", "0")
        r = client.post(f"/jobs/{job.id}/resume", data={"csrf": _csrf(page)})
        assert "resumed from its newest checkpoint" in r.text
        done = jobs.wait_job(ws, job.id, timeout=300)
        assert done.status == "succeeded", done.error
        events = " ".join(e.message for e in jobs.list_events(ws, job.id))
        assert "Job paused at step" in events and "Resumed from checkpoint step" in events
