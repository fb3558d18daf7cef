"""The quality gate on constructed per-example scores: pytest tests/evaluation/test_gate.py"""

from __future__ import annotations

import numpy as np
import pytest

from evertune.config import GateRule
from evertune.errors import ConfigError
from evertune.evaluation.gate import paired_bootstrap_ci, run_gate

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
