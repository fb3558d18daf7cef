"""The quality gate: is the candidate better (or at least not worse) than the reference?

    from evertune.config import GateRule
    from evertune.evaluation.gate import run_gate
    result = run_gate(
        {"rougeL": cand_scores}, {"rougeL": ref_scores},       # one score per example, paired
        [GateRule(metric="rougeL", non_inferiority_margin=0.02)],
        confidence=0.95, bootstrap_samples=2000, seed=0,
    )
    result.verdict, result.reasons     # "fail" | "inconclusive" | "pass", ["rougeL: ...", ...]

A pure function of per-example score arrays: both models scored the same examples, so the
comparison is paired. For each rule's metric we take a confidence interval of the mean
per-example difference d = candidate - reference: for binary metrics (every score 0 or 1:
exact_match, json_valid, judge preferences) an exact interval from the discordant pairs with
the exact McNemar p-value (`paired_binary_ci`); for the others a paired bootstrap
(resampling examples with replacement, numpy, seeded) percentile interval. Rules read the
interval, not the point estimate, and each check has three outcomes:
- pass: the interval shows it (non-inferiority or the required improvement);
- fail: the interval shows the opposite (a regression beyond the margin, or an improvement
  surely short of the required one), or the threshold on the mean is missed;
- inconclusive: the interval straddles the bound; the reason says about how many paired
  examples would settle it at the observed variance (80 % power). `gate.on_inconclusive`
  (evaluate) decides what an inconclusive verdict does.
Multiplicity: with k rule checks over all splits, each interval is at confidence
1 - (1 - confidence)/k (Bonferroni), so more rules and splits do not multiply false
rejections; `GateResult.correction` states it.

Rule checks (`evertune.config.GateRule`; for a lower-is-better metric such as loss the
improvement is -d, so "at least" becomes "at most" on d):
- threshold: the candidate's mean is at least `threshold` (at most, when lower is better).
- min_absolute_change: the CI bound of the improvement is at least this (fail: even the
  optimistic bound is short of it).
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
from scipy import stats

from evertune.config import GateRule
from evertune.errors import ConfigError

CheckName = Literal["threshold", "min_absolute_change", "min_relative_change", "non_inferiority"]
Outcome = Literal["pass", "fail", "inconclusive"]


class CheckResult(BaseModel):
    """One condition of a rule: what was required, what was observed, and the outcome."""

    name: CheckName
    required: float
    observed: float | None
    passed: bool
    """True only when the outcome is pass."""
    outcome: Outcome = "pass"
    reason: str | None = None
    """Why it failed or is inconclusive, for people; None when it passed."""
    examples_needed: int | None = None
    """Inconclusive only: paired examples needed to settle it at the observed variance
    (80 % power); None when no sample size would (the observed mean is past the bound)."""


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
    """CI of the difference (raw direction), at the corrected confidence level."""
    method: str = "paired bootstrap"
    """How the interval was made: paired bootstrap, or exact McNemar (binary metrics)."""
    p_value: float | None = None
    """Binary metrics: exact McNemar two-sided p-value of "no difference"."""
    passed: bool
    outcome: Outcome = "pass"
    checks: list[CheckResult]

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks if c.reason]


class GateResult(BaseModel):
    """The verdict over all rules; `reasons` holds one line per failed or inconclusive check.

    verdict: fail when any check fails, else inconclusive when any is, else pass.
    """

    verdict: Outcome
    reasons: list[str]
    rules: list[RuleResult]
    candidate: str
    reference: str
    confidence: float
    bootstrap_samples: int
    seed: int
    comparisons: int = 1
    """Rules x splits tested together; each interval is at 1 - (1 - confidence)/comparisons."""
    correction: str = "none"
    """The multiple-comparison correction, in words."""

    @property
    def interval_confidence(self) -> float:
        """The level each rule's interval was built at (after the correction)."""
        return 1 - (1 - self.confidence) / max(1, self.comparisons)

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


def paired_binary_ci(
    candidate: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
) -> tuple[float, float, float, float]:
    """(difference, CI low, CI high, exact McNemar p) for paired 0/1 scores.

    Only discordant pairs carry information: with b pairs where only the candidate is right
    and c where only the reference is, the difference of proportions is (b - c)/n. Given the
    m = b + c discordant pairs, b is binomial(m, pi) and the difference is (m/n)(2 pi - 1);
    the interval maps the exact (Clopper-Pearson) interval of pi through that, and the
    p-value is the exact two-sided McNemar test (pi = 0.5), so interval and test agree.
    Identical outputs give [0, 0]. (Newcombe's unconditional interval was rejected: at
    near-perfect concordance it stays ~±0.1 wide at n = 40, so two identical models could
    never show a 0.02 margin.)
    """
    c = np.asarray(candidate, dtype=np.float64) > 0.5
    r = np.asarray(reference, dtype=np.float64) > 0.5
    n = int(c.size)
    if n == 0:
        raise ValueError("paired_binary_ci needs non-empty paired 0/1 scores")
    b = int(np.sum(c & ~r))  # candidate right, reference wrong
    cc = int(np.sum(~c & r))  # candidate wrong, reference right
    m = b + cc
    delta = (b - cc) / n
    if m == 0:
        return 0.0, 0.0, 0.0, 1.0
    test = stats.binomtest(b, m, 0.5)
    ci = test.proportion_ci(confidence_level=confidence, method="exact")
    scale = m / n
    low, high = scale * (2 * ci.low - 1), scale * (2 * ci.high - 1)
    return delta, float(low), float(high), float(test.pvalue)


def examples_needed(gain: float, sd: float, bound: float, *, confidence: float,
                    power: float = 0.8) -> int | None:
    """Paired examples needed to show improvement > `bound` when the true mean improvement
    is `gain` with per-example sd `sd` (normal approximation, one side of a two-sided
    `confidence` interval, `power`). None when gain <= bound: no sample size shows it."""
    effect = gain - bound
    if effect <= 0:
        return None
    if sd <= 0:
        return 1
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2) + stats.norm.ppf(power))
    return int(math.ceil((z * sd / effect) ** 2))


# Metrics that are continuous even when every value happens to be 0 or 1 (a loss of exactly 1).
CONTINUOUS_METRICS = frozenset(
    {"loss", "perplexity", "rouge1", "rouge2", "rougeL", "embedding_cosine", "reward_margin",
     "kto_logp_gap", "undesirable_logp"}
)


def _is_binary(metric: str, cand: np.ndarray, ref: np.ndarray) -> bool:
    """A 0/1 metric (exact_match, json_valid, a judge's preference): every score is 0 or 1."""
    zero_one = np.all((cand == 0) | (cand == 1)) and np.all((ref == 0) | (ref == 1))
    return metric not in CONTINUOUS_METRICS and bool(zero_one)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _signed(x: float) -> str:
    return f"{x:+.3g}"


def _bound_check(
    name: CheckName, required: float, worst: float, best: float, *, settle: str,
    fail_reason: str, pending_reason: str, gain: float, sd: float, bound: float,
    confidence: float, n: int,
) -> CheckResult:
    """Three outcomes of 'improvement is at least `bound`' from the improvement interval
    [worst, best]: pass when worst >= bound, fail when best < bound, else inconclusive."""
    if worst >= bound:
        return CheckResult(name=name, required=required, observed=worst, passed=True)
    if best < bound:
        return CheckResult(name=name, required=required, observed=worst, passed=False,
                           outcome="fail", reason=fail_reason)
    need = examples_needed(gain, sd, bound, confidence=confidence)
    more = (f"about {need} paired examples (now {n}) would {settle} at the observed variance"
            if need is not None else f"the observed mean is past the bound, so no number of "
            f"examples would {settle}")
    return CheckResult(name=name, required=required, observed=worst, passed=False,
                       outcome="inconclusive", examples_needed=need,
                       reason=f"{pending_reason}: inconclusive; {more}")


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
        failed = [CheckResult(name=name, required=value, observed=None, passed=False,
                              outcome="fail", reason=empty)
                  for name, value in wanted.items() if value is not None]
        return RuleResult(metric=m, higher_is_better=rule.higher_is_better, n=0,
                          candidate_mean=None, reference_mean=None, difference=None,
                          ci_low=None, ci_high=None, passed=not failed,
                          outcome="fail" if failed else "pass", checks=failed)

    p_value: float | None = None
    if _is_binary(m, cand, ref):
        diff, low, high, p_value = paired_binary_ci(cand, ref, confidence=confidence)
        method = "exact McNemar (paired binary)"
    else:
        diff, low, high = paired_bootstrap_ci(cand, ref, confidence=confidence,
                                              samples=samples, seed=seed)
        method = "paired bootstrap"
    n = int(cand.size)
    sd = float(np.std(cand - ref, ddof=1)) if n > 1 else 0.0
    c_mean, r_mean = float(cand.mean()), float(ref.mean())
    sign = 1.0 if rule.higher_is_better else -1.0
    gain = sign * diff
    # The pessimistic and optimistic ends of the improvement interval.
    worst_gain = low if rule.higher_is_better else -high
    best_gain = high if rule.higher_is_better else -low
    pct = f"{confidence * 100:.4g}%"
    head = f"{m}{lower}: candidate {_fmt(c_mean)} vs reference {_fmt(r_mean)}, "
    ci = f"{pct} CI of difference [{_signed(low)}, {_signed(high)}]"
    bound_word = "lower bound" if rule.higher_is_better else "upper bound"
    best_word = "upper bound" if rule.higher_is_better else "lower bound"

    checks: list[CheckResult] = []
    if rule.threshold is not None:
        t = rule.threshold
        ok = c_mean >= t if rule.higher_is_better else c_mean <= t
        side = "below" if rule.higher_is_better else "above"
        checks.append(CheckResult(
            name="threshold", required=t, observed=c_mean, passed=ok,
            outcome="pass" if ok else "fail",
            reason=None if ok else f"{m}{lower}: candidate mean {_fmt(c_mean)} is {side} the "
                                   f"threshold {_fmt(t)}",
        ))
    if rule.min_absolute_change is not None:
        x = rule.min_absolute_change
        checks.append(_bound_check(
            "min_absolute_change", x, worst_gain, best_gain, bound=x,
            settle=f"show the required change of {_signed(sign * x)}",
            fail_reason=f"{head}{ci}: its {bound_word} does not reach the required change "
                        f"of {_signed(sign * x)}, nor does its {best_word}",
            pending_reason=f"{head}{ci}: its {bound_word} does not reach the required change "
                           f"of {_signed(sign * x)}",
            gain=gain, sd=sd, confidence=confidence, n=n,
        ))
    if rule.min_relative_change is not None:
        x = rule.min_relative_change
        if r_mean == 0:
            checks.append(CheckResult(
                name="min_relative_change", required=x, observed=None, passed=False,
                outcome="fail",
                reason=f"{head}relative change is undefined for a reference mean of 0; "
                       "use min_absolute_change for this metric",
            ))
        else:
            scale = abs(r_mean)
            res = _bound_check(
                "min_relative_change", x, worst_gain / scale, best_gain / scale,
                bound=x, gain=gain / scale, sd=sd / scale, confidence=confidence, n=n,
                settle=f"show the required relative change of {x:+.1%}",
                fail_reason=f"{head}{ci}: relative change at best is "
                            f"{best_gain / scale:+.1%}, short of the required {x:+.1%}",
                pending_reason=f"{head}{ci}: relative change at its {bound_word} is "
                               f"{worst_gain / scale:+.1%}, short of the required {x:+.1%}",
            )
            checks.append(res)
    if rule.non_inferiority_margin is not None:
        margin = rule.non_inferiority_margin
        where = "is below" if rule.higher_is_better else "is above"
        checks.append(_bound_check(
            "non_inferiority", margin, worst_gain, best_gain, bound=-margin,
            settle=f"show non-inferiority within {_signed(-sign * margin)}",
            fail_reason=f"{head}{ci} {where} the non-inferiority margin "
                        f"{_signed(-sign * margin)}",
            pending_reason=f"{head}{ci} straddles the non-inferiority margin "
                           f"{_signed(-sign * margin)}",
            gain=gain, sd=sd, confidence=confidence, n=n,
        ))
    outcome = _combine([c.outcome for c in checks])
    return RuleResult(
        metric=m, higher_is_better=rule.higher_is_better, n=n,
        candidate_mean=c_mean, reference_mean=r_mean, difference=diff, ci_low=low, ci_high=high,
        method=method, p_value=p_value, passed=outcome == "pass", outcome=outcome,
        checks=checks,
    )


def _combine(outcomes: Sequence[Outcome]) -> Outcome:
    """fail if any fails, else inconclusive if any is, else pass (no outcomes: pass)."""
    if "fail" in outcomes:
        return "fail"
    return "inconclusive" if "inconclusive" in outcomes else "pass"


def check_rule_metrics(
    rules: Sequence[GateRule], available: Sequence[str], key: str = "gate.rules"
) -> None:
    """Raise ConfigError naming every rule (of config list `key`) whose metric is not among
    `available`."""
    problems = [
        f"{key}[{i}].metric {rule.metric!r} is not computed; computed metrics: "
        f"{', '.join(available) or 'none'} (eval.metrics turns groups on: loss -> loss, "
        "perplexity; rouge -> rouge1, rouge2, rougeL; embedding -> embedding_cosine; "
        "exact_match; json_valid; eval.judge adds judge_score, judge_preference; preference "
        "pairs always give preference_accuracy, reward_margin; rated answers kto_logp_gap, "
        "undesirable_logp)"
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
    comparisons: int | None = None,
) -> GateResult:
    """Apply every rule to paired per-example scores and return the verdict with reasons.

    `candidate[metric][i]` and `reference[metric][i]` must score the same example i. A rule on
    a metric missing from either side raises ConfigError (listing every such rule at once).
    No rules means pass. `comparisons` is the number of rule checks made together (rules x
    splits; default: len(rules)); Bonferroni: each interval is built at confidence
    1 - (1 - confidence) / comparisons so that the chance of any false rejection over all
    of them stays within 1 - confidence.
    """
    available = [name for name in candidate if name in reference]
    check_rule_metrics(rules, available)
    k = max(1, comparisons if comparisons is not None else len(rules))
    level = 1 - (1 - confidence) / k
    correction = ("none (one comparison)" if k == 1 else
                  f"Bonferroni over {k} comparisons (rules x splits): each interval at "
                  f"{level * 100:.4g} %")
    results: list[RuleResult] = []
    for rule in rules:
        cand = np.asarray(candidate[rule.metric], dtype=np.float64)
        ref = np.asarray(reference[rule.metric], dtype=np.float64)
        if cand.shape != ref.shape or cand.ndim != 1:
            raise ValueError(
                f"{rule.metric}: candidate has {cand.size} scores, reference {ref.size}; "
                "the gate needs the same examples scored by both models"
            )
        results.append(_check_rule(rule, cand, ref, confidence=level,
                                   samples=bootstrap_samples, seed=seed))
    reasons = [reason for r in results for reason in r.reasons]
    return GateResult(
        verdict=_combine([r.outcome for r in results]),
        reasons=reasons,
        rules=results,
        candidate=candidate_label,
        reference=reference_label,
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
        comparisons=k,
        correction=correction,
    )


def finite_mean(values: Sequence[float | None]) -> float | None:
    """Mean of the finite values (None when there are none): how reports summarise a metric."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None
