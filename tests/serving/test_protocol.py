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
        # Non-finite numbers: Python's json reads NaN and Infinity literals (and 1e999).
        (chat(temperature=float("nan")), "temperature"),
        (chat(temperature=float("inf")), "temperature"),
        (chat(top_p=float("nan")), "top_p"),
        (chat(presence_penalty=float("nan")), "presence_penalty"),
        (chat(seed=2**63), "seed"),  # past int64: torch cannot seed with it
        (chat(seed=-(2**63) - 1), "seed"),
        (chat(seed=1e30), "seed"),
        (chat(model="m\ud800"), "model"),  # a lone surrogate cannot be encoded or tokenized
        (chat(messages=[{"role": "user", "content": "a\udc00b"}]), "messages[0].content"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]),
            "messages[0].content[0].text",
        ),
        (chat(stop=["ok", "\ud800"]), "stop"),
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


def test_sampling_limits_accept_their_edges() -> None:
    p = parse_chat(chat(seed=2**63 - 1, temperature=1e-300, top_p=1e-300), max_tokens_limit=8)
    assert (p.seed, p.temperature, p.top_p) == (2**63 - 1, 1e-300, 1e-300)
    assert parse_chat(chat(seed=-(2**63)), max_tokens_limit=8).seed == -(2**63)


def test_a_prompt_over_max_prompt_chars_is_refused_naming_the_setting() -> None:
    long = [{"role": "system", "content": "a" * 6}, {"role": "user", "content": "b" * 5}]
    assert parse_chat(chat(messages=long), max_tokens_limit=8, max_prompt_chars=11).messages
    with pytest.raises(OpenAIError) as info:
        parse_chat(chat(messages=long), max_tokens_limit=8, max_prompt_chars=10)
    err = info.value
    assert (err.status, err.param, err.code) == (400, "messages", "prompt_too_long")
    assert "serve.max_prompt_chars" in err.message and "10" in err.message
    many = {"model": "m", "prompt": ["abc", "defg"]}
    with pytest.raises(OpenAIError) as info:
        parse_completion(many, max_tokens_limit=8, max_prompt_chars=6)
    assert (info.value.param, info.value.code) == ("prompt", "prompt_too_long")
    with pytest.raises(OpenAIError) as info:
        parse_completion({"model": "m", "prompt": ["ok", "\udfff"]}, max_tokens_limit=8)
    assert (info.value.param, info.value.code) == ("prompt[1]", "invalid_unicode")


def test_completions_take_one_prompt_or_several() -> None:
    one = parse_completion({"model": "m", "prompt": "a"}, max_tokens_limit=1024)
    many = parse_completion({"model": "m", "prompt": ["a", "b"]}, max_tokens_limit=1024)
    assert (one.prompts, one.prompt_is_list, one.max_tokens) == (["a"], False, 16)
    assert (many.prompts, many.prompt_is_list) == (["a", "b"], True)


def test_a_body_that_is_not_a_json_object_is_a_400() -> None:
    for raw in (b"{", b"[1]", b"", b"[" * 50_000 + b"]" * 50_000, b"\xff\xfe{"):
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
        ("assistant@v2147483647", Target("version", 2**31 - 1)),
        ("assistant@v2147483648", None),  # past any registry's version column: a 404
        ("assistant@v99999999999999999999", None),
        ("assistant@v" + "9" * 5000, None),  # int() would refuse so many digits
        ("assistant@v\u0663", None),  # ARABIC-INDIC DIGIT THREE: digits are ASCII
    ],
)
def test_model_names(raw: str, target: Target | None) -> None:
    assert parse_model_name(raw, "assistant") == target


def test_display_names() -> None:
    assert display_name("assistant", 3) == "assistant@v3"
    assert display_name("assistant", None) == "assistant@base"
