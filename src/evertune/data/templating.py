"""Turn validated records into prompt/completion text, then into token ids with a loss mask.

    from evertune.data.templating import to_example, tokenize_example
    ex = to_example({"input": "2+2?", "output": "4"}, tokenizer)
    tok = tokenize_example(ex, tokenizer, max_seq_len=512, truncate=False)
    tok.input_ids, tok.labels      # labels are -100 on the prompt: only the answer is learned

Rules (the training and evaluation code rely on them):
- input_output and chat records go through the tokenizer's chat template, so the model is
  tuned in the same shape it is prompted with at serving time; prompt_completion is raw text.
  A rated record (KTO) is its answer's shape plus a label: `to_example` gives the prompt and
  answer, `formats.rated_label` the label.
- Text is tokenized with `add_special_tokens=False`: the chat template already writes any
  BOS/turn tokens the model wants, and a raw prompt is used exactly as given.
- The EOS token is appended after the completion and learned, so the tuned model stops.
- Nothing is padded here; batching pads (right side, labels -100).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evertune.data.formats import KIND, detect_format, sft_shape
from evertune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


@dataclass
class Example:
    """A supervised example as text; `completion` excludes the EOS token."""

    prompt: str
    completion: str


@dataclass
class PreferenceExample:
    """A DPO example as text: the prompt (chat-templated when the tokenizer has a template)."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class TokenizedExample:
    """Token ids and labels of equal length; labels are IGNORE_INDEX on the prompt."""

    input_ids: list[int]
    labels: list[int]


def _chat_prompt(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat "
            "template, so chat and input/output records cannot be rendered; use the "
            "prompt/completion format or a base model with a chat template"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert isinstance(text, str)
    return text


def to_example(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Example:
    """The prompt/completion text of an SFT record (input_output, prompt_completion or chat),
    or of a rated record's answer (its label: `formats.rated_label`)."""
    fmt = detect_format(record)
    if fmt == "rated":
        fmt = sft_shape(record)
    if fmt == "input_output":
        prompt = _chat_prompt([{"role": "user", "content": record["input"]}], tokenizer)
        return Example(prompt=prompt, completion=record["output"])
    if fmt == "prompt_completion":
        return Example(prompt=record["prompt"], completion=record["completion"])
    if fmt == "chat":
        messages = record["messages"]
        last = messages[-1]
        if last.get("role") != "assistant":
            raise DataError(
                f"a chat record must end with an assistant message, got role {last.get('role')!r}; "
                "validate the file with `evertune data add` first"
            )
        prompt = _chat_prompt([{"role": m["role"], "content": m["content"]} for m in messages[:-1]],
                              tokenizer)
        return Example(prompt=prompt, completion=last["content"])
    kind = KIND.get(fmt, "unknown") if fmt else "unknown"
    raise DataError(
        f"a {fmt or 'record with keys ' + str(sorted(record))} record ({kind}) is not a supervised "
        "example; only input_output, prompt_completion, chat and rated records have one"
    )


def to_preference(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> PreferenceExample:
    """The DPO text of a preference record; the prompt is rendered as one user turn when the
    tokenizer has a chat template (else used raw)."""
    if detect_format(record) != "preference":
        raise DataError(f"not a preference record (keys {sorted(record)}); "
                        "expected prompt, chosen and rejected")
    prompt = record["prompt"]
    if getattr(tokenizer, "chat_template", None):
        prompt = _chat_prompt([{"role": "user", "content": prompt}], tokenizer)
    return PreferenceExample(prompt=prompt, chosen=record["chosen"], rejected=record["rejected"])


def encode(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of `text` without added special tokens (see the module docstring)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's EOS id; a model without one cannot learn to stop."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no EOS "
            "token; set `eos_token` in its tokenizer_config.json"
        )
    return int(eos)


def tokenize_example(
    ex: Example, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, truncate: bool
) -> TokenizedExample | None:
    """prompt ids + completion ids + [eos], labels masking the prompt; None if it cannot fit.

    Too long and `truncate` False: None (the caller rejects the row). With `truncate`, the
    completion is cut to fit and the EOS is dropped with the cut tail (learning to stop after
    half an answer would teach the model to stop early); at least one completion token must
    remain, else None.
    """
    prompt_ids = encode(ex.prompt, tokenizer)
    completion_ids = encode(ex.completion, tokenizer) + [eos_id(tokenizer)]
    input_ids = prompt_ids + completion_ids
    if len(input_ids) > max_seq_len:
        if not truncate or len(prompt_ids) >= max_seq_len:
            return None
        input_ids = input_ids[:max_seq_len]
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def token_length(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(prompt tokens, total tokens incl. EOS) of any record as it will be trained.

    For preference records the total uses the longer of chosen and rejected; text records
    have no prompt.
    """
    fmt = detect_format(record)
    eos = 1  # every trained sequence ends with EOS
    if fmt == "text":
        return 0, len(encode(record["text"], tokenizer)) + eos
    if fmt == "preference":
        pref = to_preference(record, tokenizer)
        p = len(encode(pref.prompt, tokenizer))
        answer = max(len(encode(pref.chosen, tokenizer)), len(encode(pref.rejected, tokenizer)))
        return p, p + answer + eos
    ex = to_example(record, tokenizer)
    p = len(encode(ex.prompt, tokenizer))
    return p, p + len(encode(ex.completion, tokenizer)) + eos
