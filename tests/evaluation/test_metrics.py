"""Per-example metrics on known inputs: pytest tests/evaluation/test_metrics.py"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from evertune.evaluation.metrics import (
    embedding_cosine,
    embedding_model_path,
    exact_match,
    example_losses,
    json_valid,
    metric_names,
    perplexity,
    rouge,
)


def test_rouge_exact_values_on_tiny_strings() -> None:
    got = rouge(["the cat sat on the mat", "hello", "xyz"],
                ["the cat is on the mat", "hello", "abc"])
    # 5 of 6 unigrams shared; bigrams the-cat, on-the, the-mat of 5; LCS "the cat on the mat".
    assert got["rouge1"] == pytest.approx([5 / 6, 1.0, 0.0])
    assert got["rouge2"] == pytest.approx([3 / 5, 0.0, 0.0])  # one word has no bigram
    assert got["rougeL"] == pytest.approx([5 / 6, 1.0, 0.0])


def test_rouge_stems_and_keeps_non_latin_words() -> None:
    got = rouge(["Cats running!", "Привет мир", "Привет мир"], ["cat run", "привет мир", "мир"])
    assert got["rouge1"][0] == pytest.approx(1.0)  # Porter stemming, case folded, punctuation
    assert got["rouge1"][1] == pytest.approx(1.0)  # rouge-score alone would score 0 here
    assert got["rouge1"][2] == pytest.approx(2 * (1 / 2 * 1) / (1 / 2 + 1))


def test_rouge_needs_aligned_inputs() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])


def test_exact_match_normalises_whitespace_only() -> None:
    preds = ["  4 ", "New\n  York", "new york", "4."]
    refs = ["4", "New York", "New York", "4"]
    assert exact_match(preds, refs) == [1.0, 1.0, 0.0, 0.0]


def test_json_valid() -> None:
    preds = ['{"team": "billing"}', " [1, 2] \n", "{'a': 1}", '```json\n{"a": 1}\n```', "", "42"]
    assert json_valid(preds) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_metric_names_follow_the_eval_switches() -> None:
    assert metric_names(["loss", "rouge"]) == ["loss", "perplexity", "rouge1", "rouge2", "rougeL",
                                               "latency_s"]
    assert metric_names([]) == ["latency_s"]


def test_perplexity_is_exp_loss() -> None:
    got = perplexity([0.0, 1.0, math.nan])
    assert got[:2] == pytest.approx([1.0, math.e]) and math.isnan(got[2])


def test_embedding_model_ships_with_the_package() -> None:
    assert (embedding_model_path() / "model.safetensors").is_file()


def test_embedding_cosine_identical_vs_related_vs_unrelated() -> None:
    text = "My card was charged twice and I want a refund."
    got = embedding_cosine(
        [text, "I was billed two times for one order, please refund me.", "The cat sleeps."],
        [text, text, text],
    )
    assert got[0] == pytest.approx(1.0, abs=1e-4)
    assert got[2] < got[1] < got[0]
    assert embedding_cosine([], []) == []


def test_example_losses_match_the_models_own_loss(tiny_model: Path) -> None:
    import torch

    from evertune.data.templating import Example, tokenize_example
    from evertune.models import load_for_inference, load_tokenizer

    model, tok = load_for_inference(tiny_model), load_tokenizer(tiny_model)
    examples = [Example(prompt=tok.apply_chat_template([{"role": "user", "content": q}],
                                                       add_generation_prompt=True, tokenize=False),
                        completion=a)
                for q, a in [("hi", "hello world"), ("route this ticket", "billing"),
                             ("The package has not arrived yet", "shipping team, please check")]]
    batched = example_losses(model, tok, examples, max_seq_len=128, batch_size=3)
    one_by_one = [example_losses(model, tok, [ex], max_seq_len=128)[0] for ex in examples]
    assert batched == pytest.approx(one_by_one, rel=1e-4)
    # The same number the model computes with its own masked loss on the training tokens.
    t = tokenize_example(examples[1], tok, 128, truncate=False)
    assert t is not None
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([t.input_ids]), labels=torch.tensor([t.labels])).loss
    assert batched[1] == pytest.approx(float(ref), rel=1e-4)
    # A random model is near-uniform over the vocabulary: loss ≈ ln(vocab).
    assert all(abs(v - math.log(len(tok))) < 1.0 for v in batched)
    # A prompt that alone exceeds max_seq_len cannot be scored.
    long = Example(prompt="hello " * 100, completion="x")
    assert math.isnan(example_losses(model, tok, [long], max_seq_len=32)[0])
