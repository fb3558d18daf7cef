"""Workspace: init creates the layout and an admin token; open finds it; errors say how to fix."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
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


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, under which a plain create gives 0644 (readable by all)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.usefixtures("umask_022")
def test_state_db_token_and_mlflow_db_are_private(tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "demo")
    ws.tracking_uri  # noqa: B018 - the MLflow DB file is created on first use
    for name in ("state.db", "token", "mlflow.db"):
        assert stat.S_IMODE((ws.state_dir / name).stat().st_mode) == 0o600, name
    # SQLite's WAL companions take the database file's mode.
    for path in ws.state_dir.glob("state.db-*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


@pytest.mark.usefixtures("umask_022")
def test_init_force_narrows_an_existing_token_file(tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "demo")
    (ws.state_dir / "token").chmod(0o644)
    _, token = Workspace.init(tmp_path / "demo", force=True)
    assert (ws.state_dir / "token").read_text().strip() == token
    assert stat.S_IMODE((ws.state_dir / "token").stat().st_mode) == 0o600


@pytest.mark.usefixtures("umask_022")
def test_existing_state_files_with_other_modes_keep_working(tmp_path: Path) -> None:
    ws, token = Workspace.init(tmp_path / "demo")
    assert token is not None
    ws.engine.dispose()
    state_db = ws.state_dir / "state.db"
    state_db.chmod(0o644)  # as written by earlier versions
    again = Workspace.open(ws.root)
    with again.engine.connect() as conn:
        rows = conn.execute(select(db.tokens.c.sha256)).scalars().all()
    assert rows == [hashlib.sha256(token.encode()).hexdigest()]
    assert stat.S_IMODE(state_db.stat().st_mode) == 0o644  # left as the owner set it
