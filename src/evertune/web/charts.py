"""SVG charts rendered on the server: line charts (loss curves, serving series) and bar charts
(histograms), readable without JavaScript and small enough to inline in a page.

    line_chart([Series("train", [(1, 2.3), (2, 1.9)]), Series("val", [(2, 2.0)])],
               x_label="step", y_label="loss")            # -> Markup("<svg …>")
    bar_chart([("0–64", 12), ("64–128", 40)], x_label="tokens", y_label="examples")

Written by hand rather than with a plotting library: the console needs only these two shapes,
a few lines of SVG each, with no JavaScript or image files, and they render in microseconds.
Colours come from CSS classes (`series-0`…`series-5`), so the page's stylesheet themes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from markupsafe import Markup, escape

W, H = 640, 240
PAD_L, PAD_R, PAD_T, PAD_B = 56, 16, 16, 40


@dataclass
class Series:
    """One line: a label and (x, y) points; None or NaN y values are gaps."""

    label: str
    points: Sequence[tuple[float, float | None]] = field(default_factory=list)
    dashed: bool = False


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi] (1, 2, 5 × 10^k steps)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    # Up to the first tick at or past `hi`, so the axis covers every point (stopping within
    # half a step of `hi` drew the last points past the plot's right or top edge).
    while True:
        ticks.append(round(t, 12))
        if t >= hi - step * 1e-9:
            return ticks
        t += step


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    if abs(v) < 0.01:
        return f"{v:.0e}"
    return f"{v:g}"


def _frame(x_ticks: list[float], y_ticks: list[float], sx, sy, x_label: str, y_label: str,  # type: ignore[no-untyped-def]
           x_names: list[str] | None = None) -> list[str]:
    out = []
    for t in y_ticks:
        y = sy(t)
        out.append(f'<line class="grid" x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{_fmt(t)}</text>')
    for i, t in enumerate(x_ticks):
        x = sx(t)
        name = x_names[i] if x_names else _fmt(t)
        out.append(f'<text class="tick" x="{x:.1f}" y="{H - PAD_B + 16}" text-anchor="middle">'
                   f'{escape(name)}</text>')
    out.append(f'<line class="axis" x1="{PAD_L}" x2="{W - PAD_R}" '
               f'y1="{H - PAD_B}" y2="{H - PAD_B}"/>')
    out.append(f'<line class="axis" x1="{PAD_L}" x2="{PAD_L}" y1="{PAD_T}" y2="{H - PAD_B}"/>')
    out.append(f'<text class="label" x="{(PAD_L + W - PAD_R) / 2}" y="{H - 6}" '
               f'text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text class="label" x="14" y="{(PAD_T + H - PAD_B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(PAD_T + H - PAD_B) / 2})">{escape(y_label)}</text>')
    return out


def _svg(body: list[str], title: str, legend: list[str] | None = None,
         caption: bool = False) -> Markup:
    caption_html = f'<figcaption>{escape(title)}</figcaption>' if caption and title else ""
    legend_html = ""
    if legend:
        items = "".join(f'<span class="key series-{i % 6}"><i></i>{escape(name)}</span>'
                        for i, name in enumerate(legend))
        legend_html = f'<div class="legend">{items}</div>'
    return Markup(
        f'<figure class="chart">{caption_html}<svg viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="{escape(title)}" '
        f'preserveAspectRatio="xMidYMid meet"><title>{escape(title)}</title>{"".join(body)}</svg>'
        f"{legend_html}</figure>"
    )


def line_chart(series: Sequence[Series], *, title: str = "", x_label: str = "", y_label: str = "",
               y_min: float | None = None, x_range: tuple[float, float] | None = None,
               caption: bool = False) -> Markup:
    """A line chart of `series`; an empty-data note when there is nothing to draw.

    `x_range` fixes the x axis (e.g. a whole time window, however little of it has data);
    `caption` shows the title above the chart (the SVG carries it as its accessible name anyway).
    """
    pts = [(x, y) for s in series for x, y in s.points if y is not None and math.isfinite(y)]
    if not pts:
        return Markup(f'<p class="empty">No data yet for {escape(title or "this chart")}.</p>')
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x_ticks = nice_ticks(*(x_range or (min(xs), max(xs))))
    lo = min(ys) if y_min is None else min(y_min, min(ys))
    y_ticks = nice_ticks(lo, max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return PAD_L + (x - x0) / ((x1 - x0) or 1) * (W - PAD_L - PAD_R)

    def sy(y: float) -> float:
        return H - PAD_B - (y - y0) / ((y1 - y0) or 1) * (H - PAD_T - PAD_B)

    body = _frame(x_ticks, y_ticks, sx, sy, x_label, y_label)
    for i, s in enumerate(series):
        segments: list[list[str]] = [[]]
        for x, y in s.points:
            if y is None or not math.isfinite(y):
                segments.append([])
                continue
            segments[-1].append(f"{sx(x):.1f},{sy(y):.1f}")
        cls = f"line series-{i % 6}" + (" dashed" if s.dashed else "")
        for seg in segments:
            if len(seg) > 1:
                body.append(f'<polyline class="{cls}" points="{" ".join(seg)}"/>')
            elif len(seg) == 1:
                cx, cy = seg[0].split(",")
                body.append(f'<circle class="dot series-{i % 6}" cx="{cx}" cy="{cy}" r="3"/>')
    return _svg(body, title, [s.label for s in series], caption)


def bar_chart(bars: Sequence[tuple[str, float]], *, title: str = "", x_label: str = "",
              y_label: str = "") -> Markup:
    """Vertical bars, one per (label, value), e.g. a histogram's bins."""
    if not bars:
        return Markup(f'<p class="empty">No data yet for {escape(title or "this chart")}.</p>')
    y_ticks = nice_ticks(0, max(v for _, v in bars) or 1)
    y1 = y_ticks[-1] or 1
    n = len(bars)
    slot = (W - PAD_L - PAD_R) / n

    def sy(y: float) -> float:
        return H - PAD_B - y / y1 * (H - PAD_T - PAD_B)

    # Label at most ~8 bars so the tick text never overlaps.
    every = max(1, math.ceil(n / 8))
    shown = list(range(0, n, every))
    body = _frame([float(i) for i in shown], y_ticks, lambda i: PAD_L + (i + 0.5) * slot, sy,
                  x_label, y_label, [bars[i][0] for i in shown])
    for i, (label, value) in enumerate(bars):
        top = sy(value)
        body.append(
            f'<rect class="bar series-0" x="{PAD_L + i * slot + slot * 0.1:.1f}" y="{top:.1f}" '
            f'width="{slot * 0.8:.1f}" height="{H - PAD_B - top:.1f}">'
            f'<title>{escape(label)}: {_fmt(value)}</title></rect>'
        )
    return _svg(body, title)
