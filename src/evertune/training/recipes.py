"""One table: each training method, the dataset kind it trains on, and its recipe.

    from evertune.training.recipes import RECIPES, method_for_kind, resolve_method
    RECIPES["dpo"].entry               # "evertune.training.dpo:run_dpo", run in the job's child
    method_for_kind("pretrain")        # "pretrain": raw text trains with continued pretraining
    resolve_method("auto", "dpo")      # "dpo": `train.method: auto` lets the data decide

`train.method` (config) picks the method, `auto` (the default) the one of the dataset's kind;
a dataset version's kind must be the one the method trains on. Job creation
(`training.jobs`), the child process (`training.run`), the pipeline's routing and the
fine-tuning API all read this table, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    method: str
    """The `train.method` value (and the OpenAI API's `method.type`)."""
    kind: str
    """The dataset kind it trains on: sft | pretrain | dpo | kto (evertune.data.formats)."""
    entry: str
    """`module:function` the job's child process runs with (ws, job_id)."""
    data: str
    """What the kind's records look like, for messages that say what to add."""


RECIPES: dict[str, Recipe] = {
    "supervised": Recipe("supervised", "sft", "evertune.training.sft:run_sft",
                         "input/output, prompt/completion or chat records"),
    "pretrain": Recipe("pretrain", "pretrain", "evertune.training.pretrain:run_pretrain",
                       '{"text": …} records or .txt files'),
    "dpo": Recipe("dpo", "dpo", "evertune.training.dpo:run_dpo",
                  '{"prompt", "chosen", "rejected"} preference pairs'),
    "kto": Recipe("kto", "kto", "evertune.training.kto:run_kto",
                  'rated answers {"prompt", "completion", "label": true|false} or feedback '
                  "ratings"),
}


def method_for_kind(kind: str) -> str | None:
    """The method that trains on datasets of `kind`, or None for an unknown kind."""
    return next((r.method for r in RECIPES.values() if r.kind == kind), None)


def resolve_method(method: str, kind: str) -> str:
    """The method a job on a dataset of `kind` runs: `method`, or the kind's own for auto."""
    if method == "auto":
        found = method_for_kind(kind)
        if found is None:
            raise KeyError(kind)
        return found
    return method


def available() -> list[str]:
    """Every method, in table order."""
    return list(RECIPES)
