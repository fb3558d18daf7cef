"""The whole loop on the distributed stack, every engine real, on loopback:

    pytest tests/scale/test_stack.py        # ~4-5 min on 2 CPU cores

Debian's postgresql (the state DB and DBOS; the MLflow server's store), moto's S3 server (the
landing bucket; the MLflow server's artifacts), an `mlflow server`, a 2-CPU Ray head, two
`evertune up --no-serving` replicas and one `evertune serve --stage prod`. A file dropped in
an S3 bucket becomes a run trained by two Ray workers and a version registered in the MLflow
server; an approver approves it through the second replica's API; the serve process answers
from it. A second drop's run survives kill -9 of the replica executing it: the other replica
finishes it and registers exactly one more version.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
from pathlib import Path

import boto3
import httpx
import pytest
from sqlalchemy import create_engine, text

from evertune.registry import Registry
from evertune.training import get_job
from evertune.training.jobs import job_dir
from evertune.workspace import Workspace
from tests.conftest import make_workspace
from tests.mlflow_server import S3_ENV
from tests.scale.procs import health, start, stop, training_executor, wait
from tests.test_bucket import make_s3_bucket
from tests.test_pipeline import PIPELINE_SETTINGS, tickets

pytestmark = pytest.mark.slow


def test_the_loop_runs_on_postgres_s3_mlflow_ray_and_two_replicas(
    tmp_path: Path, tiny_model: Path, pg_url: str, moto_endpoint: str, mlflow_server: str,
    ray_cluster: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3_env = {**S3_ENV, "AWS_ENDPOINT_URL": moto_endpoint}
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    # moto keeps buckets in process-wide memory (every moto server of this pytest process
    # shares them): a bucket of this test's own, so other modules' "team-data" stays empty.
    bucket = "stack-" + secrets.token_hex(4)
    make_s3_bucket(moto_endpoint, bucket)
    ws = make_workspace(
        tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS,
        storage={"state_db": pg_url, "bucket": f"s3://{bucket}"},
        registry={"tracking_uri": mlflow_server},
        train={"n_epochs": 2, "checkpoint_every": 2, "backend": "ray",
               "ray": {"address": ray_cluster, "num_workers": 2}},
    )
    ws = Workspace.open(ws.root)
    # Tokens live in the Postgres state DB: the replicas and the serve process read them there.
    approver = ws.create_token("ana", "approver")
    serving_key = ws.create_token("app", "serving")
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    engine = create_engine(pg_url)
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "serve")}
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for name in ("a", "b"):
            procs[name] = start(ws, logs[name], "up", "--no-serving", env=s3_env)
        procs["serve"] = start(ws, logs["serve"], "serve", "--stage", "prod", env=s3_env)
        status = {name: wait(lambda p=port: (h := health(p)) and h["status"] == "ok" and h,
                             240, f"{name} healthy", logs.values())
                  for name, (_, port) in procs.items()}
        assert sorted(status[n]["role"] for n in "ab") == ["follower", "leader"], status
        executors = {status[n]["replica"]: n for n in "ab"}

        def runs() -> list[tuple[str, str]]:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(
                    "SELECT id, status FROM pipeline_runs ORDER BY created_at"))]

        def finished(n: int) -> list[tuple[str, str]] | None:
            done = [r for r in runs() if r[1] in ("succeeded", "failed")]
            return done if len(done) >= n else None

        # -- 1. drop → run on Ray → version in the MLflow server ------------------------------
        s3.put_object(Bucket=bucket, Key="raw-data/tickets.jsonl", Body=tickets(40))
        assert [s for _, s in wait(lambda: finished(1), 300, "the first run", logs.values())] \
            == ["succeeded"]
        (job_id,) = _jobs(engine)
        workers = sorted(p.name for p in (job_dir(ws, job_id) / "workers").glob("rank-*.json"))
        assert workers == ["rank-0.json", "rank-1.json"]  # two Ray workers trained it
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        (found,) = client.search_model_versions(f"name = '{ws.config.model.name}'")
        assert found.version == "1" and found.run_id

        # -- 2. approve through replica b → QA → system tests → PROD; serve answers from it ---
        _, port_b = procs["b"]
        answer = httpx.post(f"http://127.0.0.1:{port_b}/api/models/v1/approve",
                            headers={"authorization": f"Bearer {approver}"},
                            json={"comment": "scale test"}, timeout=240)
        assert answer.status_code == 200, answer.text
        assert answer.json()["stage"] == "prod", answer.json()
        _, serve_port = procs["serve"]

        def served_by() -> str | None:
            reply = httpx.post(
                f"http://127.0.0.1:{serve_port}/v1/chat/completions",
                headers={"authorization": f"Bearer {serving_key}"}, timeout=60,
                json={"model": ws.config.model.name, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "ticket 3: my billing issue"}]})
            assert reply.status_code == 200, reply.text
            return reply.json()["model"] if reply.json()["model"].endswith("@v1") else None

        assert wait(served_by, 60, "the serve process to answer from v1", logs.values())

        # -- 3. kill -9 of the replica executing a second run; the other finishes it ----------
        s3.put_object(Bucket=bucket, Key="raw-data/more-tickets.jsonl",
                      Body=tickets(40, tag="b"))

        training = wait(lambda: training_executor(engine, executors), 240,
                        "a replica training run 2",
                        logs.values())
        victim = executors[training]
        proc, _ = procs.pop(victim)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        survivor = "b" if victim == "a" else "a"
        done = wait(lambda: finished(2), 300, "run 2 on the survivor", logs.values())
        assert [s for _, s in done] == ["succeeded", "succeeded"]
        assert [v.version for v in Registry(ws).list_versions()] == [2, 1]  # once each
        with engine.connect() as conn:
            executor = conn.execute(text(
                "SELECT executor_id FROM dbos.workflow_status WHERE workflow_uuid = :id"),
                {"id": done[1][0]}).scalar_one()
        assert executors.get(executor) == survivor, (executor, executors, victim)
        jobs = [get_job(ws, j) for j in _jobs(engine)]
        assert [j.status for j in jobs] == ["succeeded", "succeeded"]  # one job per run
    finally:
        stop(proc for proc, _ in procs.values())


def _jobs(engine) -> list[str]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT id FROM jobs ORDER BY created_at")).scalars())

