"""The training loop every recipe shares: batching, learning-rate schedule, clipping,
checkpoints, resume, cancel / pause / SIGTERM, metric rows, validation, the atomic result.

    from evertune.training.harness import run_recipe
    run_recipe(ws, job_id, SftRecipe())      # what each recipe's run_<method>(ws, job_id) does
    python -m evertune.training.run JOB_DIR  # how start_job runs a job (training.run)

A recipe (`Recipe`: `sft.py`, `pretrain.py`, `dpo.py`, `kto.py`) says only what its training
units are (tokenized examples, packed blocks, preference pairs, rated answers), how units make
a batch, and what the loss of a batch is. Everything else is here, once, and reads top to
bottom, nanoGPT-style:

    setup (threads, seeds) → tokenizer → the recipe's units → wrap (LoRA, the parent's
    adapter or previous stage's weights, or full weights) → the recipe's preparation (e.g.
    reference log-probs) → optimizer → resume from a checkpoint →
    loop { stop check, lr, forward/backward, clip, step, log, eval, checkpoint } → save result

Everything the outside world sees goes through the state DB (`evertune.training.jobs`):
metrics every `log_every` steps, validation at `eval_every` (or each epoch end), checkpoints
every `checkpoint_every` steps, and the final status. Hyperparameters come from the job's
config snapshot, never from the current evertune.yaml, so a resumed job trains exactly what
it started training.

The same loop runs as one of several processes under `train.backend: ray`
(`evertune.training.ray_run`: Ray Train starts them and initialises torch.distributed): each
rank takes its share of every planned batch, and `Ranks` sums gradients, counts and loss
totals over them, so the update and the metric rows are the single process's. Rank 0 alone
writes (events, metric rows, checkpoints, the result) and reads the stop request for all.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertune.config import Config
from evertune.errors import DataError, EvertuneError, JobError, ModelError
from evertune.facts import RESULT_META, lora_settings, read_facts, training_facts
from evertune.training.jobs import (
    Job,
    fail_job,
    get_job,
    job_dir,
    newest_checkpoint,
    record_checkpoint,
    record_event,
    record_metrics,
    stop_requested,
    transition,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from evertune.data.store import DatasetVersion
    from evertune.data.templating import TokenizedExample
    from evertune.workspace import Workspace

IGNORE_INDEX = -100  # labels PyTorch's cross-entropy skips: prompt tokens and padding
VAL_MAX_UNITS = 512  # validation runs often; a bounded sample keeps it cheap
# Seconds to sleep after each step. Tests only: the tiny model trains faster than a test can
# cancel or kill it mid-run; a real job never sets it.
TEST_STEP_DELAY_ENV = "EVERTUNE_TEST_STEP_DELAY_S"

Batch = dict[str, Any]


class _Stop(Exception):
    """Raised inside the loop to end it early: cancelled, paused, or SIGTERM."""

    def __init__(self, reason: str) -> None:
        self.reason = reason  # "cancelled" | "paused" | "terminated"


@dataclass
class TrainResult:
    """What a run did: the final job, plus timings the benchmark reads."""

    job: Job
    step: int = 0  # the job's step count when this process stopped
    steps: int = 0  # optimizer steps run in this process (not counting resumed ones)
    trained_tokens: int = 0  # non-pad tokens over the whole job, resumed part included
    tokens_this_run: int = 0  # non-pad tokens seen by this process
    positions_this_run: int = 0  # padded positions (batch × width) seen by this process
    train_seconds: float = 0.0  # forward/backward/step/log, without eval and checkpoints
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    prepare_seconds: float = 0.0  # the recipe's preparation (reference log-probs)
    resumed_from: int | None = None  # checkpoint step this run continued from

    @property
    def padding_fraction(self) -> float:
        return (
            1 - self.tokens_this_run / self.positions_this_run if self.positions_this_run else 0.0
        )


@dataclass
class Setup:
    """What a recipe may read while it builds its units: the job and its resolved inputs."""

    ws: Workspace
    job: Job
    cfg: Config
    folder: Path  # the job's folder (a recipe may cache preparation there)
    base_path: Path
    tokenizer: PreTrainedTokenizerBase
    dataset: DatasetVersion
    main: bool = True  # rank 0 (or the only process): the one that writes events

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def event(self, message: str, level: str = "info") -> None:
        if self.main:  # every rank builds the same units: one of them says so
            record_event(self.ws, self.job.id, message, level)  # type: ignore[arg-type]


@dataclass
class Units:
    """A recipe's training and validation units; `lengths[i]` is unit i's token count (batch
    planning groups similar lengths)."""

    train: list[Any]
    val: list[Any]
    what: str = "examples"  # for messages: examples | blocks | pairs | rated answers

    @property
    def lengths(self) -> list[int]:
        return [unit_length(u) for u in self.train]


@dataclass
class StepLoss:
    """The loss of one batch: `loss` is what backward() sees; `total / count` is what the
    metric rows average (a token-weighted cross-entropy, a per-pair DPO loss…)."""

    loss: torch.Tensor
    total: float
    count: int
    tokens: int  # non-pad tokens in the batch
    positions: int  # positions the batch computed, padding included
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra per-batch sums, averaged over `count` in metric rows (e.g. reward_accuracy)."""


class Recipe:
    """A training method: its units, batches and loss. Subclasses override the three hooks
    marked below; `prepare` is optional.

    `loss` must return `loss == total / count` (a mean over the batch's tokens, pairs…): the
    harness relies on it to accumulate gradients exactly over micro-batches."""

    method = ""
    sequences_per_unit = 1  # sequences a unit puts through the model with gradients (DPO: 2)

    def units(self, setup: Setup) -> Units:  # override
        raise NotImplementedError

    def collate(self, units: Sequence[Any], pad_id: int, device: Any = None) -> Batch:  # override
        raise NotImplementedError

    def loss(self, model: Any, batch: Batch) -> StepLoss:  # override
        raise NotImplementedError

    def prepare(self, setup: Setup, model: Any, units: Units, resumed: bool) -> None:
        """Work before the first step, with the starting weights (DPO: reference log-probs)."""


def unit_length(unit: Any) -> int:
    """Tokens of a unit: a TokenizedExample, a packed block, or anything with `length`."""
    if hasattr(unit, "length"):
        return int(unit.length)
    return len(unit.input_ids)


# -- building blocks (plain functions, each testable on its own) ---------------------------


def plan_batches(
    lengths: list[int], batch_size: int, mode: str, seed: int, epoch: int
) -> list[list[int]]:
    """The example indices of each batch of one epoch; a pure function of its arguments, so a
    resumed job can skip exactly the batches it already trained on.

    `padded`: a random order (padding to each batch's longest example).
    `group_by_length`: shuffle, sort by length (stable, so ties stay shuffled), cut into
    batches of similar length, shuffle the batches; the longest batch goes first so an
    out-of-memory error shows at step 1 instead of an hour in.
    """
    rng = random.Random(seed * 1_000_003 + epoch)  # deterministic per (seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if mode == "group_by_length":
        order.sort(key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if mode == "group_by_length":
        rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def collate(
    examples: list[TokenizedExample], pad_id: int, device: Any = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest example: padding gets attention_mask 0 and label -100,
    so it is neither attended to nor learned."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def lr_at(
    step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str = "linear"
) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then linear or cosine
    decay to 0 at `total_steps`. Warmup starts at peak/(warmup+1), not 0 (nanoGPT): a step at
    lr 0 is wasted compute."""
    if step < warmup_steps:
        return peak * (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress)


def micro_batch_units(recipe: Recipe, batch_size: int, micro_batch_size: int) -> int:
    """Units per forward/backward pass: `train.micro_batch_size`, or with 0 (auto) the batch
    size in sequences, so a DPO pass holds as many sequences as a supervised one."""
    if micro_batch_size:
        return min(micro_batch_size, batch_size)
    return max(1, batch_size // recipe.sequences_per_unit)


class Ranks:
    """This process's place among a job's training processes: rank 0 of 1 for the local
    backend; under `train.backend: ray` Ray Train starts `world` processes and initialises
    torch.distributed (gloo on CPU, NCCL on GPU) before the recipe runs.

    Gradients are summed with explicit all-reduces rather than by wrapping the model in
    DistributedDataParallel: a rank whose share of a short batch is empty (the last batch of
    an epoch, or batch_size < world) still takes part, the model and what it saves stay
    unwrapped, and the division by the batch's total count stays in `forward_backward`. The
    price is no overlap of communication with the backward pass: small for LoRA's few weights.
    """

    BUCKET = 1 << 24  # elements per all-reduce (64 MB of fp32): bounds the extra memory

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1
        self._keys: list[str] | None = None  # the recipe's metric names, agreed once

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world={self.world})"

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes events, metric rows, checkpoints and the result."""
        return self.rank == 0

    def _device(self) -> Any:
        import torch

        assert self.dist is not None
        if self.dist.get_backend() == "nccl":  # NCCL reduces only GPU tensors
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def share(self, units: Sequence[Any]) -> Sequence[Any]:
        """This rank's contiguous part of a batch (sizes differ by at most one; may be empty)."""
        n, w, r = len(units), self.world, self.rank
        start = r * (n // w) + min(r, n % w)
        return units[start : start + n // w + (1 if r < n % w else 0)]

    def same(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a stop request, the checkpoint to resume from)."""
        if self.dist is None:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Any:
        """Rank 0 runs the block before the others do: what it caches in the job or workspace
        folder (reference log-probs, replay answers) the others then read instead of racing
        it. (A long wait counts against the process group's timeout: ray_run.PG_TIMEOUT_S.)"""
        if self.dist is not None and not self.main:
            self.dist.barrier()
        try:
            yield
        finally:
            if self.dist is not None and self.main:
                self.dist.barrier()

    def sum_window(self, sums: _Window) -> _Window:
        """Loss totals, counts, tokens and the recipe's metric sums, summed over the ranks."""
        import torch

        if self.dist is None:
            return sums
        if self._keys is None:  # the first call, on every rank at once: agree on the names
            names: list[Any] = [None] * self.world
            self.dist.all_gather_object(names, sorted(sums.metrics))
            self._keys = sorted(set().union(*names))
        assert set(sums.metrics) <= set(self._keys), (
            f"the recipe's metrics changed during training: {sorted(sums.metrics)} vs {self._keys}"
        )
        values = torch.tensor(
            [sums.total, sums.count, sums.tokens, sums.positions,
             *(sums.metrics.get(k, 0.0) for k in self._keys)],
            dtype=torch.float64,  # exact for counts below 2**53, as Python's sums are
            device=self._device(),
        )
        self.dist.all_reduce(values)
        v = values.tolist()
        return _Window(total=v[0], count=round(v[1]), tokens=round(v[2]), positions=round(v[3]),
                       metrics=dict(zip(self._keys, v[4:], strict=True)))

    def sum_grads(self, params: Sequence[Any]) -> None:
        """Sum the gradients over the ranks, in place. A parameter no rank has a gradient for
        keeps None, as in one process (AdamW skips it; a zero gradient would still move it)."""
        import torch

        assert self.dist is not None
        had = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                           device=self._device())
        self.dist.all_reduce(had)
        live = [p for p, n in zip(params, had.tolist(), strict=True) if n]
        for p in live:
            if p.grad is None:  # this rank's share was empty
                p.grad = torch.zeros_like(p)
        self._reduce([p.grad for p in live], broadcast=False)

    def same_weights(self, params: Sequence[Any]) -> None:
        """Rank 0's values of `params` on every rank (they start equal from the same seed or
        checkpoint; this makes sure, once, before the first step)."""
        if self.dist is not None:
            self._reduce([p.data for p in params], broadcast=True)

    def _reduce(self, tensors: list[Any], broadcast: bool) -> None:
        """All-reduce (sum) or broadcast from rank 0 `tensors` in place, a bucket at a time."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        assert self.dist is not None
        groups: dict[Any, list[Any]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for group in groups.values():
            start = 0
            while start < len(group):
                bucket: list[Any] = []
                size = 0
                while start < len(group) and (not bucket or size + group[start].numel()
                                              <= self.BUCKET):
                    bucket.append(group[start])
                    size += group[start].numel()
                    start += 1
                flat = _flatten_dense_tensors(bucket)
                if broadcast:
                    self.dist.broadcast(flat, src=0)
                else:
                    self.dist.all_reduce(flat)
                for t, new in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                    t.copy_(new)


def forward_backward(
    model: Any, recipe: Recipe, units: Sequence[Any], micro: int, pad_id: int, device: Any,
    trainable: Sequence[Any], ranks: Ranks | None = None,
) -> StepLoss:
    """Forward and backward of one batch, `micro` units per pass; returns the batch's StepLoss.

    The gradient equals one pass over the whole batch: each pass back-propagates its loss
    *sum* (`loss × count`) and the summed gradients are divided by the batch's count at the
    end (a per-pass mean would weight a short pass like a long one). With several `ranks`
    each runs its share of the batch that way, and the gradient sums, counts and loss totals
    are summed over the ranks before the division: the same gradient, on every rank."""
    import torch

    shared = ranks is not None and ranks.world > 1
    if not shared and micro >= len(units):
        out = recipe.loss(model, recipe.collate(units, pad_id, device))
        out.loss.backward()
        return out
    mine = ranks.share(units) if ranks is not None and shared else units
    outs = []
    for i in range(0, len(mine), micro):
        out = recipe.loss(model, recipe.collate(mine[i : i + micro], pad_id, device))
        (out.loss * out.count).backward()
        outs.append(out)
    sums = _Window()
    for o in outs:
        sums.add(o)
    if ranks is not None and shared:
        sums = ranks.sum_window(sums)
        ranks.sum_grads(trainable)
        loss = torch.tensor(sums.total / max(sums.count, 1))
    else:
        loss = sum(o.loss.detach() * o.count for o in outs) / max(sums.count, 1)  # type: ignore[assignment]
    for p in trainable:
        if p.grad is not None:
            p.grad.div_(max(sums.count, 1))
    return StepLoss(
        loss=loss,
        total=sums.total,
        count=sums.count,
        tokens=sums.tokens,
        positions=sums.positions,
        metrics=sums.metrics,
    )


def _split_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, lm_head) of a causal LM whose logits are exactly `lm_head(decoder(x))`, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    # Models that rescale or cap their logits (Gemma 2, Cohere) go through their own forward.
    if (
        cfg is None
        or getattr(cfg, "final_logit_softcapping", None)
        or getattr(cfg, "logit_scale", None)
    ):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def _model_inputs(batch: Batch) -> dict[str, Any]:
    """The model's inputs of a batch: ids plus whichever of attention_mask / position_ids it
    has (a packed batch has position ids and no mask: transformers then builds a
    block-diagonal causal mask from where the positions restart)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def token_logps(model: Any, batch: Batch) -> torch.Tensor:
    """Per row, the summed log-probability of the labelled tokens (the completion + EOS) given
    what precedes them: log p(completion | prompt), as DPO and KTO compare them.

    Like `loss_sum`, the output head runs only on labelled positions."""
    import torch

    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    parts = _split_head(model)
    if parts is None:
        logits = model(**_model_inputs(batch), use_cache=False).logits[:, :-1][keep].float()
    else:
        decoder, head = parts
        hidden = decoder(**_model_inputs(batch), use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep]).float()
    picked = torch.log_softmax(logits, dim=-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    rows = keep.nonzero()[:, 0]  # the row of each labelled position, in the same order
    return torch.zeros(targets.shape[0], device=picked.device).index_add(0, rows, picked)


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of learned tokens) of a batch.

    The output head runs only on positions that have a label: prompt and padding positions
    would produce vocab-sized logits that the loss throws away. For a 49k vocabulary that is a
    fifth of the forward pass and most of the softmax, and the reason this loop beats a plain
    `transformers.Trainer` even without length grouping (bench/train_throughput.py). The value
    equals the model's own `labels=` loss (tests/training/test_sft.py checks it). Packed
    batches (`position_ids` restarting per document, no attention mask) keep attention inside
    each document (`pretrain`).
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    parts = _split_head(model)
    if parts is None:  # generic path: the model's own loss, a mean, turned back into a sum
        out = model(**_model_inputs(batch), labels=batch["labels"], use_cache=False)
        return out.loss * n, n
    decoder, head = parts
    hidden = decoder(**_model_inputs(batch), use_cache=False).last_hidden_state
    logits = head(hidden[:, :-1][keep]).float()  # position t predicts token t+1
    return F.cross_entropy(logits, targets[keep], reduction="sum"), n


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _parent_path(ws: Workspace, job: Job, base_path: Path) -> Path:
    """The parent's weights (a registered version's artifact, or the previous stage's result),
    refused early if they were trained on another base."""
    from evertune.facts import fingerprint
    from evertune.registry import Registry

    parent = str(job.parent)
    if parent.startswith("ftjob-"):  # the previous stage of a chain: that job's result
        result = get_job(ws, parent).result or {}
        if not result.get("path"):
            raise ModelError(f"job {parent} (the previous stage) has no result to continue from")
        path = Path(result["path"])
    else:
        path = Path(Registry(ws).version_artifact_path(parent))
    if (path / RESULT_META).is_file():
        facts = read_facts(path)
        same = (
            fingerprint(base_path) == facts.base_fingerprint
            if facts.base_fingerprint
            else facts.base_model == job.model
        )
        if not same:
            raise ModelError(
                f"parent version {job.parent} was trained on base {facts.base_model!r}, but "
                f"this job's model.base is {job.model!r} (other weights); set model.base to the "
                "parent's base or drop --parent"
            )
    if not (_is_adapter(path) or (path / "config.json").is_file()):
        raise ModelError(
            f"parent version {job.parent} at {path} holds neither a PEFT adapter nor a model folder"
        )
    return path


def build_model(
    ws: Workspace, job: Job, cfg: Config, base_path: Path, parent_path: Path | None = None
) -> tuple[Any, str]:
    """The trainable model and the result kind ("lora" | "full").

    - no parent, LoRA: fresh adapters per `train.lora` on the base model;
    - parent adapter, LoRA: the parent's adapter, trainable (its rank and targets win);
    - parent full weights: those weights are the starting point;
    - `train.full_finetune`: every weight trains (a parent adapter is merged in first).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    from evertune.models import load_model

    parent = parent_path or (_parent_path(ws, job, base_path) if job.parent else None)
    start = parent if parent is not None and not _is_adapter(parent) else base_path
    model = load_model(start, cfg.model.dtype)
    if parent is not None and _is_adapter(parent):
        model = PeftModel.from_pretrained(model, parent, is_trainable=not cfg.train.full_finetune)
        if cfg.train.full_finetune:
            model = model.merge_and_unload()
    if cfg.train.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train(), "full"
    if not isinstance(model, PeftModel):
        lora = cfg.train.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model.train(), "lora"


def save_weights(model: Any, kind: str, folder: Path) -> None:
    """The trainable part: a PEFT adapter folder, or full weights as safetensors."""
    if kind == "lora":
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, safe_serialization=True)


def load_weights(model: Any, kind: str, folder: Path) -> None:
    if kind == "lora":
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        result = set_peft_model_state_dict(model, load_peft_weights(str(folder)))
        unexpected = getattr(result, "unexpected_keys", None)
        assert not unexpected, f"checkpoint {folder} has weights this model lacks: {unexpected[:5]}"
    else:
        import safetensors.torch

        for f in sorted(folder.glob("model*.safetensors")):
            model.load_state_dict(safetensors.torch.load_file(f), strict=False)


def save_checkpoint(
    folder: Path, step: int, model: Any, kind: str, state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write checkpoints/step-N atomically: into step-N.tmp, then a rename. A folder without
    the rename (killed mid-write) is never mistaken for a checkpoint."""
    import torch

    root = folder / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, kind, tmp)
    torch.save(state, tmp / "trainer_state.pt")  # optimizer, RNG: tensors, so not JSON
    (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; return the deleted folders."""
    root = folder / "checkpoints"
    done = sorted(
        (p for p in root.glob("step-*") if p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
        reverse=True,
    )
    for old in done[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return done[keep:]


# -- the loop ---------------------------------------------------------------------------------


def run_recipe(ws: Workspace, job_id: str, recipe: Recipe) -> TrainResult:
    """Train job `job_id` (status running) with `recipe` to the end; returns its final state.

    Never raises for a training failure: the job is marked failed with `{code, message}` and
    the traceback goes to stderr (JOB_DIR/train.log under the local backend).
    """
    job = get_job(ws, job_id)
    if job.status != "running":
        raise JobError(
            f"job {job_id} is {job.status}; the recipe runs only running jobs "
            "(start it with start_job)"
        )
    result = TrainResult(job=job)
    ranks = Ranks()
    stop_on_sigterm = _install_sigterm()
    try:
        _train(ws, job, recipe, result, ranks)
    except _Stop as stop:
        if ranks.main:
            _finish_stopped(ws, job_id, stop.reason, result)
    except EvertuneError as exc:  # bad data or model: every rank finds it in its setup
        code = {DataError: "bad_dataset", ModelError: "bad_model"}.get(type(exc), "invalid_job")
        if ranks.main:
            _fail(ws, job_id, code, str(exc))
    except Exception as exc:
        if ranks.world > 1:
            # One rank's failure must end them all (the others wait in a collective): Ray
            # Train tears the worker group down and restarts it from the newest checkpoint
            # (train.ray.max_failures), or its driver marks the job failed (ray_run).
            raise
        if is_oom(exc):
            _fail(ws, job_id, "out_of_memory", _oom_message(job))
        else:
            _fail(ws, job_id, "internal", _internal_message(job_id, exc))
    finally:
        stop_on_sigterm()
    result.job = get_job(ws, job_id)
    return result


def _train(ws: Workspace, job: Job, recipe: Recipe, result: TrainResult, ranks: Ranks) -> None:
    import torch

    from evertune.data.store import get_dataset
    from evertune.models import load_tokenizer, resolve_base_model

    cfg = Config.model_validate(job.config)
    t = cfg.train
    folder = job_dir(ws, job.id)
    step_delay = float(os.environ.get(TEST_STEP_DELAY_ENV) or 0)

    # -- setup: threads and seeds -----------------------------------------------------------
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    random.seed(t.seed)
    torch.manual_seed(t.seed)  # LoRA init and dropout draw from torch's global RNG

    # -- the base model's tokenizer and the recipe's units ------------------------------------
    base_path = resolve_base_model(cfg.model.base, ws.models_dir)
    tokenizer = load_tokenizer(base_path)
    pad_id = int(tokenizer.pad_token_id)
    setup = Setup(ws, job, cfg, folder, base_path, tokenizer, get_dataset(ws, job.training_file),
                  main=ranks.main)
    with ranks.main_first():  # rank 0 writes any cache (replay answers), the others read it
        units = recipe.units(setup)
    if not units.train:
        raise DataError(
            f"dataset {setup.dataset.id} has no training {units.what} that fit "
            f"data.max_seq_len={cfg.data.max_seq_len}; "
            "raise data.max_seq_len or set data.overlong=truncate"
        )
    units.val = units.val[:VAL_MAX_UNITS]
    lengths = units.lengths
    steps_per_epoch = math.ceil(len(units.train) / t.batch_size)
    micro = micro_batch_units(recipe, t.batch_size, t.micro_batch_size)
    total_steps = steps_per_epoch * t.n_epochs

    # -- the model: LoRA adapters, the parent's adapter, or full weights ----------------------
    parent_path = _parent_path(ws, job, base_path) if job.parent else None
    model, kind = build_model(ws, job, cfg, base_path, parent_path=parent_path)
    device = next(model.parameters()).device  # load_model put it on the GPU if there is one
    ckpt = ranks.same(newest_checkpoint(folder))  # all ranks resume from rank 0's choice
    t0 = time.perf_counter()
    with ranks.main_first():  # rank 0 computes and caches (reference log-probs), others read
        recipe.prepare(setup, model, units, resumed=ckpt is not None)
    result.prepare_seconds = time.perf_counter() - t0
    val_sorted = sorted(units.val, key=unit_length)  # similar lengths together: least padding
    val_batches = [
        recipe.collate(val_sorted[i : i + t.batch_size], pad_id, device)
        for i in range(0, len(val_sorted), t.batch_size)
    ]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates all parameters in one call instead of a Python loop over
    # hundreds of small LoRA tensors (transformers.Trainer's default optimizer is the same).
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in trainable)
    optimizer = torch.optim.AdamW(
        trainable, lr=t.learning_rate, weight_decay=t.weight_decay, fused=fused or None
    )

    # -- resume: weights, optimizer, RNG and data position of the newest checkpoint ------------
    step, start_epoch, next_batch, trained_tokens = 0, 0, 0, 0
    if ckpt is not None:
        load_weights(model, kind, ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        step, start_epoch, next_batch = state["step"], state["epoch"], state["next_batch"]
        trained_tokens = state["trained_tokens"]
        result.resumed_from = result.step = step
        setup.event(
            f"Resumed from checkpoint step {step} (epoch {start_epoch + 1}, batch {next_batch})"
        )
    ranks.same_weights(trainable)
    if not ranks.main:  # dropout masks: each rank its own stream (rank 0 keeps the saved one)
        torch.manual_seed(t.seed + 1_000_003 * ranks.rank + step)
    if ranks.main:
        for leftover in (folder / "checkpoints").glob("*.tmp"):  # a killed checkpoint write
            shutil.rmtree(leftover, ignore_errors=True)
    n_trainable = sum(p.numel() for p in trainable)
    if ranks.main:
        record_event(
            ws,
            job.id,
            f"Training {kind} {job.method} ({n_trainable:,} trainable parameters) on "
            f"{len(units.train)} {units.what}: {t.n_epochs} epochs × {steps_per_epoch} steps, "
            f"batch {t.batch_size}"
            + (f" in passes of {micro}" if micro < t.batch_size else "")
            + (f", split over {ranks.world} ranks" if ranks.world > 1 else "")
            + f", {t.batching}",
            data={"trainable_parameters": n_trainable, "total_steps": total_steps, "kind": kind,
                  "method": job.method} | ({"ranks": ranks.world} if ranks.world > 1 else {}),
        )

    def checkpoint(metrics: dict[str, Any]) -> None:
        if not ranks.main:
            return
        t0 = time.perf_counter()
        pos_epoch, pos_batch = (epoch + 1, 0) if next_batch >= len(batches) else (epoch, next_batch)
        state = {
            "optimizer": optimizer.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "step": step,
            "epoch": pos_epoch,
            "next_batch": pos_batch,
            "trained_tokens": trained_tokens,
        }
        meta = {
            "job_id": job.id,
            "method": job.method,
            "step": step,
            "total_steps": total_steps,
            "epoch": pos_epoch,
            "next_batch": pos_batch,
            "trained_tokens": trained_tokens,
            "kind": kind,
            "metrics": metrics,
            "hyperparameters": job.hyperparameters,
            "config": job.config,
        }
        path = save_checkpoint(folder, step, model, kind, state, meta)
        pruned = prune_checkpoints(folder, t.keep_checkpoints)
        record_checkpoint(ws, job.id, step, path, metrics, pruned)
        record_event(
            ws, job.id, f"Checkpoint saved at step {step}/{total_steps}", data={"path": str(path)}
        )
        result.checkpoint_seconds += time.perf_counter() - t0

    def evaluate() -> dict[str, Any]:
        if not val_batches:
            return {}
        t0 = time.perf_counter()
        values: dict[str, Any] = {
            **validate(model, recipe, val_batches, ranks),
            "epoch": epoch_f,
            "total_steps": total_steps,
        }
        if ranks.main:
            record_metrics(ws, job.id, step, values)
            record_event(
                ws,
                job.id,
                f"Step {step}/{total_steps}: validation loss={values['val_loss']:.4f}",
                data={"type": "metrics", **values},
            )
        result.eval_seconds += time.perf_counter() - t0
        return values

    # -- the loop --------------------------------------------------------------------------
    model.train()
    last: dict[str, Any] = {}
    window = _Window()
    t_window = t_start = time.perf_counter()
    excluded_at_window = 0.0  # eval + checkpoint seconds when the window opened
    steps_at_start = step
    epoch = start_epoch
    epoch_f = float(epoch)
    batches: list[list[int]] = []
    try:
        for epoch in range(start_epoch, t.n_epochs):
            batches = plan_batches(lengths, t.batch_size, t.batching, t.seed, epoch)
            assert len(batches) == steps_per_epoch, "the batch plan changed under a resumed job"
            # A resumed job skips the batches of this epoch it already trained on.
            for b in range(next_batch, len(batches)):
                # Rank 0 reads the request and tells the others: all stop at the same step.
                reason = ranks.same(stop_requested(ws, job.id) if ranks.main else None)
                if reason:
                    raise _Stop(reason)
                lr = lr_at(step, total_steps, t.warmup_steps, t.learning_rate)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                picked = [units.train[i] for i in batches[b]]
                out = forward_backward(model, recipe, picked, micro, pad_id, device, trainable,
                                       ranks)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step_delay:
                    time.sleep(step_delay)

                step, next_batch = step + 1, b + 1
                trained_tokens += out.tokens
                result.step, result.steps = step, result.steps + 1
                result.tokens_this_run += out.tokens
                result.positions_this_run += out.positions
                window.add(out)
                epoch_f = epoch + (b + 1) / len(batches)

                if ranks.main and (step % t.log_every == 0 or step == total_steps):
                    now = time.perf_counter()
                    excluded = result.eval_seconds + result.checkpoint_seconds
                    window_s = now - t_window - (excluded - excluded_at_window)
                    per_step = (now - t_start) / max(step - steps_at_start, 1)
                    last = {
                        **window.means(),  # train_loss and the recipe's own metrics
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": window.tokens / max(window_s, 1e-9),  # non-pad tokens
                        "padding_fraction": 1 - window.tokens / max(window.positions, 1),
                        "epoch": epoch_f,
                        "total_steps": total_steps,
                        "trained_tokens": trained_tokens,
                        "eta_s": per_step * (total_steps - step),
                    }
                    record_metrics(ws, job.id, step, last)
                    window = _Window()
                    t_window, excluded_at_window = time.perf_counter(), excluded

                end_of_epoch = b + 1 == len(batches)
                if (t.eval_every and step % t.eval_every == 0) or (
                    not t.eval_every and end_of_epoch
                ):
                    last = {**last, **evaluate()}
                if step % t.checkpoint_every == 0 and step < total_steps:
                    checkpoint(last)
            next_batch = 0
    except _Stop:
        # Keep what was learned since the last checkpoint, so resume_job loses nothing.
        newest = newest_checkpoint(folder)
        if step > steps_at_start and (newest is None or newest.name != f"step-{step}"):
            checkpoint(last)  # rank 0's; the others only stop
        raise
    finally:
        result.train_seconds = (
            time.perf_counter() - t_start - result.eval_seconds - result.checkpoint_seconds
        )
        result.trained_tokens = trained_tokens

    if ranks.main:
        _save_result(setup, model, kind, step, trained_tokens, last, _stages(job, parent_path))


@dataclass
class _Window:
    """Sums over the steps since the last metric row."""

    total: float = 0.0
    count: int = 0
    tokens: int = 0
    positions: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, out: StepLoss) -> None:
        self.total += out.total
        self.count += out.count
        self.tokens += out.tokens
        self.positions += out.positions
        for key, value in out.metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"train_loss": self.total / n} | {k: v / n for k, v in self.metrics.items()}


def validate(
    model: Any, recipe: Recipe, batches: list[Batch], ranks: Ranks | None = None
) -> dict[str, float]:
    """The recipe's loss over validation batches (dropout off): val_loss, val_perplexity
    (where the loss is a cross-entropy) and `val_<metric>` for the recipe's own metrics.
    With several `ranks` each scores every world-th batch and the sums are added up."""
    import torch

    model.eval()
    window = _Window()
    mine = batches if ranks is None else batches[ranks.rank :: ranks.world]
    with torch.no_grad():
        for batch in mine:
            window.add(recipe.loss(model, batch))
    model.train()
    if ranks is not None:
        window = ranks.sum_window(window)
    means = window.means()
    values = {"val_loss": means.pop("train_loss")}
    if recipe.method in ("supervised", "pretrain"):
        values["val_perplexity"] = math.exp(min(values["val_loss"], 50))
    return values | {f"val_{k}": v for k, v in means.items()}


def _save_result(
    setup: Setup,
    model: Any,
    kind: str,
    step: int,
    trained_tokens: int,
    last: dict[str, Any],
    stages: list[dict[str, Any]],
) -> None:
    """Write JOB_DIR/result atomically (a folder renamed into place) and mark the job done."""
    ws, job, cfg = setup.ws, setup.job, setup.cfg
    out = setup.folder / "result"
    tmp = setup.folder / "result.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, kind, tmp)
    if kind == "full":
        setup.tokenizer.save_pretrained(tmp)  # a full model folder must load on its own
    meta = {
        "job_id": job.id,
        "kind": kind,
        "method": job.method,
        "base_model": job.model,
        "base_model_path": str(setup.base_path),
        "dataset": job.training_file,
        "parent": job.parent,
        "hyperparameters": job.hyperparameters,
        "steps": step,
        "trained_tokens": trained_tokens,
        "metrics": last,
        "created_at": time.time(),
        # What serving, evaluation and deploy read instead of the live config (evertune.facts).
        "facts": training_facts(
            base_model=job.model,
            base_path=setup.base_path,
            kind=kind,
            method=job.method,
            lora=lora_settings(model),
            tokenizer=setup.tokenizer,
            max_seq_len=cfg.data.max_seq_len,
            dtype=cfg.model.dtype,
            dataset=job.training_file,
            replay=cfg.data.replay if job.method in ("supervised", "pretrain") else 0.0,
            stages=stages,
        ).to_dict(),
    }
    (tmp / RESULT_META).write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    record_event(
        ws, job.id, f"New fine-tuned model created: {out}", data={"path": str(out), "kind": kind}
    )
    transition(
        ws,
        job.id,
        "succeeded",
        result={"path": str(out), "kind": kind},
        trained_tokens=trained_tokens,
        message="The job has successfully completed",
    )


def _stages(job: Job, parent_path: Path | None) -> list[dict[str, Any]]:
    """The chain of methods behind this result: the parent's stages (a previous stage's job,
    or a registered version) and then this job, so a version's lineage lists every stage."""
    earlier: list[dict[str, Any]] = []
    if parent_path is not None:
        with contextlib.suppress(EvertuneError, OSError, ValueError):
            earlier = list(read_facts(parent_path).stages)
    return earlier + [{"method": job.method, "dataset": job.training_file, "job": job.id}]


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` says the process (or its GPU) ran out of memory."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError")
    )


def _oom_message(job: Job) -> str:
    hp = job.hyperparameters
    return (
        f"out of memory with batch_size={hp.get('batch_size')} and "
        f"max_seq_len={hp.get('max_seq_len')}; "
        f"lower train.batch_size or data.max_seq_len and run `evertune jobs resume {job.id}`"
    )


def _internal_message(job_id: str, exc: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return (
        f"{type(exc).__name__}: {exc} (traceback in the job's train.log; "
        f"`evertune jobs resume {job_id}` retries)"
    )


def _fail(ws: Workspace, job_id: str, code: str, message: str) -> None:
    # If someone else finished it (e.g. marked it process_died), their word stands.
    with contextlib.suppress(JobError):
        fail_job(ws, job_id, code, message)


def _finish_stopped(ws: Workspace, job_id: str, reason: str, result: TrainResult) -> None:
    try:
        if reason == "cancelled":
            transition(ws, job_id, "cancelled", message=f"Job cancelled at step {result.step}")
        elif reason == "paused":
            transition(ws, job_id, "paused", message=f"Job paused at step {result.step}; "
                       f"`evertune jobs resume {job_id}` continues it")
        else:
            fail_job(
                ws,
                job_id,
                "terminated",
                "the training process got SIGTERM; continue from its last checkpoint with "
                f"`evertune jobs resume {job_id}`",
            )
    except JobError:
        pass


def _install_sigterm() -> Any:
    """Turn SIGTERM into a clean stop (checkpoint, then failed/terminated); returns an undo."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise _Stop("terminated")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


