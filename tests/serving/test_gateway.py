"""The gateway over HTTP (FastAPI TestClient): names, versions, streaming, usage, errors, keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from evertune.models import load_tokenizer
from evertune.registry import Registry
from evertune.serving import Gateway
from evertune.workspace import Workspace
from tests.serving.fixtures import app_for, new_gateway, register, serving_workspace, to_prod

HI = [{"role": "user", "content": "My card was charged twice"}]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    lively_model: Path,
    adapters: list[Path],
    mlflow_template: Path,
) -> Iterator[tuple[Workspace, Gateway, TestClient]]:
    ws = serving_workspace(tmp_path_factory.mktemp("gw") / "ws", lively_model, mlflow_template)
    v1 = register(ws, adapters[0], "ftjob-g1")
    register(ws, adapters[1], "ftjob-g2")
    to_prod(Registry(ws), v1)
    gateway = new_gateway(ws)
    gateway.start()
    with TestClient(app_for(gateway)) as client:
        yield ws, gateway, client
    gateway.stop()


@pytest.fixture
def client(served: tuple[Workspace, Gateway, TestClient]) -> TestClient:
    return served[2]


def ask(client: TestClient, model: str = "assistant", **kw: Any) -> Any:
    body = {"model": model, "messages": HI, "max_tokens": 6, "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body)


def sse(client: TestClient, path: str, body: dict[str, Any]) -> tuple[list[Any], Any]:
    """The events of a streamed response (parsed JSON, and the raw [DONE] marker)."""
    with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
        headers = resp.headers
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]], headers


def test_models_lists_stages_base_and_every_version(client: TestClient) -> None:
    resp = client.get("/v1/models")
    assert resp.status_code == 200
    data = {m["id"]: m for m in resp.json()["data"]}
    assert list(data) == [
        "assistant",
        "assistant@prod",
        "assistant@qa",
        "assistant@base",
        "assistant@v1",
        "assistant@v2",
    ]
    assert data["assistant"]["version"] == "v1" and data["assistant"]["object"] == "model"
    assert data["assistant@v2"]["loaded"] is False  # loaded on first use
    assert client.get("/v1/models/assistant@qa").json()["version"] == "v1"
    assert client.get("/v1/models/nope").status_code == 404


def test_a_chat_answer_names_its_version_and_counts_usage(
    served: tuple[Workspace, Gateway, TestClient],
) -> None:
    ws, gateway, client = served
    resp = ask(client)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "assistant@v1"
    assert resp.headers["x-evertune-version"] == "v1"
    assert resp.headers["x-evertune-stage"] == "prod"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    tok = load_tokenizer(Path(ws.config.model.base))
    prompt = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    expected = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert body["usage"] == {
        "prompt_tokens": expected,
        "completion_tokens": 6,
        "total_tokens": expected + 6,
    }


def test_each_name_reaches_its_version_and_versions_answer_differently(client: TestClient) -> None:
    answers = {}
    for model, version in [
        ("assistant", "v1"),
        ("assistant@prod", "v1"),
        ("assistant@qa", "v1"),
        ("assistant@v1", "v1"),
        ("assistant@v2", "v2"),
        ("assistant@base", "base"),
    ]:
        resp = ask(client, model)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == f"assistant@{version}"
        answers.setdefault(version, set()).add(resp.json()["choices"][0]["message"]["content"])
    assert all(len(a) == 1 for a in answers.values())  # greedy: the same version, the same text
    assert len({next(iter(a)) for a in answers.values()}) == 3
    assert client.get("/v1/models").json()["data"][5]["loaded"] is True  # v2, on demand


def test_completions_with_one_and_several_prompts(client: TestClient) -> None:
    one = client.post(
        "/v1/completions",
        json={"model": "assistant", "prompt": "Hello", "max_tokens": 4, "temperature": 0},
    ).json()
    assert one["object"] == "text_completion" and one["id"].startswith("cmpl-")
    assert one["model"] == "assistant@v1" and len(one["choices"]) == 1
    assert one["usage"]["completion_tokens"] == 4
    many = client.post(
        "/v1/completions",
        json={
            "model": "assistant@v2",
            "prompt": ["Hello", "refund"],
            "max_tokens": 3,
            "temperature": 0,
        },
    ).json()
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["usage"]["completion_tokens"] == 6
    alone = client.post(
        "/v1/completions",
        json={"model": "assistant@v2", "prompt": "refund", "max_tokens": 3, "temperature": 0},
    ).json()
    assert many["choices"][1]["text"] == alone["choices"][0]["text"]


def test_streamed_chat_matches_the_plain_answer_and_ends_with_done(client: TestClient) -> None:
    plain = ask(client, max_tokens=8).json()
    events, headers = sse(
        client,
        "/v1/chat/completions",
        {
            "model": "assistant",
            "messages": HI,
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert headers["x-evertune-version"] == "v1"
    assert all(
        e["object"] == "chat.completion.chunk" and e["model"] == "assistant@v1" for e in events
    )
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]


def test_streamed_completions(client: TestClient) -> None:
    events, _ = sse(
        client,
        "/v1/completions",
        {
            "model": "assistant@base",
            "prompt": ["a", "b"],
            "max_tokens": 3,
            "temperature": 0,
            "stream": True,
        },
    )
    assert all(e["object"] == "text_completion" for e in events)
    finished = [e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]


def test_stop_strings_and_seeds(client: TestClient) -> None:
    full = ask(client, max_tokens=12).json()["choices"][0]["message"]["content"]
    # A stop string from the answer itself (not a replacement character of a split byte).
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    cut = ask(client, max_tokens=12, stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == full[: full.index(stop)]
    a = ask(client, max_tokens=8, temperature=1.0, seed=11).json()["choices"][0]["message"]
    b = ask(client, max_tokens=8, temperature=1.0, seed=11).json()["choices"][0]["message"]
    assert a == b


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "nope"}, 404, "model", "model_not_found"),
        ({"model": "assistant@v99"}, 404, "model", "model_not_found"),
        ({"model": "assistant@staging"}, 404, "model", "model_not_found"),
        ({"temperature": 3}, 400, "temperature", "invalid_value"),
        ({"max_tokens": 65}, 400, "max_tokens", "invalid_value"),
        ({"n": 3}, 400, "n", "unsupported_parameter"),
        (
            {"messages": [{"role": "user", "content": "x " * 600}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
    ],
)
def test_errors_are_openai_shaped(
    client: TestClient, body: dict[str, Any], status: int, param: str, code: str
) -> None:
    resp = ask(client, **body)
    assert resp.status_code == status
    err = resp.json()["error"]
    assert (err["param"], err["code"]) == (param, code)
    assert err["type"] == "invalid_request_error" and err["message"]
    if status == 404:
        assert "Valid models: assistant, assistant@prod" in err["message"]
        assert "assistant@v2" in err["message"]


def test_a_body_that_is_not_json_is_a_400(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_a_gateway_serving_prod_only_refuses_qa(
    tmp_path: Path,
    lively_model: Path,
    mlflow_template: Path,
) -> None:
    ws = serving_workspace(tmp_path / "ws", lively_model, mlflow_template)
    gateway = new_gateway(ws, stages=("prod",))
    gateway.start()
    try:
        client = TestClient(app_for(gateway))
        names = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert names == ["assistant", "assistant@prod", "assistant@base"]
        # Nothing promoted yet: the prod stage serves the base model.
        assert ask(client).json()["model"] == "assistant@base"
        resp = ask(client, "assistant@qa")
        assert resp.status_code == 404 and "serves prod only" in resp.json()["error"]["message"]
    finally:
        gateway.stop()


def test_serving_keys_are_separate_from_control_tokens(
    tmp_path: Path,
    lively_model: Path,
    mlflow_template: Path,
) -> None:
    ws = serving_workspace(tmp_path / "ws", lively_model, mlflow_template)
    gateway = new_gateway(ws)
    gateway.start()
    try:
        client = TestClient(app_for(gateway))
        assert ask(client).status_code == 200  # no serving key exists: open
        admin = ws.create_token("ops", "admin")
        key = ws.create_token("my-app", "serving")
        gateway.keys.ttl_s = 0  # see new keys at once
        assert ask(client).status_code == 401
        assert ask(client).json()["error"]["code"] == "missing_api_key"
        refused = client.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {admin}"},
            json={"model": "assistant", "messages": HI, "max_tokens": 2},
        )
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        ok = client.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "assistant", "messages": HI, "max_tokens": 2},
        )
        assert ok.status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get("/metrics").status_code == 200  # scrapers carry no key
    finally:
        gateway.stop()
