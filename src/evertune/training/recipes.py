"""One table: each training method, the dataset kind it trains on, and its recipe.

    from evertune.training.recipes import RECIPES, method_for_kind
    RECIPES["supervised"].entry        # "evertune.training.sft:run_sft", run in the job's child
    method_for_kind("dpo")             # "dpo": preference pairs train with DPO

`train.method` (config) picks the method; a dataset version's kind must be the one the method
trains on. A method whose recipe is not written yet has `entry=None` and is refused when a job
is created, before anything is stored. Job creation (`training.jobs`) and the child process
(`training.run`) both read this table, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    method: str
    """The `train.method` value."""
    kind: str
    """The dataset kind it trains on: sft | dpo | pretrain (evertune.data.formats)."""
    entry: str | None
    """`module:function` the job's child process runs with (ws, job_id); None: not written."""


RECIPES: dict[str, Recipe] = {
    "supervised": Recipe("supervised", "sft", "evertune.training.sft:run_sft"),
    "dpo": Recipe("dpo", "dpo", None),
    "pretrain": Recipe("pretrain", "pretrain", None),
}


def method_for_kind(kind: str) -> str | None:
    """The method that trains on datasets of `kind`, or None for an unknown kind."""
    return next((r.method for r in RECIPES.values() if r.kind == kind), None)


def available() -> list[str]:
    """Methods that have a recipe, sorted."""
    return sorted(m for m, r in RECIPES.items() if r.entry is not None)
