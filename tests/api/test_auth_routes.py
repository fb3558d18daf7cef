"""Every control-API route needs a token; every mutating route checks the caller's role."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from evertune import auth
from evertune.workspace import Workspace
from tests.api.conftest import RunRecorder, api_workspace, bearer, make_app, role_tokens

# (method, path, permission, request kwargs). Ids point nowhere, so a caller who is allowed
# gets a 4xx from the route itself (404 / 409 / 400) and nothing changes.
MUTATING: list[tuple[str, str, auth.Permission, dict[str, Any]]] = [
    ("POST", "/api/runs", "runs", {"json": {"dataset": "ds-none"}}),
    ("POST", "/api/jobs/ftjob-none/cancel", "jobs", {}),
    ("POST", "/api/jobs/ftjob-none/resume", "jobs", {}),
    ("POST", "/api/datasets", "data", {"files": {"file": ("x.jsonl", b"not json\n")}}),
    ("POST", "/api/models/v99/approve", "approve", {"json": {"comment": "ok"}}),
    ("POST", "/api/models/v99/reject", "reject", {"json": {"comment": "no"}}),
    ("POST", "/api/models/v99/promote", "promote", {"json": {"comment": "go"}}),
    ("POST", "/api/deployments/rollback", "rollback", {"json": {"comment": "back"}}),
    ("POST", "/api/tokens", "tokens", {"json": {"name": "new", "role": "viewer"}}),
    ("POST", "/api/tokens/9999/revoke", "tokens", {}),
    ("POST", "/v1/files", "data", {"files": {"file": ("x.jsonl", b"{}\n")},
                                   "data": {"purpose": "assistants"}}),
    ("POST", "/v1/fine_tuning/jobs", "jobs", {"json": {"training_file": "file-" + "0" * 24}}),
    ("POST", "/v1/fine_tuning/jobs/ftjob-none/cancel", "jobs", {}),
]
ROLES = ("viewer", "operator", "approver", "admin", "serving")


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[Workspace, dict[str, str], TestClient]]:
    ws, _ = api_workspace(tmp_path_factory.mktemp("routes"), tiny_model)
    tokens = role_tokens(ws)
    with TestClient(make_app(ws, RunRecorder())) as c:
        yield ws, tokens, c


def all_routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path with dummy parameters) of every operation in the OpenAPI schema."""
    out = []
    for path, ops in client.app.openapi()["paths"].items():  # type: ignore[attr-defined]
        for method, op in ops.items():
            assert op.get("security") == [{"HTTPBearer": []}], f"{method} {path} is open"
            out.append((method.upper(), re.sub(r"\{[^}]+\}", "x1", path)))
    return out


def test_every_route_refuses_missing_bad_and_revoked_tokens(setup: Any) -> None:
    _, tokens, client = setup
    routes = all_routes(client)
    assert len(routes) >= 30
    for method, path in routes:
        for headers, words in [
            ({}, "no API token given"),
            (bearer("evt_wrong"), "not recognised"),
            ({"Authorization": f"Basic {tokens['admin']}"}, "no API token given"),
            (bearer(tokens["revoked"]), "token 'old-laptop' was revoked"),
        ]:
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and words in err["message"], (method, path)


@pytest.mark.parametrize("method, path, permission, kwargs", MUTATING,
                         ids=[f"{m} {p}" for m, p, _, _ in MUTATING])
def test_mutating_route_checks_each_role(
    setup: Any, method: str, path: str, permission: auth.Permission, kwargs: dict[str, Any]
) -> None:
    _, tokens, client = setup
    for role in ROLES:
        r = client.request(method, path, headers=bearer(tokens[role]), **kwargs)
        if permission in auth.PERMISSIONS[role]:
            assert r.status_code not in (401, 403), (role, r.text)
            assert 200 <= r.status_code < 300 or "error" in r.json()
        else:
            assert r.status_code == 403, (role, r.text)
            err = r.json()["error"]
            assert err["type"] == "permission_error"
            if role == "serving":
                assert "serving key, valid only for the serving endpoints" in err["message"]
            else:
                assert err["message"].startswith(f"token {role!r} has role {role}, which cannot ")
                who = " or ".join(auth.roles_with(permission))
                assert err["message"].endswith(f"ask for an {who} token") or \
                    err["message"].endswith(f"ask for a {who} token")


def test_viewer_gets_the_role_message_on_approve(setup: Any) -> None:
    _, tokens, client = setup
    r = client.post("/api/models/v1/approve", headers=bearer(tokens["viewer"]),
                    json={"comment": "please"})
    assert r.status_code == 403
    assert r.json() == {"error": {
        "message": "token 'viewer' has role viewer, which cannot approve; ask for an approver "
                   "or admin token",
        "type": "permission_error", "param": None, "code": "insufficient_permissions"}}


def test_reads_are_open_to_every_role_but_serving(setup: Any) -> None:
    _, tokens, client = setup
    for role in ("viewer", "operator", "approver", "admin"):
        me = client.get("/api/whoami", headers=bearer(tokens[role]))
        assert me.status_code == 200 and me.json()["role"] == role
        assert client.get("/api/jobs", headers=bearer(tokens[role])).status_code == 200
    assert client.get("/api/jobs", headers=bearer(tokens["serving"])).status_code == 403


def test_token_routes_mint_and_revoke(setup: Any) -> None:
    _, tokens, client = setup
    admin = bearer(tokens["admin"])
    made = client.post("/api/tokens", headers=admin, json={"name": "ci", "role": "operator"})
    assert made.status_code == 201
    secret, token_id = made.json()["token"], made.json()["id"]
    assert client.get("/api/whoami", headers=bearer(secret)).json()["role"] == "operator"
    listed = client.get("/api/tokens", headers=admin).json()
    assert all(t["token"] is None for t in listed)  # secrets are shown once, at creation
    assert {"ci", "old-laptop"} <= {t["name"] for t in listed}
    assert client.post(f"/api/tokens/{token_id}/revoke", headers=admin).json()["revoked"]
    r = client.get("/api/whoami", headers=bearer(secret))
    assert r.status_code == 401 and "token 'ci' was revoked" in r.json()["error"]["message"]
    bad = client.post("/api/tokens", headers=admin, json={"name": "x", "role": "boss"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"
