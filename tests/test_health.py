"""Broken storage is reported, not hidden: /healthz degrades with the reason, and a store that
cannot be written gives a message naming the file and the fix (CLI) or a 503 (API).

    .venv/bin/pytest tests/test_health.py -q

The read-only cases use real permissions. Tests run as root in CI, where chmod alone does not
stop writes (CAP_DAC_OVERRIDE), so the process under test runs as root without the
capabilities that bypass file permissions (`setpriv --bounding-set -dac_override,…`): the
kernel then enforces the mode bits on it as on any user.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from evertune.registry import Registry
from evertune.server import create_app
from evertune.workspace import Workspace
from tests.conftest import make_workspace
from tests.test_registry import HISTORY, make_job, make_report

_DROP = "-dac_override,-dac_read_search,-fowner"


def _restricted() -> list[str]:
    """A command prefix under which the mode bits bind this user; skip where none exists."""
    if os.geteuid() != 0:
        return []  # permissions already apply
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: chmod cannot bind root")
    probe = Path(tempfile.mkdtemp())
    try:
        probe.chmod(0o555)
        done = subprocess.run(
            ["setpriv", "--bounding-set", _DROP, "--", "touch", str(probe / "x")],
            capture_output=True,
        )
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)
    if done.returncode == 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here (no CAP_SETPCAP): chmod cannot bind root")
    return ["setpriv", "--bounding-set", _DROP, "--"]


# -- /healthz ---------------------------------------------------------------------------------
def test_healthz_degrades_with_the_reason_when_the_bucket_folder_is_deleted(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = make_workspace(
        tmp_path / "ws", tiny_model, trigger={"poll_seconds": 0.05, "settle_seconds": 0}
    )
    folder = ws.root / "bucket"

    def health(client: TestClient, want: str) -> dict:
        deadline = time.monotonic() + 60
        while True:
            body = client.get("/healthz").json()
            if body["status"] == want or time.monotonic() > deadline:
                return body
            time.sleep(0.05)

    with caplog.at_level(logging.ERROR), TestClient(create_app(ws, serving=False)) as client:
        assert health(client, "ok") == {
            "status": "ok", "problems": [], "workspace": str(ws.root),
            "model": ws.config.model.name, "role": "single", "replica": None,
        }
        shutil.rmtree(folder)
        body = health(client, "degraded")
        assert body["status"] == "degraded", body
        assert len(body["problems"]) == 1
        assert f"the bucket folder {folder} does not exist" in body["problems"][0]
        assert any(
            r.levelno == logging.ERROR and str(folder) in r.getMessage() for r in caplog.records
        )
        (folder / "raw-data").mkdir(parents=True)
        assert health(client, "ok")["problems"] == []


# -- storage that cannot be written ------------------------------------------------------------
def _run(prefix: list[str], code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [*prefix, sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=300,
    )


def test_a_cli_command_on_an_mlflow_db_it_cannot_create_says_which_file_and_why(
    tmp_path: Path,
) -> None:
    prefix = _restricted()
    ws, _ = Workspace.init(tmp_path / "ws")
    (ws.state_dir / "mlflow.db").unlink(missing_ok=True)
    ws.state_dir.chmod(0o555)  # no new files in .evertune/
    try:
        # MLflow would retry opening the file for ~100 s, then print a traceback.
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "evertune.cli", "-w", str(ws.root), "models", "list"],
            capture_output=True, text=True, timeout=90,
        )
    finally:
        ws.state_dir.chmod(0o755)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert f"the MLflow database {ws.state_dir / 'mlflow.db'}" in message
    assert "Permission denied" in message and "permissions" in message and "disk" in message


APPROVE = """
import json, sys
from pathlib import Path
from fastapi import FastAPI
from fastapi.testclient import TestClient
from evertune.api import create_router
from evertune.workspace import Workspace

ws = Workspace.open(Path(sys.argv[1]))
app = FastAPI()
app.include_router(create_router(ws))
token = (ws.state_dir / "token").read_text().strip()
with TestClient(app) as client:
    r = client.post("/api/models/1/approve", json={"comment": "looks good"},
                    headers={"Authorization": f"Bearer {token}"})
print(json.dumps({"status": r.status_code, "body": r.json()}))
"""


def test_approve_on_a_read_only_mlflow_db_is_a_503_naming_the_file(tmp_path: Path) -> None:
    prefix = _restricted()
    ws, _ = Workspace.init(tmp_path / "ws")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    Registry(ws).register_version(make_job("ftjob-1", adapter), make_report(), HISTORY)
    mlflow_db = ws.state_dir / "mlflow.db"
    mlflow_db.chmod(0o444)  # state.db and the rest stay writable
    try:
        done = _run(prefix, APPROVE.replace("sys.argv[1]", repr(str(ws.root))), tmp_path)
    finally:
        mlflow_db.chmod(0o600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 503, result
    error = result["body"]["error"]
    assert error["code"] == "storage_unavailable"
    assert f"the MLflow database {mlflow_db}" in error["message"]
    assert "readonly database" in error["message"] and "permissions" in error["message"]
