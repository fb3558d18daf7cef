"""Supervised fine-tuning (SFT), LoRA or full weights: learn the answer given the prompt.

    evertune tune --set train.method=supervised     # the usual way: create + start + wait
    python -m evertune.training.run JOB_DIR         # how start_job runs a job

The unit is one templated example (prompt + answer + EOS); the loss is the token-weighted
cross-entropy of the answer, the prompt masked. With `data.replay` > 0 the base model's own
answers to general prompts are mixed in (self-distillation replay: the round keeps what the
base could do). The loop, checkpoints and result are the shared harness's
(`evertune.training.harness`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from evertune.training.harness import (
    IGNORE_INDEX,
    Batch,
    Recipe,
    Setup,
    StepLoss,
    TrainResult,
    Units,
    build_model,
    collate,
    loss_sum,
    lr_at,
    plan_batches,
    run_recipe,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from evertune.data.templating import TokenizedExample
    from evertune.workspace import Workspace

SftResult = TrainResult  # the name the benchmark and older callers use

__all__ = [
    "IGNORE_INDEX",
    "SftRecipe",
    "SftResult",
    "build_model",
    "collate",
    "loss_sum",
    "lr_at",
    "plan_batches",
    "run_sft",
    "tokenize_split",
]


def tokenize_split(
    records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    truncate: bool,
) -> tuple[list[TokenizedExample], int]:
    """Template and tokenize records; returns (examples, number skipped as too long)."""
    from evertune.data.templating import to_example, tokenize_example

    out, skipped = [], 0
    for rec in records:
        tok = tokenize_example(to_example(rec, tokenizer), tokenizer, max_seq_len, truncate)
        if tok is None:
            skipped += 1
        else:
            out.append(tok)
    return out, skipped


def skipped_event(setup: Setup, skipped: int, what: str = "training examples") -> None:
    """Say how many units were left out as longer than data.max_seq_len."""
    if skipped:
        setup.event(
            f"{skipped} {what} are longer than data.max_seq_len={setup.cfg.data.max_seq_len} "
            "and were skipped (set data.overlong=truncate to cut them instead)",
            "warn",
        )


class SftRecipe(Recipe):
    method = "supervised"

    def units(self, setup: Setup) -> Units:
        cfg, tokenizer = setup.cfg, setup.tokenizer
        truncate = cfg.data.overlong == "truncate"
        records = setup.dataset.records("train")
        if cfg.data.replay > 0:
            # Self-distillation replay: the base's own answers to general prompts (the half the
            # forgetting guard never evaluates), so the round keeps what the base could do.
            from evertune.evaluation.general import replay_records

            replay = replay_records(cfg, setup.ws.root, setup.base_path, len(records))
            setup.event(f"Replay: {len(replay)} general-set examples answered by the base model "
                        f"mixed into {len(records)} training examples "
                        f"(data.replay={cfg.data.replay:g})")
            records = records + replay
        train, skipped = tokenize_split(records, tokenizer, cfg.data.max_seq_len, truncate)
        skipped_event(setup, skipped)
        val, _ = tokenize_split(setup.dataset.records("validation"), tokenizer,
                                cfg.data.max_seq_len, truncate)
        return Units(train=train, val=val)

    def collate(self, units: Sequence[Any], pad_id: int, device: Any = None) -> Batch:
        return collate(list(units), pad_id, device)

    def loss(self, model: Any, batch: Batch) -> StepLoss:
        total, n = loss_sum(model, batch)
        return StepLoss(
            loss=total / max(n, 1),  # mean over this batch's learned tokens
            total=float(total.detach()),
            count=n,
            tokens=int(batch["attention_mask"].sum()),
            positions=batch["input_ids"].numel(),
        )


def run_sft(ws: Workspace, job_id: str) -> TrainResult:
    """Train supervised job `job_id` (status running) to the end; returns its final state."""
    return run_recipe(ws, job_id, SftRecipe())
