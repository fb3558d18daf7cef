"""Kahneman-Tversky Optimization (KTO) from rated answers: learn from thumbs up / down alone.

    evertune tune --set train.method=kto      # rated answers {"prompt", "completion", "label"}
    # or let ratings from POST /v1/feedback feed it: the feedback fold writes them as rated rows

A unit is one answer with its label: true (desirable: rated up, or a correction) or false
(undesirable: rated down). Unlike DPO it needs no pairs, which is what user ratings give. The
loss (Ethayarajh et al. 2024, as TRL's `KTOTrainer` computes it) pushes the policy/reference
log-ratio of desirable answers above a reference point z0 and of undesirable ones below it:

    desirable:   1 − σ(β (log π/π_ref − z0))        undesirable:  1 − σ(β (z0 − log π/π_ref))

z0 estimates KL(π‖π_ref) from mismatched pairs (each prompt with another unit's answer),
detached and clamped at 0. The reference is the starting weights, computed once before the
first step and cached in the job folder, as for DPO (`evertune.training.dpo`); so are the
mismatched pairs' reference log-probs (each unit is paired with the next unit's answer in the
stored order, so the pairing does not depend on the batch). Written here rather than taken
from TRL for the reason given in dpo.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evertune.errors import DataError
from evertune.training.dpo import prepare_reference
from evertune.training.harness import (
    Batch,
    Recipe,
    Setup,
    StepLoss,
    TrainResult,
    Units,
    collate,
    run_recipe,
    token_logps,
)

if TYPE_CHECKING:
    import torch

    from evertune.data.templating import TokenizedExample
    from evertune.workspace import Workspace


@dataclass
class Rated:
    """An answer with its label, and a mismatched answer to the same prompt for z0; `ref` is
    the reference's (answer, mismatched) log-probs."""

    answer: TokenizedExample
    mismatched: TokenizedExample
    label: bool
    ref: tuple[float, float] | None = None

    @property
    def length(self) -> int:
        return len(self.answer.input_ids)


def _label(record: dict[str, Any]) -> bool:
    """The boolean `label` of a rated record (DataError for a record without one)."""
    from evertune.data.formats import rated_label

    try:
        return rated_label(record)
    except ValueError as exc:
        raise DataError(f"{exc}: KTO trains on rated answers") from None


def tokenize_rated(records: list[dict[str, Any]], setup: Setup) -> tuple[list[Rated], int]:
    """Tokenize rated records and pair each prompt with the next record's answer (for z0)."""
    from evertune.data.templating import Example, to_example, tokenize_example

    cfg, tok = setup.cfg, setup.tokenizer
    truncate = cfg.data.overlong == "truncate"
    examples = [to_example(r, tok) for r in records]  # a rated record renders as its SFT shape
    out, skipped = [], 0
    for i, (rec, ex) in enumerate(zip(records, examples, strict=True)):
        other = examples[(i + 1) % len(examples)].completion
        answer = tokenize_example(ex, tok, cfg.data.max_seq_len, truncate)
        mismatched = tokenize_example(Example(ex.prompt, other), tok, cfg.data.max_seq_len, True)
        if answer is None or mismatched is None:
            skipped += 1
        else:
            out.append(Rated(answer, mismatched, _label(rec)))
    return out, skipped


def collate_rated(units: Sequence[Rated], pad_id: int, device: Any = None) -> Batch:
    """The answers, then the mismatched answers, in one padded batch (+ labels and references)."""
    import torch

    batch = collate([u.answer for u in units] + [u.mismatched for u in units], pad_id, device)
    batch["desirable"] = torch.tensor([u.label for u in units], device=device)
    if all(u.ref is not None for u in units):
        ref = torch.tensor([u.ref for u in units], dtype=torch.float32, device=device)
        batch["ref_answer"], batch["ref_mismatched"] = ref[:, 0], ref[:, 1]
    return batch


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-unit (weighted loss, reward, z0) of a batch; reward = beta × (policy − reference)."""
    import torch

    z0 = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    ratio = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    return losses, beta * ratio.detach(), z0


class KtoRecipe(Recipe):
    method = "kto"

    def units(self, setup: Setup) -> Units:
        from evertune.training.sft import skipped_event

        train, skipped = tokenize_rated(setup.dataset.records("train"), setup)
        skipped_event(setup, skipped, "rated answers")
        val, _ = tokenize_rated(setup.dataset.records("validation"), setup)
        good = sum(u.label for u in train)
        if train and (good == 0 or good == len(train)):
            setup.event(f"All {len(train)} rated answers are "
                        f"{'desirable' if good else 'undesirable'}: KTO learns from both kinds; "
                        "add ratings of the other kind for a balanced round", "warn")
        k = setup.cfg.train.kto
        self.beta, self.dw, self.uw = k.beta, k.desirable_weight, k.undesirable_weight
        setup.event(f"KTO on {good} desirable and {len(train) - good} undesirable answers")
        return Units(train=train, val=val, what="rated answers")

    def prepare(self, setup: Setup, model: Any, units: Units, resumed: bool) -> None:
        prepare_reference(setup, model, units, collate_rated)

    def collate(self, units: Sequence[Any], pad_id: int, device: Any = None) -> Batch:
        return collate_rated(units, pad_id, device)

    def loss(self, model: Any, batch: Batch) -> StepLoss:
        import torch

        n = batch["desirable"].shape[0]
        keys = ("input_ids", "attention_mask", "labels")
        logps = token_logps(model, {k: batch[k][:n] for k in keys})
        with torch.no_grad():  # z0 is detached: no graph for the mismatched half
            kl = token_logps(model, {k: batch[k][n:] for k in keys})
        losses, rewards, z0 = kto_losses(logps, batch["ref_answer"], kl, batch["ref_mismatched"],
                                         batch["desirable"], self.beta, self.dw, self.uw)
        good = batch["desirable"]
        return StepLoss(
            loss=losses.mean(),
            total=float(losses.detach().sum()),
            count=n,
            tokens=int(batch["attention_mask"][:n].sum()),
            positions=batch["input_ids"][:n].numel(),
            metrics={
                "reward_desirable": float(rewards[good].sum()),
                "reward_undesirable": float(rewards[~good].sum()),
                "kl": float(z0) * n,
            },
        )


def run_kto(ws: Workspace, job_id: str) -> TrainResult:
    """Train KTO job `job_id` (status running) to the end; returns its final state."""
    return run_recipe(ws, job_id, KtoRecipe())
