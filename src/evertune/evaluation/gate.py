"""The quality gate: is the candidate better (or at least not worse) than the reference?

    from evertune.config import GateRule
    from evertune.evaluation.gate import run_gate
    result = run_gate(
        {"rougeL": cand_scores}, {"rougeL": ref_scores},       # one score per example, paired
        [GateRule(metric="rougeL", non_inferiority_margin=0.02)],
        confidence=0.95, bootstrap_samples=2000, seed=0,
    )
    result.verdict, result.reasons     # "fail", ["rougeL: candidate 0.41 vs reference 0.52, ..."]

A pure function of per-example score arrays: both models scored the same examples, so the
comparison is paired. For each rule's metric we bootstrap the mean per-example difference
d = candidate - reference (resampling examples with replacement, numpy, seeded) and take the
percentile confidence interval. Rules read the interval, not the point estimate, so noise on
a small test set cannot pass a "clear improvement" rule or fail a "no regression" rule.

Rule checks (`evertune.config.GateRule`; for a lower-is-better metric such as loss the
improvement is -d, so "at least" becomes "at most" on d):
- threshold: the candidate's mean is at least `threshold` (at most, when lower is better).
- min_absolute_change: the CI bound of the improvement is at least this.
- min_relative_change: the CI bound of the improvement, divided by |reference mean|, is at
  least this (the bound, like min_absolute_change, so a lucky mean alone cannot pass).
- non_inferiority_margin: the CI bound of the improvement is at least -margin: the candidate
  is, with the stated confidence, worse by no more than the margin.

Examples where either model's score is not finite (a loss that could not be computed) are left
out of that metric's comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel

from evertune.config import GateRule
from evertune.errors import ConfigError

CheckName = Literal["threshold", "min_absolute_change", "min_relative_change", "non_inferiority"]


class CheckResult(BaseModel):
    """One condition of a rule: what was required, what was observed, pass or fail."""

    name: CheckName
    required: float
    observed: float | None
    passed: bool
    reason: str | None = None
    """Why it failed, for people; None when it passed."""


class RuleResult(BaseModel):
    """One rule on one metric, with the numbers behind it."""

    metric: str
    higher_is_better: bool
    n: int
    """Examples compared (pairs where both scores are finite)."""
    candidate_mean: float | None
    reference_mean: float | None
    difference: float | None
    """Mean of candidate - reference (raw direction, whatever higher_is_better says)."""
    ci_low: float | None
    ci_high: float | None
    """Bootstrap CI of the difference (raw direction)."""
    passed: bool
    checks: list[CheckResult]

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks if c.reason]


class GateResult(BaseModel):
    """The verdict over all rules; `reasons` holds one line per failed check."""

    verdict: Literal["pass", "fail"]
    reasons: list[str]
    rules: list[RuleResult]
    candidate: str
    reference: str
    confidence: float
    bootstrap_samples: int
    seed: int

    def rule(self, metric: str) -> RuleResult | None:
        """The first rule result on `metric`, if any."""
        return next((r for r in self.rules if r.metric == metric), None)


def paired_bootstrap_ci(
    candidate: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    samples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean difference, CI low, CI high) of candidate - reference, by paired bootstrap.

    Same inputs and seed, same interval. Pairs must be finite and aligned; one pair gives a
    zero-width interval.
    """
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError("paired_bootstrap_ci needs two aligned, non-empty 1-D score arrays")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    n = diff.size
    means = np.empty(samples, dtype=np.float64)
    # Resample in chunks so samples x n indices never take more than ~16 MB.
    chunk = max(1, 2_000_000 // n)
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        means[start : start + k] = diff[rng.integers(0, n, size=(k, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(diff.mean()), float(low), float(high)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _signed(x: float) -> str:
    return f"{x:+.3g}"


def _check_rule(
    rule: GateRule,
    cand: np.ndarray,
    ref: np.ndarray,
    *,
    confidence: float,
    samples: int,
    seed: int,
) -> RuleResult:
    m = rule.metric
    finite = np.isfinite(cand) & np.isfinite(ref)
    cand, ref = cand[finite], ref[finite]
    lower = "" if rule.higher_is_better else " (lower is better)"
    if cand.size == 0:
        wanted: dict[CheckName, float | None] = {
            "threshold": rule.threshold,
            "min_absolute_change": rule.min_absolute_change,
            "min_relative_change": rule.min_relative_change,
            "non_inferiority": rule.non_inferiority_margin,
        }
        empty = f"{m}: no example has a finite {m} for both models; nothing to compare"
        failed = [CheckResult(name=name, required=value, observed=None, passed=False, reason=empty)
                  for name, value in wanted.items() if value is not None]
        return RuleResult(metric=m, higher_is_better=rule.higher_is_better, n=0,
                          candidate_mean=None, reference_mean=None, difference=None,
                          ci_low=None, ci_high=None, passed=not failed, checks=failed)

    diff, low, high = paired_bootstrap_ci(cand, ref, confidence=confidence, samples=samples,
                                          seed=seed)
    c_mean, r_mean = float(cand.mean()), float(ref.mean())
    sign = 1.0 if rule.higher_is_better else -1.0
    # The pessimistic end of the improvement interval: what we are `confidence`-sure of.
    worst_gain = low if rule.higher_is_better else -high
    pct = f"{confidence:.0%}"
    head = f"{m}{lower}: candidate {_fmt(c_mean)} vs reference {_fmt(r_mean)}, "
    ci = f"{pct} CI of difference [{_signed(low)}, {_signed(high)}]"
    bound_word = "lower bound" if rule.higher_is_better else "upper bound"

    checks: list[CheckResult] = []
    if rule.threshold is not None:
        t = rule.threshold
        ok = c_mean >= t if rule.higher_is_better else c_mean <= t
        side = "below" if rule.higher_is_better else "above"
        checks.append(CheckResult(
            name="threshold", required=t, observed=c_mean, passed=ok,
            reason=None if ok else f"{m}{lower}: candidate mean {_fmt(c_mean)} is {side} the "
                                   f"threshold {_fmt(t)}",
        ))
    if rule.min_absolute_change is not None:
        x = rule.min_absolute_change
        ok = worst_gain >= x
        checks.append(CheckResult(
            name="min_absolute_change", required=x, observed=worst_gain, passed=ok,
            reason=None if ok else f"{head}{ci}: its {bound_word} does not reach the required "
                                   f"change of {_signed(sign * x)}",
        ))
    if rule.min_relative_change is not None:
        x = rule.min_relative_change
        if r_mean == 0:
            checks.append(CheckResult(
                name="min_relative_change", required=x, observed=None, passed=False,
                reason=f"{head}relative change is undefined for a reference mean of 0; "
                       "use min_absolute_change for this metric",
            ))
        else:
            rel = worst_gain / abs(r_mean)
            ok = rel >= x
            checks.append(CheckResult(
                name="min_relative_change", required=x, observed=rel, passed=ok,
                reason=None if ok else f"{head}{ci}: relative change at its {bound_word} is "
                                       f"{rel:+.1%}, short of the required {x:+.1%}",
            ))
    if rule.non_inferiority_margin is not None:
        margin = rule.non_inferiority_margin
        ok = worst_gain >= -margin
        # "is below" when the whole interval is past the margin, "reaches below" when only
        # its pessimistic end is: both fail, the wording says how clearly.
        if rule.higher_is_better:
            where = "is below" if high < -margin else "reaches below"
        else:
            where = "is above" if low > margin else "reaches above"
        checks.append(CheckResult(
            name="non_inferiority", required=margin, observed=worst_gain, passed=ok,
            reason=None if ok else f"{head}{ci} {where} the non-inferiority margin "
                                   f"{_signed(-sign * margin)}",
        ))
    return RuleResult(
        metric=m, higher_is_better=rule.higher_is_better, n=int(cand.size),
        candidate_mean=c_mean, reference_mean=r_mean, difference=diff, ci_low=low, ci_high=high,
        passed=all(c.passed for c in checks), checks=checks,
    )


def check_rule_metrics(rules: Sequence[GateRule], available: Sequence[str]) -> None:
    """Raise ConfigError naming every rule whose metric is not among `available`."""
    problems = [
        f"gate.rules[{i}].metric {rule.metric!r} is not computed; computed metrics: "
        f"{', '.join(available) or 'none'} (eval.metrics turns groups on: loss -> loss, "
        "perplexity; rouge -> rouge1, rouge2, rougeL; embedding -> embedding_cosine; "
        "exact_match; json_valid)"
        for i, rule in enumerate(rules)
        if rule.metric not in available
    ]
    if problems:
        raise ConfigError(problems)


def run_gate(
    candidate: Mapping[str, Sequence[float]],
    reference: Mapping[str, Sequence[float]],
    rules: Sequence[GateRule],
    *,
    confidence: float = 0.95,
    bootstrap_samples: int = 2000,
    seed: int = 0,
    candidate_label: str = "candidate",
    reference_label: str = "reference",
) -> GateResult:
    """Apply every rule to paired per-example scores and return the verdict with reasons.

    `candidate[metric][i]` and `reference[metric][i]` must score the same example i. A rule on
    a metric missing from either side raises ConfigError (listing every such rule at once).
    No rules means pass.
    """
    available = [name for name in candidate if name in reference]
    check_rule_metrics(rules, available)
    results: list[RuleResult] = []
    for rule in rules:
        cand = np.asarray(candidate[rule.metric], dtype=np.float64)
        ref = np.asarray(reference[rule.metric], dtype=np.float64)
        if cand.shape != ref.shape or cand.ndim != 1:
            raise ValueError(
                f"{rule.metric}: candidate has {cand.size} scores, reference {ref.size}; "
                "the gate needs the same examples scored by both models"
            )
        results.append(_check_rule(rule, cand, ref, confidence=confidence,
                                   samples=bootstrap_samples, seed=seed))
    reasons = [reason for r in results for reason in r.reasons]
    return GateResult(
        verdict="pass" if all(r.passed for r in results) else "fail",
        reasons=reasons,
        rules=results,
        candidate=candidate_label,
        reference=reference_label,
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )


def finite_mean(values: Sequence[float | None]) -> float | None:
    """Mean of the finite values (None when there are none): how reports summarise a metric."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None
