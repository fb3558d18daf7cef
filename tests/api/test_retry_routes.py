"""Retrying over HTTP: `POST /api/runs/{id}/retry`, `POST /api/models/{v}/retry` and the
console's Retry buttons, on a real workspace (real DBOS system DB, real MLflow registry).

The pipeline itself (a retry that reuses the trained job) is tests/test_pipeline.py; here the
runs are rows as the pipeline writes them, so each test takes a few seconds.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from evertune import pipeline
from evertune.registry import Registry
from evertune.web import console_router
from evertune.workspace import Workspace
from tests.api.conftest import bearer
from tests.api.helpers import register, untrained_adapter

TRIGGER = {"source": "bucket", "bucket": "/data", "key": "raw-data/a.jsonl", "version": "abc"}


def add_run(ws: Workspace, run_id: str, status: str, **outputs: Any) -> None:
    """A finished run as the pipeline records it; `outputs` go to DataPreprocessing."""
    pipeline._insert_run(ws, run_id, ws.config.model.name, {**TRIGGER, "run_id": run_id},
                         "queued", started_at=time.time())
    t, s = pipeline.pipeline_runs, pipeline.pipeline_steps
    with ws.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == run_id)
                     .values(status=status, finished_at=time.time(),
                             error="ModelEvaluation: disk full" if status == "failed" else None))
        conn.execute(update(s).where(s.c.run_id == run_id, s.c.name == "DataPreprocessing")
                     .values(status="succeeded", outputs=outputs))


def test_retry_run_over_http(
    client: TestClient, api_ws: tuple[Workspace, str], tokens: dict[str, str]
) -> None:
    ws, _ = api_ws
    add_run(ws, "run-bad", "failed")
    add_run(ws, "run-ok", "succeeded")
    op, viewer = bearer(tokens["operator"]), bearer(tokens["viewer"])

    assert client.post("/api/runs/run-bad/retry", headers=viewer).status_code == 403
    missing = client.post("/api/runs/run-nope/retry", headers=op)
    assert missing.status_code == 404 and "no pipeline run 'run-nope'" in missing.text
    done = client.post("/api/runs/run-ok/retry", headers=op)
    assert done.status_code == 409 and done.json()["error"]["code"] == "run_not_failed"
    assert "run run-ok is succeeded; only a failed run can be retried" in done.text

    # No runtime in this process: a DBOS client enqueues it for the one `evertune up` runs.
    r = client.post("/api/runs/run-bad/retry", headers=op)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == "run-bad-retry1" and body["status"] == "queued"
    assert body["trigger"]["retry_of"] == "run-bad" and body["trigger"]["actor"] == "operator"
    assert body["trigger"]["key"] == TRIGGER["key"]
    again = client.post("/api/runs/run-bad/retry", headers=op)
    assert again.json()["id"] == "run-bad-retry1"  # one retry, not two
    assert [r.id for r in pipeline.list_runs(ws)].count("run-bad-retry1") == 1

    # No pipeline has ever run here (DBOS's tables do not exist yet): the retry waits, queued,
    # and the pipeline's start picks it up. Its first step is reused from run-bad; the next
    # one fails at once (this stand-in run-bad never chose a training set).
    pipeline.launch(ws, warm=False)
    try:
        retried = pipeline.wait_run(ws, "run-bad-retry1", timeout=60)
    finally:
        pipeline.shutdown()
    first = retried.step("DataPreprocessing")
    assert first.status == "succeeded" and first.attempts == 0
    assert first.outputs["reused_from"] == "run-bad"
    assert retried.status == "failed" and retried.error.startswith("FineTuning: ")


def test_skipped_runs_show_their_reason(
    client: TestClient, api_ws: tuple[Workspace, str], tokens: dict[str, str]
) -> None:
    ws, _ = api_ws
    add_run(ws, "run-same", "skipped", skipped="training set ds-1 is the one v1 was trained on")
    [run] = client.get("/api/runs", headers=bearer(tokens["viewer"])).json()
    assert run["status"] == "skipped"
    assert run["skip_reason"] == "training set ds-1 is the one v1 was trained on"


def test_retry_qa_over_http(
    client: TestClient, api_ws: tuple[Workspace, str], tokens: dict[str, str], tiny_model: Path
) -> None:
    ws, ds = api_ws
    register(ws, untrained_adapter(tiny_model), ds, "ftjob-1")
    register(ws, untrained_adapter(tiny_model), ds, "ftjob-2")
    ana = bearer(tokens["approver"])
    artifact = Registry(ws).version_artifact_path(1)
    away = artifact.with_name("moved-away")
    artifact.rename(away)  # a load error: the environment's fault, not the version's

    r = client.post("/api/models/v1/approve", headers=ana, json={"comment": "ok"})
    assert r.status_code == 200, r.text
    assert (r.json()["stage"], r.json()["retry"]) == ("approved", True)
    assert "POST /api/models/1/retry" in r.json()["message"]

    assert client.post("/api/models/v1/retry", headers=bearer(tokens["viewer"])).status_code == 403
    pending = client.post("/api/models/v2/retry", headers=ana)
    assert pending.status_code == 409 and "--retry reruns" in pending.text

    # The console offers Retry QA on the version page; still unloadable, it stays approved.
    app = FastAPI()
    app.include_router(console_router(ws))
    app.state.workspace = ws
    with TestClient(app) as console:
        console.post("/login", data={"token": tokens["approver"]}, follow_redirects=False)
        page = console.get("/models/1").text
        assert 'data-testid="retry-form"' in page
        flashed = console.post("/models/1/retry", data={"csrf": _csrf(page)}).text
        assert "QA system tests could not judge it (the environment, not the model)" in flashed
        assert "it stays approved" in flashed
    assert Registry(ws).get_version(1).stage.value == "approved"

    away.rename(artifact)
    r = client.post("/api/models/v1/retry", headers=ana)  # no body: the comment is optional
    assert r.status_code == 200, r.text
    moves = [(m["from_stage"], m["to_stage"]) for m in r.json()["moves"]]
    # The tests ran this time, and judged the model: its empty answers reject it.
    assert moves == [("approved", "qa"), ("qa", "rejected")] and r.json()["retry"] is False


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)  # type: ignore[union-attr]


def test_console_retries_a_failed_run_and_lists_skipped_ones(
    api_ws: tuple[Workspace, str], tokens: dict[str, str]
) -> None:
    ws, _ = api_ws
    add_run(ws, "run-bad", "failed")
    add_run(ws, "run-same", "skipped", skipped="training set ds-1 is the one v1 was trained on")
    app = FastAPI()
    app.include_router(console_router(ws))
    app.state.workspace = ws

    with TestClient(app) as viewer:
        viewer.post("/login", data={"token": tokens["viewer"]}, follow_redirects=False)
        page = viewer.get("/runs/run-bad").text
        assert 'data-testid="retry-run-form"' not in page  # a viewer may not start runs
        listing = viewer.get("/runs").text
        assert "skipped: training set ds-1 is the one v1 was trained on" in listing
        assert "skipped: training set ds-1" in viewer.get("/runs/run-same").text

    with TestClient(app) as op:
        op.post("/login", data={"token": tokens["operator"]}, follow_redirects=False)
        page = op.get("/runs/run-bad").text
        assert 'data-testid="retry-run-form"' in page
        r = op.post("/runs/run-bad/retry", data={"csrf": _csrf(page)})
        assert r.status_code == 200 and str(r.url).endswith("/runs/run-bad-retry1")
        assert "run run-bad-retry1 retries run-bad" in r.text and "retry of" in r.text
        page = op.get("/runs/run-bad").text
        assert "retried as" in page and 'data-testid="retry-run-form"' not in page
