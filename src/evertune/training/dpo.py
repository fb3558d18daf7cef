"""Direct Preference Optimization (DPO) on {"prompt", "chosen", "rejected"} pairs.

    evertune data add pairs.jsonl && evertune tune       # preference pairs → dpo (method auto)
    evertune tune --set train.method=dpo --set train.dpo.beta=0.2 --set train.dpo.loss_type=ipo

A unit is one pair: the templated prompt with the chosen answer, and with the rejected one.
A batch runs chosen and rejected rows in one forward pass; the loss raises
log p(chosen) − log p(rejected) relative to the reference model's, scaled by `beta`.

The reference model is the starting weights: for a fresh LoRA adapter the base model (the
adapter disabled), for a chain or `--parent` the weights this job continues from (the SFT
model, as DPO prescribes). Its log-probabilities do not change during training, so they are
computed once, before the first step, and cached in the job folder (`reference_logps.pt`): no
second copy of the model in memory and no reference forward pass per step, and a resumed job
reads the same reference instead of recomputing it from weights that have moved.

The losses (`train.dpo.loss_type`) are written here rather than taken from TRL: TRL's are a
method of its `DPOTrainer` (reading the trainer's own state and batch layout), which cannot
run inside this harness without constructing the whole trainer; each is one line below,
following TRL's definitions (sigmoid: Rafailov et al. 2023, with `label_smoothing` as in
cDPO, which TRL 1.x's sigmoid loss no longer applies; ipo: Azar et al. 2023, on mean per-token
log-probs as in TRL; hinge: SLiC, Zhao et al. 2023; robust: rDPO, Chowdhury et al. 2024).

Memory: `train.batch_size` counts pairs, and each pair is two rows (chosen and rejected). With
`train.micro_batch_size: 0` (auto) the harness runs a batch in passes of batch_size/2 pairs and
accumulates their gradients (the same update), so a pass holds batch_size rows, as an SFT step
does at the same setting (bench/README.md measures the peak memory of both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evertune.training.harness import (
    IGNORE_INDEX,
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

REFERENCE_FILE = "reference_logps.pt"


@dataclass
class Pair:
    """A preference pair, tokenized; `ref` holds the reference's (chosen, rejected) log-probs."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    ref: tuple[float, float] | None = None

    @property
    def length(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def tokenize_pairs(
    records: list[dict[str, Any]], setup: Setup
) -> tuple[list[Pair], int]:
    """Template and tokenize preference records; returns (pairs, number skipped as too long)."""
    from evertune.data.templating import Example, to_preference, tokenize_example

    cfg, tok = setup.cfg, setup.tokenizer
    truncate = cfg.data.overlong == "truncate"
    pairs, skipped = [], 0
    for rec in records:
        pref = to_preference(rec, tok)
        chosen = tokenize_example(Example(pref.prompt, pref.chosen), tok, cfg.data.max_seq_len,
                                  truncate)
        rejected = tokenize_example(Example(pref.prompt, pref.rejected), tok,
                                    cfg.data.max_seq_len, truncate)
        if chosen is None or rejected is None:
            skipped += 1
        else:
            pairs.append(Pair(chosen, rejected))
    return pairs, skipped


def collate_pairs(pairs: Sequence[Pair], pad_id: int, device: Any = None) -> Batch:
    """One padded batch: the chosen rows, then the rejected rows (one forward pass for both),
    with the reference log-probs of each side when known."""
    import torch

    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)
    if all(p.ref is not None for p in pairs):
        ref = torch.tensor([p.ref for p in pairs], dtype=torch.float32)  # type: ignore[misc]
        batch["ref_chosen"], batch["ref_rejected"] = ref[:, 0], ref[:, 1]
        if device is not None:
            batch["ref_chosen"] = batch["ref_chosen"].to(device)
            batch["ref_rejected"] = batch["ref_rejected"].to(device)
    return batch


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (loss, chosen reward, rejected reward) from the policy's and the reference's
    summed log-probs; rewards are beta × (policy − reference), TRL's `rewards/chosen|rejected`.
    `lengths`: the (chosen, rejected) completion token counts; IPO compares mean per-token
    log-probs (as TRL does), so its target margin 1/(2 beta) does not depend on length."""
    import torch.nn.functional as F

    if loss_type == "ipo" and lengths is not None:
        chosen, ref_chosen = chosen / lengths[0], ref_chosen / lengths[0]
        rejected, ref_rejected = rejected / lengths[1], ref_rejected / lengths[1]
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - eps)
                  + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = (1 - beta * logits).clamp(min=0)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown train.dpo.loss_type {loss_type!r}")
    rewards_c = beta * (chosen - ref_chosen).detach()
    rewards_r = beta * (rejected - ref_rejected).detach()
    return losses, rewards_c, rewards_r


def reference_logps(model: Any, pairs: Sequence[Pair], batch_size: int, pad_id: int,
                    collate_fn: Any = None) -> list[tuple[float, float]]:
    """(chosen, rejected) log-probs of each pair under `model` as it is now (dropout off; a
    LoRA model with its adapter disabled when that adapter is fresh, which is the same)."""
    import torch

    collate_fn = collate_fn or collate_pairs
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Similar lengths together (least padding), answers returned in the units' order.
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            logps = token_logps(model, collate_fn([pairs[i] for i in chunk], pad_id,
                                                  device)).tolist()
            n = len(chunk)
            for i, pair in zip(chunk, zip(logps[:n], logps[n:], strict=True), strict=True):
                out[i] = pair
    model.train(was_training)
    return out


def prepare_reference(setup: Setup, model: Any, units: Units, collate_fn: Any) -> None:
    """Attach reference log-probs to every unit: read from the job folder when a resumed job
    cached them, else computed with the starting weights (the harness calls `prepare` before
    it loads a checkpoint; a fresh LoRA adapter is disabled, which is the same) and cached,
    written atomically, before the first step."""
    import os

    import torch

    path = setup.folder / REFERENCE_FILE
    everything = units.train + units.val
    cached = None
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if len(cached) != len(everything):
            cached = None  # written for other units (another config): compute again
    if cached is None:
        setup.event(f"Computing the reference model's log-probs of {len(everything)} "
                    f"{units.what} (once; no reference copy of the model in memory)")
        adapter_off = getattr(model, "disable_adapter", None)
        fresh = setup.job.parent is None and not setup.cfg.train.full_finetune
        with adapter_off() if fresh and adapter_off else contextlib.nullcontext():
            cached = reference_logps(model, everything, setup.cfg.train.batch_size,
                                     setup.pad_id, collate_fn)
        tmp = path.with_suffix(".tmp")
        torch.save(cached, tmp)
        os.replace(tmp, path)
    for unit, ref in zip(everything, cached, strict=True):
        unit.ref = tuple(ref) if isinstance(ref, list | tuple) else ref


class DpoRecipe(Recipe):
    method = "dpo"
    sequences_per_unit = 2  # chosen and rejected

    def units(self, setup: Setup) -> Units:
        from evertune.training.sft import skipped_event

        train, skipped = tokenize_pairs(setup.dataset.records("train"), setup)
        skipped_event(setup, skipped, "preference pairs")
        val, _ = tokenize_pairs(setup.dataset.records("validation"), setup)
        d = setup.cfg.train.dpo
        self.beta, self.loss_type, self.smoothing = d.beta, d.loss_type, d.label_smoothing
        self.rpo_alpha = d.rpo_alpha
        return Units(train=train, val=val, what="preference pairs")

    def prepare(self, setup: Setup, model: Any, units: Units, resumed: bool) -> None:
        prepare_reference(setup, model, units, collate_pairs)

    def collate(self, units: Sequence[Any], pad_id: int, device: Any = None) -> Batch:
        return collate_pairs(units, pad_id, device)

    def loss(self, model: Any, batch: Batch) -> StepLoss:
        logps = token_logps(model, batch)
        n = logps.shape[0] // 2
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
        losses, rc, rr = dpo_losses(logps[:n], logps[n:], batch["ref_chosen"],
                                    batch["ref_rejected"], self.beta, self.loss_type,
                                    self.smoothing, lengths=(counts[:n], counts[n:]))
        if self.rpo_alpha:
            # RPO: the chosen answer's mean per-token NLL, so its likelihood is kept while the
            # margin widens (TRL's rpo_alpha; per pair here, so micro-batches stay exact).
            losses = losses + self.rpo_alpha * (-logps[:n] / counts[:n])
        return StepLoss(
            loss=losses.mean(),
            total=float(losses.detach().sum()),
            count=n,
            tokens=int(batch["attention_mask"].sum()),
            positions=batch["input_ids"].numel(),
            metrics={
                "reward_accuracy": float((rc > rr).float().sum()),
                "reward_margin": float((rc - rr).sum()),
                "reward_chosen": float(rc.sum()),
                "reward_rejected": float(rr.sum()),
            },
        )


def run_dpo(ws: Workspace, job_id: str) -> TrainResult:
    """Train DPO job `job_id` (status running) to the end; returns its final state."""
    return run_recipe(ws, job_id, DpoRecipe())
