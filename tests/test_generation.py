"""Batched generation on the tiny model: pytest tests/test_generation.py"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from evertune.generation import generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]

QUESTIONS = [
    "hi",
    "My card was charged twice for the same order and I want a refund.",
    "route this ticket",
    "The app crashes when I open the settings page",
    "x",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model: Path) -> Loaded:
    """The tiny model with larger random weights, so greedy outputs differ by prompt.

    At its default init the tiny model is near-uniform and answers every prompt with the same
    token; a wrong position or padding would then go unnoticed.
    """
    import torch

    from evertune.models import load_for_inference, load_tokenizer

    model, tok = load_for_inference(tiny_model), load_tokenizer(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3, generator=gen)
    return model, tok


@pytest.fixture(scope="module")
def prompts(model_and_tokenizer: Loaded) -> list[str]:
    _, tok = model_and_tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=False) for q in QUESTIONS]
    return [str(t) for t in texts]


def test_batched_greedy_equals_one_by_one(model_and_tokenizer: Loaded, prompts: list[str]) -> None:
    model, tok = model_and_tokenizer
    batched = generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    alone = [generate(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert len({g.text for g in batched}) > 1  # the outputs really depend on the prompt


def test_usage_counts_and_max_new_tokens(model_and_tokenizer: Loaded, prompts: list[str]) -> None:
    model, tok = model_and_tokenizer
    for g, p in zip(generate(model, tok, prompts, max_new_tokens=7), prompts, strict=True):
        assert g.prompt_tokens == len(tok(p, add_special_tokens=False)["input_ids"])
        assert g.completion_tokens == 7 and g.finish_reason == "length"
        assert g.latency_s > 0
    assert [g.text for g in generate(model, tok, prompts[:1], max_new_tokens=0)] == [""]
    assert generate(model, tok, [], max_new_tokens=3) == []


def test_stop_string_cuts_the_text(model_and_tokenizer: Loaded, prompts: list[str]) -> None:
    model, tok = model_and_tokenizer
    full = generate(model, tok, prompts, max_new_tokens=12)
    target = next(g for g in full if len(g.text) > 4)
    i = full.index(target)
    stop = target.text[2:4]  # a stop string inside the greedy output
    cut = generate(model, tok, prompts, max_new_tokens=12, stop=[stop, "never-there"])
    assert cut[i].text == target.text[: target.text.index(stop)]
    assert cut[i].finish_reason == "stop"
    assert cut[i].completion_tokens < target.completion_tokens or target.text.endswith(stop)


def test_eos_stops_a_row_and_is_not_in_the_text(
    model_and_tokenizer: Loaded, prompts: list[str]
) -> None:
    import torch

    model, tok = model_and_tokenizer
    # The greedy continuation, token by token, straight from the model.
    ids = tok(prompts[0], add_special_tokens=False)["input_ids"]
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(input_ids=torch.tensor([ids + greedy])).logits[0, -1].argmax()))
    eos = greedy[2]  # declare the third token an end-of-sequence token of this model
    stop_at = greedy.index(eos)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [old, eos] if isinstance(old, int) else [eos]
    try:
        got = generate(model, tok, prompts[:1], max_new_tokens=6)[0]
    finally:
        model.generation_config.eos_token_id = old
    assert got.finish_reason == "stop"
    assert got.completion_tokens == stop_at + 1  # the EOS is counted ...
    assert got.text == tok.decode(greedy[:stop_at], skip_special_tokens=True)  # ... not shown


def test_sampling_is_seeded(model_and_tokenizer: Loaded, prompts: list[str]) -> None:
    model, tok = model_and_tokenizer
    a = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    c = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]
    # A tiny nucleus keeps only the top token: sampling becomes greedy.
    greedy = generate(model, tok, prompts, max_new_tokens=8)
    narrow = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=5)
    assert [g.text for g in narrow] == [g.text for g in greedy]


def test_bad_arguments(model_and_tokenizer: Loaded, prompts: list[str]) -> None:
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, prompts, top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, prompts, temperature=-1)
