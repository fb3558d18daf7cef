"""The console's model pages (/models, /models/{v}, /deployments) and their forms, on real
registry versions, a real evaluation report and real system tests of the tiny model.

    .venv/bin/python -m pytest tests/web/test_model_pages.py -q

The module's workspace holds three versions: v1 (a trained LoRA) approved into PROD with the
real deploy.approve; v2, a candidate that changes nothing in the base model, evaluated for real
against PROD v1 and the base model (so its page shows real means, real bootstrap intervals and
real regressions) and registered with that report, which its gate fails; v3, a trained LoRA
registered without an evaluation, waiting for approval. Refused actions are tried on that
workspace (nothing may change); the approve → promote → rollback flow through the forms gets a
workspace of its own.
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from evertune import deploy, steps
from evertune.auth import Principal
from evertune.data.store import get_dataset
from evertune.errors import LifecycleError
from evertune.evaluation import ModelRef, evaluate_candidate
from evertune.evaluation.report import EvalReport
from evertune.lifecycle import Stage, check_transition
from evertune.registry import Registry
from evertune.web import console_router
from evertune.workspace import Workspace
from tests.api.helpers import (
    FAST_TESTS,
    add_dataset,
    register,
    trained_adapter,
    untrained_adapter,
    use_mlflow_template,
)
from tests.conftest import make_workspace

# Evaluation without the embedding model (seconds saved); the gate keeps a text metric and loss.
SETTINGS: dict[str, dict[str, Any]] = {
    "eval": {"max_examples": 8, "max_new_tokens": 8, "batch_size": 8,
             "metrics": ["loss", "rouge", "exact_match"], "general": True},
    "gate": {"bootstrap_samples": 200, "rules": [
        {"metric": "rougeL", "higher_is_better": True, "non_inferiority_margin": 0.02},
        {"metric": "loss", "higher_is_better": False, "non_inferiority_margin": 0.05}]},
    "deploy": FAST_TESTS,
}
ROLES = ("viewer", "approver", "admin")

pytestmark = pytest.mark.slow  # evaluates and system-tests the tiny model for real


@dataclass
class Site:
    ws: Workspace
    app: FastAPI
    tokens: dict[str, str]  # role → token (the token's name is the role)
    dataset: str
    report: EvalReport  # v2's evaluation


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Site:
    root = tmp_path_factory.mktemp("model-pages")
    ws = use_mlflow_template(make_workspace(root / "ws", tiny_model, **SETTINGS))
    ds = add_dataset(ws, root)
    v1 = register(ws, trained_adapter(tiny_model), ds, "ftjob-1")
    first = deploy.approve(ws, v1.version, Principal("ana", "approver"), "first version")
    assert first.stage == "prod", first.message

    # v2: evaluated as the pipeline's ModelEvaluation step does (reference = PROD, plus base).
    report = evaluate_candidate(ws, ModelRef("candidate", adapter=untrained_adapter(tiny_model)),
                                get_dataset(ws, ds), reference=steps.reference_model(ws))
    assert report.verdict == "fail" and report.main_split.worst_regressions, (
        "the base model's answers should lose to the trained PROD adapter", report.reasons)
    job = SimpleNamespace(
        id="ftjob-2", model=ws.config.model.base, training_file=ds, parent=v1.version,
        hyperparameters={"n_epochs": 1}, result={"path": str(untrained_adapter(tiny_model))},
        run_id="run-2", status="succeeded",
    )
    losses = [{"step": 5, "values": {"train_loss": 1.25, "val_loss": 1.5}}]
    v2 = Registry(ws).register_version(job, report, losses)
    v3 = register(ws, trained_adapter(tiny_model), ds, "ftjob-3", gate=None)
    assert (v1.version, v2.version, v3.version) == (1, 2, 3)

    app = FastAPI()
    app.state.workspace = ws
    app.include_router(console_router(ws))
    return Site(ws=ws, app=app, tokens={role: ws.create_token(role, role) for role in ROLES},
                dataset=ds, report=report)


def signed_in(app: FastAPI, token: str) -> TestClient:
    client = TestClient(app)
    assert client.post("/login", data={"token": token}, follow_redirects=False).status_code == 303
    return client


@pytest.fixture(scope="module")
def clients(site: Site) -> Iterator[dict[str, TestClient]]:
    made = {role: signed_in(site.app, token) for role, token in site.tokens.items()}
    yield made
    for client in made.values():
        client.close()


# -- reading the server-rendered HTML --------------------------------------------------------
def element(html: str, testid: str) -> str:
    """The element with this data-testid, from its opening to its matching closing tag."""
    opening = re.search(rf'<([a-z0-9]+)\b[^>]*\bdata-testid="{re.escape(testid)}"[^>]*>', html)
    assert opening, f"no element with data-testid={testid!r} in the page"
    tag, start, depth = opening.group(1), opening.start(), 0
    for m in re.finditer(rf"<(/?){tag}\b[^>]*>", html[start:]):
        depth += -1 if m.group(1) else 1
        if depth == 0:
            return html[start : start + m.end()]
    raise AssertionError(f"element {testid!r} is not closed")


def has(html: str, testid: str) -> bool:
    return f'data-testid="{testid}"' in html


def text(fragment: str) -> str:
    """The visible text of an HTML fragment, whitespace collapsed."""
    return " ".join(html_lib.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)  # type: ignore[union-attr]


def get(client: TestClient, url: str) -> str:
    r = client.get(url)
    assert r.status_code == 200, (url, r.status_code, r.text[-2000:])
    return r.text


def flash(html: str) -> str:
    return text(element(html, "flash"))


def stage_of(ws: Workspace, version: int) -> Stage:
    return Registry(ws).get_version(version).stage


def f3(value: float | None) -> str:
    assert value is not None
    return f"{value:.3f}"


# -- the version page ------------------------------------------------------------------------
def test_version_page_shows_the_reports_metrics_with_the_gates_intervals(
    site: Site, clients: dict[str, TestClient]
) -> None:
    html = get(clients["viewer"], "/models/2")
    assert text(element(html, "version-stage")) == "rejected"
    split = site.report.main_split
    table = element(html, "metrics-table")
    header = text(table.split("</thead>")[0])
    assert "candidate" in header and "prod v1" in header and "base" in header
    for rule in split.gate.rules:
        row = re.search(rf'<tr data-metric="{rule.metric}">.*?</tr>', table, re.S)
        assert row, f"no row for {rule.metric}"
        shown = text(row.group(0))
        means = split.means
        for role in ("candidate", "reference", "base"):
            assert f3(means[role][rule.metric]) in shown, (role, rule.metric, shown)
        # The gate's paired difference and its bootstrap interval, as the report has them.
        assert f"{rule.difference:+.3f} [{rule.ci_low:+.3f}, {rule.ci_high:+.3f}]" in shown
        assert ("pass" if rule.passed else "fail") in shown
        if not rule.passed:
            assert 'class="num worse"' in row.group(0)
    # Metrics without a rule are listed too, marked as such.
    assert "not gated" in text(table) and 'data-metric="rouge1"' in table

    chart = element(html, "metrics-chart")
    assert "<svg" in chart and 'class="zero"' in chart
    assert chart.count('class="whisker') == 3 * len(split.gate.rules)  # a bar and two caps each
    assert "prod v1" in chart and "candidate" in chart
    # Each margin tick has its legend entry (the default rules are non-inferiority margins).
    margins = chart.count("<title>non-inferiority margin")
    assert margins and "worst Δ the gate tolerates" in chart

    verdict = text(element(html, "gate-verdict"))
    assert "fail" in verdict and "prod v1" in verdict
    for reason in site.report.reasons:
        assert reason in verdict


def test_version_page_shows_the_forgetting_guard_as_its_own_split(
    site: Site, clients: dict[str, TestClient]
) -> None:
    html = get(clients["viewer"], "/models/2")
    general = site.report.splits["general"]
    table = element(html, "metrics-table-general")
    assert "answered by the base model" in html  # the split's source, in its heading
    row = re.search(r'<tr data-metric="loss">.*?</tr>', table, re.S)
    assert row, "no loss row in the general split"
    shown = text(row.group(0))
    rule = general.gate.rules[0]
    assert f3(general.means["candidate"]["loss"]) in shown
    assert f"{rule.difference:+.3f} [{rule.ci_low:+.3f}, {rule.ci_high:+.3f}]" in shown
    assert rule.outcome in shown


def test_version_page_shows_the_worst_regressions_side_by_side(
    site: Site, clients: dict[str, TestClient]
) -> None:
    shown = text(element(get(clients["viewer"], "/models/2"), "regressions"))
    split = site.report.main_split
    assert f"by {split.regression_metric}" in shown
    for reg in split.worst_regressions:
        assert reg.input in shown and reg.expected in shown
        assert f"{reg.candidate_score:.3f} vs {reg.reference_score:.3f}" in shown
        if (reg.reference_output or "").strip():
            assert " ".join(reg.reference_output.split()) in shown  # type: ignore[union-attr]


def test_version_page_shows_lineage_history_and_system_tests(
    site: Site, clients: dict[str, TestClient]
) -> None:
    html = get(clients["viewer"], "/models/2")
    lineage = element(html, "lineage")
    for link in (f'href="/datasets/{site.dataset}"', 'href="/jobs/ftjob-2"', 'href="/runs/run-2"',
                 'href="/models/1"'):
        assert link in lineage
    assert site.report.id in lineage and str(site.ws.config.model.base) in text(lineage)
    history = text(element(html, "history"))
    assert "registered as rejected" in history and site.report.reasons[0] in history

    prod = get(clients["viewer"], "/models/1")
    tests = text(element(prod, "system-tests"))
    assert "pass" in tests and "smoke prompt(s) passed" in tests
    history = text(element(prod, "history"))
    assert "pending → approved" in history and "qa → prod" in history and "first version" in history
    assert "ana" in history


def test_a_version_without_an_evaluation_still_renders_and_says_so(
    clients: dict[str, TestClient]
) -> None:
    html = get(clients["viewer"], "/models/3")
    assert text(element(html, "version-stage")) == "pending"
    assert "registered without an evaluation" in text(element(html, "no-eval"))
    assert "skipped" in text(element(html, "gate-verdict"))
    assert not has(html, "metrics-table") and not has(html, "metrics-chart")


def test_unknown_version_is_a_404_listing_the_versions(clients: dict[str, TestClient]) -> None:
    r = clients["viewer"].get("/models/99")
    assert r.status_code == 404
    assert "v1, v2, v3" in text(element(r.text, "error"))


# -- lists -------------------------------------------------------------------------------------
def test_models_list_shows_every_version_with_stage_gate_and_key_metrics(
    site: Site, clients: dict[str, TestClient]
) -> None:
    table = element(get(clients["viewer"], "/models"), "models-table")
    rows = {int(m.group(1)): text(m.group(0))
            for m in re.finditer(r'<tr>\s*<td><a href="/models/(\d+)">.*?</tr>', table, re.S)}
    assert sorted(rows) == [1, 2, 3]
    assert "prod" in rows[1] and "@prod" in rows[1] and "Approved" in rows[1]
    assert "rejected" in rows[2] and "fail" in rows[2]
    assert "pending" in rows[3] and "skipped" in rows[3] and "PendingManualApproval" in rows[3]
    v2 = Registry(site.ws).get_version(2)
    header = text(table.split("</thead>")[0])
    assert "rougeL" in header and "loss" in header and "val_loss" in header
    assert f3(v2.metrics["rougeL"]) in rows[2] and "1.500" in rows[2]  # the val_loss logged
    assert f'href="/datasets/{site.dataset}"' in table


def test_deployments_page_shows_stages_and_history(clients: dict[str, TestClient]) -> None:
    html = get(clients["approver"], "/deployments")
    assert "v1" in text(element(html, "prod-card")) and "v1" in text(element(html, "qa-card"))
    history = text(element(html, "deployments-history"))
    assert history.count("v1") == 3 and "qa → prod" in history and "ana" in history
    # Nothing retired yet: no rollback form, and the page says why.
    assert not has(html, "rollback-form") and "nothing to roll back to" in html
    assert not has(get(clients["viewer"], "/deployments"), "rollback-form")


# -- who sees which form --------------------------------------------------------------------
def test_approver_sees_approve_and_reject_on_a_pending_version_and_a_viewer_does_not(
    clients: dict[str, TestClient]
) -> None:
    html = get(clients["approver"], "/models/3")
    form = element(html, "approve-form")
    assert 'action="/models/3/approve"' in form and 'method="post"' in form
    assert re.search(r'<textarea name="comment" id="comment-approve"[^>]*required', form)
    assert 'data-busy="Approving… running the QA system tests"' in form
    assert ">Approve</button>" in form and 'name="force"' not in form
    assert 'name="csrf"' in form
    reject = element(html, "reject-form")
    assert re.search(r'<textarea name="comment" id="comment-reject"[^>]*required', reject)
    assert ">Reject</button>" in reject

    viewer = get(clients["viewer"], "/models/3")
    assert not has(viewer, "approve-form") and not has(viewer, "reject-form")
    # The lifecycle decides too: nothing to approve or reject on the version in PROD.
    prod = get(clients["approver"], "/models/1")
    assert not any(has(prod, form) for form in ("approve-form", "reject-form", "promote-form"))


def test_only_an_admin_may_override_a_rejected_version(clients: dict[str, TestClient]) -> None:
    assert not has(get(clients["approver"], "/models/2"), "approve-form")
    form = element(get(clients["admin"], "/models/2"), "approve-form")
    assert re.search(r'<input type="checkbox" name="force"[^>]*required', form)


# -- refused actions change nothing ----------------------------------------------------------
def test_approve_without_a_comment_is_refused_and_changes_nothing(
    site: Site, clients: dict[str, TestClient]
) -> None:
    client = clients["approver"]
    before = Registry(site.ws).audit_log(limit=None)
    csrf = csrf_of(get(client, "/models/3"))
    r = client.post("/models/3/approve", data={"csrf": csrf, "comment": "   "})
    assert r.status_code == 200 and r.url.path == "/models/3"
    assert "comment" in flash(r.text) and 'class="flash error"' in r.text
    assert stage_of(site.ws, 3) is Stage.PENDING
    assert Registry(site.ws).audit_log(limit=None) == before


def test_a_viewers_forged_post_and_a_post_without_csrf_get_403(
    site: Site, clients: dict[str, TestClient]
) -> None:
    viewer = clients["viewer"]
    own_csrf = csrf_of(get(viewer, "/models/3"))  # the sign-out form carries the session's token
    r = viewer.post("/models/3/approve", data={"csrf": own_csrf, "comment": "let me in"})
    assert r.status_code == 403 and "viewer" in text(element(r.text, "error"))
    r = viewer.post("/deployments/rollback", data={"csrf": own_csrf, "comment": "oops"})
    assert r.status_code == 403

    approver = clients["approver"]
    r = approver.post("/models/3/approve", data={"comment": "no token"})
    assert r.status_code == 403 and "CSRF" in text(element(r.text, "error"))
    # Another session's token is no better than none.
    r = approver.post("/models/3/reject", data={"csrf": own_csrf, "comment": "wrong session"})
    assert r.status_code == 403
    assert stage_of(site.ws, 3) is Stage.PENDING
    assert Registry(site.ws).alias_version("prod").version == 1  # type: ignore[union-attr]


def test_an_illegal_move_comes_back_with_the_lifecycles_message(
    site: Site, clients: dict[str, TestClient]
) -> None:
    with pytest.raises(LifecycleError) as refused:
        check_transition(Stage.PROD, Stage.REJECTED, version=1)
    client = clients["approver"]
    csrf = csrf_of(get(client, "/models/1"))
    # A browser sends the page it posted from; the error flash goes back there.
    r = client.post("/models/1/reject", data={"csrf": csrf, "comment": "forged from an old tab"},
                    headers={"referer": "http://testserver/models/1"})
    assert r.status_code == 200 and r.url.path == "/models/1"
    assert flash(r.text) == str(refused.value)
    assert stage_of(site.ws, 1) is Stage.PROD


# -- the whole flow through the forms --------------------------------------------------------
def test_approve_promote_and_rollback_through_the_forms(tmp_path: Path, tiny_model: Path) -> None:
    ws = use_mlflow_template(make_workspace(tmp_path / "ws", tiny_model, **SETTINGS))
    ds = add_dataset(ws, tmp_path)
    adapter = trained_adapter(tiny_model)
    register(ws, adapter, ds, "ftjob-1")
    register(ws, adapter, ds, "ftjob-2")
    app = FastAPI()
    app.state.workspace = ws
    app.include_router(console_router(ws))
    client = signed_in(app, ws.create_token("ana", "approver"))
    reg = Registry(ws)

    # Approve v1: QA, system tests, PROD (deploy.auto_promote is on by default).
    csrf = csrf_of(get(client, "/models/1"))
    r = client.post("/models/1/approve",
                    data={"csrf": csrf, "comment": "better on billing tickets"})
    assert r.url.path == "/models/1"
    assert re.fullmatch(r"v1 approved: QA system tests passed \((\d)/\1\), now in PROD "
                        r"\(pending → approved → qa → prod\)", flash(r.text)), flash(r.text)
    assert text(element(r.text, "version-stage")) == "prod"
    assert reg.alias_version("prod").version == 1  # type: ignore[union-attr]
    approved = [a for a in reg.audit_log(1) if a.to_stage == "approved"]
    assert [(a.actor, a.reason) for a in approved] == [("ana", "better on billing tickets")]
    assert "better on billing tickets" in text(element(r.text, "history"))

    # The same workspace with auto_promote off: v2 stops in QA and is promoted from /deployments.
    manual = Workspace.open(ws.root, ["deploy.auto_promote=false"])
    app2 = FastAPI()
    app2.state.workspace = manual
    app2.include_router(console_router(manual))
    client2 = signed_in(app2, ws.create_token("bo", "approver"))
    r = client2.post("/models/2/approve", data={"csrf": csrf_of(get(client2, "/models/2")),
                                                 "comment": "newer data"})
    assert "stays in QA until promoted" in flash(r.text)
    assert text(element(r.text, "version-stage")) == "qa"
    page = get(client2, "/deployments")
    form = element(page, "promote-form")
    assert 'action="/models/2/promote"' in form and ">Promote to PROD</button>" in form
    r = client2.post("/models/2/promote", data={"csrf": csrf_of(page), "comment": "QA looks fine",
                                                 "next": "/deployments"})
    assert r.url.path == "/deployments" and flash(r.text).startswith("v2 promoted to PROD")
    assert reg.alias_version("prod").version == 2 and stage_of(ws, 1) is Stage.RETIRED  # type: ignore[union-attr]

    # Roll back: PROD returns to v1, v2 is retired, and the history says who and why.
    assert "v1" in text(element(r.text, "previous-card"))
    form = element(r.text, "rollback-form")
    assert (
        'data-confirm="Roll back PROD from v2 to the chosen version?' in form
        and ">Roll back</button>" in form
    )
    assert '<option value="">previous PROD (v1)</option>' in form
    r = client2.post("/deployments/rollback",
                     data={"csrf": csrf_of(r.text), "comment": "v2 answers in French", "to": ""})
    assert flash(r.text) == "prod rolled back from v2 to v1"
    assert reg.alias_version("prod").version == 1 and stage_of(ws, 2) is Stage.RETIRED  # type: ignore[union-attr]
    history = text(element(r.text, "deployments-history"))
    assert "v2 answers in French (rollback from v2)" in history and "bo" in history


def test_an_admin_override_whose_system_tests_fail_comes_back_as_an_error(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws = use_mlflow_template(make_workspace(tmp_path / "ws", tiny_model, **SETTINGS))
    # The untrained adapter answers with newlines: the gate failed it, the system tests will too.
    ds = add_dataset(ws, tmp_path)
    v1 = register(ws, untrained_adapter(tiny_model), ds, "ftjob-1", gate="fail")
    assert v1.stage is Stage.REJECTED
    app = FastAPI()
    app.state.workspace = ws
    app.include_router(console_router(ws))

    approver = signed_in(app, ws.create_token("ana", "approver"))
    r = approver.post("/models/1/approve", data={"csrf": csrf_of(get(approver, "/models/1")),
                                                 "comment": "the gate is wrong", "force": "true"})
    assert r.status_code == 403 and "override" in text(element(r.text, "error"))
    assert stage_of(ws, 1) is Stage.REJECTED

    admin = signed_in(app, ws.create_token("root", "admin"))
    r = admin.post("/models/1/approve", data={"csrf": csrf_of(get(admin, "/models/1")),
                                              "comment": "the gate is wrong", "force": "true"})
    message = flash(r.text)
    assert 'class="flash error"' in r.text and message.startswith(
        "v1 did not pass its QA system tests and is now rejected:"), message
    assert message.endswith("(rejected → approved → qa → rejected)")
    assert stage_of(ws, 1) is Stage.REJECTED and Registry(ws).alias_version("prod") is None
    tests = text(element(r.text, "system-tests"))
    assert "fail" in tests and ("empty output" in tests or "degenerate repetition" in tests)
    assert "override" in text(element(r.text, "history"))


def test_an_inconclusive_gate_shows_its_warning_and_the_examples_needed(
    site: Site, clients: dict[str, TestClient], tiny_model: Path
) -> None:
    """Issue 11: registered pending (gate.on_inconclusive=review), the page says the gate was
    inconclusive, why, and how many examples would settle it. Last in the module: it adds v4."""
    split = site.report.main_split
    rule = split.gate.rules[0]
    reason = (f"{rule.metric}: 97.5% CI of difference [-0.05, +0.01] straddles the "
              "non-inferiority margin -0.02: inconclusive; about 321 paired examples (now 8) "
              "would show non-inferiority within -0.02 at the observed variance")
    check = rule.checks[0].model_copy(update={"outcome": "inconclusive", "passed": False,
                                              "examples_needed": 321, "reason": reason})
    rules = [rule.model_copy(update={"outcome": "inconclusive", "passed": False,
                                     "checks": [check]})]
    gate = split.gate.model_copy(update={"verdict": "inconclusive", "reasons": [reason],
                                         "rules": rules})
    report = site.report.model_copy(update={
        "id": "eval-inconclusive-1", "verdict": "inconclusive", "reasons": [reason],
        "splits": {split.name: split.model_copy(update={"gate": gate})},
    })
    report.save(site.ws.evals_dir / report.id / "report.json")
    job = SimpleNamespace(
        id="ftjob-4", model=site.ws.config.model.base, training_file=site.dataset, parent=None,
        hyperparameters={"n_epochs": 1}, result={"path": str(untrained_adapter(tiny_model))},
        run_id="run-4", status="succeeded",
    )
    v4 = Registry(site.ws).register_version(job, report, [])
    assert v4.stage is Stage.PENDING and v4.gate == "inconclusive"

    html = get(clients["viewer"], f"/models/{v4.version}")
    verdict = text(element(html, "gate-verdict"))
    assert "inconclusive" in verdict and "321 paired examples" in verdict
    assert "A person should review it" in text(element(html, "gate-inconclusive"))
    assert "needs ~321 examples" in text(element(html, "examples-needed"))
