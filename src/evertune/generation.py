"""Batched text generation with a loaded causal LM: what evaluation and serving both call.

    from evertune.generation import generate
    from evertune.models import load_for_inference, load_tokenizer
    model, tok = load_for_inference(base), load_tokenizer(base)
    outs = generate(model, tok, ["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"],
                    max_new_tokens=32, stop=["\\n\\n"])
    outs[0].text, outs[0].finish_reason, outs[0].completion_tokens, outs[0].latency_s

Prompts are used exactly as given (already chat-templated by the caller) and tokenized with
`add_special_tokens=False`, the same rule as `evertune.data.templating`, so a prompt is seen
at generation time token for token as it was seen in training.

The decode loop is our own rather than `model.generate`: it is short, needs no generation
config on the model, and gives what serving and evaluation need per request (the time each
row finished, the exact stop string cut, token counts) without callbacks. It uses the model's
KV cache, left padding with explicit position ids (so a batched prompt gets exactly the
positions it would get alone), and stops a row at EOS or a stop string; the batch ends when
every row has stopped or `max_new_tokens` is reached.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]


@dataclass
class Generation:
    """One completion. `finish_reason` is "stop" for EOS or a stop string, "length" when
    `max_new_tokens` ran out. `completion_tokens` counts every generated token, the EOS or the
    token that completed a stop string included (what the model computed, as OpenAI counts
    usage); `text` excludes the EOS and everything from the stop string on. `latency_s` runs
    from the start of the request's batch to the step its row finished."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    latency_s: float


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    # The tokenizer's EOS plus the model's generation config ones: chat models often end a
    # turn with a token (<|im_end|>, <|eot_id|>) that only one of the two names.
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None),
                                                   "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _encode_prompts(prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    out: list[list[int]] = []
    for i, ids in enumerate(encoded):
        if not ids:
            # A model needs at least one token to condition on; BOS is the neutral choice.
            if tokenizer.bos_token_id is None:
                raise ValueError(
                    f"prompt {i} is empty and the tokenizer has no BOS token to start with"
                )
            ids = [tokenizer.bos_token_id]
        out.append(list(ids))
    return out


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence in, one string out
    return text


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row: argmax when temperature == 0, else nucleus sampling."""
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    # Computing logits only for the last position saves a (batch, prompt_len, vocab) tensor
    # in the prefill; older or custom models may not take the argument.
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    batch_size: int = 16,
) -> list[Generation]:
    """Complete each prompt; results are in the order of `prompts`.

    Args:
        model: a causal LM in eval mode (any device; inputs follow `model.device`).
        tokenizer: its tokenizer; needs a pad token or an EOS to pad with.
        prompts: full prompt texts (chat template already applied).
        max_new_tokens: generated tokens per prompt at most (the EOS counts as one).
        temperature: 0 = greedy (deterministic); > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling mass (only when sampling).
        stop: strings that end a completion; the text is cut before the earliest one.
        seed: seeds the sampling generator, so a seeded call repeats exactly; None = random.
        batch_size: prompts run together; prompts are grouped by length to pad less.
    """
    import torch

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []

    stop = [s for s in (stop or []) if s]
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    device = model.device
    generator: torch.Generator | None = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}

    encoded = _encode_prompts(prompts, tokenizer)
    # Longest first: similar lengths share a batch (less padding), and a too-long batch
    # fails at once rather than at the end.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[Generation | None] = [None] * len(prompts)

    with torch.inference_mode():
        for rows in _batches(order, batch_size):
            start = time.perf_counter()
            width = max(len(encoded[i]) for i in rows)
            # Left padding: every row's last prompt token sits in the last column, so one
            # next-token column serves the whole batch.
            input_ids = torch.tensor(
                [[pad_id] * (width - len(encoded[i])) + encoded[i] for i in rows], device=device
            )
            attention = torch.tensor(
                [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows],
                device=device,
            )
            # Positions count real tokens only, as if each prompt ran alone.
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            generated: list[list[int]] = [[] for _ in rows]
            cut: list[int | None] = [None] * len(rows)  # text index of a stop string
            reason: list[FinishReason | None] = [None] * len(rows)
            finished_at = [0.0] * len(rows)
            past = None
            step_ids, step_pos = input_ids, positions
            for _ in range(max_new_tokens):
                out = model(
                    input_ids=step_ids,
                    attention_mask=attention,
                    position_ids=step_pos,
                    past_key_values=past,
                    use_cache=True,
                    **keep_last,
                )
                past = out.past_key_values
                next_ids = _sample(out.logits[:, -1, :], temperature, top_p, generator)
                now = time.perf_counter() - start
                for r, token in enumerate(next_ids.tolist()):
                    if reason[r] is not None:
                        continue
                    generated[r].append(token)
                    if token in eos:
                        reason[r], finished_at[r] = "stop", now
                    elif stop:
                        text = _decode(tokenizer, generated[r])
                        at = _first_stop(text, stop)
                        if at is not None:
                            reason[r], finished_at[r], cut[r] = "stop", now, at
                if all(r is not None for r in reason):
                    break
                # Finished rows keep stepping (a batch moves together); their tokens are ignored.
                step_ids = next_ids.unsqueeze(-1)
                step_pos = step_pos[:, -1:] + 1
                attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=-1)
            end = time.perf_counter() - start
            for r, i in enumerate(rows):
                ids = generated[r]
                body = ids[:-1] if ids and ids[-1] in eos else ids
                text = _decode(tokenizer, body)
                if cut[r] is not None:
                    text = text[: cut[r]]
                results[i] = Generation(
                    text=text,
                    prompt_tokens=len(encoded[i]),
                    completion_tokens=len(ids),
                    finish_reason=reason[r] or "length",
                    latency_s=finished_at[r] if reason[r] is not None else end,
                )
    return [g for g in results if g is not None]
