"""The OpenAI wire format: request validation, response objects, errors, SSE framing.

    params = parse_chat(await request.json(), max_tokens_limit=1024)   # OpenAIError on bad input
    OpenAIError(404, "The model `x` does not exist", param="model", code="model_not_found")

Validation is by hand rather than by a Pydantic model so that each error names the exact
parameter (`param`, as the OpenAI API does: `messages[2].role`, `temperature`) and says
what is allowed. Unknown parameters are ignored, as OpenAI-compatible servers do (clients
send new fields before servers know them); parameters we know but cannot honour (`n` > 1,
`logprobs`, tools, penalties) are refused with 400 rather than silently ignored.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TEMPERATURE = 1.0  # the OpenAI API's default; send 0 for deterministic answers
DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI completions default (chat: up to the limit)
MAX_STOP = 4  # stop sequences per request, as in the OpenAI API
MAX_PROMPTS = 32  # prompts in one /v1/completions request
CHAT_ROLES = ("system", "developer", "user", "assistant")
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, what torch (and vLLM) seed generators take
DEFAULT_MAX_PROMPT_CHARS = 200_000  # `serve.max_prompt_chars`'s default
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone UTF-16 halves: JSON allows them, UTF-8 not

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 — the OpenAI field name
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    @property
    def label(self) -> str:
        """A short code for metrics: the OpenAI code, else the HTTP status."""
        return self.code or str(self.status)


def bad(param: str, message: str, code: str | None = None) -> OpenAIError:
    """A 400 naming `param`."""
    return OpenAIError(400, message, param=param, code=code or "invalid_value")


@dataclass
class SamplingParams:
    """What both endpoints share."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


@dataclass
class ChatParams(SamplingParams):
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass
class CompletionParams(SamplingParams):
    prompts: list[str] = field(default_factory=list)
    prompt_is_list: bool = False


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 when it is not one."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise OpenAIError(
            400,
            f"We could not parse the JSON body of your request ({exc}). The body must be a "
            f"JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(
    body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value):
        raise bad(key, f"'{key}' must be a number, got {json.dumps(value)}", "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        # Python's json reads NaN, Infinity and 1e999; every comparison with NaN is False.
        raise bad(key, f"'{key}' must be a finite number, got {value}")
    if value > hi or value < lo or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise bad(key, f"'{key}' must be in {left}{lo:g}, {hi:g}], got {value}")
    return float(value)


def _int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad(key, f"'{key}' must be an integer, got {json.dumps(value)}", "invalid_type")
    return value


def _text(value: str, param: str) -> str:
    """`value`, or a 400 naming `param` when it holds a lone surrogate (not valid Unicode)."""
    m = _SURROGATE.search(value)
    if m is not None:
        raise bad(
            param,
            f"'{param}' holds a lone UTF-16 surrogate (\\u{ord(m.group()):04x}) at character "
            f"{m.start()}, which is not valid Unicode; send the whole surrogate pair or the "
            f"character itself",
            "invalid_unicode",
        )
    return value


def _prompt_size(total: int, param: str, max_prompt_chars: int) -> None:
    """400 when the prompt text is over `serve.max_prompt_chars` (checked before tokenizing)."""
    if total > max_prompt_chars:
        raise bad(
            param,
            f"the prompt is {total} characters; this server accepts at most "
            f"{max_prompt_chars} (serve.max_prompt_chars: raise it in evertune.yaml or with "
            f"--set serve.max_prompt_chars=N to allow more)",
            "prompt_too_long",
        )


def _refuse(body: dict[str, Any], key: str, ok: tuple[Any, ...], why: str) -> None:
    """400 when `key` is present with a value other than null or one of `ok`."""
    value = body.get(key)
    if value is None or any(value == v and type(value) is type(v) for v in ok):
        return
    raise bad(
        key, f"'{key}' = {json.dumps(value)} is not supported: {why}", "unsupported_parameter"
    )


def _sampling(
    body: dict[str, Any], max_tokens_limit: int, default_max: int | None
) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad(
            "model",
            "you must provide a model parameter (a string such as 'NAME' or 'NAME@prod')",
            "missing_required_parameter" if model is None else "invalid_type",
        )
    _text(model, "model")  # echoed in a 404: it must be encodable
    max_tokens = _int(body, "max_completion_tokens")
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = _int(body, "max_tokens"), "max_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= max_tokens_limit:
        raise bad(
            key,
            f"'{key}' must be between 1 and {max_tokens_limit} (serve.max_tokens_limit), "
            f"got {max_tokens}",
        )
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: list[str] = []
    elif isinstance(stop_raw, str):
        stop = [stop_raw]
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = list(stop_raw)
    else:
        raise bad("stop", "'stop' must be a string or an array of strings", "invalid_type")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}")
    if any(not s for s in stop):
        raise bad("stop", "'stop' sequences must not be empty strings")
    for s in stop:
        _text(s, "stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "'stream' must be true or false", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed with stream: true")
        if not isinstance(options, dict):
            raise bad("stream_options", "'stream_options' must be an object", "invalid_type")
        include_usage = bool(options.get("include_usage"))
    n = _int(body, "n")
    if n is not None and n != 1:
        raise bad("n", f"'n' must be 1 (one choice per prompt), got {n}", "unsupported_parameter")
    for penalty in ("presence_penalty", "frequency_penalty"):
        value = _number(body, penalty, 0.0, -2.0, 2.0)
        if value != 0:
            raise bad(penalty, f"'{penalty}' is not supported (only 0)", "unsupported_parameter")
    _refuse(body, "logit_bias", ({},), "logit bias is not implemented")
    seed = _int(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise bad("seed", f"'seed' must be a 64-bit signed integer (-2^63 to 2^63-1), got {seed}")
    return {
        "model": model,
        "max_tokens": max_tokens if max_tokens is not None else default_max,
        "temperature": _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "stop": stop,
        "seed": seed,
        "stream": bool(stream),
        "include_usage": include_usage,
    }


def _content(value: Any, where: str) -> str:
    """Message content: a string, or an array of text parts joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return _text(value, where)
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(
                    f"{where}[{i}]",
                    f"only text content parts are supported, got {kind!r}",
                    "unsupported_content",
                )
            texts.append(_text(part["text"], f"{where}[{i}].text"))
        return "".join(texts)
    raise bad(where, "message content must be a string or an array of text parts", "invalid_type")


def parse_chat(
    body: dict[str, Any],
    *,
    max_tokens_limit: int,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
) -> ChatParams:
    """Validate a /v1/chat/completions body."""
    common = _sampling(body, max_tokens_limit, default_max=None)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad(
            "messages",
            "'messages' must be a non-empty array of {role, content} objects",
            "missing_required_parameter" if raw is None else "invalid_value",
        )
    messages: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(
                f"messages[{i}]", "each message must be an object {role, content}", "invalid_type"
            )
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(
                f"messages[{i}].role",
                f"role must be one of {', '.join(CHAT_ROLES)}; got "
                f"{json.dumps(role)} (tool calls are not supported)",
            )
        messages.append(
            {"role": role, "content": _content(m.get("content"), f"messages[{i}].content")}
        )
    _prompt_size(sum(len(m["content"]) for m in messages), "messages", max_prompt_chars)
    _refuse(body, "logprobs", (False,), "log probabilities are not returned")
    _refuse(body, "top_logprobs", (0,), "log probabilities are not returned")
    for key in ("tools", "functions"):
        _refuse(body, key, ([],), "tool calling is not supported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad(
            "response_format",
            'only response_format {"type": "text"} is supported',
            "unsupported_parameter",
        )
    return ChatParams(**common, messages=messages)


def parse_completion(
    body: dict[str, Any],
    *,
    max_tokens_limit: int,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
) -> CompletionParams:
    """Validate a /v1/completions body (a prompt string, or an array of them)."""
    common = _sampling(
        body, max_tokens_limit, default_max=min(DEFAULT_COMPLETION_MAX_TOKENS, max_tokens_limit)
    )
    raw = body.get("prompt")
    if isinstance(raw, str):
        prompts, is_list = [raw], False
    elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        prompts, is_list = list(raw), True
    elif raw is None:
        raise bad(
            "prompt",
            "you must provide a prompt (a string or an array of strings)",
            "missing_required_parameter",
        )
    else:
        raise bad(
            "prompt",
            "'prompt' must be a string or a non-empty array of strings (token "
            "arrays are not supported)",
            "invalid_type",
        )
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
    for i, p in enumerate(prompts):
        _text(p, f"prompt[{i}]" if is_list else "prompt")
    # Every prompt is tokenized and held at once: the cap is on their sum.
    _prompt_size(sum(len(p) for p in prompts), "prompt", max_prompt_chars)
    _refuse(body, "logprobs", (0,), "log probabilities are not returned")
    _refuse(body, "echo", (False,), "echo is not supported")
    _refuse(body, "best_of", (1,), "best_of must be 1")
    _refuse(body, "suffix", ("",), "insertion (suffix) is not supported")
    return CompletionParams(**common, prompts=prompts, prompt_is_list=is_list)


# -- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    """`chatcmpl-…` / `cmpl-…`: unique ids the feedback endpoint refers to."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def openai_finish(reason: str) -> str:
    # "cancelled" never reaches a client that is still listening; say length to be safe.
    return reason if reason in ("stop", "length") else "length"


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")
