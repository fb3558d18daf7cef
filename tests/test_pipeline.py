"""The durable pipeline in-process: full runs on the tiny model, queueing, webhooks, restarts.

    .venv/bin/pytest tests/test_pipeline.py -q

Real DBOS (SQLite), a real moto S3 server and a real http.server on loopback; DBOS is one per
process, so each test launches the runtime for its workspace and shuts it down after.
The kill -9 tests are in tests/e2e/test_crash_recovery.py.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from evertune import notify, pipeline, steps
from evertune.bucket import Bucket
from evertune.errors import NotFoundError
from evertune.registry import Registry
from evertune.trigger import Watcher
from evertune.workspace import Workspace
from tests.conftest import make_workspace
from tests.e2e.test_cli import evertune
from tests.test_bucket import make_s3_bucket, moto_s3, s3_env  # noqa: F401 (fixtures)

# Fast evaluation: no embedding model, a gate on loss only (the verdict does not matter here).
PIPELINE_SETTINGS: dict[str, dict[str, Any]] = {
    "eval": {
        "max_examples": 8,
        "max_new_tokens": 8,
        "batch_size": 8,
        "metrics": ["loss", "rouge", "exact_match"],
    },
    "gate": {
        "bootstrap_samples": 200,
        "rules": [{"metric": "loss", "higher_is_better": False, "non_inferiority_margin": 10.0}],
    },
    "trigger": {"settle_seconds": 0, "poll_seconds": 0.1},
}
TEAMS = ["billing", "shipping", "account", "technical", "returns"]


def tickets(n: int = 40, tag: str = "") -> bytes:
    """`n` short input/output records (they fit the tiny model's max_seq_len)."""
    rows = [
        {"input": f"ticket {i}{tag}: my {TEAMS[i % 5]} issue {i}", "output": TEAMS[i % 5]}
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class Webhook:
    """A tiny webhook receiver on a free loopback port; `events` collects the POSTed JSON."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/evertune?token=s3cret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def _wait(predicate: Any, timeout: float = 120, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_s3_drop_runs_all_steps_queues_the_next_and_notifies(
    s3_env: str,  # noqa: F811
    tmp_path: Path,
    tiny_model: Path,
    webhook: Webhook,
) -> None:
    url = make_s3_bucket(s3_env, "team-data")
    ws = make_workspace(
        tmp_path / "ws",
        tiny_model,
        **PIPELINE_SETTINGS,
        storage={"bucket": url},
        notify={"webhook_url": webhook.url},
    )
    pipeline.launch(ws)
    try:
        bucket = Bucket.for_workspace(ws)
        watcher = Watcher(ws)
        landed = time.time()
        bucket.write_bytes("raw-data/tickets.jsonl", tickets())
        [good] = watcher.scan_once()
        # The job id is visible while training runs.
        _wait(lambda: pipeline.get_run(ws, good).job_id, what="FineTuning to start the job")
        assert pipeline.get_run(ws, good).step("FineTuning").status == "running"

        # One run per model at a time: a drop while a run is going waits, visible as queued.
        bucket.write_bytes("raw-data/broken.jsonl", b'{"input": "no output field"}\n')
        [bad] = watcher.scan_once()
        time.sleep(2 * pipeline.QUEUE_POLL_S)  # the queue had time to start it, and did not
        queued = pipeline.get_run(ws, bad)
        assert queued.status == "queued" and queued.started_at is None
        assert [s.status for s in queued.steps] == ["pending"] * 4

        run = pipeline.wait_run(ws, good, timeout=300)
        assert run.status == "succeeded", run.error
        assert run.version == 1
        assert [s.name for s in run.steps] == list(pipeline.STEPS)
        for step in run.steps:
            assert step.status == "succeeded" and step.attempts == 1
            assert step.started_at and step.finished_at and step.duration_s >= 0
            messages = [line["message"] for line in step.logs]
            assert messages[0] == "started" and "succeeded" in messages
        assert run.started_at >= landed and run.finished_at >= run.step("RegisterModel").finished_at
        data = run.step("DataPreprocessing").outputs
        assert data["file"] == "raw-data/tickets.jsonl" and data["counts"]["total"] == 40
        tuned = run.step("FineTuning").outputs
        assert tuned["job"].startswith("ftjob-") and tuned["trained_tokens"] > 0
        assert run.step("ModelEvaluation").outputs["verdict"] in ("pass", "fail")
        reg = run.step("RegisterModel").outputs
        assert reg["version"] == 1 and reg["approval_status"] in (
            "PendingManualApproval",
            "Rejected",
        )
        assert any(
            "webhook sent: model.registered" in line["message"]
            for line in run.step("RegisterModel").logs
        )
        [mv] = Registry(ws).list_versions()
        assert mv.pipeline_run == good and mv.job == tuned["job"]
        assert mv.dataset == data["training_dataset"]
        assert len(json.dumps(run.model_dump())) < 20_000  # step outputs stay small

        failed = pipeline.wait_run(ws, bad, timeout=60)
        assert failed.status == "failed"
        assert failed.started_at >= run.finished_at  # it waited for the first run
        assert failed.error.startswith("DataPreprocessing: ")
        assert "raw-data/broken.jsonl" in failed.error
        assert failed.step("DataPreprocessing").error in failed.error
        assert failed.version is None

        _wait(lambda: len(webhook.events) >= 2, timeout=10, what="two webhook events")
        registered, fail = webhook.events
        assert registered["event"] == "model.registered" and registered["version"] == 1
        assert registered["run_id"] == good and registered["model"] == "assistant"
        assert "assistant v1 registered" in registered["text"]
        assert fail["event"] == "run.failed" and fail["run_id"] == bad
        assert fail["step"] == "DataPreprocessing" and "broken.jsonl" in fail["error"]
        assert [r.id for r in pipeline.list_runs(ws)] == [bad, good]

        # `evertune runs wait` (the quickstart follows its run with it): the outcome and exit code.
        ok = evertune("-w", str(ws.root), "runs", "wait", good, cwd=tmp_path)
        assert f"run {good} succeeded: registered assistant v1" in ok.stdout
        assert "FineTuning" in ok.stdout and "RegisterModel" in ok.stdout  # the step table
        no = evertune("-w", str(ws.root), "runs", "wait", bad, cwd=tmp_path, check=False)
        assert (
            no.returncode == 1 and f"run {bad} failed" in no.stderr and "broken.jsonl" in no.stderr
        )
        unknown = evertune(
            "-w", str(ws.root), "runs", "wait", "run-nope", cwd=tmp_path, check=False
        )
        assert unknown.returncode != 0 and "no pipeline run 'run-nope'" in unknown.stderr
    finally:
        pipeline.shutdown()


@pytest.mark.slow
def test_api_run_survives_a_restart_while_its_job_keeps_training(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS)
    # What POST /v1/fine_tuning/jobs does before it starts the run.
    upload = tmp_path / "upload.jsonl"
    upload.write_bytes(tickets(tag=" api"))
    other = tmp_path / "other.jsonl"
    other.write_bytes(tickets(12, tag=" other"))
    steps.preprocess(ws, [other])  # cumulative mode must not pull this into an API run
    [dataset] = steps.preprocess(ws, [upload]).versions
    from evertune.training.jobs import create_job, get_job, list_events, list_jobs

    job = create_job(ws, dataset, run_id="run-api-1")
    trigger = {
        "source": "api",
        "run_id": "run-api-1",
        "file": str(upload),
        "dataset": dataset.id,
        "overrides": ["eval.max_new_tokens=4"],
    }

    # Stop the runtime while FineTuning waits: the training process (its own session) goes on.
    monkeypatch.setenv(pipeline.PAUSE_ENV, "FineTuning")
    pipeline.launch(ws, warm=False)
    try:
        assert pipeline.start_run(ws, trigger) == "run-api-1"
        assert pipeline.start_run(ws, trigger) == "run-api-1"  # idempotent
        _wait(
            lambda: any(
                "test hook" in line["message"]
                for line in pipeline.get_run(ws, "run-api-1").step("FineTuning").logs
            ),
            timeout=60,
            what="FineTuning to start the job",
        )
    finally:
        pipeline.shutdown()
    assert get_job(ws, job.id).status == "running"

    monkeypatch.delenv(pipeline.PAUSE_ENV)
    pipeline.launch(ws)
    try:
        run = pipeline.wait_run(ws, "run-api-1", timeout=300)
    finally:
        pipeline.shutdown()
    assert run.status == "succeeded", run.error
    assert run.step("DataPreprocessing").outputs["training_dataset"] == dataset.id
    assert run.step("DataPreprocessing").outputs["versions"] == [dataset.id]  # same content
    fine_tuning = run.step("FineTuning")
    assert fine_tuning.outputs["job"] == job.id and fine_tuning.attempts == 2
    assert any(f"job {job.id} is still training" in line["message"] for line in fine_tuning.logs)
    assert not any("resumed" in e.message for e in list_events(ws, job.id))  # waited, not resumed
    assert [j.id for j in list_jobs(ws)] == [job.id]
    assert Registry(ws).get_version(run.version).pipeline_run == "run-api-1"


def test_shutdown_interrupts_a_step_and_the_next_launch_resumes_it(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS)
    Bucket.for_workspace(ws).write_bytes("raw-data/bad.jsonl", b"not json\n")
    monkeypatch.setenv(pipeline.PAUSE_ENV, "DataPreprocessing")
    pipeline.launch(ws, warm=False)
    try:
        [run_id] = Watcher(ws).scan_once()
        _wait(
            lambda: any(
                "test hook" in line["message"]
                for line in pipeline.get_run(ws, run_id).step("DataPreprocessing").logs
            ),
            timeout=30,
            what="the paused step",
        )
    finally:
        pipeline.shutdown()
    paused = pipeline.get_run(ws, run_id)
    assert paused.status == "running" and paused.step("DataPreprocessing").status == "running"
    assert "interrupted by shutdown" in paused.step("DataPreprocessing").logs[-1]["message"]

    monkeypatch.delenv(pipeline.PAUSE_ENV)
    pipeline.launch(ws, warm=False)
    try:
        run = pipeline.wait_run(ws, run_id, timeout=30)
    finally:
        pipeline.shutdown()
    step = run.step("DataPreprocessing")
    assert run.status == "failed" and step.status == "failed" and step.attempts == 2
    assert "started again after a restart (attempt 2)" in [line["message"] for line in step.logs]
    assert "bad.jsonl is not JSON Lines" in run.error
    assert len(pipeline.list_runs(ws)) == 1


def test_runtime_and_trigger_errors(workspace: Workspace) -> None:
    trigger = {"source": "bucket", "bucket": "b", "key": "raw-data/a.jsonl", "version": "v1"}
    with pytest.raises(pipeline.PipelineError, match="evertune up"):
        pipeline.start_run(workspace, trigger)  # not launched in this process
    assert pipeline.run_id_for(trigger) == pipeline.run_id_for(dict(trigger))
    assert pipeline.run_id_for(trigger) != pipeline.run_id_for({**trigger, "version": "v2"})
    assert pipeline.run_id_for(trigger).startswith("run-")
    with pytest.raises(pipeline.PipelineError, match="lacks version"):
        pipeline.run_id_for({"source": "bucket", "bucket": "b", "key": "k"})
    pipeline.launch(workspace, warm=False)
    try:
        # DBOS's system DB holds every run's trigger and step outputs: private to its owner.
        assert stat.S_IMODE((workspace.state_dir / "dbos.db").stat().st_mode) == 0o600
        pipeline.launch(workspace, warm=False)  # idempotent for the same workspace
        with pytest.raises(pipeline.PipelineError, match="unknown"):
            pipeline.start_run(workspace, {"source": "ftp"})
        with pytest.raises(pipeline.PipelineError, match="needs run_id"):
            pipeline.start_run(workspace, {"source": "api", "file": "x.jsonl"})
        with pytest.raises(NotFoundError, match="no pipeline run 'run-nope'"):
            pipeline.get_run(workspace, "run-nope")
        assert pipeline.list_runs(workspace) == []
    finally:
        pipeline.shutdown()


def test_notify_never_raises(workspace: Workspace, webhook: Webhook, caplog: Any) -> None:
    assert notify.send(workspace, {"event": "run.failed"}) is False  # no URL configured
    assert notify.post("ftp://example.com/hook", {"event": "x"}) is False
    dead = "http://127.0.0.1:9/hook?token=s3cret"  # discard port: nothing listens
    assert notify.post(dead, {"event": "run.failed"}, timeout=1) is False
    assert "s3cret" not in caplog.text and "127.0.0.1" in caplog.text
    event = {
        "event": "run.failed",
        "run_id": "run-1",
        "model": "m",
        "step": "FineTuning",
        "error": "job x failed",
    }
    assert notify.post(webhook.url, event) is True
    assert (
        webhook.events[0]["text"] == "Evertune: run run-1 for m failed at FineTuning: job x failed"
    )


@pytest.mark.slow
def test_a_failed_run_is_retried_without_retraining_and_an_unchanged_drop_is_skipped(
    tmp_path: Path, tiny_model: Path
) -> None:
    from evertune.training.jobs import list_jobs

    ws = make_workspace(tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS)
    # A real fault where evaluation writes its report: the evals folder is a file.
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    if ws.evals_dir.is_dir():
        ws.evals_dir.rmdir()
    ws.evals_dir.write_text("not a folder\n")
    bucket = Bucket.for_workspace(ws)
    pipeline.launch(ws, warm=False)
    watcher = Watcher(ws)
    try:
        bucket.write_bytes("raw-data/tickets.jsonl", tickets())
        [first] = watcher.scan_once()
        failed = pipeline.wait_run(ws, first, timeout=300)
        assert failed.status == "failed" and failed.error.startswith("ModelEvaluation: ")
        assert failed.step("FineTuning").status == "succeeded"
        job = failed.job_id
        assert job and [j.id for j in list_jobs(ws)] == [job]
        assert Registry(ws).list_versions() == []
        shown = evertune("-w", str(ws.root), "runs", "show", first, cwd=tmp_path)
        assert f"evertune runs retry {first}" in shown.stdout

        # Fixed; `evertune runs retry` (another process: it enqueues with a DBOS client) makes
        # a new run that this process's runtime runs, reusing what succeeded.
        ws.evals_dir.unlink()
        out = evertune("-w", str(ws.root), "runs", "retry", first, cwd=tmp_path)
        retry_id = f"{first}-retry1"
        assert f"run {retry_id} retries {first}" in out.stdout
        assert pipeline.retry_run(ws, first) == retry_id  # the same retry, not a second one
        retried = pipeline.wait_run(ws, retry_id, timeout=300)
        assert retried.status == "succeeded", retried.error
        assert retried.retry_of == first and retried.trigger["key"] == "raw-data/tickets.jsonl"
        for name in ("DataPreprocessing", "FineTuning"):
            step = retried.step(name)
            assert step.status == "succeeded" and step.attempts == 0  # not run again
            assert step.outputs["reused_from"] == first
            assert f"reused from run {first}" in step.logs[-1]["message"]
        assert retried.job_id == job and [j.id for j in list_jobs(ws)] == [job]  # no retraining
        assert retried.step("ModelEvaluation").attempts == 1
        [mv] = Registry(ws).list_versions()
        assert retried.version == mv.version == 1 and mv.job == job
        with pytest.raises(pipeline.PipelineError, match="only a failed run can be retried"):
            pipeline.retry_run(ws, retry_id)

        # The same records again under another key: the training set is the one v1 was
        # trained on, so the run ends as skipped instead of training a copy. `runs wait --key`
        # waits for *this* drop's run, though the watcher has not started it yet.
        watcher.start()
        bucket.write_bytes("raw-data/tickets-again.jsonl", tickets())
        out = evertune("-w", str(ws.root), "runs", "wait", "--key",
                       "raw-data/tickets-again.jsonl", "--timeout", "120", cwd=tmp_path)
        again = pipeline.run_id_for_key(ws, "raw-data/tickets-again.jsonl")
        assert f"run {again} skipped: training set " in out.stdout.replace("\n", " ")
        skipped = pipeline.get_run(ws, again)
        assert skipped.status == "skipped" and skipped.error is None and skipped.version is None
        dataset = skipped.step("DataPreprocessing").outputs["training_dataset"]
        assert dataset == mv.dataset
        assert f"training set {dataset} is the one v1 was trained on" in str(skipped.skip_reason)
        assert [s.status for s in skipped.steps] == ["succeeded", "skipped", "skipped", "skipped"]
        assert len(list_jobs(ws)) == 1 and len(Registry(ws).list_versions()) == 1

        listed = json.loads(
            evertune("-w", str(ws.root), "runs", "list", "--json", cwd=tmp_path).stdout
        )
        by_id = {r["id"]: r for r in listed}
        assert [r["id"] for r in listed] == [again, retry_id, first]
        assert by_id[again]["status"] == "skipped"
        assert by_id[again]["skip_reason"] == skipped.skip_reason
        assert by_id[first]["status"] == "failed" and by_id[retry_id]["version"] == 1
        table = evertune("-w", str(ws.root), "runs", "list", cwd=tmp_path).stdout
        assert "skipped" in table and f"training set {dataset}" in table
        assert f"retry of {first}" in table
    finally:
        watcher.stop()
        pipeline.shutdown()


@pytest.mark.slow
def test_a_judge_that_is_down_fails_the_evaluation_and_the_retry_scores_with_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    from evertune.evaluation.report import load_report
    from tests.evaluation.test_judge import ScriptedJudge
    from tests.serving.fixtures import free_port, run_server

    port = free_port()  # nothing listens there yet: the judge is down
    judge = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "scripted"}
    ws = make_workspace(tmp_path / "ws", tiny_model,
                        **{**PIPELINE_SETTINGS, "eval": {**PIPELINE_SETTINGS["eval"],
                                                         "judge": judge}})
    bucket = Bucket.for_workspace(ws)
    pipeline.launch(ws, warm=False)
    watcher = Watcher(ws)
    try:
        bucket.write_bytes("raw-data/tickets.jsonl", tickets())
        [first] = watcher.scan_once()
        failed = pipeline.wait_run(ws, first, timeout=300)
        assert failed.status == "failed" and failed.error.startswith("ModelEvaluation: ")
        assert f"127.0.0.1:{port}" in failed.error and "runs retry" in failed.error
        assert Registry(ws).list_versions() == []

        # The judge is back at the same address: the retry evaluates with it and registers.
        script = ScriptedJudge()
        with run_server(script.app(), port=port):
            retry_id = pipeline.retry_run(ws, first)
            retried = pipeline.wait_run(ws, retry_id, timeout=300)
        assert retried.status == "succeeded", retried.error
        assert script.prompts, "the retry never asked the judge"
        [version] = Registry(ws).list_versions()
        report = load_report(ws.evals_dir / version.eval_report / "report.json")
        test = report.splits["test"]
        assert "judge_score" in test.means["candidate"]
        assert all(row.judge is not None for row in test.rows)
    finally:
        pipeline.shutdown()
