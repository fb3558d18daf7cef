"""The official `openai` client against the gateway on a loopback uvicorn server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from evertune.registry import Registry
from tests.serving.fixtures import (
    app_for,
    new_gateway,
    register,
    run_server,
    serving_workspace,
    to_prod,
)

HI = [{"role": "user", "content": "I cannot log in to my account"}]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    lively_model: Path,
    adapters: list[Path],
    mlflow_template: Path,
) -> Iterator[tuple[str, str]]:
    ws = serving_workspace(tmp_path_factory.mktemp("oai") / "ws", lively_model, mlflow_template)
    to_prod(Registry(ws), register(ws, adapters[0], "ftjob-o1"))
    key = ws.create_token("client", "serving")
    gateway = new_gateway(ws)
    gateway.start()
    try:
        with run_server(app_for(gateway)) as url:
            yield url, key
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def client(server: tuple[str, str]) -> openai.OpenAI:
    url, key = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["assistant", "assistant@prod"] and "assistant@v1" in ids
    assert client.models.retrieve("assistant@v1").id == "assistant@v1"


def test_chat(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="assistant",
        messages=HI,
        max_tokens=5,
        temperature=0,
        seed=1,  # type: ignore[arg-type]
    )
    assert raw.headers["x-evertune-version"] == "v1"
    out = raw.parse()
    assert out.model == "assistant@v1"
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="assistant@base", prompt=["Hello", "refund"], max_tokens=3, temperature=0
    )
    assert out.model == "assistant@base" and [c.index for c in out.choices] == [0, 1]
    assert out.usage is not None and out.usage.completion_tokens == 6


def test_streaming_chat_and_completions(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model="assistant",
        messages=HI,
        max_tokens=8,  # type: ignore[arg-type]
        temperature=0,
    )
    chunks = list(
        client.chat.completions.create(
            model="assistant",
            messages=HI,
            max_tokens=8,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert {c.model for c in chunks} == {"assistant@v1"}
    pieces = list(
        client.completions.create(
            model="assistant", prompt="Hello", max_tokens=4, temperature=0, stream=True
        )
    )
    assert pieces[-1].choices[0].finish_reason == "length"


def test_errors(client: openai.OpenAI, server: tuple[str, str]) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="assistant@v42", messages=HI)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found" and "Valid models" in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="assistant", messages=HI, top_p=5)  # type: ignore[arg-type]
    assert bad.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="assistant", prompt="x " * 2000, max_tokens=4)
    assert long.value.code == "context_length_exceeded"
    stranger = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="evt_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
