"""The serving page (`/serving`) and `serving.summary`, on a real request log and real feedback.

    .venv/bin/python -m pytest tests/web/test_serving_page.py -q

Rows go through the gateway's own writer (`RequestLog.record`, which redacts) and feedback
through `monitoring.feedback.write_feedback` into the workspace bucket; PROD and QA are real
registered versions moved by the real Registry.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from evertune.monitoring.feedback import build_record, write_feedback
from evertune.monitoring.request_log import RequestLog
from evertune.registry import Registry
from evertune.web import console_router
from evertune.web.serving import parse_window, series, summary
from evertune.workspace import Workspace
from tests.api.helpers import add_dataset, register, untrained_adapter, use_mlflow_template
from tests.conftest import make_workspace

NOW = time.time()  # reset by the `ws` fixture: rows are dated relative to when they are written
# (version, stage, status, ttft_s) per logged request, all within the last 15 minutes.
# v1: ttft p50 0.3 s, 1 error in 5; v2: p50 (0.4 + 0.6) / 2 = 0.5 s, 2 errors in 4.
ROWS = [
    ("v1", "prod", "ok", 0.3), ("v1", "prod", "ok", 0.1), ("v1", "prod", "error", 0.5),
    ("v1", "prod", "ok", 0.2), ("v1", "prod", "ok", 0.4),
    ("v2", "qa", "ok", 0.8), ("v2", "qa", "error", 0.2), ("v2", "qa", "ok", 0.6),
    ("v2", "qa", "error", 0.4),
]
SAMPLE = 0.5  # serve.request_log_sample: counts and rates are estimated ×2


def _entry(
    i: int, version: str, stage: str, status: str, ttft: float, **extra: Any
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-test{i:03d}", "created_at": NOW - 600 + i * 30,
        "model": f"assistant@{stage}",
        "version": version, "stage": stage, "endpoint": "chat", "status": status,
        "prompt": [{"role": "user", "content": f"question {i}"}],
        "completion": None if status == "error" else f"answer {i}",
        "prompt_tokens": 12, "completion_tokens": 0 if status == "error" else 11,
        # 10 tokens after the first, 20 ms each: time per output token 0.02 s.
        "ttft_s": ttft, "duration_s": ttft + (0 if status == "error" else 0.2),
        "error": "engine overloaded" if status == "error" else None, **extra,
    }


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Workspace:
    global NOW
    # Not the import time: in a full run this module's tests start minutes after collection,
    # and rows dated from then would fall out of the 15-minute window.
    NOW = time.time()
    root = tmp_path_factory.mktemp("serving")
    ws = use_mlflow_template(make_workspace(root / "ws", tiny_model,
                                            serve={"request_log_sample": SAMPLE}))
    dataset = add_dataset(ws, root)
    adapter = untrained_adapter(tiny_model)
    reg = Registry(ws)
    for n, job in ((1, "ftjob-serving-1"), (2, "ftjob-serving-2")):
        register(ws, adapter, dataset, job)
        reg.transition(n, "approved", "ana", "looks good")
        reg.transition(n, "qa", "ana", "deploy")
        if n == 1:
            reg.transition(1, "prod", "ana", "system tests passed")  # v1 in PROD, v2 in QA

    log = RequestLog(ws, sample=SAMPLE)
    for i, row in enumerate(ROWS):
        log.record(_entry(i, *row))
    # Outside a 15-minute window, inside the hour: counts on the page, not in summary(900).
    log.record(_entry(90, "v1", "prod", "error", 9.0, created_at=NOW - 1800))
    # The newest row, with an e-mail address the writer redacts before storing it.
    secret = [{"role": "user", "content": "mail jane.doe@example.com the invoice"}]
    log.record(_entry(99, "v2", "qa", "ok", 0.6, created_at=NOW - 10, prompt=secret))
    log.flush()
    log.close()

    source = {"endpoint": "chat", "prompt": [{"role": "user", "content": "Where is my parcel?"}],
              "completion": "billing", "version": "v1", "model": "assistant@prod"}
    corrected = build_record(source, response_id="chatcmpl-test001", rating=-1,
                             correction="shipping", comment="wrong team")
    write_feedback(ws, corrected, "chatcmpl-test001")
    write_feedback(ws, build_record(source, response_id="chatcmpl-test003", rating=1,
                                    correction=None), "chatcmpl-test003")
    return ws


def viewer_client(ws: Workspace) -> TestClient:
    """The console of `ws`, logged in as a viewer."""
    app = FastAPI()
    app.state.workspace = ws
    app.include_router(console_router(ws))
    c = TestClient(app, follow_redirects=False)
    r = c.post("/login", data={"token": ws.create_token("vic", "viewer"), "next": "/"})
    assert r.status_code == 303, r.text
    return c


@pytest.fixture(scope="module")
def client(ws: Workspace) -> TestClient:
    return viewer_client(ws)


def section(html: str, testid: str) -> str:
    found = re.search(rf'<section[^>]*data-testid="{testid}"[^>]*>(.*?)</section>', html, re.S)
    assert found, f"no section {testid!r} in the page"
    return found.group(1)


def test_summary_counts_errors_and_medians_from_the_window(ws: Workspace) -> None:
    h = summary(ws, window_s=900)
    assert h.logged == 10 and h.sample == SAMPLE
    assert h.requests == 20  # 10 logged at a 50 % sample
    assert h.errors == 3 and h.error_rate == pytest.approx(3 / 10)
    # TTFTs .1 .2 .2 .3 .4 | .4 .5 .6 .6 .8: the mean of the two middle ones
    assert h.ttft_p50_s == pytest.approx(0.4)
    assert h.rps == pytest.approx(20 / 900)
    v1, v2 = h.by_version["v1"], h.by_version["v2"]
    assert (v1["logged"], v1["requests"], v1["errors"]) == (5, 10, 1)
    assert v1["error_rate"] == pytest.approx(0.2) and v1["ttft_p50_s"] == pytest.approx(0.3)
    assert (v2["logged"], v2["requests"], v2["errors"]) == (5, 10, 2)
    assert v2["error_rate"] == pytest.approx(0.4) and v2["ttft_p50_s"] == pytest.approx(0.6)

    hour = summary(ws, window_s=3600)  # now the old v1 error counts too
    assert hour.by_version["v1"]["logged"] == 6 and hour.by_version["v1"]["errors"] == 2


def test_series_buckets_rates_and_time_per_output_token(ws: Workspace) -> None:
    data = series(ws, parse_window("1h"), now=NOW)
    assert data["versions"][0] in ("v1", "v2") and set(data["versions"]) == {"v1", "v2"}
    assert data["buckets"] == 60
    v1 = data["points"]["v1"]
    assert sum(p["rps"] * 60 for p in v1.values()) == pytest.approx(12)  # 6 logged × 2
    ok = [p for p in v1.values() if p["tpot_p50_s"] is not None]
    assert ok and all(p["tpot_p50_s"] == pytest.approx(0.02) for p in ok)
    assert max(p["error_rate"] for p in v1.values()) == 1.0  # a bucket holding one error


def test_serving_page_shows_versions_log_and_feedback(client: TestClient) -> None:
    r = client.get("/serving")
    assert r.status_code == 200, r.text
    html = r.text
    assert 'href="/models/1">v1</a>' in section(html, "prod-card")
    assert 'href="/models/2">v2</a>' in section(html, "qa-card")
    assert "estimates" in html and "serve.request_log_sample: 0.5" in html

    charts = section(html, "serving-charts")
    assert charts.count("<svg") == 4
    for label in ("v1", "v2"):
        assert charts.count(f"<i></i>{label}</span>") == 4  # a line per version in every chart
    assert "<polyline" in charts

    log = section(html, "request-log")
    assert log.count("<tr>") == 1 + 11  # header + every logged row (fewer than 50)
    assert "mail [email] the invoice" in log and "jane.doe" not in html
    assert "engine overloaded" in log and "chatcmpl-test099" in log
    assert log.index("chatcmpl-test099") < log.index("chatcmpl-test008")  # newest first

    fb = section(html, "feedback")
    assert "corrected" in fb and "shipping" in fb and "wrong team" in fb
    assert "chatcmpl-test001" in fb and "chatcmpl-test003" in fb and "positive" in fb


def test_window_choice_and_a_clear_error_for_an_unknown_one(client: TestClient) -> None:
    r = client.get("/serving?window=15m")
    assert r.status_code == 200 and "Last 15m" in r.text
    bad = client.get("/serving?window=2d")
    assert bad.status_code == 400
    message = re.search(r'data-testid="error">(.*?)<', bad.text, re.S).group(1)  # type: ignore[union-attr]
    assert "unknown window &#39;2d&#39;" in message and "15m, 1h, 6h, 24h" in message


def test_serving_page_needs_sign_in(ws: Workspace) -> None:
    app = FastAPI()
    app.state.workspace = ws
    app.include_router(console_router(ws))
    r = TestClient(app, follow_redirects=False).get("/serving")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
