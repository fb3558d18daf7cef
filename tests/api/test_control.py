"""The /api routes over a real workspace: approvals and deployments with audit, jobs, datasets."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from evertune.workspace import Workspace
from tests.api.conftest import RunRecorder, bearer
from tests.api.helpers import TICKETS, register, trained_adapter, write_jsonl


def test_approve_promote_rollback_over_http(
    client: TestClient, api_ws: tuple[Workspace, str], tokens: dict[str, str], tiny_model: Path
) -> None:
    ws, ds = api_ws
    adapter = trained_adapter(tiny_model)
    register(ws, adapter, ds, "ftjob-1")
    register(ws, adapter, ds, "ftjob-2")
    ana, viewer = bearer(tokens["approver"]), bearer(tokens["viewer"])

    denied = client.post("/api/models/v1/approve", headers=viewer, json={"comment": "hi"})
    assert denied.status_code == 403 and "which cannot approve" in denied.text
    missing = client.post("/api/models/v1/approve", headers=ana, json={"comment": ""})
    assert missing.status_code == 409 and "needs a comment" in missing.json()["error"]["message"]

    r = client.post("/api/models/v1/approve", headers=ana, json={"comment": "better billing"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stage"] == "prod" and body["system_tests"]["passed"] is True
    assert [(m["from_stage"], m["to_stage"]) for m in body["moves"]] == [
        ("pending", "approved"), ("approved", "qa"), ("qa", "prod")]

    # Illegal moves answer 409 with the allowed ones.
    again = client.post("/api/models/v1/approve", headers=ana, json={"comment": "twice"})
    assert again.status_code == 409
    assert again.json()["error"] == {
        "message": "version 1 is prod; it cannot move to approved; allowed: retired (replaced "
                   "or withdrawn)",
        "type": "invalid_request_error", "param": None, "code": "illegal_transition"}
    not_qa = client.post("/api/models/v2/promote", headers=ana, json={"comment": "skip QA"})
    assert not_qa.status_code == 409
    assert "only a version in qa can be promoted" in not_qa.json()["error"]["message"]
    assert "allowed from pending: approved, rejected" in not_qa.json()["error"]["message"]

    assert client.post("/api/models/v2/approve", headers=ana,
                       json={"comment": "newer"}).json()["stage"] == "prod"
    now = client.get("/api/deployments", headers=viewer).json()
    assert (now["prod"]["version"], now["qa"]["version"], now["previous_prod"]["version"]) == (
        2, 2, 1)

    back = client.post("/api/deployments/rollback", headers=ana, json={"comment": "v2 is off"})
    assert back.status_code == 200 and back.json()["version"] == 1
    now = client.get("/api/deployments", headers=viewer).json()
    assert now["prod"]["version"] == 1 and now["auto_promote"] is True
    history = [(h["version"], h["from_stage"], h["to_stage"], h["actor"]) for h in now["history"]]
    assert history[:2] == [(1, "retired", "prod", "approver"), (2, "prod", "retired", "approver")]
    assert len(history) == 9

    audit = client.get("/api/audit", headers=viewer, params={"version": "v1"}).json()
    assert [a["action"] for a in audit][-1] == "register"
    approved = next(a for a in audit if a["to_stage"] == "approved")
    assert (approved["actor"], approved["reason"], approved["from_stage"]) == (
        "approver", "better billing", "pending")
    assert approved["created_at"] > 0
    models = client.get("/api/models", headers=viewer).json()
    assert [(m["version"], m["stage"]) for m in models] == [(2, "retired"), (1, "prod")]
    one = client.get("/api/models/prod", headers=viewer).json()
    assert one["version"] == 1 and one["audit"][0]["to_stage"] == "prod"

    rejected = client.post("/api/models/v2/reject", headers=ana, json={"comment": "bad"})
    assert rejected.status_code == 409  # retired → rejected is not a move the lifecycle has
    assert "allowed: prod (rollback)" in rejected.json()["error"]["message"]


def test_jobs_datasets_runs_and_evals(
    client: TestClient,
    api_ws: tuple[Workspace, str],
    tokens: dict[str, str],
    recorder: RunRecorder,
    tmp_path: Path,
) -> None:
    from evertune.data.store import get_dataset
    from evertune.training import jobs

    ws, ds = api_ws
    op, viewer = bearer(tokens["operator"]), bearer(tokens["viewer"])
    job = jobs.create_job(ws, get_dataset(ws, ds))

    listed = client.get("/api/jobs", headers=viewer).json()
    assert [j["id"] for j in listed] == [job.id] and "config" not in listed[0]
    assert client.get(f"/api/jobs/{job.id}", headers=viewer).json()["status"] == "queued"
    events = client.get(f"/api/jobs/{job.id}/events", headers=viewer).json()
    assert "job queued" in events[-1]["message"]
    assert client.get(f"/api/jobs/{job.id}/metrics", headers=viewer).json() == []
    assert client.get(f"/api/jobs/{job.id}/checkpoints", headers=viewer).json() == []
    cancelled = client.post(f"/api/jobs/{job.id}/cancel", headers=op)
    assert cancelled.json()["status"] == "cancelled"
    twice = client.post(f"/api/jobs/{job.id}/cancel", headers=op)
    assert twice.status_code == 409 and "already cancelled" in twice.json()["error"]["message"]

    sets = client.get("/api/datasets", headers=viewer).json()
    assert [d["id"] for d in sets] == [ds] and sets[0]["counts"]["total"] == len(TICKETS)
    assert client.get(f"/api/datasets/{ds[:8]}", headers=viewer).json()["report"]["kind"] == "sft"
    assert client.get("/api/datasets/ds-nope", headers=viewer).status_code == 404
    extra = write_jsonl(tmp_path / "more.jsonl", [{"prompt": "Hi", "completion": "Hello"},
                                                  {"prompt": "", "completion": "x"}])
    with extra.open("rb") as fh:
        added = client.post("/api/datasets", headers=op, files={"file": ("more.jsonl", fh)})
    assert added.status_code == 200, added.text
    assert added.json()["rejected"] == 1 and added.json()["versions"][0]["counts"]["total"] == 1

    assert client.get("/api/runs", headers=viewer).json() == []
    started = client.post("/api/runs", headers=op,
                          json={"dataset": ds[:10], "overrides": ["train.n_epochs=2"]})
    assert started.status_code == 201, started.text
    (trigger,) = recorder.triggers
    assert started.json()["id"] == trigger["run_id"]
    assert (trigger["source"], trigger["dataset"], trigger["overrides"]) == (
        "api", ds, ["train.n_epochs=2"])
    bad = client.post("/api/runs", headers=op, json={"overrides": ["train.n_epoch=2"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "overrides"
    assert "unknown key 'n_epoch'" in bad.json()["error"]["message"]
    missing_run = client.get("/api/runs/run-nope", headers=viewer)
    assert missing_run.status_code == 404 and "no pipeline run" in missing_run.text

    (ws.evals_dir / "ev-1").mkdir(parents=True)
    report = {"id": "ev-1", "verdict": "pass"}
    (ws.evals_dir / "ev-1" / "report.json").write_text(json.dumps(report))
    assert client.get("/api/evals/ev-1", headers=viewer).json()["verdict"] == "pass"
    for bad in ("ev-2", "..", "%2e%2e%2fstate.db"):
        assert client.get(f"/api/evals/{bad}", headers=viewer).status_code == 404
