"""Shared fixtures: a tiny model built once per session and a fresh workspace per test."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

# No test may reach a model hub; everything is built locally or shipped by a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Converted base models go to this test session's own cache, never the user's ~/.cache.
os.environ.setdefault("EVERTUNE_MODEL_CACHE", tempfile.mkdtemp(prefix="evertune-model-cache-"))

from evertune.testing import build_tiny_model  # noqa: E402
from evertune.workspace import Workspace  # noqa: E402

# Small settings so a whole tune → eval → register cycle takes seconds on 2 CPU cores.
# The forgetting guard and replay are off here: the random tiny model has no general ability
# to keep (any training moves its noise answers), so the guard would reject every round of
# tests about something else. tests/evaluation/test_forgetting_guard.py tests them on a tiny
# model taught a general ability; tests that need them turn them on.
TINY_SETTINGS = {
    "train": {"n_epochs": 1, "batch_size": 4, "checkpoint_every": 2, "learning_rate": 0.01},
    "data": {"max_seq_len": 128, "replay": 0.0},
    "eval": {"max_examples": 8, "max_new_tokens": 8, "batch_size": 8, "general": False},
    "gate": {"bootstrap_samples": 200},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def make_workspace(root: Path, tiny_model: Path, **sections: dict) -> Workspace:
    """A workspace at `root` whose base model is the tiny model, with small settings."""
    Workspace.init(root)
    cfg_path = root / "evertune.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model"]["base"] = str(tiny_model)
    # Section by section: a test's `eval` settings change those keys, the others stay tiny.
    for settings in (TINY_SETTINGS, sections):
        for section, values in settings.items():
            raw.setdefault(section, {}).update(values)
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Workspace.open(root)


@pytest.fixture
def workspace(tmp_path: Path, tiny_model: Path) -> Workspace:
    return make_workspace(tmp_path / "ws", tiny_model)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback for the session (tests/postgres.py)."""
    from tests.postgres import INSTALL_HINT, PostgresServer, pg_bin

    if pg_bin() is None:
        pytest.fail(f"the Postgres tests need Debian's postgresql; {INSTALL_HINT}")
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres, request) -> str:
    """A fresh database on the session's Postgres server; its SQLAlchemy URL."""
    import re
    import secrets

    name = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40] + "_" + secrets.token_hex(3)
    return postgres.create_database(name)
