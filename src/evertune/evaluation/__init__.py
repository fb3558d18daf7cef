"""Evaluation: score a candidate against PROD (or the base model) and apply the quality gate.

    from evertune.evaluation import ModelRef, evaluate_candidate, print_report
    report = evaluate_candidate(ws, ModelRef("candidate", adapter=path), dataset)
    print_report(report, console)
    report.verdict, report.reasons

`metrics` holds the per-example metrics, `gate` the paired-bootstrap gate (a pure function
over score arrays), `report` the JSON report model and its Rich table, `evaluate` the run.
"""

from evertune.evaluation.evaluate import (
    Progress,
    check_eval_config,
    evaluate_candidate,
    select_examples,
)
from evertune.evaluation.gate import (
    CheckResult,
    GateResult,
    RuleResult,
    check_rule_metrics,
    paired_bootstrap_ci,
    run_gate,
)
from evertune.evaluation.metrics import (
    METRIC_GROUPS,
    embedding_cosine,
    exact_match,
    example_losses,
    json_valid,
    metric_names,
    rouge,
)
from evertune.evaluation.report import (
    EvalReport,
    ExampleRow,
    ModelOutput,
    ModelRef,
    Regression,
    SplitReport,
    load_report,
    print_report,
)

__all__ = [
    "METRIC_GROUPS",
    "CheckResult",
    "EvalReport",
    "ExampleRow",
    "GateResult",
    "ModelOutput",
    "ModelRef",
    "Progress",
    "Regression",
    "RuleResult",
    "SplitReport",
    "check_rule_metrics",
    "embedding_cosine",
    "check_eval_config",
    "evaluate_candidate",
    "example_losses",
    "exact_match",
    "json_valid",
    "load_report",
    "metric_names",
    "paired_bootstrap_ci",
    "print_report",
    "rouge",
    "run_gate",
    "select_examples",
]
