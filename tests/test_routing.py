"""Routing by data, stage chains and KTO from feedback ratings.

    .venv/bin/python -m pytest tests/test_routing.py -q            # all (the slow ones train)
    .venv/bin/python -m pytest tests/test_routing.py -q -m "not slow"

The kind of the drop decides a round's method (`train.method: auto`), each stage of
`train.stages` trains on the data of its kind continuing from the previous stage's job, and a
KTO round learns from feedback ratings alone. Plans are checked without training; the pipeline
tests run real jobs on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evertune import pipeline, steps
from evertune.bucket import Bucket
from evertune.errors import ConfigError, DataError
from evertune.monitoring.feedback import build_record, write_feedback
from evertune.registry import Registry
from evertune.training import jobs
from evertune.trigger import Watcher
from evertune.workspace import Workspace
from tests.conftest import make_workspace
from tests.e2e.test_cli import evertune
from tests.test_pipeline import PIPELINE_SETTINGS, _wait, tickets


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def texts(n: int = 12, tag: str = "") -> bytes:
    return jsonl([{"text": f"Document {i}{tag}: the parcel left the depot on day {i}."}
                  for i in range(n)])


def pairs(n: int = 24, tag: str = "") -> bytes:
    teams = ["billing", "shipping", "account", "returns"]
    return jsonl([{"prompt": f"ticket {i}{tag}: route it", "chosen": teams[i % 4],
                   "rejected": f"I cannot help with ticket {i}."} for i in range(n)])


def ratings(n: int = 12) -> bytes:
    return jsonl([{"prompt": f"ticket {i}: route it", "completion": "billing",
                   "label": i % 2 == 0} for i in range(n)])


def store(ws: Workspace, tmp_path: Path, name: str, data: bytes) -> list[Any]:
    """`evertune data add` of one file; its dataset versions."""
    path = tmp_path / name
    path.write_bytes(data)
    return list(steps.preprocess(ws, [path]).versions)


def test_the_kind_of_the_drop_decides_the_method(tmp_path: Path, tiny_model: Path) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model)
    assert ws.config.train.method == "auto" and ws.config.train.stages == []
    sft = store(ws, tmp_path, "tickets.jsonl", tickets(20))
    first_text = store(ws, tmp_path, "book.txt", b"Chapter one.\n\nChapter two.\n")
    text = store(ws, tmp_path, "docs.jsonl", texts())
    pref = store(ws, tmp_path, "pairs.jsonl", pairs())
    rated = store(ws, tmp_path, "ratings.jsonl", ratings())
    logged: list[str] = []

    [stage] = steps.plan_round(ws, drop=text, log=logged.append)
    # A text drop: a pretraining round on all the text stored so far (the union of both).
    assert stage.method == "pretrain" and stage.dataset.kind == "pretrain"
    assert stage.dataset.origin == "union" and stage.dataset.counts["total"] == 14
    assert set(stage.dataset.report["union_of"]) == {first_text[0].id, text[0].id}
    assert any("method pretrain (auto: the round's data is pretrain)" in line for line in logged)

    assert [(s.method, s.dataset.id) for s in steps.plan_round(ws, drop=pref)] == [
        ("dpo", pref[0].id)]
    assert [(s.method, s.dataset.id) for s in steps.plan_round(ws, drop=rated)] == [
        ("kto", rated[0].id)]
    assert [(s.method, s.dataset.id) for s in steps.plan_round(ws, drop=sft)] == [
        ("supervised", sft[0].id)]
    # No drop (`evertune tune`): the newest stored data decides; a named dataset its own kind.
    assert [s.method for s in steps.plan_round(ws)] == ["kto"]
    assert [s.method for s in steps.plan_round(ws, dataset_ref=pref[0].id)] == ["dpo"]
    assert [s.method for s in steps.plan_round(ws, method="supervised")] == ["supervised"]

    # An explicit method is kept whatever is dropped: the text drop trains supervised.
    fixed = Workspace.open(ws.root, ["train.method=supervised"])
    [stage] = steps.plan_round(fixed, drop=text)
    assert stage.method == "supervised" and stage.dataset.id == sft[0].id
    with pytest.raises(DataError, match="holds pretrain records, but --method=supervised"):
        steps.plan_round(ws, method="supervised", dataset_ref=text[0].id)

    # data.mode latest: the drop's own version of the stage's kind, else all of that kind.
    latest = Workspace.open(ws.root, ["data.mode=latest", "train.stages=[pretrain,supervised]"])
    plan = steps.plan_round(latest, drop=text)
    assert [(s.method, s.dataset.id) for s in plan] == [("pretrain", text[0].id),
                                                        ("supervised", sft[0].id)]


def test_a_method_or_stage_without_its_data_fails_naming_the_data_to_add(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model)
    sft = store(ws, tmp_path, "tickets.jsonl", tickets(20))

    dpo = Workspace.open(ws.root, ["train.method=dpo"])
    with pytest.raises(DataError) as err:
        steps.plan_round(dpo, drop=sft)
    message = str(err.value)
    assert "train.method=dpo trains on dpo data, preference pairs" in message
    assert '{"prompt", "chosen", "rejected"}' in message and "drop a file of them" in message
    assert "train.method: auto" in message

    chain = Workspace.open(ws.root, ["train.stages=[pretrain,supervised,dpo]"])
    with pytest.raises(DataError) as err:
        steps.plan_round(chain, drop=sft)
    message = str(err.value)
    assert "stage pretrain needs text" in message  # every missing stage, in one message
    assert ("stage dpo needs preference pairs ({\"prompt\", \"chosen\", \"rejected\"}) and none "
            "are stored; drop a file of them or remove dpo from train.stages") in message
    assert "supervised" not in message.replace("train.stages", "")
    assert jobs.list_jobs(ws) == []

    kto = Workspace.open(ws.root, ["train.method=kto"])
    with pytest.raises(DataError, match=r"train.method=kto trains on kto data, rated answers.*"
                                        r"POST /v1/feedback"):
        steps.plan_round(kto, drop=sft)

    # A gate rule on a metric eval.metrics turns off ends the round in its evaluation: refused
    # while planning, before minutes of training, naming the rule.
    no_embedding = Workspace.open(ws.root, ["eval.metrics=[loss,rouge,exact_match]"])
    with pytest.raises(ConfigError, match=r"gate.rules\[\d\].metric 'embedding_cosine' is not "
                                          r"computed"):
        steps.plan_round(no_embedding, drop=sft)
    assert jobs.list_jobs(ws) == []


SERVED_CHAT = {"endpoint": "chat", "prompt": [{"role": "user", "content": "Where is my parcel?"}],
               "completion": "No idea.", "version": "v1", "model": "assistant@prod"}
SERVED_TEXT = {"endpoint": "completions", "prompt": "Ticket: refund please\nTeam:",
               "completion": " shipping", "version": "v1", "model": "assistant@prod"}


def rate(ws: Workspace, served: dict[str, Any], response_id: str, rating: int | None,
         correction: str | None = None, sender: str = "support-app") -> None:
    """Feedback as the gateway writes it (POST /v1/feedback on a response it served)."""
    record = build_record(served, response_id=response_id, rating=rating, correction=correction,
                          sender=sender, receiver=sender)
    write_feedback(ws, record, response_id)


def test_a_kto_round_learns_from_feedback_ratings_alone(tmp_path: Path, tiny_model: Path) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model, train={"method": "kto"})
    sft = store(ws, tmp_path, "tickets.jsonl", tickets(20))  # no rated answers uploaded
    rate(ws, SERVED_CHAT, "chatcmpl-up", 1, sender="alice")
    rate(ws, SERVED_CHAT, "chatcmpl-down", -1, sender="bob")
    rate(ws, SERVED_CHAT, "chatcmpl-meh", 0)
    rate(ws, {**SERVED_CHAT, "completion": "Parcels? No clue."}, "chatcmpl-fixed", -1,
         correction="It ships tomorrow.", sender="carol")
    rate(ws, SERVED_TEXT, "cmpl-down", -1, sender="dave")
    rate(ws, {**SERVED_TEXT, "prompt": "Ticket: charged twice\nTeam:"}, "cmpl-fixed", None,
         correction=" billing", sender="erin")
    logged: list[str] = []

    [stage] = steps.plan_round(ws, drop=sft, log=logged.append)
    assert stage.method == "kto" and stage.dataset.kind == "kto"
    assert stage.dataset.origin == "feedback"
    rows = [r for s in ("train", "validation", "test") for r in stage.dataset.records(s)]

    def answer(r: dict[str, Any]) -> str:
        return r["messages"][-1]["content"] if "messages" in r else r["completion"]

    got = sorted((r["feedback"]["response_id"], answer(r), r["label"], r["feedback"]["sender"])
                 for r in rows)
    assert got == [
        ("chatcmpl-down", "No idea.", False, "bob"),
        ("chatcmpl-fixed", "It ships tomorrow.", True, "carol"),  # the correction: good
        ("chatcmpl-fixed", "Parcels? No clue.", False, "carol"),  # the answer it replaced
        ("chatcmpl-up", "No idea.", True, "alice"),
        ("cmpl-down", " shipping", False, "dave"),
        ("cmpl-fixed", " billing", True, "erin"),  # a correction without a rating
        ("cmpl-fixed", " shipping", False, "erin"),
    ]  # the neutral rating is not trained on
    assert stage.dataset.report["labels"] == {"desirable": 3, "undesirable": 4}
    assert any("stored as rated answers" in line and "3 good, 4 bad" in line for line in logged)
    # The same ratings again are the same dataset version (content-addressed).
    assert steps.plan_round(ws, drop=sft)[0].dataset.id == stage.dataset.id

    # A supervised round on the same feedback still never imitates an answer rated down
    # (the chat records: the file's first format; a liked and a neutral "No idea." are one).
    sft_rows = [r for s in ("train", "validation", "test")
                for r in steps.training_data(ws).records(s) if "feedback" in r]
    assert sorted(answer(r) for r in sft_rows) == ["It ships tomorrow.", "No idea."]
    assert all(r["feedback"]["label"] != "negative" for r in sft_rows)

    # Uploaded rated answers and the ratings train together.
    rated = store(ws, tmp_path, "ratings.jsonl", ratings())
    [stage] = steps.plan_round(ws, drop=rated)
    assert stage.dataset.origin == "union" and stage.dataset.counts["total"] == 12 + 7


def test_a_chain_missing_a_kind_fails_in_data_preprocessing_before_any_job(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS,
                        train={"stages": ["supervised", "dpo"]})
    pipeline.launch(ws, warm=False)
    try:
        Bucket.for_workspace(ws).write_bytes("raw-data/tickets.jsonl", tickets())
        [run_id] = Watcher(ws).scan_once()
        run = pipeline.wait_run(ws, run_id, timeout=120)
    finally:
        pipeline.shutdown()
    assert run.status == "failed" and run.error.startswith("DataPreprocessing: ")
    assert "stage dpo needs preference pairs" in run.error
    assert "drop a file of them or remove dpo from train.stages" in run.error
    assert [s.status for s in run.steps] == ["failed", "pending", "pending", "pending"]
    assert run.step("DataPreprocessing").outputs["versions"]  # the drop itself was stored
    assert jobs.list_jobs(ws) == []


def test_tune_method_option_and_a_method_without_data(tmp_path: Path, tiny_model: Path) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model)
    store(ws, tmp_path, "tickets.jsonl", tickets(20))
    out = evertune("-w", str(ws.root), "tune", "--method", "dpo", cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert "--method dpo trains on dpo data, preference pairs" in out.stderr + out.stdout
    assert jobs.list_jobs(ws) == []


def _job_of(ws: Workspace, run_id: str) -> jobs.Job:
    job_id = _wait(lambda: pipeline.get_run(ws, run_id).job_id, what="FineTuning to start a job")
    return jobs.get_job(ws, job_id)


@pytest.mark.slow
def test_a_text_drop_trains_pretrain_and_a_preference_drop_trains_dpo(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS)
    store(ws, tmp_path, "tickets.jsonl", tickets(20))
    earlier = store(ws, tmp_path, "earlier.jsonl", texts(8, tag=" earlier"))
    bucket = Bucket.for_workspace(ws)
    watcher = Watcher(ws)
    pipeline.launch(ws, warm=False)
    try:
        for key, data, method, kind in (
            ("raw-data/docs.jsonl", texts(), "pretrain", "pretrain"),
            ("raw-data/pairs.jsonl", pairs(), "dpo", "dpo"),
        ):
            bucket.write_bytes(key, data)
            [run_id] = watcher.scan_once()
            job = _job_of(ws, run_id)
            assert job.method == method, (key, job.method)
            prep = pipeline.get_run(ws, run_id).step("DataPreprocessing")
            assert prep.outputs["method"] == method
            assert prep.outputs["training_dataset"] == job.training_file
            dataset = steps.training_data(ws, kind=kind)
            assert job.training_file == dataset.id  # the cumulative data of the drop's kind
            assert any(f"method {method} (auto: the round's data is {kind})" in line["message"]
                       for line in prep.logs)
            # Routing is what is tested here: stop the job rather than train it to the end.
            jobs.cancel_job(ws, job.id)
            run = pipeline.wait_run(ws, run_id, timeout=300)
            assert run.step("FineTuning").outputs["method"] == method
            assert run.status in ("failed", "succeeded")
        text_job = jobs.get_job(ws, [j for j in jobs.list_jobs(ws) if j.method == "pretrain"][0].id)
        union = steps.training_data(ws, kind="pretrain")
        assert text_job.training_file == union.id and earlier[0].id in union.report["union_of"]
    finally:
        pipeline.shutdown()


@pytest.mark.slow
def test_a_supervised_then_dpo_chain_runs_each_stage_from_the_previous_one(
    tmp_path: Path, tiny_model: Path
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from evertune.web import console_router
    from tests.web.test_pipeline_pages import element

    ws = make_workspace(tmp_path / "ws", tiny_model, **PIPELINE_SETTINGS,
                        train={"stages": ["supervised", "dpo"]})
    [sft] = store(ws, tmp_path, "tickets.jsonl", tickets(24))
    bucket = Bucket.for_workspace(ws)
    pipeline.launch(ws, warm=False)
    try:
        bucket.write_bytes("raw-data/pairs.jsonl", pairs())
        [run_id] = Watcher(ws).scan_once()
        run = pipeline.wait_run(ws, run_id, timeout=600)
    finally:
        pipeline.shutdown()
    assert run.status == "succeeded", run.error
    prep = run.step("DataPreprocessing").outputs
    pref = steps.training_data(ws, kind="dpo")
    assert prep["stages"] == [{"stage": 1, "method": "supervised", "dataset": sft.id},
                              {"stage": 2, "method": "dpo", "dataset": pref.id}]
    assert prep["method"] == "dpo" and prep["training_dataset"] == pref.id

    tuned = run.step("FineTuning").outputs
    first, second = (jobs.get_job(ws, s["job"]) for s in tuned["stages"])
    assert [(s["stage"], s["method"], s["status"]) for s in tuned["stages"]] == [
        (1, "supervised", "succeeded"), (2, "dpo", "succeeded")]
    assert (first.method, first.training_file, first.parent) == ("supervised", sft.id, None)
    assert (second.method, second.training_file, second.parent) == ("dpo", pref.id, first.id)
    assert first.run_id == f"{run_id}/1-supervised" and second.run_id == f"{run_id}/2-dpo"
    assert tuned["job"] == second.id == run.job_id  # evaluation and registration use the last
    assert {j.id for j in jobs.list_jobs(ws)} == {first.id, second.id}

    [mv] = Registry(ws).list_versions()
    assert mv.job == second.id and mv.pipeline_run == run_id and mv.parent_version is None
    assert steps.version_stages(ws, mv) == [("supervised", sft.id), ("dpo", pref.id)]

    # The step running again (a kill -9 mid-chain, resumed by DBOS) finds both stage jobs.
    plan = [steps.Stage("supervised", sft), steps.Stage("dpo", pref)]
    again = steps.run_stages(ws, plan, run_id=run_id, wait=lambda j: steps.follow_job(ws, j))
    assert [j.id for j in again] == [first.id, second.id] and len(jobs.list_jobs(ws)) == 2
    # Nothing new dropped: the same chain on the same data would register a copy.
    assert "training sets" in str(steps.unchanged_reason(ws, pref, "dpo", plan))

    # The run page shows the stage jobs under FineTuning, with links to their pages.
    app = FastAPI()
    app.include_router(console_router(ws))
    app.state.workspace = ws
    with TestClient(app) as client:
        token = ws.create_token("ana", "viewer")
        client.post("/login", data={"token": token}, follow_redirects=False)
        html = client.get(f"/runs/{run_id}").text
    dag = element(html, "dag-stages")
    assert f'href="/jobs/{first.id}"' in dag and f'href="/jobs/{second.id}"' in dag
    assert dag.index("supervised") < dag.index("dpo")
    table = element(html, "stages-FineTuning")
    assert f'href="/datasets/{pref.id}"' in table and "succeeded" in table
