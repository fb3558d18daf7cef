"""One batched decode with per-request parameters and per-step streaming.

    slots = [Slot(request=req, emit=callback, adapter="v3") for req, callback in batch]
    decode_batch(group, tokenizer, slots, eos_ids, lock=step_lock)

This is `evertune.generation.generate` reshaped for serving, on the same rules (prompts
tokenized without special tokens, left padding with explicit position ids so a batched
prompt sees the positions it would see alone, the model's KV cache, stop at EOS or a stop
string, the same sampler), with what a server needs in addition:

- parameters per row: each request brings its own max_tokens, temperature, top_p, stop
  strings and seed (one torch.Generator per seeded row, so a seeded request repeats exactly
  whatever it is batched with);
- events per step: a streaming row gets a `TextDelta` as soon as its text grows (text that
  could still turn into a stop string, or an incomplete UTF-8 character, is held back);
- finished rows leave the batch (the KV cache rows are dropped), so a short answer does not
  keep costing compute while a long one finishes;
- cancellation: a row whose client went away stops at the next step;
- PEFT adapters per row: when the group's module is a PeftModel, each row names its adapter
  (`adapter_names`, PEFT's mixed-batch LoRA inference), so versions share one batch;
- isolation: what is done per row (seeding, sampling, decoding text, emitting) fails only
  that row; a prefill that fails for several new rows is retried one row at a time, so a
  poisoned request fails alone and never takes the running batch with it. Only a failure of
  a decode step's shared forward pass (which no row can be blamed for) fails every row.

Kept inside serving/ rather than in generation.py (owned by evaluation): the evaluation path
stays the simple one, and this file can follow serving's needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evertune.generation import _accepts_logits_to_keep, _first_stop, _sample
from evertune.serving.engine import Event, Finished, FinishReason, GenRequest, TextDelta

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

PEFT_BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch
GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (as vLLM does): dividing logits by 1e-300 gives
inf/NaN probabilities, and such a temperature means "the most likely token" anyway."""


@dataclass(frozen=True)
class Failed:
    """Internal event: this row failed; the engine's stream re-raises `error`."""

    error: BaseException


Sink = Callable[[Event | Failed], None]


class ModelGroup:
    """A module that requests can share a batch on.

    Merged versions and full models are each their own group; with unmerged adapters the
    base model, wrapped in a PeftModel once the first adapter arrives, is one group for the
    base and every adapter. `module` may be replaced (wrapping) under the engine's lock, so
    the decode loop reads it at every step.
    """

    def __init__(self, module: Any, peft: bool = False) -> None:
        self.module = module
        self.peft = peft
        self.keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(module) else {}


@dataclass
class Slot:
    """One request inside a batch, with its decoding state."""

    request: GenRequest
    emit: Sink
    adapter: str | None = None  # PEFT adapter name; None = the base model
    t0: float = field(default_factory=time.perf_counter)  # when the request was submitted
    cancelled: bool = False  # set by the client side; the row stops at the next step
    on_finish: Callable[[Slot], None] | None = None
    generated: list[int] = field(default_factory=list)
    sent: str = ""  # text already emitted as deltas
    first_at: float | None = None
    done: bool = False
    generator: Any = None  # torch.Generator for sampled rows

    def finish(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos: set[int],
        reason: FinishReason,
        cut: int | None = None,
    ) -> None:
        """Emit the last delta and `Finished`, once."""
        if self.done:
            return
        ids = self.generated
        body = ids[:-1] if ids and ids[-1] in eos else ids
        text = _decode(tokenizer, body)
        if cut is not None:
            text = text[:cut]
        # Done only once the text exists: if decoding raised, `fail` still tells the client.
        self.done = True
        if self.request.stream and len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(TextDelta(text[len(self.sent) :]))
        now = time.perf_counter()
        # Release the model before telling the client: once it has its answer, nothing of
        # this request holds a version any more (the gateway may unload it at once).
        if self.on_finish is not None:
            self.on_finish(self)
        self.emit(
            Finished(
                text=text,
                finish_reason=reason,
                prompt_tokens=self.request.prompt_tokens,
                completion_tokens=len(ids),
                ttft_s=None if self.first_at is None else self.first_at - self.t0,
                total_s=now - self.t0,
            )
        )

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            if self.on_finish is not None:
                self.on_finish(self)
            self.emit(Failed(error))


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence in, one string out
    return text


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Characters at the end of `text` not to stream yet: an incomplete UTF-8 character
    (decoded as U+FFFD) or the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text.endswith(s[:k], 0, end):
                hold = k
                break
    return len(text) - end + hold


def _step_row(
    slot: Slot, token: int, now: float, tokenizer: PreTrainedTokenizerBase, eos: set[int]
) -> None:
    """Add one sampled token to a row; finish it or stream its new text."""
    req = slot.request
    if slot.first_at is None:
        slot.first_at = now
    slot.generated.append(token)
    if token in eos:
        slot.finish(tokenizer, eos, "stop")
        return
    text: str | None = None
    if req.stop:
        text = _decode(tokenizer, slot.generated)
        at = _first_stop(text, req.stop)
        if at is not None:
            slot.finish(tokenizer, eos, "stop", cut=at)
            return
    assert req.max_tokens is not None, "GenRequest must be prepared before decoding"
    if len(slot.generated) >= req.max_tokens:
        slot.finish(tokenizer, eos, "length")
        return
    if req.stream:
        text = text if text is not None else _decode(tokenizer, slot.generated)
        visible = text[: len(text) - _held_back(text, req.stop)]
        if len(visible) > len(slot.sent) and visible.startswith(slot.sent):
            slot.emit(TextDelta(visible[len(slot.sent) :]))
            slot.sent = visible


def _sampled(request: GenRequest) -> bool:
    """Whether a row samples (False: greedy). NaN compares False, so it decodes greedily too
    (the gateway refuses NaN before it gets here)."""
    return request.temperature >= GREEDY_BELOW


def _vocab_size(module: Any) -> int | None:
    """Rows of the input embedding (None when the module does not say)."""
    try:
        return int(module.get_input_embeddings().num_embeddings)
    except Exception:
        return None


def _check_ids(ids: Sequence[int] | None, vocab: int | None) -> None:
    """Raise for a token id the model has no embedding for: on a GPU the lookup would be a
    device-side assert that breaks the CUDA context for every request, not an exception."""
    if ids and vocab is not None and not all(0 <= i < vocab for i in ids):
        bad = next(i for i in ids if not 0 <= i < vocab)
        raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")


def _seed_generator(slot: Slot, device: Any) -> None:
    """A generator for a sampled row: seeded when the request says so (raises on a seed
    torch cannot take; the caller fails that row only)."""
    import torch

    if not _sampled(slot.request):
        return
    gen = torch.Generator(device=device)
    if slot.request.seed is None:
        gen.seed()
    else:
        gen.manual_seed(slot.request.seed)
    slot.generator = gen


class RunningBatch:
    """Rows decoding together; new rows join at step boundaries (continuous batching).

        batch = RunningBatch(group, tokenizer, eos, lock=step_lock, pad_id=pad)
        batch.admit(slots)            # prefill the new rows, then merge them in
        while batch.rows:
            batch.step()              # one token for every live row
            batch.admit(more)         # optional: whoever arrived meanwhile

    State between steps: the KV cache of every row (right-aligned: each row's real tokens
    end in the last column, left padding before them), the 2-D attention mask over the
    cached columns, each row's next input token and position. Admitting prefills the new
    rows alone, then left-pads the narrower of the two caches to the wider and concatenates
    them along the batch; when rows leave, leading columns that are padding for every row
    left are cropped, so the width stays that of the longest live row. Merging needs the
    plain `DynamicCache` (per-layer key/value tensors); with any other cache type
    `can_admit` is False after the first admission and the batch runs to its end.
    Every method is meant for one thread (the batcher); a failure fails the batch's rows.
    """

    def __init__(
        self,
        group: ModelGroup,
        tokenizer: PreTrainedTokenizerBase,
        eos: set[int],
        *,
        lock: threading.RLock | None = None,
        pad_id: int = 0,
    ) -> None:
        self.group = group
        self.tokenizer = tokenizer
        self.eos = eos
        self.lock = lock or threading.RLock()
        self.pad_id = pad_id
        self.rows: list[Slot] = []
        self._past: Any = None
        self._attention: Any = None  # [rows, cached columns]
        self._next_ids: list[int] = []
        self._next_pos: Any = None  # [rows, 1]

    @property
    def can_admit(self) -> bool:
        """Whether new rows can join now (always before the first rows arrive)."""
        return self._past is None or _mergeable(self._past)

    def admit(self, slots: list[Slot]) -> None:
        """Prefill `slots` and add the unfinished ones to the batch (never raises).

        A failure fails only new rows: the running rows are untouched (`_admit` changes the
        batch's state only once nothing can fail any more). When a prefill of several rows
        fails, each row is retried alone, so only the row that causes it fails."""
        import torch

        try:
            with torch.inference_mode():
                self._admit(slots)
        except Exception as exc:  # a broken request fails itself, not the batcher thread
            fresh = [s for s in slots if not s.done and not s.generated]
            for slot in slots:
                if not slot.done and slot.generated:  # got a token already: cannot redo
                    slot.fail(exc)
            if len(fresh) > 1:
                for slot in fresh:
                    self.admit([slot])
            else:
                for slot in fresh:
                    slot.fail(exc)

    def step(self) -> None:
        """One decode step for every row (never raises)."""
        import torch

        try:
            with torch.inference_mode():
                self._step()
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: BaseException, extra: Sequence[Slot] = ()) -> None:
        for slot in [*self.rows, *extra]:
            slot.fail(exc)
        self.rows = []
        self._past = None

    # -- internals ---------------------------------------------------------------------------
    def _forward(self, rows: list[Slot], **inputs: Any) -> Any:
        with self.lock:
            extra: dict[str, Any] = dict(self.group.keep_last)
            if self.group.peft:
                # A finished row still in the batch (no cache row selection) may name an
                # adapter already removed: it computes on the base, its tokens are ignored.
                extra["adapter_names"] = [
                    s.adapter if s.adapter and not s.done else PEFT_BASE for s in rows
                ]
            return self.group.module(use_cache=True, **inputs, **extra)

    def _admit(self, slots: list[Slot]) -> None:
        import torch

        for slot in slots:
            if slot.cancelled:
                slot.finish(self.tokenizer, self.eos, "cancelled")
        new = [s for s in slots if not s.done]
        if not new:
            return
        device = self.group.module.device
        vocab = _vocab_size(self.group.module)
        for slot in new:
            try:
                _check_ids(slot.request.prompt_ids, vocab)
                _seed_generator(slot, device)
            except Exception as exc:  # e.g. a seed out of torch's range: this row only
                slot.fail(exc)
        new = [s for s in new if not s.done]
        if not new:
            return
        prompts = [s.request.prompt_ids or [] for s in new]
        assert all(prompts), "GenRequest must be prepared (prompt_ids) before decoding"
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor(
            [[self.pad_id] * (width - len(p)) + p for p in prompts], device=device
        )
        attention = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
        )
        # Positions count real tokens only, as if each prompt ran alone.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(
            new,
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=None,
        )
        picks = self._process(new, out.logits[:, -1, :])
        past, next_pos = out.past_key_values, positions[:, -1:] + 1
        keep = [r for r, s in enumerate(new) if not s.done]
        if not keep:
            return
        if len(keep) < len(new):
            if not hasattr(past, "batch_select_indices"):
                # Cannot drop rows from this cache: let the finished ones ride along.
                keep = list(range(len(new)))
            else:
                index = torch.tensor(keep, device=device)
                past.batch_select_indices(index)
                attention, next_pos = attention[index], next_pos[index]
        new, picks = [new[r] for r in keep], [picks[r] for r in keep]
        if self._past is None or not self.rows:
            self.rows, self._past, self._attention = new, past, attention
            self._next_ids, self._next_pos = picks, next_pos
            return
        assert self.can_admit and _mergeable(past), "admit() called while can_admit is False"
        have, add = self._attention.shape[1], attention.shape[1]
        width = max(have, add)
        pad = torch.nn.functional.pad
        # Build first, merge the cache, then assign: a failure leaves the running rows whole.
        merged_attention = torch.cat(
            [pad(self._attention, (width - have, 0)), pad(attention, (width - add, 0))], dim=0
        )
        merged_pos = torch.cat([self._next_pos, next_pos], dim=0)
        _merge_into(self._past, past, width - have, width - add)
        self._attention, self._next_pos = merged_attention, merged_pos
        self._next_ids = self._next_ids + picks
        self.rows = self.rows + new

    def _step(self) -> None:
        import torch

        if not self.rows:
            return
        device = self.group.module.device
        attention = torch.cat(
            [self._attention, self._attention.new_ones((len(self.rows), 1))], dim=-1
        )
        out = self._forward(
            self.rows,
            input_ids=torch.tensor(self._next_ids, device=device).unsqueeze(-1),
            attention_mask=attention,
            position_ids=self._next_pos,
            past_key_values=self._past,
        )
        self._past, self._attention = out.past_key_values, attention
        self._next_ids = self._process(self.rows, out.logits[:, -1, :])
        self._next_pos = self._next_pos + 1
        keep = [r for r, s in enumerate(self.rows) if not s.done]
        if not keep:
            self.rows, self._past = [], None
            return
        if len(keep) < len(self.rows) and hasattr(self._past, "batch_select_indices"):
            # Drop finished rows from every tensor and the KV cache: a batch costs what its
            # live rows cost.
            index = torch.tensor(keep, device=device)
            self._past.batch_select_indices(index)
            self._attention, self._next_pos = self._attention[index], self._next_pos[index]
            self.rows = [self.rows[r] for r in keep]
            self._next_ids = [self._next_ids[r] for r in keep]
            # Columns that are padding for every row left carry nothing: crop them.
            lead = int((self._attention.cumsum(-1) == 0).sum(-1).min())
            if lead > 0 and _mergeable(self._past):
                _crop_left(self._past, lead)
                self._attention = self._attention[:, lead:]

    def _process(self, rows: list[Slot], logits: torch.Tensor) -> list[int]:
        """Pick one token per row and hand it to the row (finishing or streaming it).

        Per row, so that a row whose sampling or decoding raises fails alone; it is done,
        so it leaves the batch like a finished row (its pick, the argmax, is never used)."""
        picks: list[int] = logits.argmax(dim=-1).tolist()  # one op for every greedy row
        now = time.perf_counter()
        for r, slot in enumerate(rows):
            if slot.done:
                continue
            try:
                if slot.cancelled:
                    slot.finish(self.tokenizer, self.eos, "cancelled")
                    continue
                req = slot.request
                if _sampled(req):
                    picks[r] = int(
                        _sample(logits[r : r + 1], req.temperature, req.top_p, slot.generator)[0]
                    )
                _step_row(slot, picks[r], now, self.tokenizer, self.eos)
            except Exception as exc:
                slot.fail(exc)
        return picks


def _mergeable(cache: Any) -> bool:
    """A DynamicCache made of plain DynamicLayers: per-layer [batch, heads, seq, dim] tensors."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers
    )


def _merge_into(cache: Any, other: Any, pad_self: int, pad_other: int) -> None:
    """Append `other`'s rows to `cache`, left-padding either to the same length."""
    import torch

    pad = torch.nn.functional.pad
    # Every tensor is built before any layer changes: a failure here (out of memory) leaves
    # the running rows' cache whole.
    merged = [
        (
            torch.cat(
                [pad(mine.keys, (0, 0, pad_self, 0)), pad(theirs.keys, (0, 0, pad_other, 0))],
                dim=0,
            ),
            torch.cat(
                [pad(mine.values, (0, 0, pad_self, 0)), pad(theirs.values, (0, 0, pad_other, 0))],
                dim=0,
            ),
        )
        for mine, theirs in zip(cache.layers, other.layers, strict=True)
    ]
    for layer, (keys, values) in zip(cache.layers, merged, strict=True):
        layer.keys, layer.values = keys, values


def _crop_left(cache: Any, n: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, n:, :]
        layer.values = layer.values[:, :, n:, :]


def decode_batch(
    group: ModelGroup,
    tokenizer: PreTrainedTokenizerBase,
    slots: list[Slot],
    eos: set[int],
    *,
    lock: threading.RLock | None = None,
    pad_id: int = 0,
) -> None:
    """Decode `slots` together until each has finished (no rows join later)."""
    batch = RunningBatch(group, tokenizer, eos, lock=lock, pad_id=pad_id)
    batch.admit(slots)
    while batch.rows:
        batch.step()
