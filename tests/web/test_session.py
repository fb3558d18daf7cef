"""Console sign-in, sessions, CSRF, the overview page and the SVG charts.

    .venv/bin/python -m pytest tests/web/test_session.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from evertune import auth
from evertune.web import console_router, session
from evertune.web.charts import Series, bar_chart, line_chart, nice_ticks
from evertune.web.render import duration
from evertune.workspace import Workspace
from tests.api.helpers import use_mlflow_template
from tests.conftest import make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Workspace:
    return use_mlflow_template(
        make_workspace(tmp_path_factory.mktemp("console") / "ws", tiny_model)
    )


@pytest.fixture(scope="module")
def app(ws: Workspace) -> FastAPI:
    app = FastAPI()
    app.state.workspace = ws
    app.include_router(console_router(ws))
    return app


def client(app: FastAPI, token: str | None = None) -> TestClient:
    c = TestClient(app, follow_redirects=False)
    if token is not None:
        r = c.post("/login", data={"token": token, "next": "/"})
        assert r.status_code == 303, r.text
    return c


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)  # type: ignore[union-attr]


def test_signed_out_pages_redirect_to_sign_in_and_back(app: FastAPI, ws: Workspace) -> None:
    c = client(app)
    r = c.get("/models?x=1")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/models%3Fx%3D1"
    form = c.get(r.headers["location"])
    assert form.status_code == 200 and 'name="next" value="/models?x=1"' in form.text
    token = ws.create_token("ana", "viewer")
    r = c.post("/login", data={"token": token, "next": "/models?x=1"})
    assert r.status_code == 303 and r.headers["location"] == "/models?x=1"
    cookie = r.headers["set-cookie"]
    assert session.COOKIE in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_a_bad_token_is_refused_with_the_reason(app: FastAPI, ws: Workspace) -> None:
    c = client(app)
    r = c.post("/login", data={"token": "evt_not_a_token", "next": "/"})
    assert (
        r.status_code == 401 and "not recognised" in r.text
        and 'data-testid="login-error"' in r.text
    )
    assert session.COOKIE not in r.headers.get("set-cookie", "")
    secret, info = auth.create_token(ws, "old", "viewer", auth.local_principal(ws))
    signed_in = client(app, secret)
    assert signed_in.get("/").status_code == 200
    auth.revoke_token(ws, info.id, auth.local_principal(ws))
    # A revoked token ends its sessions at the next request.
    r = signed_in.get("/")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_sign_in_never_redirects_off_site(app: FastAPI, ws: Workspace) -> None:
    token = ws.create_token("bo", "viewer")
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        r = client(app).post("/login", data={"token": token, "next": target})
        assert r.status_code == 303 and r.headers["location"] == "/"


def test_overview_of_an_empty_workspace(app: FastAPI, ws: Workspace) -> None:
    c = client(app, ws.create_token("cy", "approver"))
    html = c.get("/").text
    assert "<h1>assistant</h1>" in html
    assert 'data-testid="whoami"' in html and "cy · <b>approver</b>" in html
    assert "nothing in PROD yet" in html and "Nothing waits for approval." in html
    assert "No runs yet" in html and 'data-testid="health-card"' in html
    assert 'href="/runs" aria-current="page"' not in html and 'href="/" aria-current="page"' in html


def test_sign_out_clears_the_session(app: FastAPI, ws: Workspace) -> None:
    c = client(app, ws.create_token("di", "viewer"))
    r = c.post("/logout", data={"csrf": ""})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert c.get("/").status_code == 303


def test_csrf_token_is_per_session(app: FastAPI, ws: Workspace) -> None:
    a = client(app, ws.create_token("ed", "approver"))
    b = client(app, ws.create_token("fi", "approver"))
    token_a, token_b = csrf_of(a.get("/").text), csrf_of(b.get("/").text)
    assert len(token_a) == 64 and token_a != token_b
    assert csrf_of(a.get("/").text) == token_a  # stable for the session


def test_static_files_and_unknown_pages(app: FastAPI, ws: Workspace) -> None:
    c = client(app, ws.create_token("gu", "viewer"))
    css = c.get("/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert c.get("/static/console.js").headers["content-type"].startswith("text/javascript")
    missing = c.get("/static/session.py")
    assert missing.status_code == 404 and 'data-testid="error"' in missing.text


def test_line_chart_draws_each_series_and_breaks_at_gaps() -> None:
    svg = str(line_chart([Series("train", [(1, 3.0), (2, 2.0), (3, None), (4, 1.0), (5, 0.5)]),
                          Series("val", [(5, 0.9)])], title="loss", x_label="step", y_label="loss"))
    assert svg.count("<polyline") == 2  # train: (1,2) and (4,5) around the gap; val is one point
    assert svg.count("<circle") == 1
    assert "<title>loss</title>" in svg and ">train<" in svg and ">val<" in svg
    assert "No data" in str(line_chart([Series("x", [])], title="loss"))
    # Labels are escaped: a dataset name cannot inject markup.
    assert "<script>" not in str(line_chart([Series("<script>", [(0, 1.0), (1, 2.0)])]))


def test_bar_chart_and_ticks() -> None:
    svg = str(bar_chart([(f"{i * 16}", i * 2.0) for i in range(20)], title="lengths"))
    assert svg.count("<rect") == 20
    assert nice_ticks(0, 0.93) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 3)[0] <= 3 <= nice_ticks(3, 3)[-1]
    assert [duration(x) for x in (0.25, 12.34, 245, 7380)] == [
        "250 ms", "12.3 s", "4 min 05 s", "2 h 03 min"
    ]


def test_a_serving_key_cannot_sign_in(app: FastAPI, ws: Workspace) -> None:
    r = client(app).post("/login", data={"token": ws.create_token("bot", "serving"), "next": "/"})
    assert r.status_code == 401 and "serving key" in r.text
    assert session.COOKIE not in r.headers.get("set-cookie", "")
