"""Bad input to the control API gets a 4xx that names it, never a 500; limits hold.

    .venv/bin/python -m pytest tests/api/test_hostile_input.py -q

Each test here is a case the schemathesis run (test_fuzz.py) or a client once turned into a
server error or an unbounded resource use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from evertune import pipeline
from evertune.workspace import Workspace
from tests.api.conftest import RunRecorder, bearer, make_app
from tests.api.helpers import TICKETS, add_dataset, use_mlflow_template, write_jsonl
from tests.api.test_openai_client import openai_client, serve
from tests.conftest import make_workspace


def error_of(response: Any, status: int) -> dict[str, Any]:
    """The OpenAI error object of `response`, checking its status."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


# -- request bodies ----------------------------------------------------------------------------
def test_auto_hyperparameters_take_the_workspace_values(
    api_ws: tuple[Workspace, str], tokens: dict[str, str], recorder: RunRecorder, tmp_path: Path
) -> None:
    """OpenAI documents "auto" for every hyperparameter: Evertune picks (the config's value)."""
    ws, _ = api_ws
    data = write_jsonl(tmp_path / "upload.jsonl", TICKETS[:20])
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    with serve(make_app(ws, recorder)) as url:
        client = openai_client(url, tokens["operator"])
        f = client.files.create(file=data.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name,
                                             hyperparameters=auto)  # type: ignore[arg-type]
        assert job.hyperparameters.n_epochs == ws.config.train.n_epochs == 1
        assert job.hyperparameters.batch_size == ws.config.train.batch_size == 4
        assert job.hyperparameters.learning_rate_multiplier == 1.0
        assert recorder.triggers[-1]["overrides"] == []  # nothing overridden: the config's values

        # The same through `method` (OpenAI's newer form), mixed with a number.
        method = {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 2}}}
        job = client.fine_tuning.jobs.create(training_file=f.id, model=ws.config.model.name,
                                             method=method)  # type: ignore[arg-type]
        assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 4)
        assert job.hyperparameters.learning_rate_multiplier == 2.0


def test_malformed_bodies_are_400_with_the_error_shape(
    client: TestClient, tokens: dict[str, str]
) -> None:
    admin = bearer(tokens["admin"])
    as_json = {**admin, "content-type": "application/json"}
    cases = [
        # FastAPI cannot decode these: Starlette's HTTPException, which was not ours.
        ("/api/tokens", {**as_json}, b'{"name": "\xff\xfe", "role": "viewer"}'),
        ("/api/runs", {**as_json}, b"\x80\x81 not utf-8"),
        # A multipart upload without its boundary parameter.
        ("/api/datasets", {**admin, "content-type": "multipart/form-data"}, b"--x\r\n"),
        ("/v1/files", {**admin, "content-type": "multipart/form-data"}, b"--x\r\n"),
    ]
    for path, headers, body in cases:
        err = error_of(client.post(path, headers=headers, content=body), 400)
        assert err["type"] == "invalid_request_error", (path, err)
        assert err["message"], path
    # A method object whose hyperparameters are not an object: named, not a TypeError.
    err = error_of(client.post("/v1/fine_tuning/jobs", headers=admin, json={
        "training_file": "file-x", "method": {"type": "supervised",
                                              "supervised": {"hyperparameters": [1]}}}), 400)
    assert err["param"] == "method.supervised.hyperparameters"


def test_a_lone_surrogate_in_a_json_string_is_400_and_changes_nothing(
    client: TestClient, api_ws: tuple[Workspace, str], tokens: dict[str, str]
) -> None:
    from evertune import auth

    ws, _ = api_ws
    admin = bearer(tokens["admin"])
    before = len(auth.list_tokens(ws, auth.authenticate(ws, tokens["admin"])))
    # json.dumps would write the escape too; spelled out so the test shows what is sent.
    body = b'{"name": "ci-\\ud800", "role": "viewer"}'
    r = client.post("/api/tokens", headers={**admin, "content-type": "application/json"},
                    content=body)
    err = error_of(r, 400)
    assert err["code"] == "invalid_unicode" and "surrogate" in err["message"]
    assert len(auth.list_tokens(ws, auth.authenticate(ws, tokens["admin"]))) == before
    # A whole surrogate pair is an ordinary character (an emoji) and is accepted.
    ok = client.post("/api/tokens", headers={**admin, "content-type": "application/json"},
                     content=b'{"name": "ci-\\ud83d\\ude00", "role": "viewer"}')
    assert ok.status_code == 201 and ok.json()["name"] == "ci-\N{GRINNING FACE}"


def test_huge_numbers_in_paths_are_not_found_not_a_crash(
    client: TestClient, tokens: dict[str, str]
) -> None:
    admin = bearer(tokens["admin"])
    huge = "9" * 30
    for path in (f"/api/models/{huge}", f"/api/models/v{huge}", f"/api/models/{'9' * 5000}"):
        err = error_of(client.get(path, headers=admin), 404)
        assert "version numbers are 1 to 2147483647" in err["message"]
    err = error_of(client.post(f"/api/models/{huge}/approve", headers=admin,
                               json={"comment": "x"}), 404)
    err = error_of(client.post("/api/deployments/rollback", headers=admin,
                               json={"to": huge}), 404)
    assert err["message"].startswith("to: no model version")
    error_of(client.get("/api/audit", headers=admin, params={"version": huge}), 404)
    err = error_of(client.post(f"/api/tokens/{huge}/revoke", headers=admin), 400)
    assert err["param"] == "token_id"


def test_an_oversized_or_non_ascii_token_is_401(client: TestClient) -> None:
    for token in ("evt_" + "a" * 1_000_000, "evt_\N{GREEK SMALL LETTER ALPHA}" * 3):
        # As bytes: a client may send any octets; the server reads them as Latin-1.
        r = client.get("/api/whoami", headers={"Authorization": f"Bearer {token}".encode()})
        err = error_of(r, 401)
        assert "not an Evertune token" in err["message"] and r.headers["www-authenticate"]


# -- uploads -----------------------------------------------------------------------------------
def _leftovers(ws: Workspace) -> list[Path]:
    root = ws.state_dir / "files" / "datasets"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def test_dataset_upload_over_the_cap_is_413_and_leaves_nothing(
    tmp_path: Path, tiny_model: Path, tokens_for: Any
) -> None:
    ws = use_mlflow_template(make_workspace(tmp_path / "ws", tiny_model,
                                            data={"max_file_mb": 0.01}))  # 10 KiB
    op = bearer(tokens_for(ws)["operator"])
    big = write_jsonl(tmp_path / "big.jsonl", TICKETS * 10)  # ~24 KiB of valid rows
    assert big.stat().st_size > 0.01 * 2**20
    with TestClient(make_app(ws)) as client:
        r = client.post("/api/datasets", headers=op,
                        files={"file": ("big.jsonl", big.read_bytes())})
        err = error_of(r, 413)
        assert err["code"] == "file_too_large" and "data.max_file_mb=0.01" in err["message"]
        assert _leftovers(ws) == []
        # Declared over the cap (plus the form's slack): refused before FastAPI spools it.
        for path in ("/api/datasets", "/v1/files"):
            r = client.post(path, headers=op, data={"purpose": "fine-tune"},
                            files={"file": ("huge.jsonl", b"x" * 1_500_000)})
            err = error_of(r, 413)
            assert err["message"].startswith("the request body is 1,50"), err
        # A refused file of another kind (not JSON Lines at all) leaves nothing either.
        r = client.post("/api/datasets", headers=op, files={"file": ("x.jsonl", b"\x00\x01")})
        assert r.status_code == 400, r.text
        assert _leftovers(ws) == []
        # An accepted one is kept: the dataset version's provenance.
        ok = client.post("/api/datasets", headers=op,
                         files={"file": ("ok.jsonl", (tmp_path / "big.jsonl").read_bytes()[:4000]
                                         .rsplit(b"\n", 1)[0] + b"\n")})
        assert ok.status_code == 200, ok.text
        assert [p.name for p in _leftovers(ws)] == ["ok.jsonl"]


@pytest.fixture
def tokens_for() -> Any:
    from tests.api.conftest import role_tokens

    return role_tokens


# -- queued runs -------------------------------------------------------------------------------
class QueueingRecorder(RunRecorder):
    """Records the run as `pipeline.start_run` does (a queued row in the state DB) without
    starting DBOS, so the queue fills up as a busy server's would."""

    def __call__(self, ws: Workspace, trigger: dict[str, Any]) -> str:
        run_id = super().__call__(ws, trigger)
        pipeline._insert_run(ws, run_id, ws.config.model.name, trigger, "queued", started_at=None)
        return run_id


def test_queued_runs_are_capped_with_429(tmp_path: Path, tiny_model: Path) -> None:
    from tests.api.conftest import role_tokens

    ws = use_mlflow_template(make_workspace(tmp_path / "ws", tiny_model,
                                            api={"max_queued_runs": 2}))
    ds = add_dataset(ws, tmp_path)
    op = bearer(role_tokens(ws)["operator"])
    recorder = QueueingRecorder()
    with TestClient(make_app(ws, recorder)) as client:
        for _ in range(2):
            assert client.post("/api/runs", headers=op, json={"dataset": ds}).status_code == 201
        err = error_of(client.post("/api/runs", headers=op, json={"dataset": ds}), 429)
        assert err["code"] == "too_many_queued_runs"
        assert "2 pipeline runs are already queued or running" in err["message"]
        assert "api.max_queued_runs=2" in err["message"]
        # A fine-tuning job queues a run too, so it meets the same limit.
        data = write_jsonl(tmp_path / "more.jsonl", TICKETS[:10])
        f = client.post("/v1/files", headers=op, data={"purpose": "fine-tune"},
                        files={"file": ("more.jsonl", data.read_bytes())}).json()
        err = error_of(client.post("/v1/fine_tuning/jobs", headers=op,
                                   json={"training_file": f["id"]}), 429)
        assert err["code"] == "too_many_queued_runs"
        assert len(recorder.triggers) == 2  # the refused ones queued nothing

        # Once a run finishes there is room again.
        _finish(ws, recorder.triggers[0]["run_id"])
        assert client.post("/api/runs", headers=op, json={"dataset": ds}).status_code == 201


def _finish(ws: Workspace, run_id: str) -> None:
    from sqlalchemy import update

    t = pipeline.pipeline_runs
    with ws.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == run_id).values(status="succeeded"))


# -- the OpenAPI document ----------------------------------------------------------------------
def test_openapi_documents_400_with_the_error_schema_and_never_422(
    client: TestClient, tokens: dict[str, str]
) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["paths"], "no routes documented"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = op["responses"]
            assert "422" not in codes, (method, path)
            for code in ("400", "401", "403", "4XX"):
                schema = codes[code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    # What the API answers for a validation error is what the document says: 400, that shape.
    err = error_of(client.get("/api/runs", params={"limit": 0},
                              headers=bearer(tokens["viewer"])), 400)
    assert err["param"] == "limit" and err["code"] == "invalid_request"
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}
