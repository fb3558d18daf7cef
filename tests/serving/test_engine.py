"""The transformers engine: batched streaming decode, per-request parameters, adapters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from evertune.generation import generate
from evertune.serving.engine import BASE_KEY, EngineError, Finished, GenRequest, TextDelta
from evertune.serving.transformers_engine import TransformersEngine
from tests.serving.fixtures import SlowModel

PROMPTS = [
    "Hi",
    "My card was charged twice for the same order and I want a refund.",
    "hello world yes no",
    "The package has not arrived yet",
    "refund",
]


def chat(engine: TransformersEngine, text: str) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


async def run(engine: TransformersEngine, key: str, req: GenRequest) -> tuple[list[str], Finished]:
    deltas: list[str] = []
    final: Finished | None = None
    async for event in engine.stream(key, req):
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        else:
            final = event
    assert final is not None
    return deltas, final


async def run_all(
    engine: TransformersEngine, jobs: list[tuple[str, GenRequest]]
) -> list[tuple[list[str], Finished]]:
    return await asyncio.gather(*(run(engine, k, r) for k, r in jobs))


@pytest.fixture(scope="module")
def engine(lively_model: Path) -> TransformersEngine:
    batches: list[int] = []
    eng = TransformersEngine(
        lively_model,
        batch_wait_ms=50,
        max_batch_size=8,
        max_tokens_limit=64,
        threads=1,
        on_batch=batches.append,
    )
    eng.start()
    eng.batches = batches  # type: ignore[attr-defined]
    yield eng
    eng.stop()


def test_batched_greedy_decoding_matches_generate_row_for_row(engine: TransformersEngine) -> None:
    prompts = [chat(engine, p) for p in PROMPTS]
    stop = ["ing"]
    reference = generate(
        engine._base_module, engine.tokenizer, prompts, max_new_tokens=12, stop=stop
    )
    # Different max_tokens per request, some streaming: all decoded in one batch.
    jobs = [
        (BASE_KEY, GenRequest(p, max_tokens=12, temperature=0, stop=stop, stream=i % 2 == 0))
        for i, p in enumerate(prompts)
    ]
    jobs.append((BASE_KEY, GenRequest(prompts[0], max_tokens=3, temperature=0, stream=True)))
    engine.batches.clear()  # type: ignore[attr-defined]
    results = asyncio.run(run_all(engine, jobs))
    assert max(engine.batches) > 1  # type: ignore[attr-defined]  # they shared a batch
    for (deltas, final), ref in zip(results, reference, strict=False):
        assert (final.text, final.finish_reason, final.completion_tokens) == (
            ref.text,
            ref.finish_reason,
            ref.completion_tokens,
        )
        assert final.prompt_tokens == ref.prompt_tokens
        if deltas:
            assert "".join(deltas) == final.text
            assert not any("ing" in d for d in deltas)  # a stop string never leaks
    short = results[-1][1]
    assert (short.completion_tokens, short.finish_reason) == (3, "length")
    assert short.ttft_s is not None and short.total_s >= short.ttft_s


def test_a_seeded_request_repeats_exactly_whatever_it_is_batched_with(
    engine: TransformersEngine,
) -> None:
    prompt = chat(engine, PROMPTS[1])

    def req(seed: int) -> GenRequest:
        return GenRequest(prompt, max_tokens=10, temperature=1.0, top_p=0.9, seed=seed)

    alone = asyncio.run(run_all(engine, [(BASE_KEY, req(7))]))[0][1].text
    crowd = asyncio.run(
        run_all(
            engine,
            [
                (BASE_KEY, req(7)),
                (BASE_KEY, req(8)),
                (BASE_KEY, GenRequest(chat(engine, "Hi"), max_tokens=4)),
            ],
        )
    )
    assert crowd[0][1].text == alone
    assert crowd[1][1].text != alone  # another seed samples something else


def test_a_too_long_request_is_refused_before_it_runs(engine: TransformersEngine) -> None:
    req = GenRequest("hello " * 600, max_tokens=64)
    with pytest.raises(EngineError) as info:
        engine.prepare(req)
    assert info.value.code == "context_length_exceeded" and info.value.status == 400
    auto = GenRequest("hello", max_tokens=None)
    engine.prepare(auto)
    assert auto.max_tokens == 64  # serve.max_tokens_limit when the context has room


def test_closing_a_stream_cancels_its_row(engine: TransformersEngine) -> None:
    async def first_delta_then_leave() -> None:
        agen = engine.stream(
            BASE_KEY, GenRequest(chat(engine, "Hi"), max_tokens=60, temperature=0, stream=True)
        )
        async for event in agen:
            assert isinstance(event, TextDelta)
            break
        await agen.aclose()

    asyncio.run(first_delta_then_leave())
    for _ in range(100):  # the batcher notices at its next step
        if engine._users[BASE_KEY] == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert engine._users[BASE_KEY] == 0


def test_merged_and_unmerged_adapters_answer_alike(
    lively_model: Path, adapters: list[Path]
) -> None:
    merged = TransformersEngine(lively_model, merge_adapters=True, batch_wait_ms=30, threads=1)
    unmerged = TransformersEngine(lively_model, merge_adapters=False, batch_wait_ms=30, threads=1)
    merged.start()
    unmerged.start()
    try:
        for eng in (merged, unmerged):
            eng.load("v1", adapters[0])
            eng.load("v2", adapters[1])
            eng.load("v1", adapters[0])  # idempotent
            with pytest.raises(EngineError, match="never reloaded"):
                eng.load("v1", adapters[1])  # a key always means the same weights
        prompt = chat(merged, PROMPTS[1])
        jobs = [
            (k, GenRequest(prompt, max_tokens=8, temperature=0)) for k in (BASE_KEY, "v1", "v2")
        ]
        a = [f.text for _, f in asyncio.run(run_all(merged, jobs))]
        unmerged_batches: list[int] = []
        unmerged.on_batch = unmerged_batches.append
        b = [f.text for _, f in asyncio.run(run_all(unmerged, jobs))]
        assert a == b
        assert len(set(a)) == 3  # base, v1 and v2 answer differently
        assert max(unmerged_batches) == 3  # unmerged: versions share one batch
        # The base model was not changed by loading adapters beside it.
        again = asyncio.run(run_all(unmerged, jobs[:1]))[0][1].text
        assert again == a[0]
    finally:
        merged.stop()
        unmerged.stop()


def test_unload_waits_for_the_requests_on_that_version(
    lively_model: Path, adapters: list[Path]
) -> None:
    eng = TransformersEngine(lively_model, merge_adapters=False, batch_wait_ms=0, threads=1)
    eng.start()
    try:
        eng.load("v1", adapters[0])
        assert eng._shared is not None
        eng._shared.module = SlowModel(eng._shared.module)  # still decoding when unloaded
        prompt = chat(eng, "Hi")

        async def scenario() -> Finished:
            agen = eng.stream("v1", GenRequest(prompt, max_tokens=30, temperature=0, stream=True))
            first = await agen.__anext__()
            assert isinstance(first, TextDelta)
            eng.unload("v1")  # in use: deferred
            assert "v1" not in eng.loaded() and "v1" in eng._models
            final = None
            async for event in agen:
                final = event
            assert isinstance(final, Finished)
            return final

        final = asyncio.run(scenario())
        assert final.completion_tokens == 30 and final.finish_reason == "length"
        assert "v1" not in eng._models  # removed once its request finished
        with pytest.raises(EngineError, match="not loaded"):
            eng.submit(
                "v1",
                __import__("evertune.serving.decode", fromlist=["Slot"]).Slot(
                    request=GenRequest(prompt), emit=lambda e: None
                ),
            )
    finally:
        eng.stop()


def test_requests_join_a_running_batch_and_answer_as_if_alone(engine: TransformersEngine) -> None:
    model, tok = engine._base_module, engine.tokenizer
    prompts = {
        "a": chat(engine, "Hi"),
        "b": chat(engine, PROMPTS[1]),  # longer than a's: the running cache is left-padded
        "c": chat(engine, "refund"),
    }
    lengths = {"a": 60, "b": 5, "c": 6}
    expected = {
        k: generate(model, tok, [p], max_new_tokens=lengths[k])[0].text for k, p in prompts.items()
    }

    async def scenario() -> tuple[dict[str, str], list[str]]:
        texts: dict[str, str] = {}
        order: list[str] = []

        async def one(name: str) -> None:
            req = GenRequest(prompts[name], max_tokens=lengths[name], temperature=0)
            texts[name] = (await run(engine, BASE_KEY, req))[1].text
            order.append(name)

        a = asyncio.create_task(one("a"))
        await asyncio.sleep(0.2)  # "a" is decoding (60 steps of >= 20 ms)
        await one("b")  # joins, finishes first: its row leaves, padding is cropped
        await one("c")  # joins the cropped batch
        await a
        return texts, order

    assert engine._shared is not None
    engine._shared.module = SlowModel(model)
    engine.batches.clear()  # type: ignore[attr-defined]
    try:
        texts, order = asyncio.run(scenario())
    finally:
        engine._shared.module = model
    assert texts == expected
    assert order == ["b", "c", "a"]
    assert max(engine.batches) == 2  # type: ignore[attr-defined]  # they decoded beside "a"
