"""Drift monitoring on real traffic: a served, trained tiny model, the official `openai` client,
the real request log, feedback, registry, audit log and pipeline.

    .venv/bin/python -m pytest -q tests/monitoring/test_drift.py

The story test serves a LoRA version trained on support tickets (its dataset version is what
PROD's lineage names), sends held-out tickets (no drift), then cooking questions (drift: an
audit event, gauges on /metrics, one pipeline run with the feedback gathered so far), then
tickets again (drift clears). The embedding model is the packaged all-MiniLM-L6-v2, the same
one production uses, so the p-values are the real ones for these prompts.
"""

from __future__ import annotations

import random
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from evertune import pipeline, steps
from evertune.monitoring import ServingMetrics
from evertune.monitoring.drift import (
    CLEAR_FACTOR,
    DRIFT,
    PERMUTATIONS,
    DriftMonitor,
    is_refusal,
    list_checks,
    mmd_test,
    output_signals,
    prompt_texts,
    record_prompt,
)
from evertune.monitoring.feedback import build_record, write_feedback
from evertune.monitoring.request_log import RequestLog
from evertune.registry import Registry
from evertune.workspace import Workspace
from tests.api.helpers import register, train_lora, use_mlflow_template, write_jsonl
from tests.conftest import make_workspace
from tests.serving.fixtures import FAST_SERVE, app_for, new_gateway, run_server, to_prod

DRIFT_SETTINGS = {"window": 30, "min_prompts": 20, "reference_prompts": 200,
                  "every_seconds": 0.2, "threshold": 0.01, "start_round": True}

ISSUES = {
    "billing": ["I was charged twice for order {n}", "my invoice {n} shows the wrong amount",
                "I want a refund for my last payment"],
    "shipping": ["my package {n} has not arrived yet", "the tracking number {n} does not work",
                 "my order {n} arrived damaged"],
    "account": ["I cannot log in after resetting my password",
                "my account was locked after too many attempts",
                "I never received the verification code"],
    "technical": ["the app crashes when I open the settings page",
                  "the website shows error {n} at checkout",
                  "notifications stopped working on my phone"],
    "returns": ["I want to return shoes that are too small",
                "the return label {n} is not valid", "my return {n} was not refunded"],
}
OPENERS = ["", "Hi,", "Hello team,", "Urgent:"]
CLOSERS = ["", "Please help.", "Thanks.", "Can you check?"]
DISHES = ["banana bread", "risotto", "lasagna", "pancakes", "a curry", "sourdough bread"]
COOKING = ["How long should I bake {d}?", "What can I use instead of eggs in {d}?",
           "Why does my {d} come out dry?", "What wine goes well with {d}?",
           "Can I freeze {d} and reheat it later?", "Give me a quick vegan recipe for {d}."]


def ticket(rng: random.Random) -> tuple[str, str]:
    team = rng.choice(list(ISSUES))
    text = rng.choice(ISSUES[team]).format(n=rng.randint(1000, 99999))
    prompt = " ".join(p for p in (rng.choice(OPENERS), text + ".", rng.choice(CLOSERS)) if p)
    return prompt, f"the team for this ticket is {team}"


def cooking(rng: random.Random) -> str:
    return rng.choice(COOKING).format(d=rng.choice(DISHES))


def train_adapter(base: Path, records: list[dict[str, str]], out: Path, n_steps: int = 60) -> Path:
    """A LoRA adapter of `base` trained in-process on `records` (input/output)."""
    return train_lora(base, records, n_steps, out, lr=2e-2)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[dict[str, Any]]:
    """PROD = v1, trained on 120 tickets (its dataset version), served over HTTP."""
    root = tmp_path_factory.mktemp("drift")
    ws = use_mlflow_template(make_workspace(root / "ws", tiny_model, serve=FAST_SERVE,
                                            monitor={"drift": DRIFT_SETTINGS}))
    rng = random.Random(0)
    records = [{"input": p, "output": o} for p, o in (ticket(rng) for _ in range(120))]
    dataset = steps.preprocess(ws, [write_jsonl(root / "tickets.jsonl", records)]).versions[0]
    adapter = train_adapter(tiny_model, dataset.records("train"), root / "adapter")
    mv = register(ws, adapter, dataset.id, "ftjob-drift-1")
    to_prod(Registry(ws), mv.version)
    metrics = ServingMetrics()
    gateway = new_gateway(ws, metrics=metrics)
    gateway.start()
    try:
        with run_server(app_for(gateway)) as url:
            yield {"ws": ws, "url": url, "gateway": gateway, "metrics": metrics,
                   "dataset": dataset.id}
    finally:
        gateway.stop()


def send(s: dict[str, Any], prompts: list[str]) -> list[str]:
    """Ask PROD each prompt with the official client; the response ids."""
    client = openai.OpenAI(base_url=f"{s['url']}/v1", api_key="unused", max_retries=0,
                           timeout=30)
    ids = []
    for p in prompts:
        r = client.chat.completions.create(model="assistant", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": p}])
        assert r.model == "assistant@v1"
        ids.append(r.id)
    s["gateway"].request_log.flush()
    return ids


def sample(text: str, name: str, **labels: str) -> float | None:
    """One Prometheus sample of `text`, or None when the series is absent."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def drift_audit(ws: Workspace) -> list[Any]:
    return [r for r in Registry(ws).audit_log(limit=None) if r.action.startswith("drift")]


def test_real_traffic_drift_is_reported_once_starts_one_round_and_clears(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, url = served["ws"], served["url"]
    monitor = DriftMonitor(ws, metrics=served["metrics"])

    # Nothing served yet: no figure, said why, and no p-value series (not a fake 0 or 1).
    first = monitor.check()
    assert first is not None and first.p_value is None and first.version == "v1"
    assert "needs monitor.drift.min_prompts=20" in (first.note or "")
    metrics = httpx.get(f"{url}/metrics").text
    assert sample(metrics, "evertune_drift_p_value", version="v1") is None
    assert sample(metrics, "evertune_drift_last_check_timestamp_seconds") is not None

    # Held-out tickets, the kind v1 was trained on: below the threshold, no event.
    rng = random.Random(1)
    ids = send(served, [ticket(rng)[0] for _ in range(30)])
    same = monitor.check()
    assert same is not None and same.prompts == 30 and same.reference > 80
    assert same.p_value is not None and same.p_value >= CLEAR_FACTOR * 0.01, same
    assert same.drifted is False and same.event is None and drift_audit(ws) == []
    # Feedback gathered so far (corrections of two answers): what a drift round trains on.
    for rid in ids[:2]:
        r = httpx.post(f"{url}/v1/feedback", json={
            "id": rid, "rating": -1, "correction": "the team for this ticket is billing"})
        assert r.status_code == 200, r.text

    # Cooking questions: drift, one audit event, one round started by the real pipeline
    # (held in its first step by the pipeline's test hook, so nothing trains here).
    monkeypatch.setenv(pipeline.PAUSE_ENV, "DataPreprocessing")
    pipeline.launch(ws, warm=False)
    try:
        rng = random.Random(2)
        send(served, [cooking(rng) for _ in range(30)])
        drifted = monitor.check()
        assert drifted is not None and drifted.p_value is not None
        assert drifted.p_value < 0.01 and drifted.drifted is True and drifted.event == DRIFT
        assert drifted.p_value == pytest.approx(1 / (PERMUTATIONS + 1))
        assert drifted.statistic is not None and drifted.statistic > 10 * abs(same.statistic or 0)
        events = drift_audit(ws)
        assert [e.action for e in events] == ["drift"] and events[0].version == 1
        assert events[0].actor == "drift-monitor" and "p below" in events[0].reason
        assert events[0].data["dataset"] == served["dataset"]
        run = pipeline.find_run(ws, drifted.round or "")
        assert run is not None and run.trigger["actor"] == "drift-monitor"
        assert "served prompts drifted from v1" in run.trigger["reason"]
        # The round trains on the uploads plus the feedback, not on v1's own dataset again.
        assert run.trigger["dataset"] != served["dataset"]
        assert events[0].data["round"] == run.id

        metrics = httpx.get(f"{url}/metrics").text
        labels = {"model": "assistant", "version": "v1"}
        assert sample(metrics, "evertune_drift_detected", **labels) == 1.0
        assert (sample(metrics, "evertune_drift_p_value", **labels) or 1) < 0.01
        assert sample(metrics, "evertune_drift_prompts", **labels) == 30
        assert sample(metrics, "evertune_output_responses", **labels) == 30
        assert sample(metrics, "evertune_output_answer_tokens_mean", **labels) is not None

        # Still drifted at the next checks: no second event, no second round.
        assert monitor.check(only_if_new=True) is None  # nothing new served
        again = monitor.check()
        assert again is not None and again.drifted is True and again.event is None
        assert again.round is None and len(drift_audit(ws)) == 1
        assert len([r for r in pipeline.list_runs(ws) if r.id.startswith("run-drift-")]) == 1
    finally:
        pipeline.shutdown()

    # Tickets again: the window is back to the trained kind, drift clears (one event).
    rng = random.Random(3)
    send(served, [ticket(rng)[0] for _ in range(30)])
    back = monitor.check()
    assert back is not None and back.drifted is False and back.event == "drift_cleared"
    assert [e.action for e in drift_audit(ws)] == ["drift_cleared", "drift"]
    assert sample(httpx.get(f"{url}/metrics").text, "evertune_drift_detected",
                  version="v1") == 0.0
    # Every check is a row the console charts, oldest first.
    rows = list_checks(ws, since=0)
    assert [r.event for r in rows] == [None, None, "drift", None, "drift_cleared"]
    assert rows[2].round == drifted.round and rows[-1].signals[0].version == "v1"


def test_a_new_monitor_reads_the_state_from_the_audit_log(served: dict[str, Any]) -> None:
    """A restart neither repeats an event nor forgets one: the state is in the audit log."""
    ws = served["ws"]
    before = len(drift_audit(ws))
    report = DriftMonitor(ws, metrics=ServingMetrics()).check()
    assert report is not None and report.event is None and len(drift_audit(ws)) == before
    assert report.drifted is (drift_audit(ws)[0].action == DRIFT)


def test_the_server_hook_runs_checks_and_survives_a_failing_one(
    tmp_path: Path, tiny_model: Path
) -> None:
    """`evertune up`'s app starts the monitor; a check that fails (PROD's dataset is gone) is
    recorded with its reason, and the loop keeps checking."""
    from evertune.server import create_app

    ws = use_mlflow_template(make_workspace(tmp_path / "ws", tiny_model,
                                            monitor={"drift": DRIFT_SETTINGS}))
    rng = random.Random(4)
    records = [{"input": p, "output": o} for p, o in (ticket(rng) for _ in range(40))]
    dataset = steps.preprocess(ws, [write_jsonl(tmp_path / "t.jsonl", records)]).versions[0]
    from tests.api.helpers import untrained_adapter

    mv = register(ws, untrained_adapter(tiny_model), dataset.id, "ftjob-drift-gone")
    to_prod(Registry(ws), mv.version)
    log = RequestLog(ws)
    for i in range(25):
        log.record({"id": f"chatcmpl-gone{i}", "model": "assistant", "version": "v1",
                    "stage": "prod", "endpoint": "chat", "status": "ok",
                    "prompt": [{"role": "user", "content": ticket(rng)[0]}],
                    "completion": "ok", "completion_tokens": 1})
    log.flush()
    shutil.rmtree(dataset.path)  # e.g. a hand-cleaned .evertune/datasets

    with TestClient(create_app(ws, serving=False)) as client:
        deadline = time.monotonic() + 60
        while len(list_checks(ws, since=0)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        checks = list_checks(ws, since=0)
        metrics = client.get("/metrics").text
    assert len(checks) >= 2, "the loop stopped after a failed check"
    assert all(c.p_value is None for c in checks)
    assert f"check failed: NotFoundError: no dataset '{dataset.id}'" in (checks[0].note or "")
    assert sample(metrics, "evertune_drift_last_check_timestamp_seconds") is not None


def test_output_signals_from_the_request_log_and_feedback(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws = use_mlflow_template(make_workspace(tmp_path / "ws", tiny_model))
    log = RequestLog(ws)
    rows = [  # (version, completion, completion tokens)
        ("v1", "the team for this ticket is billing", 7),
        ("v1", "", 0),
        ("v1", "I\u2019m sorry, but I can't help with that.", 10),
        ("v1", "   ", 1),
        ("v2", ["shipping", "returns"], 4),  # a completions request with two prompts
        ("v2", "account", 1),
    ]
    for i, (version, completion, tokens) in enumerate(rows):
        log.record({"id": f"chatcmpl-sig{i}", "created_at": time.time() - 60 + i,
                    "model": "assistant", "version": version, "stage": "prod",
                    "endpoint": "chat", "status": "ok",
                    "prompt": [{"role": "user", "content": f"question {i}"}],
                    "completion": completion, "completion_tokens": tokens})
    log.record({"id": "chatcmpl-sig-err", "model": "assistant", "version": "v1",
                "stage": "prod", "endpoint": "chat", "status": "error", "error": "boom"})
    log.flush()
    source = {"endpoint": "chat", "prompt": [{"role": "user", "content": "question"}],
              "completion": "x", "version": "v1", "model": "assistant"}
    write_feedback(ws, build_record(source, response_id="chatcmpl-sig0", rating=-1,
                                    correction="returns"), "chatcmpl-sig0")
    write_feedback(ws, build_record(source, response_id="chatcmpl-sig2", rating=1,
                                    correction=None), "chatcmpl-sig2")

    got = {s.version: s for s in output_signals(ws, window=30)}
    v1, v2 = got["v1"], got["v2"]
    assert (v1.responses, v1.answers) == (4, 4)  # the error row is not an answer
    assert v1.answer_tokens_mean == pytest.approx(18 / 4)
    assert v1.empty_ratio == 0.5 and v1.refusal_ratio == 0.25
    assert v1.feedback_ratio == 0.5 and v1.rated_down_ratio == 0.5
    assert (v2.responses, v2.answers) == (2, 3) and v2.answer_tokens_mean == pytest.approx(5 / 3)
    assert v2.empty_ratio == 0 and v2.feedback_ratio == 0 and v2.rated_down_ratio is None

    # No PROD version: no drift figure (said why), but the signals are exported.
    metrics = ServingMetrics()
    report = DriftMonitor(ws, metrics=metrics).check()
    assert report is not None and report.version is None and "no version in PROD" in (
        report.note or "")
    text = metrics.render().decode()
    assert sample(text, "evertune_output_empty_ratio", version="v1") == 0.5
    assert sample(text, "evertune_output_rated_down_ratio", version="v1") == 0.5
    assert sample(text, "evertune_output_rated_down_ratio", version="v2") is None


def test_mmd_test_is_calibrated_and_sensitive() -> None:
    rng = np.random.default_rng(0)
    same = [mmd_test(rng.normal(size=(20, 8)), rng.normal(size=(30, 8)), 200, seed=s)[1]
            for s in range(100)]
    # Under the null the p-value is uniform: about 5 % below 0.05 (binomial sd 2.2 %).
    assert 0.0 <= np.mean(np.array(same) < 0.05) <= 0.12
    assert 0.3 <= float(np.median(same)) <= 0.7
    shifted = rng.normal(size=(30, 8)) + 0.8
    stat, p = mmd_test(shifted, rng.normal(size=(60, 8)))
    assert p == pytest.approx(1 / (PERMUTATIONS + 1)) and stat > 0.05
    x, y = rng.normal(size=(25, 8)), rng.normal(size=(40, 8))
    assert mmd_test(x, y, seed=3) == mmd_test(x, y, seed=3)  # reproducible
    with pytest.raises(ValueError, match="at least 2 points"):
        mmd_test(x[:1], y)


def test_prompt_texts_records_and_refusals() -> None:
    chat = [{"role": "system", "content": "You route tickets."},
            {"role": "user", "content": "My parcel is late"},
            {"role": "assistant", "content": "shipping"},
            {"role": "user", "content": [{"type": "text", "text": "and damaged"}]}]
    assert prompt_texts(chat) == ["My parcel is late\nand damaged"]  # user turns only
    assert prompt_texts("Once upon") == ["Once upon"]
    assert prompt_texts(["a", "", "b"]) == ["a", "b"]
    assert prompt_texts(None) == [] and prompt_texts([{"role": "system", "content": "x"}]) == []
    assert record_prompt({"input": "i", "output": "o"}) == "i"
    assert record_prompt({"prompt": "p", "completion": "c"}) == "p"
    assert record_prompt({"prompt": "p", "chosen": "a", "rejected": "b"}) == "p"
    assert record_prompt({"text": "raw"}) == "raw"
    assert record_prompt({"messages": chat[:3]}) == "My parcel is late"
    assert record_prompt({"input": "  ", "output": "o"}) is None
    assert is_refusal("I\u2019m sorry, but I cannot do that")
    assert is_refusal("As an AI, I have no opinion")
    assert not is_refusal("Shipping. I can't believe it is late either.")
