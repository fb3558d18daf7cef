"""Candidate vs reference (PROD) vs base from an evaluation report: the rows of the version
page's metrics table and a chart of the gate's confidence intervals.

    split = report.main_split
    rows = metric_rows(report, split)       # one Row per metric, in the report's order
    rows[0].values["candidate"], rows[0].ci_low, rows[0].css     # 0.41, -0.03, "worse"
    comparison_chart(report, split)         # -> Markup('<figure class="chart">…<svg>…</svg>…')

The chart has one line per metric and two panels, because the metrics have nothing in common
but their names (a loss near 3, a ROUGE score near 0.4, a perplexity in the thousands):
- "mean per model": the candidate's, reference's and base model's means as dots on that
  metric's own scale, the two ends labelled;
- "difference": candidate − reference with the gate's bootstrap confidence interval as a
  whisker around it, a dashed zero line and the non-inferiority margin as a tick. The axis is
  flipped for lower-is-better metrics so that right always means better; the end labels keep
  the raw (candidate − reference) values, the ones the table shows.
Drawn by hand like web/charts.py, with its CSS classes (series-N, whisker, zero, grid, tick).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from markupsafe import Markup, escape

from evertune.evaluation.metrics import LOWER_IS_BETTER

if TYPE_CHECKING:
    from evertune.evaluation.gate import RuleResult
    from evertune.evaluation.report import EvalReport, SplitReport

# Chart geometry (SVG user units; the figure scales to its container's width).
W = 640
ROW_H = 38
HEAD_H = 30
VAL_X0, VAL_X1 = 128, 360  # "mean per model" panel (metric names to its left)
DIF_X0, DIF_X1 = 392, 624  # "difference" panel
ROLE_SERIES = {"candidate": 0, "reference": 1, "base": 2}  # colour of each model's dots


@dataclass(frozen=True)
class Row:
    """One metric of one split: each model's mean and what the gate made of the difference."""

    metric: str
    higher_is_better: bool
    values: dict[str, float | None]
    """role → mean; roles the report did not score are absent."""
    difference: float | None
    """candidate − reference, raw direction (the gate's paired mean when gated)."""
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    """Examples the gate compared (pairs where both scores are finite)."""
    gated: bool = False
    passed: bool | None = None
    """The rule's outcome; None when no gate rule names this metric."""
    failed_checks: list[str] = field(default_factory=list)
    margin: float | None = None
    """The rule's non-inferiority margin, if it has one."""
    outcome: str | None = None
    """pass | fail | inconclusive (the interval straddles a bound); None when not gated."""
    examples_needed: int | None = None
    """Inconclusive: about how many paired examples would settle the rule."""

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    @property
    def css(self) -> str:
        """`better`, `worse` or "" for the candidate's cells.

        Gated metrics are judged by the interval, as the gate judges them: better when the
        whole interval is an improvement, worse when the rule failed or the whole interval is a
        loss, neutral when it straddles zero. Ungated metrics go by the sign of the difference.
        """
        sign = 1.0 if self.higher_is_better else -1.0
        if self.gated and self.ci_low is not None and self.ci_high is not None:
            worst, best = sorted((sign * self.ci_low, sign * self.ci_high))
            if (self.passed is False and self.outcome != "inconclusive") or best < 0:
                return "worse"
            return "better" if worst > 0 else ""
        if self.passed is False:
            return "worse"
        if self.difference is None or self.difference == 0:
            return ""
        return "better" if sign * self.difference > 0 else "worse"


def metric_rows(report: EvalReport, split: SplitReport) -> list[Row]:
    """A Row per metric the candidate was scored on, in the report's order."""
    ref_role = report.reference_role
    candidate = split.means.get("candidate", {})
    rows = []
    for metric in candidate:
        values = {role: means.get(metric) for role, means in split.means.items()}
        rule = split.gate.rule(metric)
        if rule is not None:
            rows.append(_gated_row(metric, values, rule))
            continue
        cand, ref = values.get("candidate"), values.get(ref_role)
        rows.append(Row(
            metric=metric, higher_is_better=metric not in LOWER_IS_BETTER, values=values,
            difference=cand - ref if cand is not None and ref is not None else None,
        ))
    return rows


def _gated_row(metric: str, values: dict[str, float | None], rule: RuleResult) -> Row:
    margin = next((c.required for c in rule.checks if c.name == "non_inferiority"), None)
    return Row(
        metric=metric, higher_is_better=rule.higher_is_better, values=values,
        difference=rule.difference, ci_low=rule.ci_low, ci_high=rule.ci_high, n=rule.n,
        gated=True, passed=rule.passed,
        failed_checks=[c.name for c in rule.checks if not c.passed], margin=margin,
        outcome=rule.outcome,
        examples_needed=max((c.examples_needed for c in rule.checks
                             if c.examples_needed is not None), default=None),
    )


def comparison_chart(report: EvalReport, split: SplitReport) -> Markup:
    """The two-panel chart of `split` (see the module docstring); a note when it is empty."""
    rows = [r for r in metric_rows(report, split) if _finite(r.values.values())]
    if not rows:
        return Markup('<p class="empty">No metric of this split has a value to chart.</p>')
    roles = [role for role in ("candidate", "reference", "base") if role in split.means]
    ref = report.models.get(report.reference_role)
    ref_label = ref.label if ref is not None else report.reference_role
    height = HEAD_H + ROW_H * len(rows) + 6
    body = [
        f'<text class="label" x="{VAL_X0}" y="16">mean per model</text>',
        f'<text class="label" x="{DIF_X0}" y="16">Δ vs {escape(ref_label)} '
        f"({split.gate.interval_confidence * 100:.4g}% CI), better →</text>",
    ]
    for i, row in enumerate(rows):
        top = HEAD_H + i * ROW_H
        mid = top + 14
        bottom = top + ROW_H - 2
        body.append(f'<line class="grid" x1="0" x2="{W}" y1="{bottom}" y2="{bottom}"/>')
        body.append(f'<text class="tick" x="4" y="{mid + 4}">'
                    f"{escape(row.metric)} {row.arrow}</text>")
        body += _values_panel(row, roles, report, mid)
        body += _difference_panel(row, mid, top)
    legend = "".join(f'<span class="key series-{ROLE_SERIES[role]}"><i></i>'
                     f"{escape(_role_label(report, role))}</span>" for role in roles)
    legend += ('<span class="key delta-better"><i></i>Δ better</span>'
               '<span class="key delta-worse"><i></i>Δ worse</span>'
               '<span class="key delta-same"><i></i>Δ no clear change</span>')
    if any(row.margin is not None for row in rows):
        legend += '<span class="key margin"><i></i>worst Δ the gate tolerates</span>'
    title = f"{split.name}: candidate vs {ref_label}"
    return Markup(
        f'<figure class="chart"><svg viewBox="0 0 {W} {height}" role="img" '
        f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">'
        f'<title>{escape(title)}</title>{"".join(body)}</svg>'
        f'<div class="legend">{legend}</div></figure>'
    )


def _values_panel(row: Row, roles: list[str], report: EvalReport, mid: float) -> list[str]:
    values: dict[str, float] = {}
    for role in roles:
        value = row.values.get(role)
        if value is not None and math.isfinite(value):
            values[role] = value
    lo, hi = min(values.values()), max(values.values())
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0  # one value (or all equal): centre it
    sx = _scale(lo - pad, hi + pad, VAL_X0, VAL_X1)
    out = [f'<line class="axis" x1="{VAL_X0}" x2="{VAL_X1}" y1="{mid}" y2="{mid}"/>']
    for end in sorted({lo, hi}):
        out.append(f'<text class="tick" x="{sx(end):.1f}" y="{mid + 17}" '
                   f'text-anchor="middle">{_fmt(end)}</text>')
    # The candidate last, so its dot is on top where values coincide.
    for role in sorted(values, key=lambda r: r == "candidate"):
        value = values[role]
        out.append(f'<circle class="dot series-{ROLE_SERIES[role]}" cx="{sx(value):.1f}" '
                   f'cy="{mid}" r="4.5"><title>{escape(_role_label(report, role))}: '
                   f"{_fmt(value)}</title></circle>")
    return out


def _difference_panel(row: Row, mid: float, top: float) -> list[str]:
    if row.difference is None or not math.isfinite(row.difference):
        return [f'<text class="tick" x="{DIF_X0}" y="{mid + 4}">no difference to show</text>']
    ends = [row.difference, *(v for v in (row.ci_low, row.ci_high) if v is not None)]
    if row.margin is not None:
        ends.append(row.margin)
    reach = max(abs(v) for v in ends) * 1.15
    # Right is better: a lower-is-better metric's axis runs from +reach (worse) to -reach.
    left, right = (-reach, reach) if row.higher_is_better else (reach, -reach)
    sx = _scale(left, right, DIF_X0, DIF_X1) if reach else (lambda _: (DIF_X0 + DIF_X1) / 2)
    zero = sx(0.0)
    out = [f'<line class="zero" x1="{zero:.1f}" x2="{zero:.1f}" y1="{top + 2}" '
           f'y2="{top + ROW_H - 6}"/>']
    if reach:  # all zero (identical scores): the dot on the zero line says it all
        out += [f'<text class="tick" x="{DIF_X0}" y="{mid + 17}">{_signed(left)}</text>',
                f'<text class="tick" x="{DIF_X1}" y="{mid + 17}" '
                f'text-anchor="end">{_signed(right)}</text>']
    if row.margin is not None:
        # The worst difference the rule tolerates: -margin in the improvement direction.
        at = sx(-row.margin if row.higher_is_better else row.margin)
        out.append(f'<line class="axis" x1="{at:.1f}" x2="{at:.1f}" y1="{mid - 8}" y2="{mid + 8}">'
                   f"<title>non-inferiority margin {_fmt(row.margin)}</title></line>")
    # Coloured by verdict, not by model: the legend's model colours would mislead here.
    tone = {"better": "delta-better", "worse": "delta-worse"}.get(row.css, "delta-same")
    if row.ci_low is not None and row.ci_high is not None:
        x0, x1 = sx(row.ci_low), sx(row.ci_high)
        ci = f"CI [{_signed(row.ci_low)}, {_signed(row.ci_high)}]"
        whisker = f'class="whisker {tone}"'
        out.append(f'<line {whisker} x1="{x0:.1f}" x2="{x1:.1f}" y1="{mid}" y2="{mid}">'
                   f"<title>{escape(row.metric)}: {ci}</title></line>")
        out += [f'<line {whisker} x1="{x:.1f}" x2="{x:.1f}" y1="{mid - 5}" y2="{mid + 5}"/>'
                for x in (x0, x1)]
    what = "" if row.gated else " (not gated)"
    out.append(f'<circle class="dot {tone}" cx="{sx(row.difference):.1f}" cy="{mid}" '
               f'r="4"><title>{escape(row.metric)}: difference {_signed(row.difference)}{what}'
               "</title></circle>")
    return out


def _role_label(report: EvalReport, role: str) -> str:
    """`reference (prod v3)`: the role, and the model's label when it says more."""
    ref = report.models.get(role)
    return role if ref is None or ref.label == role else f"{role} ({ref.label})"


def _scale(lo: float, hi: float, x0: float, x1: float) -> Callable[[float], float]:
    """Map [lo, hi] onto [x0, x1] (lo > hi reverses the axis)."""
    def sx(v: float) -> float:
        return x0 + (v - lo) / ((hi - lo) or 1.0) * (x1 - x0)

    return sx


def _finite(values: Iterable[float | None]) -> bool:
    return any(v is not None and math.isfinite(v) for v in values)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _signed(v: float) -> str:
    return f"{v:+,.0f}" if abs(v) >= 1000 else f"{v:+.3g}"
