"""Evertune on real engines on loopback: pytest tests/scale/test_engines.py

An `mlflow server` with a PostgreSQL backend store and S3 artifacts (moto's S3 server) is the
registry; a server that is down, S3 without credentials and a wrong Postgres URL are refused by
`evertune up` at start with the setting to fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evertune.registry import Registry
from evertune.workspace import Workspace
from tests.postgres import free_port
from tests.test_registry import HISTORY, make_job, make_report

pytestmark = pytest.mark.slow


def test_versions_live_on_an_mlflow_server_with_postgres_and_s3(
    tmp_path: Path, mlflow_server: str, pg_url: str, moto_endpoint: str
) -> None:
    Workspace.init(tmp_path / "ws")
    ws = Workspace.open(tmp_path / "ws", [f"registry.tracking_uri={mlflow_server}",
                                          f"storage.state_db={pg_url}"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 16)
    reg = Registry(ws)
    mv = reg.register_version(make_job("ftjob-srv", adapter), make_report(), HISTORY)
    assert mv.source.startswith("mlflow-artifacts:/") or mv.source.startswith("s3://")

    # Another process (a replica on another host) sees the version through the server, and
    # the artifacts come back through the server's proxy from S3.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    (found,) = client.search_model_versions(f"name = '{ws.config.model.name}'")
    assert int(found.version) == mv.version
    other = Workspace.open(Workspace.init(tmp_path / "other")[0].root,
                           [f"registry.tracking_uri={mlflow_server}"])
    folder = Registry(other).version_artifact_path(mv.version)
    assert (folder / "adapter_model.safetensors").read_bytes() == bytes(range(256)) * 16
    # The bytes are in the S3 bucket (moto), not on this disk.
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, **{
        k: v for k, v in {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
                          "region_name": "us-east-1"}.items()})
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="team-models")["Contents"]]
    assert any(k.endswith("adapter_model.safetensors") for k in keys), keys


def _up_refused(tmp_path: Path, *sets: str, env: dict[str, str | None] | None = None) -> str:
    root = tmp_path / "ws"
    Workspace.init(root)
    args = [sys.executable, "-m", "evertune.cli", "-w", str(root), "up", "--port",
            str(free_port())] + [a for s in sets for a in ("--set", s)]
    started = time.monotonic()
    merged = {**os.environ, "COLUMNS": "200", **(env or {})}
    done = subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in merged.items() if v is not None})
    assert done.returncode != 0, done.stdout
    assert time.monotonic() - started < 60  # at start, not after MLflow's retries
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    return out


def test_up_refuses_an_mlflow_server_that_is_down(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    out = _up_refused(tmp_path, f"registry.tracking_uri={down}")
    assert f"the MLflow tracking server at {down} (registry.tracking_uri) does not answer" in out


def test_up_refuses_s3_without_credentials(tmp_path: Path, moto_endpoint: str) -> None:
    bare: dict[str, str | None] = {k: None for k in (  # unset: no credentials anywhere
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    bare.update({"AWS_ENDPOINT_URL": moto_endpoint, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                 "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"})
    out = _up_refused(tmp_path, "storage.bucket=s3://team-data", env=bare)
    assert "cannot list s3://team-data (storage.bucket)" in out
    assert "AWS_ACCESS_KEY_ID" in out


def test_up_refuses_a_postgres_url_that_does_not_answer(tmp_path: Path) -> None:
    wrong = f"postgresql+psycopg://evertune:pw@127.0.0.1:{free_port()}/evertune"
    out = _up_refused(tmp_path, f"storage.state_db={wrong}")
    assert "cannot connect to the state DB" in out and "(storage.state_db)" in out
    assert ":pw@" not in out


def test_up_refuses_a_ray_address_that_does_not_answer(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="needs Ray: pip install -e '.[dev]' (or '.[ray]')")
    wrong = f"127.0.0.1:{free_port()}"
    out = _up_refused(tmp_path, "train.backend=ray", f"train.ray.address={wrong}")
    assert f"train.ray.address='{wrong}' does not answer" in out
    assert "ray start --head" in out
