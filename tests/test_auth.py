"""Tokens and roles: authenticate (sha256 lookup, revoked refused), require, token management."""

from __future__ import annotations

from pathlib import Path

import pytest

from evertune import auth
from evertune.auth import InvalidToken, Principal
from evertune.errors import ConfigError, NotFoundError, PermissionDenied
from evertune.workspace import Workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "ws")[0]


def test_roles_have_explicit_permissions() -> None:
    assert auth.PERMISSIONS["viewer"] == {"read"}
    assert auth.PERMISSIONS["operator"] == {"read", "data", "runs", "jobs"}
    assert auth.PERMISSIONS["approver"] == {"read", "approve", "reject", "promote", "rollback"}
    assert auth.PERMISSIONS["admin"] >= auth.PERMISSIONS["operator"] | auth.PERMISSIONS["approver"]
    assert {"tokens", "override"} <= auth.PERMISSIONS["admin"]
    assert auth.PERMISSIONS["serving"] == frozenset()
    assert auth.roles_with("approve") == ["approver", "admin"]


def test_authenticate_finds_the_token_by_its_hash(ws: Workspace) -> None:
    secret = ws.create_token("ana", "approver")
    me = auth.authenticate(ws, f"  {secret}\n")
    assert (me.name, me.role) == ("ana", "approver")
    assert me.token_id is not None
    # Only the hash is stored: the secret itself is nowhere in the state DB file.
    assert secret.encode() not in (ws.state_dir / "state.db").read_bytes()


@pytest.mark.parametrize("token, words", [
    (None, "no API token given"),
    ("", "no API token given"),
    ("evt_not-a-real-token", "not recognised"),
])
def test_authenticate_refuses_missing_and_unknown_tokens(
    ws: Workspace, token: str | None, words: str
) -> None:
    with pytest.raises(InvalidToken, match=words) as info:
        auth.authenticate(ws, token)
    assert isinstance(info.value, PermissionDenied)
    assert info.value.exit_code == 3


def test_revoked_token_is_refused_with_the_reason(ws: Workspace) -> None:
    admin = auth.local_principal(ws)
    secret, info = auth.create_token(ws, "ci", "operator", admin)
    assert auth.authenticate(ws, secret).role == "operator"
    revoked = auth.revoke_token(ws, "ci", admin)
    assert revoked.revoked and revoked.id == info.id
    with pytest.raises(InvalidToken, match="token 'ci' was revoked; ask an admin for a new one"):
        auth.authenticate(ws, secret)


def test_require_names_the_role_and_who_can() -> None:
    viewer = Principal("v", "viewer")
    with pytest.raises(PermissionDenied) as info:
        auth.require(viewer, "approve")
    assert str(info.value) == (
        "token 'v' has role viewer, which cannot approve; ask for an approver or admin token"
    )
    with pytest.raises(PermissionDenied, match="cannot start or cancel fine-tuning jobs; ask for "
                       "an operator or admin token"):
        auth.require(Principal("ana", "approver"), "jobs")
    with pytest.raises(PermissionDenied, match="ask for an admin token"):
        auth.require(Principal("op", "operator"), "tokens")
    with pytest.raises(PermissionDenied, match="serving key, valid only for the serving"):
        auth.require(Principal("app", "serving"), "read")
    auth.require(Principal("op", "operator"), "jobs")
    auth.require(Principal("root", "admin"), "override")


def test_local_principal_reads_env_then_token_file(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    assert auth.local_principal(ws) == Principal("local-admin", "admin", 1)
    monkeypatch.setenv(auth.TOKEN_ENV, ws.create_token("ana", "viewer"))
    assert auth.local_principal(ws).name == "ana"
    monkeypatch.delenv(auth.TOKEN_ENV)
    (ws.state_dir / "token").unlink()
    with pytest.raises(InvalidToken, match="no token for the CLI"):
        auth.local_principal(ws)


def test_token_management_is_for_admins(ws: Workspace) -> None:
    admin = auth.local_principal(ws)
    approver = auth.authenticate(ws, ws.create_token("ana", "approver"))
    with pytest.raises(PermissionDenied, match="which cannot manage tokens"):
        auth.create_token(ws, "x", "viewer", approver)
    with pytest.raises(PermissionDenied):
        auth.list_tokens(ws, approver)
    with pytest.raises(ConfigError, match="unknown role 'boss'"):
        auth.create_token(ws, "x", "boss", admin)
    auth.create_token(ws, "twin", "viewer", admin)
    auth.create_token(ws, "twin", "viewer", admin)
    with pytest.raises(NotFoundError, match="2 active tokens are named 'twin'"):
        auth.revoke_token(ws, "twin", admin)
    with pytest.raises(NotFoundError, match="no active token 'nobody'"):
        auth.revoke_token(ws, "nobody", admin)
    names = [(t.name, t.role, t.revoked) for t in auth.list_tokens(ws, admin)]
    assert names == [("local-admin", "admin", False), ("ana", "approver", False),
                     ("twin", "viewer", False), ("twin", "viewer", False)]
