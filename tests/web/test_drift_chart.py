"""The drift section of the serving page (`/serving`): chart, latest check, output signals.

    .venv/bin/python -m pytest tests/web/test_drift_chart.py -q

Checks are written with the drift monitor's own writer (`drift.record_check`), the rows the
monitor writes after each check (tests/monitoring/test_drift.py runs the monitor itself).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from evertune.monitoring.drift import DriftReport, OutputSignals, record_check
from evertune.web.charts import PAD_B, PAD_T, H
from evertune.web.serving import drift_view, parse_window
from evertune.workspace import Workspace
from tests.api.helpers import use_mlflow_template
from tests.conftest import make_workspace
from tests.web.test_serving_page import viewer_client

# (seconds ago, p-value, drifted, event): four quiet checks, then drift.
CHECKS = [(600, 0.62, False, None), (480, 0.41, False, None), (360, 0.33, False, None),
          (240, None, None, None), (120, 0.001, True, "drift"), (5, 0.001, True, None)]


def _signals(empty: float) -> list[OutputSignals]:
    return [
        OutputSignals(version="v1", responses=30, answers=30, answer_tokens_mean=7.5,
                      empty_ratio=empty, refusal_ratio=0.1, feedback_ratio=0.2,
                      rated_down_ratio=0.5),
        OutputSignals(version="v2", responses=4, answers=4, answer_tokens_mean=3.0,
                      empty_ratio=0.0, refusal_ratio=None, feedback_ratio=0.0,
                      rated_down_ratio=None),
    ]


def section(html: str, testid: str) -> str:
    found = re.search(rf'<section[^>]*data-testid="{testid}"[^>]*>(.*?)</section>', html, re.S)
    assert found, f"no section {testid!r} in the page"
    return found.group(1)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Workspace:
    ws = use_mlflow_template(make_workspace(tmp_path_factory.mktemp("drift-page") / "ws",
                                            tiny_model))
    now = time.time()
    for ago, p, drifted, event in CHECKS:
        record_check(ws, DriftReport(
            created_at=now - ago, model="assistant", threshold=0.01, version="v1",
            dataset="ds-0123456789abcdef", prompts=200 if p else 12, reference=800,
            statistic=0.2 if drifted else (0.001 if p else None), p_value=p, drifted=drifted,
            event=event, round="run-drift-abc" if event else None,
            note=None if p else "12 served PROD prompt(s) with text in the request log",
            signals=_signals(0.05 if drifted else 0.0)))
    record_check(ws, DriftReport(created_at=now - 60, model="other-model", threshold=0.01,
                                 version="v9", p_value=0.5, statistic=0.0, drifted=False))
    return ws


def test_drift_section_charts_the_checks_and_shows_the_latest(ws: Workspace) -> None:
    html = viewer_client(ws).get("/serving?window=15m").text
    drift = section(html, "drift")
    assert drift.count("<svg") == 2
    assert "<i></i>v1</span>" in drift and "threshold (p = 0.01)" in drift
    assert "v9" not in drift  # another model's checks are not this one's
    latest = re.search(r'data-testid="drift-latest">(.*?)</p>', drift, re.S)
    assert latest is not None
    text = " ".join(latest.group(1).split())
    assert "drift</span>" in text and "p 0.0010 (threshold 0.01)" in text
    assert "200 served vs 800 training prompts" in text and "ds-0123456789abcdef" in text
    signals = section(html, "drift").split('data-testid="output-signals"')[1]
    for cell in ("7.5", "5.0%", "10.0%", "20.0%", "50.0%", "3.0"):
        assert f'<td class="num">{cell}</td>' in signals, cell


def test_drift_chart_points_sit_where_the_p_values_say(ws: Workspace) -> None:
    view = drift_view(ws, parse_window("15m"))
    assert view["checks"] == len(CHECKS) and view["latest"].p_value == 0.001
    svg = str(view["charts"]["drift"])
    lines = re.findall(r'<polyline class="line series-(\d)( dashed)?" points="([^"]+)"', svg)
    # v1 is broken by the check without a figure: two segments, and the dashed threshold.
    assert [(n, d) for n, d, _ in lines] == [("0", ""), ("0", ""), ("1", " dashed")]
    ticks = [float(t) for t in re.findall(r'text-anchor="end">([\d.]+)</text>', svg)]
    top, bottom = max(ticks), min(ticks)

    def y_of(value: float) -> float:
        return H - PAD_B - (value - bottom) / (top - bottom) * (H - PAD_T - PAD_B)

    drifted = [float(pt.split(",")[1]) for pt in lines[1][2].split()]
    threshold = float(lines[2][2].split()[0].split(",")[1])
    assert drifted == [pytest.approx(y_of(3.0), abs=0.1)] * 2  # -log10 0.001
    assert threshold == pytest.approx(y_of(2.0), abs=0.1)  # -log10 0.01
    assert drifted[0] < threshold  # SVG y grows downwards: drawn above the line


def test_no_checks_yet_and_monitoring_off_are_said(tmp_path: Path, tiny_model: Path) -> None:
    ws = use_mlflow_template(make_workspace(tmp_path / "ws", tiny_model))
    drift = section(viewer_client(ws).get("/serving").text, "drift")
    assert "No drift check yet" in drift and "<svg" not in drift
    off = use_mlflow_template(make_workspace(tmp_path / "off", tiny_model,
                                             monitor={"drift": {"enabled": False}}))
    drift = section(viewer_client(off).get("/serving").text, "drift")
    assert "monitor.drift.enabled: false" in drift
