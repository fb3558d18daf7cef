"""Fixtures for the control-API tests: a workspace with a dataset, a token per role, an app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from evertune.api import create_router
from evertune.workspace import Workspace
from tests.api.helpers import FAST_TESTS, add_dataset, use_mlflow_template
from tests.conftest import make_workspace

ROLES = ("viewer", "operator", "approver", "admin", "serving")


class RunRecorder:
    """Stands in for `pipeline.start_run`: records each trigger and returns its run id."""

    def __init__(self) -> None:
        self.triggers: list[dict[str, Any]] = []

    def __call__(self, ws: Workspace, trigger: dict[str, Any]) -> str:
        self.triggers.append(trigger)
        return str(trigger["run_id"])


def api_workspace(root: Path, tiny: Path) -> tuple[Workspace, str]:
    ws = make_workspace(root / "ws", tiny, deploy=FAST_TESTS)
    use_mlflow_template(ws)
    return ws, add_dataset(ws, root)


def role_tokens(ws: Workspace) -> dict[str, str]:
    """A token per role (named after it), plus `revoked`: a viewer token that was revoked."""
    tokens = {role: ws.create_token(role, role) for role in ROLES}
    tokens["revoked"] = ws.create_token("old-laptop", "viewer")
    from evertune import auth

    auth.revoke_token(ws, "old-laptop", auth.authenticate(ws, tokens["admin"]))
    return tokens


def make_app(ws: Workspace, start_run: Any = None) -> FastAPI:
    app = FastAPI()
    app.include_router(create_router(ws, start_run=start_run))
    return app


@pytest.fixture
def api_ws(tmp_path: Path, tiny_model: Path) -> tuple[Workspace, str]:
    """(workspace, id of its TICKETS dataset)."""
    return api_workspace(tmp_path, tiny_model)


@pytest.fixture
def tokens(api_ws: tuple[Workspace, str]) -> dict[str, str]:
    return role_tokens(api_ws[0])


@pytest.fixture
def recorder() -> RunRecorder:
    return RunRecorder()


@pytest.fixture
def client(api_ws: tuple[Workspace, str], recorder: RunRecorder) -> Iterator[TestClient]:
    with TestClient(make_app(api_ws[0], recorder)) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
