"""Engines for the scale tests, started on loopback: moto's S3 server, an `mlflow server`
(Postgres backend store, S3 artifacts) and a Ray head. Module-scoped: each test module gets
its own, so one module's leftovers (registered models, buckets) never meet another's."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.postgres import PostgresServer, free_port
from tests.test_bucket import make_s3_bucket, moto_s3  # noqa: F401 (a fixture)

# moto accepts any credentials; the variables must exist for boto3 to sign at all.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto_endpoint(moto_s3: str) -> str:  # noqa: F811 (the imported fixture)
    """moto's S3 server on loopback (tests/test_bucket.py's fixture)."""
    return moto_s3


@pytest.fixture(scope="module")
def mlflow_server(postgres: PostgresServer, moto_endpoint: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server`: Postgres backend store, artifacts proxied to s3://team-models."""
    make_s3_bucket(moto_endpoint, "team-models")
    store = postgres.create_database("mlflow_" + secrets.token_hex(4))
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow") / "server.log"
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": moto_endpoint}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
             "--artifacts-destination", "s3://team-models/mlartifacts", "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
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


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """The address of a 2-CPU Ray head on loopback (tests/ray_cluster.py)."""
    pytest.importorskip("ray", reason="needs Ray: pip install -e '.[dev]' (or '.[ray]')")
    from tests.ray_cluster import ray_head

    with ray_head() as address:
        yield address
