"""Score a candidate against the reference (PROD, else the base model) and apply the gate.

    from evertune.evaluation import ModelRef, evaluate_candidate, print_report
    report = evaluate_candidate(
        ws, ModelRef("candidate", adapter=Path(job.result["path"])), dataset,
        reference=ModelRef("v3 (prod)", adapter=prod_path, version="3"),   # None: gate vs base
        progress=lambda label, done, total: print(label, done, total),     # or a Rich bar
    )
    print_report(report, console)          # `evertune eval …` does both

What runs, in order:
1. Examples, one split each, reported and gated separately (the verdict passes only if every
   split passes):
   - test: up to `eval.max_examples` of the dataset's test split (a seeded sample, so the same
     dataset always gives the same examples; the validation split if the test split is empty);
   - golden: the whole golden set (`data.golden_set`) when configured;
   - regression: a sample of the regression suite, the test examples of every version that
     was ever in PROD (`eval.regression_suite`, evertune.evaluation.regression_suite);
   - general: the forgetting guard (`eval.general`): general-ability prompts whose references
     are the base model's own greedy answers (evertune.evaluation.general), gated by
     `gate.general_rules` (loss of those answers: how far the model moved from the base).
2. Each model (candidate, reference if given, base) is loaded once with
   `evertune.models.load_for_inference`, generates greedily for every example and computes the
   teacher-forced loss of the expected answer, then is freed before the next one loads.
3. Text metrics (`eval.metrics`) compare each output with the expected answer, and the LLM
   judge (`eval.judge`) scores answers; the gate (`gate.rules`) compares candidate and
   reference example by example.
4. The report goes to `ws.evals_dir/<id>/report.json`.

Each kind of record is scored by what it can show:
- supervised records: everything above.
- text (pretraining) records have no answer to generate: loss and perplexity of the whole
  text only; rules on other metrics are skipped for them with a note (so `gate.rules`' loss
  rule decides a text split).
- preference pairs (dpo data): the answer generated for the prompt is compared with `chosen`
  as for supervised records, and one teacher-forced pass per side gives log p(chosen | prompt)
  and log p(rejected | prompt) (summed over the answer's tokens and EOS, masked as
  `metrics.example_losses`): `preference_accuracy` (chosen more likely than rejected) and
  `reward_margin` (DPO's implicit reward margin relative to the base model, train.dpo.beta).
  `gate.preference_rules` are added for them; rules on loss and perplexity (the likelihood of
  the chosen answer, which DPO may lower while widening the margin) leave them out.
- rated answers (kto data: an SFT record plus a boolean `label`, e.g. {"prompt",
  "completion", "label"}), rendered as that SFT record: a desirable answer is a supervised
  example; a rated-down one is never generated towards: its summed log-probability
  is reported (`undesirable_logp`, lower is better) and left out of loss rules.
  `kto_logp_gap` reports, for both, how far the model moved the answer's log-probability from
  the base's in the rated direction. Neither is gated by default.
Preference and rated metrics need the base model's log-probabilities: when the base is not
scored as a role (`eval.compare_base: false`), it is loaded once more for those passes only.
"""

from __future__ import annotations

import gc
import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from evertune.config import GateRule
from evertune.errors import DataError, NotFoundError
from evertune.evaluation import metrics as M
from evertune.evaluation.gate import (
    GateResult,
    Outcome,
    check_rule_metrics,
    finite_mean,
    run_gate,
)
from evertune.evaluation.judge import JUDGE_METRICS
from evertune.evaluation.report import (
    EvalReport,
    ExampleRow,
    ModelOutput,
    ModelRef,
    Regression,
    Role,
    SplitReport,
)

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from evertune.config import Config
    from evertune.data.store import DatasetVersion
    from evertune.generation import Generation
    from evertune.workspace import Workspace

T = TypeVar("T")
Progress = Callable[[str, int, int], None]
"""progress(label, done, total): e.g. ("candidate: generating (test)", 16, 64)."""

WORST_REGRESSIONS = 10
# Ranking metric for worst regressions when no gate rule names one, best first.
REGRESSION_METRICS = ("rougeL", "embedding_cosine", "exact_match", "loss")
TEXT_METRICS = frozenset(M.METRIC_GROUPS["rouge"] + M.METRIC_GROUPS["embedding"]
                         + M.METRIC_GROUPS["exact_match"] + M.METRIC_GROUPS["json_valid"]
                         + M.ALWAYS)
LIKELIHOOD_METRICS = frozenset(M.METRIC_GROUPS["loss"])

ItemKind = Literal["sft", "text", "preference", "desirable", "undesirable"]
# Kinds whose expected answer gets a teacher-forced pass whatever eval.metrics says (their
# metrics are log-probabilities), and those whose metrics compare with the base model's.
_ALWAYS_FORCED: frozenset[str] = frozenset({"text", "preference", "desirable"})
_VS_BASE: frozenset[str] = frozenset({"preference", "desirable", "undesirable"})


@dataclass
class _Item:
    """One example as the models see it."""

    input: str
    prompt: str
    expected: str
    generative: bool  # False for text records (loss only) and rated-down answers
    kind: ItemKind = "sft"
    rejected: str | None = None
    """Scored by log-probability only: a pair's rejected answer, or a rated-down answer."""


@dataclass
class _EvalSet:
    name: str
    source: str
    items: list[_Item]
    records: list[dict[str, Any]]
    """The raw records behind `items` (a model on another base renders them with its own
    tokenizer, so examples still pair one to one)."""
    rules_key: str = "rules"
    """The gate's rule list for this set: gate.rules (with gate.preference_rules where it holds
    preference pairs), or gate.general_rules (forgetting guard)."""
    keep_records: bool = False
    """Saved beside the report (the test split: the regression suite grows from them when the
    version reaches PROD)."""

    def rendered(self, tokenizer: PreTrainedTokenizerBase) -> _EvalSet:
        """The same records rendered by another model's tokenizer and chat template."""
        return replace(self, items=[_item(r, tokenizer) for r in self.records])

    @property
    def generative(self) -> list[int]:
        return [i for i, item in enumerate(self.items) if item.generative]

    def of_kind(self, *kinds: str) -> list[int]:
        """Indices of the items of any of `kinds`."""
        return [i for i, item in enumerate(self.items) if item.kind in kinds]

    @property
    def kinds(self) -> set[str]:
        return {item.kind for item in self.items}


@dataclass
class _Scored:
    """One model's raw results on one set, aligned with its items (None / NaN: not scored)."""

    generations: list[Generation | None]
    losses: list[float]
    """Mean cross-entropy per token of the expected answer."""
    logps: list[float]
    """Summed log-probability of the expected answer (a pair's chosen one)."""
    rejected_logps: list[float]
    """Summed log-probability of `rejected` (a pair's rejected answer, a rated-down answer)."""
    unscorable: int = 0
    """Examples with an answer that could not be scored (its prompt exceeds data.max_seq_len)."""


def _item(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> _Item:
    from evertune.data.formats import detect_format
    from evertune.data.templating import to_example, to_preference

    fmt = detect_format(record)
    if fmt == "text":
        # No prompt: the loss covers the whole text, as continued pretraining learns it.
        return _Item(input=record["text"], prompt="", expected=record["text"], generative=False,
                     kind="text")
    if fmt == "preference":
        # The generated answer is compared with the chosen one (what the tuned model should
        # say); both answers' log-probabilities give preference_accuracy and reward_margin.
        pref = to_preference(record, tokenizer)
        return _Item(input=record["prompt"], prompt=pref.prompt, expected=pref.chosen,
                     generative=True, kind="preference", rejected=pref.rejected)
    # A rated record (kto data) is its answer's SFT shape plus a boolean label, rendered as
    # that shape; raises DataError for anything else.
    ex = to_example(record, tokenizer)
    if "messages" in record:
        users = [m["content"] for m in record["messages"] if m.get("role") == "user"]
        shown = users[-1] if users else ex.prompt
    elif "input" in record and "output" in record:
        shown = record["input"]
    else:
        shown = ex.prompt
    label = record.get("label")
    if label is False:
        # A rated-down answer is only scored by its log-probability: a model must not be
        # rewarded for answering like it, so it is no generation reference.
        return _Item(input=shown, prompt=ex.prompt, expected="", generative=False,
                     kind="undesirable", rejected=ex.completion)
    return _Item(input=shown, prompt=ex.prompt, expected=ex.completion, generative=True,
                 kind="desirable" if label is True else "sft")


def select_examples(records: Sequence[T], limit: int, seed: str) -> list[T]:
    """Up to `limit` records, a sample seeded by `seed` (the dataset id), in stored order.

    The same dataset gives the same examples on every run, so candidates evaluated on it
    one after another are compared on the same footing. Any sequence samples alike (the
    regression suite samples its keys, the general set its prompts).
    """
    if len(records) <= limit:
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def _eval_sets(
    ws: Workspace,
    dataset: DatasetVersion,
    tokenizer: PreTrainedTokenizerBase,
    general: tuple[list[dict[str, Any]], str] | None = None,
) -> tuple[list[_EvalSet], list[str]]:
    """The splits to score: test (else validation), golden, regression, and `general` (the
    guard's records and their source) when given."""
    from evertune.data.store import load_golden

    notes: list[str] = []
    sets: list[_EvalSet] = []
    limit = ws.config.eval.max_examples
    split, records = "test", dataset.records("test")
    if not records:
        split, records = "validation", dataset.records("validation")
        if records:
            notes.append(f"dataset {dataset.id} has an empty test split; evaluated on its "
                         "validation split instead (add data or raise data.split.test)")
    chosen: list[dict[str, Any]] = []
    if records:
        chosen = select_examples(records, limit, dataset.id)
        source = f"{dataset.id} {split} split ({len(chosen)} of {len(records)})"
        sets.append(_EvalSet("test", source, [_item(r, tokenizer) for r in chosen], chosen,
                             keep_records=True))
    golden = load_golden(ws)
    if golden:
        source = f"golden set {ws.config.data.golden_set} ({len(golden)})"
        sets.append(_EvalSet("golden", source, [_item(r, tokenizer) for r in golden], golden))
    if ws.config.eval.regression_suite:
        regression = _regression_set(ws, dataset, chosen, tokenizer)
        if regression is not None:
            sets.append(regression)
    if not sets:
        # Only task data can say whether a round is good; the general split alone cannot.
        raise DataError(
            f"dataset {dataset.id} has no test or validation examples and no golden set is "
            "configured, so there is nothing to evaluate on; add more data (the split is by "
            "content hash, so tiny drops can leave a split empty) or set data.golden_set"
        )
    if general is not None:
        records, source = general
        sets.append(_EvalSet("general", source, [_item(r, tokenizer) for r in records], records,
                             rules_key="general_rules"))
    return sets, notes


def _general_records(
    ws: Workspace, base_path: Path, progress: Progress | None
) -> tuple[list[dict[str, Any]], str] | None:
    """The forgetting guard's examples (`eval.general`): guard prompts answered by the base."""
    if not ws.config.eval.general:
        return None
    from evertune.evaluation.general import general_examples, load_prompts

    what = "base: answering the general set (once per base model)"
    prompts, name = load_prompts(ws.config, ws.root)
    records = general_examples(
        ws.config, ws.root, base_path, "guard", limit=ws.config.eval.general_max_examples,
        prompts=prompts,
        progress=lambda done, total: _report_progress(progress, what, done, total),
    )
    return records, f"{name}, guard half ({len(records)}), answered by the base model"


def _regression_set(
    ws: Workspace,
    dataset: DatasetVersion,
    test_records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
) -> _EvalSet | None:
    """The regression suite (test examples of every version ever in PROD) as a split, less
    any example already in this test selection; None while the suite is empty."""
    from evertune.data.formats import record_key
    from evertune.evaluation.regression_suite import suite_records

    in_test = {record_key(r) for r in test_records}
    limit = ws.config.eval.regression_max_examples
    records, total = suite_records(ws, limit, seed=dataset.id)
    records = [r for r in records if record_key(r) not in in_test]
    if not records:
        return None
    source = f"regression suite ({len(records)} of {total} examples of versions in PROD)"
    return _EvalSet("regression", source, [_item(r, tokenizer) for r in records], records)


def _report_progress(progress: Progress | None, label: str, done: int, total: int) -> None:
    if progress is not None:
        progress(label, done, total)


def _score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: _EvalSet,
    cfg: Config,
    label: str,
    progress: Progress | None,
    *,
    logps_only: bool = False,
) -> _Scored:
    """Generate for the set's generative items and run the teacher-forced passes; with
    `logps_only` (the base model kept for reward margins) only the passes preference and
    rated metrics need."""
    from evertune.generation import generate

    gens: list[Generation | None] = [None] * len(eval_set.items)
    todo = [] if logps_only else eval_set.generative
    # Chunk by eval.batch_size ourselves (sorted by prompt length, so chunks pad little) to
    # report progress between batches.
    todo.sort(key=lambda i: len(eval_set.items[i].prompt))
    size = cfg.eval.batch_size
    what = f"{label}: generating ({eval_set.name})"
    if todo:
        _report_progress(progress, what, 0, len(todo))
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        outs = generate(model, tokenizer, [eval_set.items[i].prompt for i in chunk],
                        max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0,
                        batch_size=size)
        for i, out in zip(chunk, outs, strict=True):
            gens[i] = out
        _report_progress(progress, what, start + len(chunk), len(todo))

    if logps_only:
        kinds = _ALWAYS_FORCED & _VS_BASE
    elif "loss" in cfg.eval.metrics:
        kinds = _ALWAYS_FORCED | {"sft"}
    else:
        kinds = _ALWAYS_FORCED
    return _forced_passes(model, tokenizer, eval_set, cfg, gens, kinds,
                          f"{label}: loss ({eval_set.name})", progress)


def _forced_passes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: _EvalSet,
    cfg: Config,
    gens: list[Generation | None],
    kinds: frozenset[str],
    what: str,
    progress: Progress | None,
) -> _Scored:
    """One batched teacher-forced pass over the expected answers of items of `kinds` and the
    `rejected` answers of every item that has one (one forward pass per pair side)."""
    from evertune.data.templating import Example

    items = eval_set.items
    n = len(items)
    main = eval_set.of_kind(*kinds)
    other = [i for i, item in enumerate(items) if item.rejected is not None]
    examples = ([Example(prompt=items[i].prompt, completion=items[i].expected) for i in main]
                + [Example(prompt=items[i].prompt, completion=items[i].rejected or "")
                   for i in other])
    scored: list[tuple[float, int]] = []
    if examples:
        total = len(examples)
        _report_progress(progress, what, 0, total)
        scored = M.completion_logprobs(
            model, tokenizer, examples, max_seq_len=cfg.data.max_seq_len,
            batch_size=cfg.eval.batch_size,
            progress=lambda done: _report_progress(progress, what, done, total),
        )
    losses, logps, rejected = [math.nan] * n, [math.nan] * n, [math.nan] * n
    for i, (logp, tokens) in zip(main, scored[: len(main)], strict=True):
        logps[i], losses[i] = logp, M.mean_loss(logp, tokens)
    for i, (logp, _) in zip(other, scored[len(main):], strict=True):
        rejected[i] = logp
    bad = {i for i, (_, tokens) in zip(main + other, scored, strict=True) if not tokens}
    return _Scored(generations=gens, losses=losses, logps=logps, rejected_logps=rejected,
                   unscorable=len(bad))


def _scatter(n: int, idx: Sequence[int], values: Sequence[float]) -> list[float]:
    """`values` placed at positions `idx` of a list of `n` NaNs."""
    full = [math.nan] * n
    for i, v in zip(idx, values, strict=True):
        full[i] = v
    return full


def _scores(
    eval_set: _EvalSet, scored: _Scored, base: _Scored | None, cfg: Config
) -> dict[str, list[float]]:
    """Per-example scores of one model on one set (NaN where a metric does not apply).

    Metric columns appear only when some example can have them: a text split has no
    generation metrics, preference and rated columns appear where such examples are.
    """
    groups = cfg.eval.metrics
    kinds = eval_set.kinds
    scores: dict[str, list[float]] = {}
    if "loss" in groups or "text" in kinds:
        # Text records have nothing else to show: their loss is reported whatever eval.metrics.
        scores["loss"] = list(scored.losses)
        scores["perplexity"] = M.perplexity(scored.losses)
    idx = eval_set.generative
    if idx:
        scores.update(_generation_scores(eval_set, scored, idx, groups))
    if "preference" in kinds:
        scores.update(_preference_scores(eval_set, scored, base, cfg.train.dpo.beta))
    if kinds & {"desirable", "undesirable"}:
        scores.update(_rated_scores(eval_set, scored, base))
    return scores


def _generation_scores(
    eval_set: _EvalSet, scored: _Scored, idx: list[int], groups: Sequence[str]
) -> dict[str, list[float]]:
    """The eval.metrics text metrics of the generated answers at `idx`, and their latency."""
    n = len(eval_set.items)
    preds = [scored.generations[i].text for i in idx]  # type: ignore[union-attr]
    refs = [eval_set.items[i].expected for i in idx]
    scores: dict[str, list[float]] = {}
    if "rouge" in groups:
        for key, values in M.rouge(preds, refs).items():
            scores[key] = _scatter(n, idx, values)
    if "embedding" in groups:
        scores["embedding_cosine"] = _scatter(n, idx, M.embedding_cosine(preds, refs))
    if "exact_match" in groups:
        scores["exact_match"] = _scatter(n, idx, M.exact_match(preds, refs))
    if "json_valid" in groups:
        scores["json_valid"] = _scatter(n, idx, M.json_valid(preds))
    latency = [scored.generations[i].latency_s for i in idx]  # type: ignore[union-attr]
    scores["latency_s"] = _scatter(n, idx, latency)
    return scores


def _preference_scores(
    eval_set: _EvalSet, scored: _Scored, base: _Scored | None, beta: float
) -> dict[str, list[float]]:
    """preference_accuracy and reward_margin of the set's preference pairs."""
    idx = eval_set.of_kind("preference")
    n = len(eval_set.items)
    chosen = [scored.logps[i] for i in idx]
    rejected = [scored.rejected_logps[i] for i in idx]
    # Without the base's log-probabilities (never the case from evaluate_candidate) the
    # margin is unknown, not zero.
    b_chosen = [base.logps[i] if base else math.nan for i in idx]
    b_rejected = [base.rejected_logps[i] if base else math.nan for i in idx]
    return {
        "preference_accuracy": _scatter(n, idx, M.preference_accuracy(chosen, rejected)),
        "reward_margin": _scatter(n, idx, M.reward_margin(chosen, rejected, b_chosen,
                                                          b_rejected, beta=beta)),
    }


def _rated_scores(
    eval_set: _EvalSet, scored: _Scored, base: _Scored | None
) -> dict[str, list[float]]:
    """kto_logp_gap of every rated answer and undesirable_logp of the rated-down ones."""
    idx = eval_set.of_kind("desirable", "undesirable")
    n = len(eval_set.items)

    def logp(s: _Scored | None, i: int) -> float:
        if s is None:
            return math.nan
        return s.rejected_logps[i] if eval_set.items[i].kind == "undesirable" else s.logps[i]

    good = [eval_set.items[i].kind == "desirable" for i in idx]
    gap = M.kto_logp_gap([logp(scored, i) for i in idx], [logp(base, i) for i in idx], good)
    scores = {"kto_logp_gap": _scatter(n, idx, gap)}
    bad = eval_set.of_kind("undesirable")
    if bad:
        scores["undesirable_logp"] = _scatter(n, bad, [scored.rejected_logps[i] for i in bad])
    return scores


def _applies(metric: str, item: _Item) -> bool:
    """Whether a gate rule on `metric` compares `item` (see the module docstring)."""
    if metric in TEXT_METRICS or metric in JUDGE_METRICS:
        return item.generative
    if metric in LIKELIHOOD_METRICS:
        # Not a pair's chosen answer (DPO may lower its likelihood while it widens the margin)
        # nor a rated-down answer (a lower loss on it would be worse, not better).
        return item.kind in ("sft", "text", "desirable")
    if metric in M.PREFERENCE_METRICS:
        return item.kind == "preference"
    if metric == "kto_logp_gap":
        return item.kind in ("desirable", "undesirable")
    if metric == "undesirable_logp":
        return item.kind == "undesirable"
    return True


def _configured_rules(eval_set: _EvalSet, cfg: Config) -> list[GateRule]:
    """The set's rule list (gate.rules or gate.general_rules), plus gate.preference_rules
    where a task split holds preference pairs."""
    rules = list(getattr(cfg.gate, eval_set.rules_key))
    if eval_set.rules_key == "rules" and "preference" in eval_set.kinds:
        rules += cfg.gate.preference_rules
    return rules


def _rules_of(eval_set: _EvalSet, cfg: Config) -> list[GateRule]:
    """The rules gating `eval_set`: the configured ones that compare at least one of its
    examples (a text split keeps only rules on loss and perplexity)."""
    return [rule for rule in _configured_rules(eval_set, cfg)
            if any(_applies(rule.metric, item) for item in eval_set.items)]


def _rule_notes(eval_set: _EvalSet, cfg: Config, rules: list[GateRule], notes: list[str]) -> None:
    """Say which configured rules the set skips, and which rules see only part of it."""
    name, kinds = eval_set.name, eval_set.kinds
    skipped = sorted({r.metric for r in _configured_rules(eval_set, cfg) if r not in rules})
    if skipped:
        if kinds == {"text"}:
            why = ("text (pretraining) examples have no answer to generate; gated on loss only")
        elif kinds == {"preference"}:
            why = ("preference pairs are gated by gate.preference_rules and rules on their "
                   "generated answers; the loss of the chosen answer is reported, not gated "
                   "(DPO may lower it while widening the margin)")
        else:
            why = "no example of this split is scored by them"
        notes.append(f"{name}: rules on {', '.join(skipped)} skipped: {why}")
    partial = sorted({r.metric for r in rules
                      if not all(_applies(r.metric, item) for item in eval_set.items)
                      and r.metric in LIKELIHOOD_METRICS})
    left_out = [k for k in ("preference", "undesirable") if k in kinds]
    if partial and left_out:
        what = " and ".join({"preference": "preference pairs",
                             "undesirable": "rated-down answers"}[k] for k in left_out)
        notes.append(f"{name}: rules on {', '.join(partial)} leave out its {what}")


def _gate_view(
    eval_set: _EvalSet, scores: dict[str, list[float]], rules: list[GateRule]
) -> dict[str, list[float]]:
    """`scores` with NaN wherever a rule's metric does not apply to the example, so the gate
    compares only the examples the rule is about (the report keeps every score)."""
    view = dict(scores)
    for metric in {r.metric for r in rules if r.metric in scores}:
        view[metric] = [v if _applies(metric, item) else math.nan
                        for v, item in zip(scores[metric], eval_set.items, strict=True)]
    return view


def _judge(
    eval_set: _EvalSet,
    scored: dict[Role, _Scored],
    scores: dict[Role, dict[str, list[float]]],
    ref_role: Role,
    cfg: Config,
    rules: list[GateRule],
    progress: Progress | None,
    notes: list[str],
) -> list[dict[str, Any] | None] | None:
    """Add the LLM judge's per-example scores (eval.judge) to `scores`; its raw answers per
    example, or None when no judge runs on this set. The general set is judged only when a
    general rule asks for a judge metric (its references are the base's own answers)."""
    judge = cfg.eval.judge
    idx = eval_set.generative
    if judge is None or not idx:
        return None
    if eval_set.rules_key == "general_rules" and not any(r.metric in JUDGE_METRICS
                                                         for r in rules):
        return None
    from evertune.evaluation.judge import judge_split

    what = f"judge ({eval_set.name})"
    outcome = judge_split(
        judge,
        [eval_set.items[i].input for i in idx],
        [eval_set.items[i].expected for i in idx],
        {role: [s.generations[i].text for i in idx] for role, s in scored.items()},  # type: ignore[union-attr]
        ref_role,
        progress=lambda done, total: _report_progress(progress, what, done, total),
    )
    n = len(eval_set.items)
    missing = {metric: sum(1 for v in values if not math.isfinite(v))
               for metric, values in outcome.scores.get("candidate", {}).items()}
    for metric, count in missing.items():
        if count:
            notes.append(f"{eval_set.name}: the judge gave no readable {metric} for {count} of "
                         f"{len(idx)} candidate answers (the raw answers are in the rows); "
                         "those examples are left out of rules on it")
    for role, metrics in outcome.scores.items():
        for metric, values in metrics.items():
            full = [math.nan] * n
            for i, v in zip(idx, values, strict=True):
                full[i] = v
            scores[role][metric] = full  # type: ignore[index]
    raw: list[dict[str, Any] | None] = [None] * n
    for i, record in zip(idx, outcome.raw, strict=True):
        raw[i] = record
    return raw


def _clean(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _regressions_on(
    eval_set: _EvalSet,
    scores: dict[Role, dict[str, list[float]]],
    scored: dict[Role, _Scored],
    ref_role: Role,
    metric: str,
    higher: bool,
) -> list[Regression]:
    sign = 1.0 if higher else -1.0
    cand, ref = scores["candidate"][metric], scores[ref_role][metric]
    found: list[Regression] = []
    for i, item in enumerate(eval_set.items):
        c, r = cand[i], ref[i]
        if not (math.isfinite(c) and math.isfinite(r)) or sign * (c - r) >= 0:
            continue
        c_gen, r_gen = scored["candidate"].generations[i], scored[ref_role].generations[i]
        found.append(Regression(
            index=i, metric=metric, candidate_score=c, reference_score=r, change=sign * (c - r),
            input=item.input, expected=item.expected,
            candidate_output=c_gen.text if c_gen else None,
            reference_output=r_gen.text if r_gen else None, rejected=item.rejected,
        ))
    found.sort(key=lambda reg: reg.change)
    return found[:WORST_REGRESSIONS]


def _worst_regressions(
    eval_set: _EvalSet,
    scores: dict[Role, dict[str, list[float]]],
    scored: dict[Role, _Scored],
    ref_role: Role,
    gate: GateResult,
) -> tuple[str | None, list[Regression]]:
    """The examples the candidate lost most on, by the most telling metric that has any:
    a metric whose rule failed, else any gated metric, else REGRESSION_METRICS in order."""
    cand = scores["candidate"]
    order = ([(r.metric, r.higher_is_better) for r in gate.rules if not r.passed]
             + [(r.metric, r.higher_is_better) for r in gate.rules]
             + [(m, m not in M.LOWER_IS_BETTER) for m in REGRESSION_METRICS])
    for metric, higher in order:
        if metric in cand:
            found = _regressions_on(eval_set, scores, scored, ref_role, metric, higher)
            if found:
                return metric, found
    return None, []


def gate_verdict(
    split_verdicts: list[Outcome], on_inconclusive: str, notes: list[str]
) -> Outcome:
    """The report's verdict from its splits' gates, with `gate.on_inconclusive` applied.

    fail if any split fails; inconclusive (some interval straddles its margin) becomes pass,
    fail, or stays inconclusive for review (registered pending approval, warned), with a note.
    """
    if "fail" in split_verdicts:
        return "fail"
    if "inconclusive" not in split_verdicts:
        return "pass"
    what = {"review": "registered pending a person's review",
            "pass": "treated as a pass", "fail": "treated as a failure"}[on_inconclusive]
    notes.append(f"gate inconclusive: too few examples to show or refute a rule's margin "
                 f"(see the reasons for the examples needed); gate.on_inconclusive="
                 f"{on_inconclusive}: {what}")
    return "inconclusive" if on_inconclusive == "review" else on_inconclusive  # type: ignore[return-value]


def _split_report(
    eval_set: _EvalSet,
    scored: dict[Role, _Scored],
    ref_role: Role,
    models: dict[Role, ModelRef],
    cfg: Config,
    notes: list[str],
    comparisons: int,
    progress: Progress | None = None,
    base: _Scored | None = None,
) -> SplitReport:
    """Score, judge and gate one set. `base`: the base model's results on it when the base is
    not one of the roles (its log-probabilities set reward margins)."""
    base = scored.get("base", base)
    scores: dict[Role, dict[str, list[float]]] = {
        role: _scores(eval_set, s, base, cfg) for role, s in scored.items()
    }
    rules = _rules_of(eval_set, cfg)
    judged = _judge(eval_set, scored, scores, ref_role, cfg, rules, progress, notes)
    _rule_notes(eval_set, cfg, rules, notes)
    unscorable = scored["candidate"].unscorable
    if unscorable:
        notes.append(f"{eval_set.name}: {unscorable} example(s) have a prompt longer than "
                     f"data.max_seq_len ({cfg.data.max_seq_len}); their loss is not scored "
                     "(nor, for a pair, its preference metrics)")
    gate = run_gate(
        _gate_view(eval_set, scores["candidate"], rules),
        _gate_view(eval_set, scores[ref_role], rules), rules,
        confidence=cfg.gate.confidence, bootstrap_samples=cfg.gate.bootstrap_samples,
        seed=cfg.gate.seed, candidate_label=models["candidate"].label,
        reference_label=models[ref_role].label, comparisons=comparisons,
    )
    rows = []
    for i, item in enumerate(eval_set.items):
        outputs = {}
        for role, s in scored.items():
            gen = s.generations[i]
            outputs[role] = ModelOutput(
                text=gen.text if gen else None,
                scores={k: _clean(v[i]) for k, v in scores[role].items()},
                latency_s=gen.latency_s if gen else None,
                completion_tokens=gen.completion_tokens if gen else None,
                finish_reason=gen.finish_reason if gen else None,
            )
        rows.append(ExampleRow(index=i, input=item.input, prompt=item.prompt,
                               expected=item.expected, rejected=item.rejected, outputs=outputs,
                               judge=judged[i] if judged else None))
    metric, worst = _worst_regressions(eval_set, scores, scored, ref_role, gate)
    return SplitReport(
        name=eval_set.name, source=eval_set.source, n_examples=len(eval_set.items),
        means={role: {k: finite_mean(v) for k, v in s.items()} for role, s in scores.items()},
        gate=gate, regression_metric=metric, worst_regressions=worst, rows=rows,
    )


def _base_of(ws: Workspace, ref: ModelRef) -> Path:
    """The base folder `ref` was trained on: from its facts when Evertune trained it, else
    (a folder from elsewhere) the configured base."""
    from evertune.facts import folder_base

    if ref.adapter is None:
        from evertune.models import resolve_base_model

        return resolve_base_model(ws.config.model.base, ws.models_dir)
    return folder_base(ref.adapter, ws.models_dir, ws.config.model.base,
                       what=f"model {ref.label!r}")


def _run_model(
    ws: Workspace,
    ref: ModelRef,
    label: str,
    base_path: Path,
    tokenizer: PreTrainedTokenizerBase,
    sets: list[_EvalSet],
    progress: Progress | None,
    notes: list[str],
    *,
    logps_only: bool = False,
) -> dict[str, _Scored]:
    """Load `ref` on the base it was trained on, score every set with it, free it."""
    from evertune.models import load_for_inference, load_tokenizer

    _report_progress(progress, f"{label}: loading", 0, 1)
    own_base = base_path if ref.adapter is None else _base_of(ws, ref)
    own_tok, own_sets = tokenizer, sets
    if own_base != base_path:
        # Trained on another base (model.base changed between rounds): its own tokenizer
        # and chat template render the same records, so examples still pair one to one.
        own_tok = load_tokenizer(own_base)
        own_sets = [s.rendered(own_tok) for s in sets]
        notes.append(f"{ref.label} was trained on base {own_base} and is scored on it")
    model = load_for_inference(own_base, ref.adapter, dtype=ws.config.model.dtype)
    _report_progress(progress, f"{label}: loading", 1, 1)
    results = {s.name: _score_model(model, own_tok, s, ws.config, label, progress,
                                    logps_only=logps_only)
               for s in own_sets}
    del model
    _release_memory()
    return results


def _release_memory() -> None:
    # Collect now, so the next model does not load beside the one just dropped.
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_eval_config(cfg: Config) -> tuple[list[str], list[str]]:
    """(metrics eval.metrics computes, metrics an evaluation may compute); ConfigError if a gate
    rule names a metric the evaluation would not compute, or the judge's API-key variable is
    missing. Run before a round trains (steps.plan_round) and
    again before evaluating, so a typo in evertune.yaml costs seconds, not a training run."""
    computed = M.metric_names(cfg.eval.metrics)
    if cfg.eval.judge is not None:
        from evertune.evaluation.judge import check_judge

        check_judge(cfg.eval.judge)
        computed += list(JUDGE_METRICS)
    # Preference and rated metrics are computed wherever such examples are, whatever
    # eval.metrics says (gate.preference_rules rests on them).
    possible = computed + list(M.PREFERENCE_METRICS) + list(M.RATED_METRICS)
    check_rule_metrics(cfg.gate.rules, possible)
    check_rule_metrics(cfg.gate.preference_rules, possible, key="gate.preference_rules")
    if cfg.eval.general:
        check_rule_metrics(cfg.gate.general_rules, computed, key="gate.general_rules")
    return computed, possible


def evaluate_candidate(
    ws: Workspace,
    candidate: ModelRef,
    dataset: DatasetVersion,
    *,
    reference: ModelRef | None = None,
    include_base: bool = True,
    progress: Progress | None = None,
) -> EvalReport:
    """Evaluate `candidate` on `dataset` (and the golden set), gate it, save and return the report.

    Args:
        ws: the workspace (its config's `eval`, `gate`, `model` and `data` sections apply).
        candidate: the model to judge (usually a job's adapter folder).
        dataset: the dataset version whose test split is evaluated.
        reference: the model the candidate must beat, usually the PROD version; without one
            the gate compares with the base model.
        include_base: also score the base model when a reference is given (it is always scored
            when there is no reference); `eval.compare_base: false` turns this off too.
        progress: called as progress(label, done, total) while models load, generate and score.

    Raises:
        ConfigError: a gate rule names a metric that `eval.metrics` does not compute.
        NotFoundError: an adapter folder does not exist.
        DataError: nothing to evaluate on (no test/validation examples and no golden set).
    """
    from evertune.models import load_tokenizer

    started = time.time()
    cfg = ws.config
    computed, possible = check_eval_config(cfg)  # a bad rule fails before generation
    for ref in (candidate, reference):
        if ref is not None and ref.adapter is not None and not ref.adapter.exists():
            raise NotFoundError(f"adapter folder {ref.adapter} of model {ref.label!r} does not "
                                "exist; check the job's result path or the registry version")

    # Each model is loaded on the base it was trained on (its own facts), not on whatever
    # model.base says today; the base model role is the candidate's base.
    base_path = _base_of(ws, candidate)
    tokenizer = load_tokenizer(base_path)
    general = _general_records(ws, base_path, progress)
    sets, notes = _eval_sets(ws, dataset, tokenizer, general)

    models: dict[Role, ModelRef] = {"candidate": candidate}
    if reference is not None:
        models["reference"] = reference
    if reference is None or (include_base and cfg.eval.compare_base):
        models["base"] = ModelRef(label="base", adapter=None, version=None)
    ref_role: Role = "reference" if reference is not None else "base"

    # role -> set name -> results. A role whose model is the same folder as an earlier one's
    # (a reference that is the base model itself) reuses its results.
    results: dict[Role, dict[str, _Scored]] = {}
    done_by_adapter: dict[str | None, Role] = {}
    for role, ref in models.items():
        key = str(ref.adapter.resolve()) if ref.adapter is not None else None
        if key in done_by_adapter:
            results[role] = results[done_by_adapter[key]]
            continue
        label = role if ref.label == role else f"{role} ({ref.label})"
        results[role] = _run_model(ws, ref, label, base_path, tokenizer, sets, progress, notes)
        done_by_adapter[key] = role
    # Reward margins and KTO gaps are relative to the base: score it (log-probabilities only)
    # when it is not a role, e.g. under eval.compare_base: false.
    base_results = results.get(done_by_adapter[None]) if None in done_by_adapter else None
    if base_results is None and any(s.kinds & _VS_BASE for s in sets):
        notes.append("the base model was scored for log-probabilities only (reward_margin and "
                     "kto_logp_gap are relative to it), not reported as a model")
        base_results = _run_model(ws, ModelRef("base"), "base", base_path, tokenizer, sets,
                                  progress, notes, logps_only=True)

    # Bonferroni over every rule check on every split (only the rules that apply to a split's
    # examples), so adding rules or a golden split does not add false rejections.
    comparisons = sum(len(_rules_of(s, cfg)) for s in sets)
    splits: dict[str, SplitReport] = {}
    for s in sets:
        what = f"scoring outputs and gating ({s.name})"
        _report_progress(progress, what, 0, 1)
        splits[s.name] = _split_report(
            s, {role: results[role][s.name] for role in models}, ref_role, models, cfg, notes,
            comparisons, progress, base=base_results[s.name] if base_results else None,
        )
        _report_progress(progress, what, 1, 1)
    reasons = [reason if name == "test" else f"{name}: {reason}"
               for name, split in splits.items() for reason in split.gate.reasons]
    verdict = gate_verdict([sp.gate.verdict for sp in splits.values()],
                           cfg.gate.on_inconclusive, notes)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    report = EvalReport(
        id=f"eval-{stamp}-{secrets.token_hex(3)}",
        created_at=started,
        duration_s=round(time.time() - started, 3),
        dataset=dataset.id,
        dataset_kind=dataset.kind,
        golden_set=cfg.data.golden_set,
        models=models,
        reference_role=ref_role,
        metrics=computed + [m for m in possible[len(computed):]
                            if any(m in sp.means.get("candidate", {}) for sp in splits.values())],
        verdict=verdict,
        reasons=reasons,
        notes=notes,
        splits=splits,
        settings={"eval": cfg.eval.model_dump(), "gate": cfg.gate.model_dump(),
                  "base_model": str(base_path), "max_seq_len": cfg.data.max_seq_len},
    )
    report.save(ws.evals_dir / report.id / "report.json")
    for s in sets:
        if s.keep_records:
            _write_records(ws.evals_dir / report.id / "examples" / f"{s.name}.jsonl", s.records)
    return report


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    import json

    from evertune.data.store import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def evaluated_records(ws: Workspace, report_id: str, split: str = "test") -> list[dict[str, Any]]:
    """The raw records report `report_id` evaluated on `split` ([] for reports written before
    records were kept, or a split without them)."""
    import json

    path = ws.evals_dir / report_id / "examples" / f"{split}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
