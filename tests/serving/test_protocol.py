"""Request validation names the parameter at fault; model names parse as documented."""

from __future__ import annotations

from typing import Any

import pytest

from evertune.serving.names import Target, display_name, parse_model_name
from evertune.serving.protocol import OpenAIError, parse_chat, parse_completion, parse_json

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, **kw}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MSG}, "model"),
        (chat(messages=[]), "messages"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "messages[0].content[0]",
        ),
        (chat(temperature=2.5), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(temperature=True), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=10_000), "max_tokens"),
        (chat(max_completion_tokens=10_000), "max_completion_tokens"),
        (chat(max_tokens=2.5), "max_tokens"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(stop=[1]), "stop"),
        (chat(stop=[""]), "stop"),
        (chat(seed="x"), "seed"),
        (chat(n=2), "n"),
        (chat(stream="yes"), "stream"),
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(logprobs=True), "logprobs"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (chat(presence_penalty=0.5), "presence_penalty"),
        (chat(response_format={"type": "json_object"}), "response_format"),
    ],
)
def test_a_bad_chat_parameter_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_chat(body, max_tokens_limit=1024)
    err = info.value
    assert (err.status, err.param, err.type) == (400, param, "invalid_request_error")
    assert err.body()["error"]["param"] == param


def test_chat_defaults_and_accepted_shapes() -> None:
    p = parse_chat(
        chat(
            messages=[
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
                },
                *MSG,
            ],
            stop="\n",
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
            user="u-1",
            unknown_future_field=1,
            n=1,
            logprobs=False,
            tools=[],
        ),
        max_tokens_limit=100,
    )
    assert p.messages[0] == {"role": "developer", "content": "be brief"}
    assert (p.stop, p.seed, p.stream, p.include_usage) == (["\n"], 3, True, True)
    assert (p.temperature, p.top_p, p.max_tokens) == (1.0, 1.0, None)  # OpenAI's defaults


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
    ],
)
def test_a_bad_completion_parameter_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_completion(body, max_tokens_limit=1024)
    assert (info.value.status, info.value.param) == (400, param)


def test_completions_take_one_prompt_or_several() -> None:
    one = parse_completion({"model": "m", "prompt": "a"}, max_tokens_limit=1024)
    many = parse_completion({"model": "m", "prompt": ["a", "b"]}, max_tokens_limit=1024)
    assert (one.prompts, one.prompt_is_list, one.max_tokens) == (["a"], False, 16)
    assert (many.prompts, many.prompt_is_list) == (["a", "b"], True)


def test_a_body_that_is_not_a_json_object_is_a_400() -> None:
    for raw in (b"{", b"[1]", b""):
        with pytest.raises(OpenAIError) as info:
            parse_json(raw)
        assert info.value.status == 400 and info.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        ("assistant", Target("prod")),
        ("assistant@prod", Target("prod")),
        ("assistant@qa", Target("qa")),
        ("assistant@base", Target("base")),
        ("assistant@v12", Target("version", 12)),
        ("assistant@V3", Target("version", 3)),
        ("assistant@v0", None),
        ("assistant@staging", None),
        ("assistant@", None),
        ("other", None),
        ("other@prod", None),
        ("assistant-x@prod", None),
    ],
)
def test_model_names(raw: str, target: Target | None) -> None:
    assert parse_model_name(raw, "assistant") == target


def test_display_names() -> None:
    assert display_name("assistant", 3) == "assistant@v3"
    assert display_name("assistant", None) == "assistant@base"
