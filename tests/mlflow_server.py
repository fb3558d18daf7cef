"""A real `mlflow server` for tests and benchmarks, on loopback.

    with mlflow_server(store_url, s3_endpoint, log) as url:    # http://127.0.0.1:PORT
        ...                                                    # registry.tracking_uri=<url>

Backend store: a SQLAlchemy URL (a Postgres database in the scale tests); artifacts proxied
by the server to s3://team-models on an S3 endpoint (moto's server), so clients never need
S3 credentials of their own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.postgres import free_port

# moto accepts any credentials; the variables must exist for boto3 to sign at all.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}
ARTIFACT_BUCKET = "team-models"


@contextlib.contextmanager
def mlflow_server(store: str, s3_endpoint: str, log: Path) -> Iterator[str]:
    """Start the server (the bucket `ARTIFACT_BUCKET` must exist); yield its URL; stop it."""
    port = free_port()
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
             "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/mlartifacts",
             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("mlflow server did not start:\n" + log.read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
