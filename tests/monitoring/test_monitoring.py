"""Metrics, the request log and feedback capture, through a running gateway."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from evertune.data.formats import detect_format, validate_row
from evertune.monitoring import ServingMetrics, list_requests
from evertune.monitoring.request_log import RequestLog
from evertune.registry import Registry
from evertune.serving import Gateway
from evertune.workspace import Workspace
from tests.serving.fixtures import app_for, new_gateway, register, serving_workspace, to_prod

SECRET = [{"role": "user", "content": "I am ana@example.com, call me at +1 (555) 010-9999"}]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    lively_model: Path,
    adapters: list[Path],
    mlflow_template: Path,
) -> Iterator[tuple[Workspace, Gateway, TestClient]]:
    ws = serving_workspace(tmp_path_factory.mktemp("mon") / "ws", lively_model, mlflow_template)
    to_prod(Registry(ws), register(ws, adapters[0], "ftjob-m1"))
    gateway = new_gateway(ws, metrics=ServingMetrics())  # a fresh registry: exact counts
    gateway.start()
    with TestClient(app_for(gateway)) as client:
        yield ws, gateway, client
    gateway.stop()


def chat(client: TestClient, model: str = "assistant", **kw: Any) -> Any:
    body = {"model": model, "messages": SECRET, "max_tokens": 5, "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in `text`."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics_by_version_and_stage(served: tuple[Workspace, Gateway, TestClient]) -> None:
    _, gateway, client = served
    before = gateway.metrics.render().decode()
    assert "evertune_requests_total" not in before or "v1" not in before
    for _ in range(2):
        assert chat(client).status_code == 200
    assert chat(client, "assistant@base", stream=True).status_code == 200
    assert chat(client, "nope").status_code == 404
    text = client.get("/metrics").text
    prod = {"version": "v1", "stage": "prod"}
    assert sample(text, "evertune_requests_total", endpoint="chat", status="ok", **prod) == 2
    assert sample(text, "evertune_requests_total", stage="base", version="base", status="ok") == 1
    assert sample(text, "evertune_request_errors_total", code="model_not_found") == 1
    assert sample(text, "evertune_completion_tokens_total", **prod) == 10
    assert sample(text, "evertune_prompt_tokens_total", **prod) > 0
    assert sample(text, "evertune_time_to_first_token_seconds_count", **prod) == 2
    assert sample(text, "evertune_time_to_first_token_seconds_sum", **prod) > 0
    assert sample(text, "evertune_time_per_output_token_seconds_count", **prod) == 2
    assert sample(text, "evertune_request_duration_seconds_count", endpoint="chat", **prod) == 2
    assert sample(text, "evertune_requests_in_flight", **prod) == 0
    assert sample(text, "evertune_stage_version", stage="prod") == 1
    assert sample(text, "evertune_batch_size_count", engine="transformers") >= 3


def test_the_request_log_is_redacted_and_newest_first(
    served: tuple[Workspace, Gateway, TestClient],
) -> None:
    ws, gateway, client = served
    ids = [chat(client, max_tokens=3 + i).json()["id"] for i in range(3)]
    gateway.request_log.flush()
    rows = list_requests(ws, limit=3)
    assert [r.id for r in rows] == ids[::-1]
    row = rows[0]
    assert row.prompt == [{"role": "user", "content": "I am [email], call me at [phone]"}]
    assert (row.version, row.stage, row.endpoint, row.status) == ("v1", "prod", "chat", "ok")
    assert row.completion_tokens == 5 and row.prompt_tokens > 0
    assert row.params["max_tokens"] == 5 and row.params["temperature"] == 0
    assert row.ttft_s is not None and row.duration_s is not None and row.ttft_s <= row.duration_s
    assert json.dumps(row.to_dict())  # JSON-ready for `evertune logs --json`
    assert list_requests(ws, limit=1, version="v999") == []


def test_sampling_zero_logs_nothing(tmp_path: Path, lively_model: Path) -> None:
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", lively_model)
    never, always = RequestLog(ws, sample=0.0), RequestLog(ws, sample=1.0)
    assert not any(never.sampled() for _ in range(100))
    assert all(always.sampled() for _ in range(100))
    half = RequestLog(ws, sample=0.5)
    assert 20 < sum(half.sampled() for _ in range(200)) < 180
    with pytest.raises(ValueError, match="sample"):
        RequestLog(ws, sample=1.5)


def read_feedback(ws: Workspace, key: str) -> dict[str, Any]:
    lines = (Path(ws.bucket_url) / key).read_text("utf-8").splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_a_correction_becomes_a_chat_training_record(
    served: tuple[Workspace, Gateway, TestClient],
) -> None:
    ws, _, client = served
    answer = chat(client).json()
    resp = client.post(
        "/v1/feedback",
        json={"id": answer["id"], "rating": -1, "correction": "Mail me at bob@example.org instead"},
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["label"] == "corrected"
    # One object per response and sender: `<id>.<sender>.jsonl` (serving is open here).
    day = r"feedback/\d{4}-\d\d-\d\d/"
    assert re.fullmatch(rf"{day}{answer['id']}\.anonymous\.jsonl", out["key"])
    record = read_feedback(ws, out["key"])
    assert detect_format(record) == "chat" and validate_row(record, "chat") == []
    assert record["messages"] == [
        {"role": "user", "content": "I am [email], call me at [phone]"},
        {"role": "assistant", "content": "Mail me at [email] instead"},
    ]
    meta = record["feedback"]
    assert (meta["rating"], meta["version"], meta["response_id"]) == (-1, "v1", answer["id"])
    assert meta["original"] == answer["choices"][0]["message"]["content"]


def test_a_rating_alone_is_a_labelled_record_of_the_served_answer(
    served: tuple[Workspace, Gateway, TestClient],
) -> None:
    ws, gateway, client = served
    answer = client.post(
        "/v1/completions",
        json={"model": "assistant", "prompt": "Hello", "max_tokens": 3, "temperature": 0},
    ).json()
    gateway._recent.clear()  # forget it in memory: found again through the request log
    gateway.request_log.flush()
    out = client.post("/v1/feedback", json={"id": answer["id"], "rating": 1}).json()
    record = read_feedback(ws, out["key"])
    assert detect_format(record) == "prompt_completion"
    assert record["prompt"] == "Hello" and record["completion"] == answer["choices"][0]["text"]
    assert record["feedback"]["label"] == "positive"


def test_feedback_on_an_unknown_response_needs_its_prompt(
    served: tuple[Workspace, Gateway, TestClient],
) -> None:
    ws, _, client = served
    missing = client.post("/v1/feedback", json={"id": "chatcmpl-gone", "rating": 1})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "id"
    given = client.post(
        "/v1/feedback",
        json={
            "id": "chatcmpl-elsewhere",
            "rating": 0,
            "completion": "ok",
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert given.status_code == 200
    assert read_feedback(ws, given.json()["key"])["feedback"]["label"] == "neutral"
    for body, param in [
        ({"rating": 1}, "id"),
        ({"id": "x"}, "rating"),
        ({"id": "x", "rating": "good"}, "rating"),
        ({"id": "x", "correction": ""}, "correction"),
    ]:
        resp = client.post("/v1/feedback", json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param


def test_a_later_rating_of_the_same_answer_supersedes_the_earlier_one(tmp_path: Path) -> None:
    # A user who rated an answer up, and down the next day, changed their mind: only the newest
    # record of that (response, sender) trains; another sender's record of it is untouched.
    from evertune.bucket import Bucket
    from evertune.monitoring.feedback import collect_feedback, feedback_key

    ws, _ = Workspace.init(tmp_path / "ws")
    bucket = Bucket.for_workspace(ws)

    def put(when: float, sender: str, completion: str) -> None:
        record = {"prompt": "Hi", "completion": completion,
                  "feedback": {"verified": True, "sender": sender}}
        key = feedback_key("chatcmpl-abc", when=when, sender=sender)
        bucket.write_bytes(key, (json.dumps(record) + "\n").encode())

    day = 86_400.0
    put(10 * day, "ana", "first opinion")
    put(11 * day, "ana", "second opinion")
    put(10 * day, "bob", "bob's opinion")
    dest = tmp_path / "feedback.jsonl"
    assert collect_feedback(ws, dest) == 2
    text = dest.read_text()
    assert "second opinion" in text and "bob's opinion" in text and "first opinion" not in text
