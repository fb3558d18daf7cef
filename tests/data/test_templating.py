"""Records to tokens: the prompt is masked, EOS is learned.

    pytest tests/data/test_templating.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evertune.data.templating import (
    IGNORE_INDEX,
    Example,
    eos_id,
    to_example,
    to_preference,
    token_length,
    tokenize_example,
)
from evertune.errors import DataError
from evertune.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_input_output_uses_the_chat_template(tok):
    ex = to_example({"input": "2+2?", "output": "4"}, tok)
    assert ex == Example(prompt="<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
                         completion="4")


def test_chat_prompt_is_all_but_the_last_turn(tok):
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello there"}]}
    ex = to_example(record, tok)
    assert ex.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert ex.prompt.endswith("<|im_start|>assistant\n")
    assert ex.completion == "Hello there"


def test_prompt_completion_is_raw(tok):
    assert to_example({"prompt": "2+2=", "completion": "4"}, tok) == Example("2+2=", "4")


def test_non_sft_records_raise(tok):
    with pytest.raises(DataError, match="not a supervised example"):
        to_example({"prompt": "p", "chosen": "a", "rejected": "b"}, tok)
    with pytest.raises(DataError, match="not a supervised example"):
        to_example({"text": "doc"}, tok)


def test_prompt_is_masked_and_eos_is_learned(tok):
    ex = to_example({"input": "Where is my parcel?", "output": "On its way."}, tok)
    out = tokenize_example(ex, tok, max_seq_len=128, truncate=False)
    assert out is not None
    prompt, completion = ids(tok, ex.prompt), ids(tok, ex.completion)
    assert out.input_ids == prompt + completion + [tok.eos_token_id]
    assert out.labels == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]
    assert len(out.input_ids) == len(out.labels)
    assert token_length({"input": "Where is my parcel?", "output": "On its way."}, tok) == (
        len(prompt), len(out.input_ids))


def test_too_long_is_none_or_truncated(tok):
    ex = Example(prompt="hello " * 5, completion="the quick brown fox " * 20)
    full = tokenize_example(ex, tok, max_seq_len=10_000, truncate=False)
    assert full is not None
    n_prompt = len(ids(tok, ex.prompt))
    limit = n_prompt + 3
    assert tokenize_example(ex, tok, max_seq_len=limit, truncate=False) is None
    cut = tokenize_example(ex, tok, max_seq_len=limit, truncate=True)
    assert cut is not None and len(cut.input_ids) == limit
    assert cut.input_ids == full.input_ids[:limit]
    assert cut.labels[n_prompt:] == cut.input_ids[n_prompt:]  # 3 completion tokens learned
    assert tok.eos_token_id not in cut.labels  # no EOS after a cut answer
    # The prompt alone fills the window: nothing left to learn.
    assert tokenize_example(ex, tok, max_seq_len=n_prompt, truncate=True) is None


def test_preference_prompt_is_templated(tok):
    pref = to_preference({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}, tok)
    assert pref.prompt == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert (pref.chosen, pref.rejected) == ("Hi!", "No.")


def test_no_chat_template_or_eos_is_a_clear_error():
    bare = SimpleNamespace(chat_template=None, name_or_path="base-model", eos_token_id=None)
    with pytest.raises(DataError, match="'base-model' has no chat template"):
        to_example({"input": "a", "output": "b"}, bare)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="has no EOS token"):
        eos_id(bare)  # type: ignore[arg-type]
