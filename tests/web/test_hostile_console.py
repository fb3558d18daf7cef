"""The console under hostile input: 4xx pages rather than 500s, capped fields, no framing and a
Content-Security-Policy its own pages satisfy.

    .venv/bin/python -m pytest tests/web/test_hostile_console.py -q
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from urllib.parse import unquote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from evertune.web import console_router
from evertune.web.render import SECURITY_HEADERS
from evertune.workspace import Workspace
from tests.api.helpers import use_mlflow_template
from tests.conftest import make_workspace

HUGE = "9" * 30


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Workspace:
    return use_mlflow_template(
        make_workspace(tmp_path_factory.mktemp("console-hostile") / "ws", tiny_model)
    )


@pytest.fixture(scope="module")
def app(ws: Workspace) -> FastAPI:
    app = FastAPI()
    app.state.workspace = ws
    app.include_router(console_router(ws))
    return app


def signed_in(app: FastAPI, token: str) -> TestClient:
    c = TestClient(app, follow_redirects=False)
    assert c.post("/login", data={"token": token, "next": "/"}).status_code == 303
    return c


def test_a_huge_version_number_is_a_404_page(app: FastAPI, ws: Workspace) -> None:
    c = signed_in(app, ws.create_token("viewer-huge", "viewer"))
    for ref in (HUGE, f"v{HUGE}", "9" * 5000):
        r = c.get(f"/models/{ref}")
        assert r.status_code == 404, r.text[:300]
        assert "version numbers are 1 to 2147483647" in r.text


def test_a_megabyte_login_field_is_refused_with_a_4xx_page(app: FastAPI) -> None:
    c = TestClient(app, follow_redirects=False)
    # Under Starlette's 1 MiB field limit: refused by its length before any lookup.
    r = c.post("/login", data={"token": "evt_" + "x" * 900_000, "next": "/"})
    assert r.status_code == 401 and "not an Evertune token" in r.text
    assert "set-cookie" not in r.headers
    # Over it, as a plain or a multipart form: refused while parsing (was a 500).
    big = "evt_" + "x" * 2_000_000
    for extra in ({}, {"files": {"f": ("f", b"")}}):
        r = c.post("/login", data={"token": big, "next": "/"}, **extra)  # type: ignore[arg-type]
        assert r.status_code == 400 and "Bad request" in r.text, r.text[:300]
    # Multipart without its boundary.
    r = c.post("/login", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400
    # An overlong `next` is not carried into the form (it would become a Location header).
    r = c.get("/login", params={"next": "/" + "a" * 10_000})
    assert r.status_code == 200 and 'name="next" value="/"' in r.text


def test_a_comment_over_the_cap_comes_back_as_an_error_and_changes_nothing(
    app: FastAPI, ws: Workspace
) -> None:
    c = signed_in(app, ws.create_token("ana-long", "approver"))
    r = c.post("/models/1/reject", data={"csrf": "x", "comment": "a" * 5000},
               headers={"referer": "http://testserver/models/1"})
    assert r.status_code == 303 and r.headers["location"] == "/models/1"
    flash = unquote(r.cookies.get("evertune_flash") or "")
    assert flash.startswith("error:invalid form") and "at most 2000 characters" in flash


def test_every_console_response_forbids_framing_and_foreign_code(
    app: FastAPI, ws: Workspace
) -> None:
    c = signed_in(app, ws.create_token("viewer-csp", "viewer"))
    anonymous = TestClient(app, follow_redirects=False)
    for response in (c.get("/"), c.get("/models"), c.get("/models/v404"), c.get("/serving"),
                     c.get("/static/console.js"), anonymous.get("/login"), anonymous.get("/runs")):
        assert response.status_code in (200, 303, 404), response.status_code
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value, (response.url, name)
    policy = SECURITY_HEADERS["Content-Security-Policy"]
    csp = dict(part.split(" ", 1) for part in policy.split("; "))
    assert csp["frame-ancestors"] == "'none'" and SECURITY_HEADERS["X-Frame-Options"] == "DENY"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"  # no 'unsafe-inline'


def test_templates_have_no_inline_script_style_or_handler() -> None:
    """What the CSP above would block: a <script> without src, a <style> element, a style=""
    attribute, an on…= handler, a javascript: URL."""
    folder = files("evertune.web").joinpath("templates")
    inline = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|<style\b|\sstyle=|\son[a-z]+=|javascript:",
                        re.IGNORECASE)
    found = {
        f"{t.name}: {m.group(0)}"
        for t in folder.iterdir() if t.name.endswith(".html")
        for m in inline.finditer(t.read_text("utf-8"))
    }
    assert not found
    # Charts are drawn on the server into the page: their SVG must obey the same rule.
    from evertune.web.charts import Series, line_chart

    svg = str(line_chart([Series("loss", [(0, 1.0), (1, 0.5)])], title="t"))
    assert not inline.search(svg)
