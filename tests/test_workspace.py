"""Workspace: init creates the layout and an admin token; open finds it; errors say how to fix."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from sqlalchemy import select

from evertune import db
from evertune.errors import WorkspaceError
from evertune.workspace import Workspace


def test_init_creates_layout_config_and_admin_token(tmp_path: Path) -> None:
    ws, token = Workspace.init(tmp_path / "demo")
    assert token is not None and token.startswith("evt_")
    assert (ws.root / "evertune.yaml").is_file()
    for sub in ("datasets", "jobs", "models", "evals"):
        assert (ws.state_dir / sub).is_dir()
    assert (ws.root / "bucket" / "raw-data").is_dir()
    token_file = ws.state_dir / "token"
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    with ws.engine.connect() as conn:
        rows = conn.execute(select(db.tokens.c.role, db.tokens.c.sha256)).all()
    # Only the hash is stored, never the token itself.
    assert rows == [("admin", hashlib.sha256(token.encode()).hexdigest())]


def test_init_twice_keeps_the_existing_workspace(tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path)
    (ws.root / "evertune.yaml").write_text("model:\n  name: support-bot\n")
    again, token = Workspace.init(tmp_path)
    assert token is None
    assert again.config.model.name == "support-bot"


def test_open_finds_the_workspace_from_a_subfolder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Workspace.init(tmp_path)
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    monkeypatch.delenv("EVERTUNE_HOME", raising=False)
    assert Workspace.open().root == tmp_path.resolve()


def test_open_outside_a_workspace_says_how_to_create_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EVERTUNE_HOME", raising=False)
    with pytest.raises(WorkspaceError, match="evertune init"):
        Workspace.open()
    with pytest.raises(WorkspaceError, match=f"evertune init {tmp_path / 'x'}"):
        Workspace.open(tmp_path / "x")


def test_overrides_apply_to_the_opened_workspace(tmp_path: Path) -> None:
    Workspace.init(tmp_path)
    ws = Workspace.open(tmp_path, ["train.n_epochs=7"])
    assert ws.config.train.n_epochs == 7
    assert ws.state_db_url.startswith("sqlite:///") and ws.tracking_uri.startswith("sqlite:///")
