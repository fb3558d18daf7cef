"""Engines for the scale tests, started on loopback: moto's S3 server, an `mlflow server`
(Postgres backend store, S3 artifacts) and a Ray head. Module-scoped: each test module gets
its own, so one module's leftovers (registered models, buckets) never meet another's."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.mlflow_server import ARTIFACT_BUCKET, mlflow_server
from tests.postgres import PostgresServer
from tests.test_bucket import make_s3_bucket, moto_s3  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def moto_endpoint(moto_s3: str) -> str:  # noqa: F811 (the imported fixture)
    """moto's S3 server on loopback (tests/test_bucket.py's fixture)."""
    return moto_s3


@pytest.fixture(scope="module", name="mlflow_server")
def mlflow_server_fixture(postgres: PostgresServer, moto_endpoint: str,
                          tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server`: Postgres backend store, artifacts proxied to s3://team-models."""
    make_s3_bucket(moto_endpoint, ARTIFACT_BUCKET)
    store = postgres.create_database("mlflow_" + secrets.token_hex(4))
    log = tmp_path_factory.mktemp("mlflow") / "server.log"
    with mlflow_server(store, moto_endpoint, log) as url:
        yield url


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """The address of a 2-CPU Ray head on loopback (tests/ray_cluster.py)."""
    pytest.importorskip("ray", reason="needs Ray: pip install -e '.[dev]' (or '.[ray]')")
    from tests.ray_cluster import ray_head

    with ray_head() as address:
        yield address
