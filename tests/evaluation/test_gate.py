"""The quality gate on constructed per-example scores: pytest tests/evaluation/test_gate.py"""

from __future__ import annotations

import numpy as np
import pytest

from evertune.config import GateRule
from evertune.errors import ConfigError
from evertune.evaluation.gate import (
    examples_needed,
    paired_binary_ci,
    paired_bootstrap_ci,
    run_gate,
)

N = 60


def scores(mean: float, noise: float = 0.05, seed: int = 0, n: int = N) -> list[float]:
    return list(np.random.default_rng(seed).normal(mean, noise, n))


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    cand, ref = scores(0.5, seed=1), scores(0.45, seed=2)
    a = paired_bootstrap_ci(cand, ref, samples=500, seed=7)
    b = paired_bootstrap_ci(cand, ref, samples=500, seed=7)
    c = paired_bootstrap_ci(cand, ref, samples=500, seed=8)
    assert a == b
    assert a[0] == c[0] and a[1:] != c[1:]  # the mean does not depend on the seed, the CI does
    mean, low, high = a
    assert low < mean < high
    assert mean == pytest.approx(np.mean(cand) - np.mean(ref))


def test_bootstrap_ci_narrows_with_confidence_and_covers_a_constant_shift() -> None:
    ref = scores(0.5, seed=3)
    cand = [r + 0.1 for r in ref]  # the same shift on every example: zero-width interval
    mean, low, high = paired_bootstrap_ci(cand, ref, samples=200)
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))
    cand = scores(0.5, seed=4)
    _, lo90, hi90 = paired_bootstrap_ci(cand, ref, confidence=0.90, samples=1000)
    _, lo99, hi99 = paired_bootstrap_ci(cand, ref, confidence=0.99, samples=1000)
    assert lo99 < lo90 < hi90 < hi99


def test_clear_improvement_passes_min_absolute_change() -> None:
    ref = scores(0.40, seed=1)
    cand = [r + 0.10 + e for r, e in zip(ref, scores(0, 0.02, seed=2), strict=True)]
    rule = GateRule(metric="rougeL", min_absolute_change=0.05)
    result = run_gate({"rougeL": cand}, {"rougeL": ref}, [rule], bootstrap_samples=500)
    assert result.verdict == "pass" and result.reasons == []
    r = result.rules[0]
    assert r.passed and r.n == N
    assert 0.05 < r.ci_low < r.difference < r.ci_high
    assert r.checks[0].name == "min_absolute_change" and r.checks[0].observed == r.ci_low


def test_noisy_tiny_improvement_fails_min_absolute_change() -> None:
    ref = scores(0.40, seed=1)
    cand = [r + 0.01 for r in scores(0.40, seed=5)]  # +0.01 on average, lost in the noise
    rule = GateRule(metric="rougeL", min_absolute_change=0.05)
    result = run_gate({"rougeL": cand}, {"rougeL": ref}, [rule], bootstrap_samples=500)
    assert result.verdict == "fail"
    assert "does not reach the required change of +0.05" in result.reasons[0]


def test_clear_regression_fails_non_inferiority_with_a_readable_reason() -> None:
    ref = scores(0.52, seed=1)
    cand = [r - 0.11 + e for r, e in zip(ref, scores(0, 0.05, seed=2), strict=True)]
    rule = GateRule(metric="rougeL", non_inferiority_margin=0.02)
    result = run_gate({"rougeL": cand}, {"rougeL": ref}, [rule], bootstrap_samples=500)
    assert result.verdict == "fail"
    (reason,) = result.reasons
    r = result.rules[0]
    assert r.ci_high < -0.02
    assert reason == (
        f"rougeL: candidate {r.candidate_mean:.3g} vs reference {r.reference_mean:.3g}, "
        f"95% CI of difference [{r.ci_low:+.3g}, {r.ci_high:+.3g}] is below the "
        "non-inferiority margin -0.02"
    )


def test_noise_within_the_margin_passes_non_inferiority() -> None:
    ref = scores(0.50, seed=1)
    cand = [r + e for r, e in zip(ref, scores(0, 0.01, seed=9), strict=True)]  # same model ± noise
    rule = GateRule(metric="rougeL", non_inferiority_margin=0.02)
    result = run_gate({"rougeL": cand}, {"rougeL": ref}, [rule], bootstrap_samples=500)
    assert result.verdict == "pass"
    assert -0.02 < result.rules[0].ci_low < 0 < result.rules[0].ci_high


def test_lower_is_better_flips_the_direction() -> None:
    ref = scores(2.0, seed=1)
    worse = [r + 0.3 for r in ref]  # higher loss
    better = [r - 0.3 for r in ref]
    rule = GateRule(metric="loss", higher_is_better=False, non_inferiority_margin=0.05,
                    min_absolute_change=0.1)
    bad = run_gate({"loss": worse}, {"loss": ref}, [rule], bootstrap_samples=200)
    good = run_gate({"loss": better}, {"loss": ref}, [rule], bootstrap_samples=200)
    assert good.verdict == "pass"
    assert bad.verdict == "fail"
    assert len(bad.reasons) == 2
    assert bad.reasons[0].startswith("loss (lower is better): candidate 2.3")
    assert "its upper bound does not reach the required change of -0.1" in bad.reasons[0]
    assert "is above the non-inferiority margin +0.05" in bad.reasons[1]
    # The reported interval stays in the raw direction (candidate - reference).
    assert bad.rules[0].ci_low == pytest.approx(0.3)


def test_threshold_is_a_floor_or_a_ceiling() -> None:
    cand = scores(0.45, seed=1)
    ref = scores(0.45, seed=2)
    floor = GateRule(metric="exact_match", threshold=0.5)
    assert run_gate({"exact_match": cand}, {"exact_match": ref}, [floor]).verdict == "fail"
    assert "candidate mean 0.4" in run_gate({"exact_match": cand}, {"exact_match": ref},
                                            [floor]).reasons[0]
    ceiling = GateRule(metric="loss", higher_is_better=False, threshold=0.5)
    assert run_gate({"loss": cand}, {"loss": ref}, [ceiling]).verdict == "pass"
    assert run_gate({"loss": [0.6] * 5}, {"loss": [0.1] * 5}, [ceiling]).verdict == "fail"


def test_min_relative_change() -> None:
    ref = [0.40] * 20
    rule = GateRule(metric="rougeL", min_relative_change=0.10)
    assert run_gate({"rougeL": [0.46] * 20}, {"rougeL": ref}, [rule]).verdict == "pass"
    failed = run_gate({"rougeL": [0.42] * 20}, {"rougeL": ref}, [rule])
    assert failed.verdict == "fail" and "+5.0%, short of the required +10.0%" in failed.reasons[0]
    zero = run_gate({"rougeL": [0.1] * 5}, {"rougeL": [0.0] * 5}, [rule])
    assert zero.verdict == "fail" and "undefined" in zero.reasons[0]


def test_unknown_metric_is_a_config_error_listing_every_bad_rule() -> None:
    rules = [GateRule(metric="rougeL", non_inferiority_margin=0.1), GateRule(metric="bleu"),
             GateRule(metric="acc")]
    with pytest.raises(ConfigError) as err:
        run_gate({"rougeL": [1.0]}, {"rougeL": [1.0]}, rules)
    assert len(err.value.problems) == 2
    assert "gate.rules[1].metric 'bleu' is not computed" in err.value.problems[0]
    assert "computed metrics: rougeL" in err.value.problems[0]


def test_non_finite_pairs_are_left_out_and_no_rules_pass() -> None:
    nan = float("nan")
    rule = GateRule(metric="loss", higher_is_better=False, non_inferiority_margin=0.1)
    result = run_gate({"loss": [1.0, nan, 1.0]}, {"loss": [1.0, 1.0, nan]}, [rule])
    assert result.rules[0].n == 1 and result.verdict == "pass"
    empty = run_gate({"loss": [nan]}, {"loss": [1.0]}, [rule])
    assert empty.verdict == "fail" and "no example has a finite loss" in empty.reasons[0]
    assert run_gate({}, {}, []).verdict == "pass"


def test_misaligned_scores_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="same examples"):
        run_gate({"x": [1.0, 2.0]}, {"x": [1.0]}, [GateRule(metric="x", threshold=0)])


# -- issue 11: three outcomes, exact tests for 0/1 metrics, multiplicity, examples needed ------
def issue_case(flips: dict[int, float]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The issue's golden set rebuilt: 40 examples, the reference right on 37 (0.925); the
    candidate gives identical outputs except at `flips` (index -> its exact_match there)."""
    ref_em = [1.0] * 37 + [0.0] * 3
    ref_rouge = [0.97] * 37 + [0.4] * 3
    cand_em, cand_rouge = list(ref_em), list(ref_rouge)
    for i, value in flips.items():
        cand_em[i] = value
        cand_rouge[i] = 1.0 if value else 0.4  # a right answer scores 1, a wrong one 0.4
    return ({"exact_match": cand_em, "rougeL": cand_rouge},
            {"exact_match": ref_em, "rougeL": ref_rouge})


ISSUE_RULES = [GateRule(metric="exact_match", non_inferiority_margin=0.02),
               GateRule(metric="rougeL", non_inferiority_margin=0.02)]


@pytest.mark.parametrize("flips", [
    {0: 0.0, 1: 0.0, 37: 1.0, 38: 1.0},  # the issue's case: 0.925 vs 0.925, two each way
    {0: 0.0, 37: 1.0, 38: 1.0},  # three flips, two better and one worse
])
def test_a_candidate_as_good_on_40_examples_is_inconclusive_not_fail(
    flips: dict[int, float],
) -> None:
    cand, ref = issue_case(flips)
    result = run_gate(cand, ref, ISSUE_RULES, comparisons=4)  # 2 rules x (test, golden)
    assert result.verdict == "inconclusive"  # the old gate said "fail"
    em = result.rule("exact_match")
    assert em is not None and em.outcome == "inconclusive"
    assert em.method.startswith("exact McNemar") and em.p_value is not None and em.p_value > 0.5
    assert em.ci_low < -0.02 < em.ci_high  # straddles the margin: neither shown
    for rule in result.rules:
        (check,) = rule.checks
        assert check.outcome != "fail"
    # What would settle it is said: examples needed at the observed variance (or that none
    # would, when the observed mean is past the margin).
    assert all("inconclusive;" in r and ("paired examples (now 40)" in r or "no number" in r)
               for r in result.reasons)
    needed = [c.examples_needed for r in result.rules for c in r.checks]
    assert any(n is not None and n > 40 for n in needed)
    assert result.correction.startswith("Bonferroni over 4 comparisons")
    assert "98.75%" in result.reasons[0]


def test_identical_outputs_pass_and_clear_changes_are_shown() -> None:
    same = run_gate(*issue_case({}), ISSUE_RULES, comparisons=4)
    assert same.verdict == "pass"
    em = same.rule("exact_match")
    assert em is not None and (em.ci_low, em.ci_high) == (0.0, 0.0)

    # A clear regression: the candidate loses 10 of the reference's right answers.
    worse = run_gate(*issue_case({i: 0.0 for i in range(10)}), ISSUE_RULES, comparisons=4)
    assert worse.verdict == "fail"
    em = worse.rule("exact_match")
    assert em is not None and em.outcome == "fail" and em.p_value is not None
    assert em.p_value < 0.01 and em.ci_high < -0.02
    assert "is below the non-inferiority margin -0.02" in worse.reasons[0]

    # A clear improvement: 40 examples, the reference right on 20, the candidate on those
    # and 12 more (a judge-preference-like 0/1 metric, then a min_absolute_change rule).
    ref = [1.0] * 20 + [0.0] * 20
    cand = [1.0] * 32 + [0.0] * 8
    rules = [GateRule(metric="preferred", non_inferiority_margin=0.02),
             GateRule(metric="preferred", min_absolute_change=0.05)]
    better = run_gate({"preferred": cand}, {"preferred": ref}, rules)
    assert better.verdict == "pass", better.reasons
    assert all(r.method.startswith("exact McNemar") for r in better.rules)


def test_min_change_rule_is_inconclusive_when_the_interval_straddles_it() -> None:
    ref = scores(0.40, seed=1)
    rule = GateRule(metric="rougeL", min_absolute_change=0.02)
    # +0.03 on average with noise: the interval straddles +0.02, neither shown nor refuted.
    cand = [r + 0.03 + e for r, e in zip(ref, scores(0.0, noise=0.1, seed=9), strict=True)]
    result = run_gate({"rougeL": cand}, {"rougeL": ref}, [rule], bootstrap_samples=500)
    assert result.verdict == "inconclusive"
    (check,) = result.rules[0].checks
    assert check.examples_needed is not None and check.outcome == "inconclusive"


def test_bonferroni_widens_each_interval_with_more_comparisons() -> None:
    cand, ref = scores(0.5, seed=1), scores(0.45, seed=2)
    rule = GateRule(metric="rougeL", non_inferiority_margin=0.02)
    one = run_gate({"rougeL": cand}, {"rougeL": ref}, [rule], bootstrap_samples=500)
    six = run_gate({"rougeL": cand}, {"rougeL": ref}, [rule], bootstrap_samples=500,
                   comparisons=6)
    assert one.correction.startswith("none") and "Bonferroni over 6" in six.correction
    a, b = one.rules[0], six.rules[0]
    assert a.ci_low is not None and b.ci_low is not None and a.ci_high is not None
    assert b.ci_high is not None and b.ci_low < a.ci_low and b.ci_high > a.ci_high


def test_examples_needed_grows_as_the_margin_shrinks_and_is_none_past_it() -> None:
    wide = examples_needed(0.0, 0.2, -0.05, confidence=0.95)
    narrow = examples_needed(0.0, 0.2, -0.02, confidence=0.95)
    assert wide is not None and narrow is not None and narrow > wide
    # ((1.96 + 0.84) * 0.2 / 0.02)^2 ≈ 785
    assert narrow == pytest.approx(785, rel=0.01)
    assert examples_needed(-0.03, 0.2, -0.02, confidence=0.95) is None


def test_paired_binary_ci_matches_the_exact_mcnemar_test() -> None:
    # 9 discordant pairs, all for the candidate: exact p = 2 * 0.5**9.
    cand = [1.0] * 9 + [1.0] * 21 + [0.0] * 10
    ref = [0.0] * 9 + [1.0] * 21 + [0.0] * 10
    diff, low, high, p = paired_binary_ci(cand, ref, confidence=0.95)
    assert diff == pytest.approx(9 / 40) and p == pytest.approx(2 * 0.5**9)
    assert 0 < low < diff <= high <= 9 / 40


def test_the_console_report_shows_an_inconclusive_verdict_and_the_examples_needed() -> None:
    from rich.console import Console

    from evertune.evaluation.report import EvalReport, ModelRef, SplitReport, print_report

    cand, ref = issue_case({0: 0.0, 1: 0.0, 37: 1.0, 38: 1.0})
    gate = run_gate(cand, ref, ISSUE_RULES, comparisons=2)
    means = {"candidate": {m: float(np.mean(v)) for m, v in cand.items()},
             "reference": {m: float(np.mean(v)) for m, v in ref.items()}}
    split = SplitReport(name="golden", source="golden.jsonl", n_examples=40, means=means,
                        gate=gate, regression_metric=None, worst_regressions=[], rows=[])
    report = EvalReport(
        id="eval-x", created_at=0.0, duration_s=1.0, dataset="ds-1", dataset_kind="chat",
        golden_set="golden.jsonl",
        models={"candidate": ModelRef("candidate"), "reference": ModelRef("prod v1")},
        reference_role="reference", metrics=list(cand), verdict="inconclusive",
        reasons=gate.reasons, notes=[], splits={"golden": split}, settings={},
    )
    console = Console(record=True, width=300)
    print_report(report, console)
    text = console.export_text()
    assert "gate: INCONCLUSIVE" in text and "FAIL" not in text
    assert "needs ~" in text and "paired examples (now 40)" in text
    assert "Bonferroni over 2 comparisons" in text
