"""The evaluation report: a Pydantic model saved as `.evertune/evals/<id>/report.json`.

    from evertune.evaluation.report import EvalReport, load_report, print_report
    report = load_report(ws.evals_dir / "eval-20261122-120000-ab12cd" / "report.json")
    print_report(report, rich.console.Console())
    report.verdict, report.reasons, report.gate.rules[0].ci_low
    report.splits["test"].means["candidate"]["rougeL"]

Models are keyed by role: "candidate", "reference" (the version the candidate must beat,
usually PROD; absent when there is none) and "base". `reference_role` names the role the gate
compared against: "reference" when given, else "base". Every score that could not be computed
(a NaN loss) is stored as null, so the file is plain JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from evertune.evaluation.gate import GateResult, RuleResult
from evertune.evaluation.metrics import LOWER_IS_BETTER

if TYPE_CHECKING:
    from rich.console import Console

Role = Literal["candidate", "reference", "base"]
ROLES: tuple[Role, ...] = ("candidate", "reference", "base")


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: the base model plus an optional adapter (None = the base itself).

    `label` is for people ("candidate", "v3 (prod)"); `version` is its registry version if it
    has one. A full fine-tune's result folder works as `adapter` too.
    """

    label: str
    adapter: Path | None = None
    version: str | None = None


class ModelOutput(BaseModel):
    """One model's answer to one example and its scores (None = not computable)."""

    text: str | None
    """None where the split is scored by loss only (text data has no answer to generate)."""
    scores: dict[str, float | None]
    latency_s: float | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class ExampleRow(BaseModel):
    index: int
    """Position of the example in the evaluated selection."""
    input: str
    """What a person would call the input: the user message, raw prompt, or text."""
    prompt: str
    """The exact text the models were given (chat template applied)."""
    expected: str
    """The reference answer: generations are compared with it and its loss is scored (the
    chosen answer of a preference pair; the whole text of a text record; empty for a
    rated-down answer)."""
    rejected: str | None = None
    """The rejected answer of a preference pair, or a rated-down (KTO) answer: scored by its
    log-probability only, never a generation reference. None for other examples."""
    outputs: dict[str, ModelOutput]
    """By role."""
    judge: dict[str, object] | None = None
    """The LLM judge's raw answers for this example (eval.judge), and why any could not be
    read (recorded as missing scores, never a crash); None without a judge."""


class Regression(BaseModel):
    """An example where the candidate did worse than the reference, side by side."""

    index: int
    metric: str
    candidate_score: float
    reference_score: float
    change: float
    """Signed so negative is worse (flipped for lower-is-better metrics)."""
    input: str
    expected: str
    candidate_output: str | None
    reference_output: str | None
    rejected: str | None = None
    """The pair's rejected answer (preference data) or the rated-down answer (KTO data)."""


class SplitReport(BaseModel):
    """Scores of every model on one set of examples, and the gate on them."""

    name: str
    """"test" (the dataset's test split) or "golden" (the configured golden set)."""
    source: str
    """Where the examples came from, for people."""
    n_examples: int
    means: dict[str, dict[str, float | None]]
    """role -> metric -> arithmetic mean of the per-example scores (what the gate compares)."""
    gate: GateResult
    regression_metric: str | None
    worst_regressions: list[Regression]
    rows: list[ExampleRow]


class EvalReport(BaseModel):
    """The whole evaluation of one candidate; `verdict` is pass only if every split passes."""

    id: str
    created_at: float
    duration_s: float
    dataset: str
    dataset_kind: str
    golden_set: str | None
    models: dict[str, ModelRef]
    """By role."""
    reference_role: Role
    metrics: list[str]
    verdict: Literal["pass", "fail", "inconclusive"]
    """After gate.on_inconclusive: inconclusive only under `review` (pending, warned)."""
    reasons: list[str]
    """Every failed or inconclusive check, prefixed with the split ("golden: rougeL: ...")."""
    notes: list[str]
    """Things that did not fail the gate but a person should know (skipped rules, ...)."""
    splits: dict[str, SplitReport]
    settings: dict[str, object]
    """The eval and gate config sections the run used."""

    @property
    def gate(self) -> GateResult:
        """The gate on the main split (test, or golden when only that exists)."""
        return self.main_split.gate

    @property
    def main_split(self) -> SplitReport:
        return self.splits.get("test") or next(iter(self.splits.values()))

    @property
    def means(self) -> dict[str, dict[str, float | None]]:
        """role -> metric -> mean on the main split."""
        return self.main_split.means

    def summary_metrics(self) -> dict[str, float]:
        """Flat finite numbers for a tracking store: "test.candidate.rougeL" -> 0.41, ...

        Also "test.gate.rougeL.ci_low" / ".ci_high" for every rule.
        """
        flat: dict[str, float] = {}
        for split in self.splits.values():
            for role, means in split.means.items():
                for metric, value in means.items():
                    if value is not None and math.isfinite(value):
                        flat[f"{split.name}.{role}.{metric}"] = value
            for rule in split.gate.rules:
                for key in ("ci_low", "ci_high"):
                    value = getattr(rule, key)
                    if value is not None:
                        flat[f"{split.name}.gate.{rule.metric}.{key}"] = value
        return flat

    def save(self, path: Path) -> Path:
        """Write the report as JSON (atomically: a reader never sees half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2), "utf-8")
        tmp.replace(path)
        return path


def load_report(path: Path) -> EvalReport:
    """Read a report.json written by `evaluate_candidate`."""
    return EvalReport.model_validate_json(path.read_text("utf-8"))


# -- printing ----------------------------------------------------------------------------


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def _signed(value: float) -> str:
    return f"{value:+.1f}" if abs(value) >= 10 else f"{value:+.3f}"


def _delta(rule: RuleResult | None, cand: float | None, ref: float | None) -> str:
    if rule is not None and rule.difference is not None:
        assert rule.ci_low is not None and rule.ci_high is not None
        return f"{_signed(rule.difference)} [{_signed(rule.ci_low)}, {_signed(rule.ci_high)}]"
    if cand is None or ref is None:
        return "-"
    return _signed(cand - ref)


def _outcome(rules: list[RuleResult]) -> str:
    if not rules:
        return "[dim]not gated[/]"
    checks = [c for r in rules for c in r.checks]
    failed = [c.name for c in checks if c.outcome == "fail"]
    if failed:
        return "[red]FAIL[/] " + ", ".join(failed)
    pending = [c.name + (f" (needs ~{c.examples_needed} examples)"
                         if c.examples_needed is not None else " (no n would settle it)")
               for c in checks if c.outcome == "inconclusive"]
    if pending:
        return "[yellow]inconclusive[/] " + ", ".join(pending)
    return "[green]pass[/]"


def _split_table(report: EvalReport, split: SplitReport):  # type: ignore[no-untyped-def]
    from rich.table import Table

    roles = [r for r in ROLES if r in split.means]
    ref_role = report.reference_role
    title = f"{split.name}: {split.source}, {split.n_examples} examples"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for role in roles:
        label = report.models[role].label
        name = role if label == role else f"{role}\n{label}"
        table.add_column(name + (" (gate ref)" if role == ref_role else ""), justify="right")
    level = split.gate.interval_confidence * 100
    table.add_column(f"Δ vs {ref_role} ({level:.4g}% CI)", justify="right")
    table.add_column("rule")
    metrics = list(split.means.get("candidate", {}))
    for metric in metrics:
        rules = [r for r in split.gate.rules if r.metric == metric]
        arrow = "↓" if (rules[0].higher_is_better is False if rules
                        else metric in LOWER_IS_BETTER) else "↑"
        cand = split.means["candidate"].get(metric)
        ref = split.means.get(ref_role, {}).get(metric)
        table.add_row(
            f"{metric} {arrow}",
            *[_num(split.means[r].get(metric)) for r in roles],
            _delta(rules[0] if rules else None, cand, ref),
            _outcome(rules),
        )
    return table


def print_report(report: EvalReport, console: Console, *, regressions: int = 3) -> None:
    """Print one comparison table per split, the verdict and its reasons, and the worst
    regressions (the first `regressions` of each split; the JSON keeps ten)."""
    from rich.markup import escape

    for split in report.splits.values():
        console.print(_split_table(report, split))
        shown = split.worst_regressions[:regressions]
        if shown:
            console.print(
                f"[bold]worst regressions[/] on {split.name} by {split.regression_metric}:"
            )
            for reg in shown:
                console.print(_regression_lines(reg, report.reference_role))
    for note in report.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    where = f"(candidate vs {report.reference_role}; report {report.id})"
    if report.verdict in ("pass", "inconclusive"):
        if report.verdict == "pass":
            console.print(f"[bold green]gate: PASS[/] {where}")
        else:
            console.print(f"[bold yellow]gate: INCONCLUSIVE[/] {where}: needs a person's "
                          "review (gate.on_inconclusive=review)")
        for reason in report.reasons:  # inconclusive checks, with the examples needed
            console.print(f"  [yellow]warning:[/] {escape(reason)}")
        if report.splits:
            console.print(f"[dim]{escape(report.gate.correction)}[/]")
    else:
        console.print(f"[bold red]gate: FAIL[/] {where}")
        for reason in report.reasons:
            console.print(f"  - {escape(reason)}")


def _regression_lines(reg: Regression, ref_role: str) -> str:
    """One worst regression for the console: the input, then whichever of expected, rejected
    and the two outputs it has (a text record has only its text: no answer was generated)."""
    from rich.markup import escape

    lines = [f"  #{reg.index} ({reg.candidate_score:.3f} vs {reg.reference_score:.3f}) "
             f"input: {escape(_short(reg.input))}"]
    text_only = reg.candidate_output is None and reg.expected == reg.input
    shown = [("expected:", reg.expected if reg.expected and not text_only else None),
             ("rejected:", reg.rejected), ("candidate:", reg.candidate_output),
             (ref_role + ":", reg.reference_output)]
    lines += [f"      {name:<10} {escape(_short(text))}" for name, text in shown
              if text is not None]
    return "\n".join(lines)


def _short(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
