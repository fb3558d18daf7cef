"""The console in a real browser, against a real `evertune up` (fixtures: conftest.py).

    .venv/bin/pytest tests/browser -q

What a person does in the console, end to end: sign in, follow a pipeline run to its dataset
and training job, approve the version it registered (QA, system tests, PROD), roll back; what a
viewer cannot do, even with a forged form; the serving page with real traffic; and that every
page fits a phone. The server state is shared and the tests run in file order: the viewer looks
at v2 while it still waits for approval, then the approver moves it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from evertune.pipeline import STEPS
from tests.browser.conftest import PHONE, ConsoleServer, Shots, sign_in

pytestmark = pytest.mark.slow

ACTION_FORMS = ("approve-form", "reject-form", "promote-form", "rollback-form")
# The approver's rollout runs system tests inside the request: give it more than a click.
ACTION_TIMEOUT_MS = 60_000

# Elements sticking out past the viewport's right edge, outside a `.table-wrap` (wide tables
# scroll inside their wrapper, which is fine on a phone; anything else widens the page).
OVERFLOW_JS = """() => {
  const width = document.documentElement.clientWidth;
  const out = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('.table-wrap')) continue;
    const r = el.getBoundingClientRect();
    if (r.width && r.right > width + 1) {
      const id = el.id ? '#' + el.id : '';
      const tid = el.dataset.testid ? `[data-testid=${el.dataset.testid}]` : '';
      out.push(`${el.tagName.toLowerCase()}${id}${tid} right=${Math.round(r.right)}`);
    }
  }
  return {scroll: document.documentElement.scrollWidth, client: width, offenders: out.slice(0, 8)};
}"""


def by_testid(page: Any, name: str) -> Any:
    return page.get_by_test_id(name)


def submit(page: Any, form: str, button: str) -> None:
    """Click `button` in the form with data-testid `form` and wait for the page after it."""
    with page.expect_navigation(timeout=ACTION_TIMEOUT_MS):
        by_testid(page, form).get_by_role("button", name=button).click()


def follow(page: Any, selector: str) -> None:
    """Click the first link matching `selector` and wait for the page it opens."""
    with page.expect_navigation():
        page.locator(selector).first.click()


def prod_card(page: Any) -> str:
    """The version the page's PROD card shows ("v2"), or "—"."""
    return str(by_testid(page, "prod-card").locator(".big").inner_text()).strip()


def flash_ok(page: Any) -> str:
    """The success flash's text (fails on an error flash or none)."""
    flash = by_testid(page, "flash")
    assert "error" not in (flash.get_attribute("class") or "").split(), flash.inner_text()
    return str(flash.inner_text())


def test_sign_in(page: Any, console: ConsoleServer, shots: Shots) -> None:
    page.goto("/login")
    page.fill("#token", "evt_not-a-real-token")
    with page.expect_navigation():
        page.click("form[action='/login'] button[type=submit]")
    assert by_testid(page, "login-error").is_visible()
    assert by_testid(page, "whoami").count() == 0
    shots(page, "login-error")

    # Signed out, a deep link goes to the sign-in form, and after it back to the deep link.
    page.goto("/models")
    assert page.url.startswith(f"{console.url}/login"), page.url
    shots(page, "login-redirect")
    sign_in(page, console.tokens["viewer"])
    assert page.url == f"{console.url}/models"
    assert "viewer" in by_testid(page, "whoami").inner_text()
    assert by_testid(page, "models-table").is_visible()
    shots(page, "models")


def test_viewer_cannot_act(page: Any, console: ConsoleServer, shots: Shots) -> None:
    sign_in(page, console.tokens["viewer"])
    page.goto("/models/2")
    stage = console.stage(2)
    assert by_testid(page, "version-stage").inner_text().strip() == stage
    for form in ACTION_FORMS:
        assert by_testid(page, form).count() == 0, f"a viewer sees {form} on /models/2 ({stage})"
    shots(page, "model-v2")
    page.goto("/deployments")
    for form in ACTION_FORMS:
        assert by_testid(page, form).count() == 0, f"a viewer sees {form} on /deployments"
    shots(page, "deployments")
    prod_before = console.api("deployments")["prod"]["version"]

    # Forged approvals with the viewer's own session: with this session's CSRF token (taken
    # from the page, so only the role check stands in the way) and without one.
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    forged = page.request.post("/models/2/approve", form={"csrf": csrf, "comment": "forged"})
    assert forged.status == 403, forged.text()[:500]
    forged = page.request.post("/deployments/rollback", form={"csrf": csrf, "comment": "forged"})
    assert forged.status == 403, forged.text()[:500]
    status = page.evaluate("""async () => (await fetch('/models/2/approve', {method: 'POST',
        body: new URLSearchParams({comment: 'forged, no csrf'})})).status""")
    assert status == 403

    # The same forgery as a form the browser submits: the 403 page says why.
    page.goto("/models/2")
    with page.expect_navigation() as nav:
        page.evaluate("""csrf => {
            const f = document.createElement('form');
            f.method = 'post'; f.action = '/models/2/approve';
            for (const [k, v] of [['csrf', csrf], ['comment', 'forged']]) {
              const i = document.createElement('input'); i.type = 'hidden';
              i.name = k; i.value = v; f.appendChild(i);
            }
            document.body.appendChild(f); f.submit();
        }""", csrf)
    assert nav.value.status == 403
    assert "approve" in by_testid(page, "error").inner_text().lower()
    shots(page, "forged-approve")

    assert console.stage(2) == stage
    assert console.api("deployments")["prod"]["version"] == prod_before
    assert not [a for a in console.api("audit") if a["actor"] == "viewer"]


def test_approver_follows_a_run_approves_and_rolls_back(
    page: Any, console: ConsoleServer, shots: Shots
) -> None:
    sign_in(page, console.tokens["approver"])
    assert prod_card(page) == "v1"
    assert "v2" in by_testid(page, "pending").inner_text()
    shots(page, "overview", phone=True)

    # The run that registered v2: its DAG, then its dataset and its training job.
    page.goto("/runs")
    assert by_testid(page, "runs-table").is_visible()
    shots(page, "runs")
    follow(page, f"a[href='/runs/{console.run_id}']")
    assert by_testid(page, "run-dag").is_visible()
    for step in STEPS:
        node = by_testid(page, f"step-{step}")
        assert "s-succeeded" in (node.get_attribute("class") or "").split(), step
    assert page.locator("#dag[data-live]").count() == 0  # a finished run is not refreshed
    shots(page, "run")
    run_url = page.url

    follow(page, f"main a[href='/datasets/{console.run_output('versions')[0]}']")  # the drop
    assert by_testid(page, "token-histogram").locator("svg").count() == 1
    assert "missing field 'output'" in by_testid(page, "rejects").inner_text()
    shots(page, "dataset")
    page.goto(run_url)
    follow(page, f"main a[href='/jobs/{console.run_output('job')}']")
    assert by_testid(page, "loss-chart").locator("svg").count() >= 1
    shots(page, "job")

    # Approve v2: QA, system tests, PROD (deploy.auto_promote).
    page.goto("/models/2")
    assert by_testid(page, "version-stage").inner_text().strip() == "pending"
    verdict = by_testid(page, "gate-verdict").inner_text()
    assert "pass" in verdict.lower(), verdict
    assert by_testid(page, "metrics-table").is_visible()
    shots(page, "model-v2", phone=True)
    page.fill("#comment-approve", "routes the new tickets")
    submit(page, "approve-form", "Approve")
    assert "prod" in flash_ok(page).lower()
    assert by_testid(page, "version-stage").inner_text().strip() == "prod"
    shots(page, "model-v2-approved")
    page.goto("/")
    assert prod_card(page) == "v2"
    # v2 passed through QA on its way; the QA card shows only a version that is in QA now.
    assert by_testid(page, "qa-card").locator(".big").inner_text().strip() == "—"
    shots(page, "overview-after-approve")

    # Roll back: the confirm dialog, then PROD is v1 again, on the page and in the registry.
    page.goto("/deployments")
    assert prod_card(page) == "v2"
    assert by_testid(page, "rollback-form").is_visible()
    shots(page, "deployments")
    dialogs: list[str] = []

    def confirm(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.once("dialog", confirm)
    submit(page, "rollback-form", "Roll back")
    assert dialogs and "roll back" in dialogs[0].lower(), dialogs  # asked before acting
    flash_ok(page)
    assert prod_card(page) == "v1"
    # The qa alias still names v2 (serving's NAME@qa answers with it): the page says it is retired.
    assert "v2 (now retired)" in by_testid(page, "qa-note").inner_text()
    shots(page, "deployments-rolled-back")
    assert console.api("deployments")["prod"]["version"] == 1
    assert (console.stage(1), console.stage(2)) == ("prod", "retired")
    page.goto("/")
    assert prod_card(page) == "v1"
    assert "v2" not in by_testid(page, "pending").inner_text()  # retired, not waiting


def test_serving_page(page: Any, console: ConsoleServer, shots: Shots) -> None:
    model = console.ws.config.model.name
    ids = []
    for team in ("billing", "shipping"):
        r = httpx.post(f"{console.url}/v1/chat/completions", timeout=60, json={
            "model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": f"Ticket 7: please route my {team} question"}],
        })
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    r = httpx.post(f"{console.url}/v1/feedback", timeout=30,
                   json={"id": ids[0], "rating": 1, "comment": "right team"})
    assert r.status_code == 200, r.text

    sign_in(page, console.tokens["viewer"])
    page.goto("/serving")
    assert by_testid(page, "serving-charts").locator("svg").count() >= 1
    assert "please route my billing question" in by_testid(page, "request-log").inner_text()
    assert "right team" in by_testid(page, "feedback").inner_text()
    shots(page, "serving")


def test_pages_fit_a_phone(page: Any, console: ConsoleServer, shots: Shots) -> None:
    page.set_viewport_size(PHONE)
    v2 = console.api("models/2")
    pages = {  # name: (path, status)
        "login": ("/login", 200), "overview": ("/", 200), "runs": ("/runs", 200),
        "run": (f"/runs/{console.run_id}", 200), "jobs": ("/jobs", 200),
        "job": (f"/jobs/{v2['job']}", 200), "datasets": ("/datasets", 200),
        "dataset-drop": (f"/datasets/{console.run_output('versions')[0]}", 200),
        "dataset-union": (f"/datasets/{v2['dataset']}", 200), "models": ("/models", 200),
        "model-v1": ("/models/1", 200), "model-v2": ("/models/2", 200),
        "deployments": ("/deployments", 200), "serving": ("/serving", 200),
        "not-found": ("/models/99", 404),
    }
    too_wide = {}
    for name, (path, status) in pages.items():
        if name == "overview":
            sign_in(page, console.tokens["approver"])  # approvers see the action forms too
        response = page.goto(path)
        assert response is not None and response.status == status, f"{path}: {response}"
        fit = page.evaluate(OVERFLOW_JS)
        if fit["scroll"] > fit["client"] + 1:
            too_wide[path] = fit
        page.screenshot(path=str(shots.path(f"{name}__phone")), full_page=True)
    assert not too_wide, f"pages wider than a {PHONE['width']} px phone: {too_wide}"
