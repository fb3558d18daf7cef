"""Hostile input to the serving path: a bad request fails alone, with a 4xx naming the fix.

Two levels. The batch (`serving.decode.RunningBatch`, driven by hand so the rows surely
share a batch): a row whose seed torch refuses, or whose prompt the model cannot run, fails
alone and the rows beside it answer exactly as they would alone. The gateway over real HTTP
(uvicorn on loopback): poisoned requests sent concurrently with innocent ones get a 400 or
an answer, every innocent one succeeds; oversized bodies get a 413 naming
`serve.max_request_bytes` while they stream in; a long prompt gets a 400 naming
`serve.max_prompt_chars` before it is tokenized; tokenizing runs off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from evertune.generation import _eos_ids, generate
from evertune.serving import Gateway
from evertune.serving.decode import Failed, ModelGroup, RunningBatch, Slot
from evertune.serving.engine import Event, Finished, GenRequest
from tests.serving.fixtures import app_for, new_gateway, run_server, serving_workspace

MAX_BYTES = 64 * 1024
MAX_CHARS = 4000
HI = [{"role": "user", "content": "My card was charged twice"}]


# -- the batch -------------------------------------------------------------------------------
class Model:
    """The lively model, its tokenizer and EOS ids, for driving a batch by hand."""

    def __init__(self, path: Path) -> None:
        from evertune.models import load_model, load_tokenizer

        self.module = load_model(path)
        self.tok = load_tokenizer(path)
        self.eos = _eos_ids(self.module, self.tok)

    def prompt(self, text: str) -> str:
        out = self.tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        assert isinstance(out, str)
        return out

    def request(self, text: str, max_tokens: int = 8, **kw: Any) -> GenRequest:
        prompt = self.prompt(text)
        ids = list(self.tok(prompt, add_special_tokens=False)["input_ids"])
        return GenRequest(
            prompt, max_tokens=max_tokens, prompt_ids=ids, prompt_tokens=len(ids), **kw
        )

    def alone(self, text: str, max_tokens: int = 8) -> str:
        return generate(self.module, self.tok, [self.prompt(text)], max_new_tokens=max_tokens)[
            0
        ].text


@pytest.fixture(scope="module")
def model(lively_model: Path) -> Model:
    return Model(lively_model)


def slot(req: GenRequest) -> tuple[Slot, list[Event | Failed]]:
    events: list[Event | Failed] = []
    return Slot(request=req, emit=events.append), events


def outcome(events: list[Event | Failed]) -> Finished | Failed:
    assert events, "the row never ended"
    last = events[-1]
    assert isinstance(last, Finished | Failed)
    return last


INNOCENT = ["Hi", "The package has not arrived yet", "refund"]


def test_a_seed_torch_refuses_fails_only_its_row(model: Model) -> None:
    innocent = [slot(model.request(t, temperature=0)) for t in INNOCENT]
    poisoned = slot(model.request("Hi", temperature=1.0, seed=2**64))  # past torch's range
    batch = RunningBatch(ModelGroup(model.module), model.tok, model.eos)
    batch.admit([innocent[0][0], poisoned[0], *(s for s, _ in innocent[1:])])
    while batch.rows:
        batch.step()
    assert isinstance(outcome(poisoned[1]), Failed)
    for text, (_, events) in zip(INNOCENT, innocent, strict=True):
        final = outcome(events)
        assert isinstance(final, Finished) and final.text == model.alone(text)


def test_a_tiny_temperature_decodes_greedily(model: Model) -> None:
    rows = [slot(model.request(t, temperature=1e-300, seed=1)) for t in INNOCENT]
    batch = RunningBatch(ModelGroup(model.module), model.tok, model.eos)
    batch.admit([s for s, _ in rows])
    while batch.rows:
        batch.step()
    for text, (_, events) in zip(INNOCENT, rows, strict=True):
        final = outcome(events)
        assert isinstance(final, Finished) and final.text == model.alone(text)


def test_a_prompt_the_model_cannot_run_fails_alone(model: Model) -> None:
    innocent = [slot(model.request(t, temperature=0)) for t in INNOCENT]
    bad = model.request("Hi", temperature=0)
    bad.prompt_ids = [model.module.config.vocab_size + 7]  # no such embedding row
    poisoned = slot(bad)
    batch = RunningBatch(ModelGroup(model.module), model.tok, model.eos)
    batch.admit([poisoned[0], *(s for s, _ in innocent)])  # refused before the forward pass
    while batch.rows:
        batch.step()
    failed = outcome(poisoned[1])
    assert isinstance(failed, Failed) and "outside the model's vocabulary" in str(failed.error)
    for text, (_, events) in zip(INNOCENT, innocent, strict=True):
        final = outcome(events)
        assert isinstance(final, Finished) and final.text == model.alone(text)


class Picky:
    """The model, failing any prefill that holds token `bad`: a forward pass that one
    request's input breaks, whatever it is batched with."""

    def __init__(self, model: Any, bad: int) -> None:
        self.model = model
        self.bad = bad

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **inputs: Any) -> Any:
        if inputs.get("past_key_values") is None and bool((inputs["input_ids"] == self.bad).any()):
            raise RuntimeError(f"cannot run token {self.bad}")
        return self.model(**inputs)


def test_a_prefill_that_fails_is_retried_row_by_row(model: Model) -> None:
    innocent = [slot(model.request(t, temperature=0)) for t in INNOCENT]
    used = {i for s, _ in innocent for i in s.request.prompt_ids or []}
    marker = next(i for i in range(model.module.config.vocab_size - 1, 0, -1) if i not in used)
    bad = model.request("Hi", temperature=0)
    bad.prompt_ids = [*(bad.prompt_ids or []), marker]
    poisoned = slot(bad)
    batch = RunningBatch(ModelGroup(Picky(model.module, marker)), model.tok, model.eos)
    batch.admit([innocent[0][0], poisoned[0], *(s for s, _ in innocent[1:])])
    while batch.rows:
        batch.step()
    failed = outcome(poisoned[1])
    assert isinstance(failed, Failed) and "cannot run token" in str(failed.error)
    for text, (_, events) in zip(INNOCENT, innocent, strict=True):
        final = outcome(events)
        assert isinstance(final, Finished) and final.text == model.alone(text)


def test_a_bad_request_joining_a_running_batch_leaves_it_running(model: Model) -> None:
    innocent = [slot(model.request(t, max_tokens=12, temperature=0)) for t in INNOCENT]
    batch = RunningBatch(ModelGroup(model.module), model.tok, model.eos)
    batch.admit([s for s, _ in innocent])
    batch.step()
    running = len(batch.rows)
    assert running > 0
    bad_prompt = model.request("Hi", temperature=0)
    bad_prompt.prompt_ids = [model.module.config.vocab_size + 7]
    joiners = [slot(model.request("Hi", temperature=1.0, seed=-(2**65))), slot(bad_prompt)]
    batch.admit([s for s, _ in joiners])  # continuous batching: they join between steps
    assert len(batch.rows) == running  # neither joined, nobody left
    while batch.rows:
        batch.step()
    assert all(isinstance(outcome(events), Failed) for _, events in joiners)
    for text, (_, events) in zip(INNOCENT, innocent, strict=True):
        final = outcome(events)
        assert isinstance(final, Finished) and final.text == model.alone(text, 12)


# -- the gateway over HTTP -------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, lively_model: Path, mlflow_template: Path
) -> Iterator[tuple[str, Gateway]]:
    ws = serving_workspace(
        tmp_path_factory.mktemp("hostile") / "ws",
        lively_model,
        mlflow_template,
        max_request_bytes=MAX_BYTES,
        max_prompt_chars=MAX_CHARS,
        max_batch_size=16,
        batch_wait_ms=200.0,  # the concurrent requests below share batches
    )
    gateway = new_gateway(ws, ("prod",))
    gateway.start()
    try:
        with run_server(app_for(gateway)) as url:
            yield url, gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def url(served: tuple[str, Gateway]) -> str:
    return served[0]


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "assistant", "messages": HI, "max_tokens": 6, "temperature": 0, **kw}


POISON: list[tuple[bytes, int, str | None]] = [
    # (raw body, status, param at fault)
    (json.dumps(body(seed=2**63)).encode(), 400, "seed"),
    (json.dumps(body(seed=2**64 + 1, temperature=1.0)).encode(), 400, "seed"),
    (json.dumps(body(temperature=float("nan"))).encode(), 400, "temperature"),  # NaN literal
    (json.dumps(body(temperature=float("inf"))).encode(), 400, "temperature"),
    (json.dumps(body(top_p=float("nan"), temperature=1.0)).encode(), 400, "top_p"),
    (
        b'{"model": "assistant", "messages": [{"role": "user", "content": "a\\ud800"}]}',
        400,
        "messages[0].content",
    ),  # fmt: skip
    (json.dumps(body(temperature=1e-300)).encode(), 200, None),  # greedy, as at 0
]


def test_poisoned_requests_fail_alone_among_concurrent_innocent_ones(url: str) -> None:
    innocent = [body(messages=[{"role": "user", "content": f"order {i}"}]) for i in range(12)]

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            good = [client.post("/v1/chat/completions", json=b) for b in innocent]
            bad = [
                client.post(
                    "/v1/chat/completions",
                    content=raw,
                    headers={"content-type": "application/json"},
                )
                for raw, _, _ in POISON
            ]
            done = await asyncio.gather(*good[:6], *bad, *good[6:])
            return [*done[:6], *done[6 + len(bad) :]], list(done[6 : 6 + len(bad)])

    good, bad = asyncio.run(scenario())
    assert [r.status_code for r in good] == [200] * len(innocent), [r.text for r in good]
    for resp, (_, status, param) in zip(bad, POISON, strict=True):
        assert resp.status_code == status, resp.text
        if param is not None:
            err = resp.json()["error"]
            assert (err["param"], err["type"]) == (param, "invalid_request_error")
    greedy = bad[-1].json()["choices"][0]["message"]["content"]
    same = httpx.post(f"{url}/v1/chat/completions", json=body(), timeout=60).json()
    assert greedy == same["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("raw", "status", "param", "code"),
    [
        (json.dumps(body(model="assistant@v" + "9" * 20)), 404, "model", "model_not_found"),
        (json.dumps(body(model="assistant@v" + "9" * 5000)), 404, "model", "model_not_found"),
        (json.dumps(body(model="assistant\ud800")), 400, "model", "invalid_unicode"),
        ("[" * 30_000 + "]" * 30_000, 400, None, "invalid_json"),
        ('{"model": "assistant", "messages": ', 400, None, "invalid_json"),
        (json.dumps(body(stop=["\udfff"])), 400, "stop", "invalid_unicode"),
        (json.dumps(body(max_tokens=1e308)), 400, "max_tokens", "invalid_value"),
    ],
)  # fmt: skip
def test_bad_input_is_an_openai_shaped_4xx(
    url: str, raw: str, status: int, param: str | None, code: str
) -> None:
    resp = httpx.post(
        f"{url}/v1/chat/completions",
        content=raw.encode("utf-8", "surrogatepass"),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert (err["param"], err["code"]) == (param, code)
    assert err["type"] == "invalid_request_error" and err["message"]


def test_an_oversized_body_is_refused_with_413_naming_the_limit(url: str) -> None:
    big = json.dumps(body(messages=[{"role": "user", "content": "x" * (4 * MAX_BYTES)}]))
    declared = httpx.post(
        f"{url}/v1/chat/completions",
        content=big.encode(),
        headers={"content-type": "application/json"},
        timeout=60,
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        data = big.encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    streamed = httpx.post(
        f"{url}/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    for resp in (declared, streamed):
        assert resp.status_code == 413, resp.text
        err = resp.json()["error"]
        assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
        assert "serve.max_request_bytes" in err["message"] and str(MAX_BYTES) in err["message"]
    # The official client gets the 413 as an error it can read, not a broken connection.
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "y" * (4 * MAX_BYTES)}]
        )
    assert info.value.status_code == 413
    # The server is fine afterwards.
    ok = httpx.post(f"{url}/v1/chat/completions", json=body(), timeout=60)
    assert ok.status_code == 200


def test_a_long_prompt_is_refused_before_it_is_tokenized(
    served: tuple[str, Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, gateway = served
    seen: list[tuple[int, bool]] = []  # (prompt length, called on the event loop's thread)
    prepare = gateway.engine.prepare

    def spy(req: GenRequest) -> None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((len(req.prompt), on_loop))
        prepare(req)

    monkeypatch.setattr(gateway.engine, "prepare", spy)
    long = body(messages=[{"role": "user", "content": "z" * (MAX_CHARS + 1)}])
    resp = httpx.post(f"{url}/v1/chat/completions", json=long, timeout=60)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert (err["param"], err["code"]) == ("messages", "prompt_too_long")
    assert "serve.max_prompt_chars" in err["message"] and str(MAX_CHARS) in err["message"]
    many = {"model": "assistant", "prompt": ["w" * (MAX_CHARS // 2 + 1)] * 2, "max_tokens": 2}
    resp = httpx.post(f"{url}/v1/completions", json=many, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "prompt_too_long"
    assert seen == []  # neither reached the tokenizer
    ok = httpx.post(f"{url}/v1/chat/completions", json=body(), timeout=60)
    assert ok.status_code == 200
    assert len(seen) == 1 and seen[0][1] is False  # tokenized in a worker thread
