"""A workspace: one folder holding `evertune.yaml`, the landing bucket and `.evertune/` state.

    evertune init demo          # Workspace.init(Path("demo"))
    evertune -w demo data list  # Workspace.open(Path("demo"))

Layout (embedded defaults; each store can move to a real engine through config):

    demo/
      evertune.yaml
      bucket/                   landing bucket (raw-data/, feedback/)
      .evertune/
        state.db                jobs, events, metrics, checkpoints, tokens, the workspace
                                lock of `evertune up` (SQLite, mode 0600)
        token                   the admin token for the local CLI (mode 0600)
        models/                 hub downloads (the packaged default is converted once per
                                machine: models.model_cache_dir())
        datasets/<id>/          content-addressed dataset versions
        jobs/<ftjob-id>/        job folders: checkpoints, logs, the result adapter
        evals/<id>/             evaluation reports
        mlflow.db, mlartifacts/ the model registry and tracking store (mlflow.db 0600)
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from sqlalchemy import Engine, insert

from evertune import db
from evertune.config import CONFIG_FILE, Config, default_config_text, load_config
from evertune.errors import WorkspaceError

STATE_DIR = ".evertune"
HOME_ENV = "EVERTUNE_HOME"


def find_root(start: Path | None = None) -> Path:
    """The workspace folder: `start`, else $EVERTUNE_HOME, else the nearest parent of cwd with
    evertune.yaml."""
    if start is not None:
        if (start / CONFIG_FILE).is_file():
            return start.resolve()
        raise WorkspaceError(
            f"{start} is not an Evertune workspace (no {CONFIG_FILE}); "
            f"create one with `evertune init {start}`"
        )
    env = os.environ.get(HOME_ENV)
    if env:
        return find_root(Path(env))
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder
    raise WorkspaceError(
        f"no {CONFIG_FILE} in {here} or its parents; run `evertune init DIR` and pass `-w DIR`, "
        f"or set {HOME_ENV}"
    )


def write_private(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only: created 0600 (never briefly 0644, as
    writing first and chmod-ing after would be), and an existing one is narrowed to 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        f.write(text)


@dataclass
class Workspace:
    root: Path
    config: Config
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def open(
        cls, root: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
    ) -> Workspace:
        root = find_root(root)
        cfg = load_config(root / CONFIG_FILE, list(overrides))
        return cls(root=root, config=cfg, overrides=list(overrides))

    @classmethod
    def init(cls, root: Path, *, force: bool = False) -> tuple[Workspace, str | None]:
        """Create the workspace; return it and the new admin token (None if one existed)."""
        root = root.resolve()
        cfg_path = root / CONFIG_FILE
        if cfg_path.exists() and not force:
            ws = cls.open(root)
            return ws, None
        root.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(default_config_text(), "utf-8")
        ws = cls.open(root)
        for sub in ("datasets", "jobs", "models", "evals"):
            (ws.state_dir / sub).mkdir(parents=True, exist_ok=True)
        if "://" not in ws.config.storage.bucket:
            for prefix in ("raw-data", "feedback"):
                (ws.root / ws.config.storage.bucket / prefix).mkdir(parents=True, exist_ok=True)
        token = ws.create_token("local-admin", "admin")
        write_private(ws.state_dir / "token", token + "\n")
        return ws, token

    # -- paths -------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def datasets_dir(self) -> Path:
        return self.state_dir / "datasets"

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def evals_dir(self) -> Path:
        return self.state_dir / "evals"

    @property
    def bucket_url(self) -> str:
        """fsspec URL of the landing bucket (a plain path for the local default)."""
        b = self.config.storage.bucket
        return b if "://" in b else str(self.root / b)

    @property
    def state_db_url(self) -> str:
        return self.config.storage.state_db or f"sqlite:///{self.state_dir / 'state.db'}"

    @property
    def tracking_uri(self) -> str:
        if self.config.registry.tracking_uri:
            return self.config.registry.tracking_uri
        path = self.state_dir / "mlflow.db"
        if not path.exists():
            # Ours to create: 0600 like state.db (MLflow would leave it to the umask, 0644).
            db.create_private(path, "the MLflow database")
        return f"sqlite:///{path}"

    @property
    def artifact_location(self) -> str | None:
        """Where new MLflow experiments keep artifacts: registry.artifact_location; with a
        tracking server, None (the server's own destination, proxied, so every host reads
        them); else the workspace's .evertune/mlartifacts folder."""
        if self.config.registry.artifact_location:
            return self.config.registry.artifact_location
        if (self.config.registry.tracking_uri or "").startswith(("http://", "https://")):
            return None
        return (self.state_dir / "mlartifacts").as_uri()

    # -- stores ------------------------------------------------------------------------
    @cached_property
    def engine(self) -> Engine:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return db.connect(self.state_db_url)

    def create_token(self, name: str, role: str) -> str:
        """Mint an API token; only its sha256 is stored, so show the returned value once."""
        token = "evt_" + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                insert(db.tokens).values(
                    name=name,
                    role=role,
                    sha256=hashlib.sha256(token.encode()).hexdigest(),
                    created_at=time.time(),
                    revoked=False,
                )
            )
        return token
