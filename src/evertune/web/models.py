"""Model versions and deployments: the pages where a person decides what serves traffic.

    GET  /models                  every version: stage, approval, gate, key metrics
    GET  /models/{v}              one version (3, v3 or an alias such as prod): gate verdict,
                                  metrics vs PROD and base with the gate's CIs (table + chart),
                                  worst regressions, lineage, audit history, system tests, and
                                  the Approve / Reject / Promote forms its stage allows
    POST /models/{v}/approve      csrf, comment (required), force (admin override) → deploy.approve
    POST /models/{v}/retry        csrf, comment (optional): rerun QA after an environment
                                  failure                          → deploy.approve(retry=True)
    POST /models/{v}/reject       csrf, comment (required)                        → deploy.reject
    POST /models/{v}/promote      csrf, comment, next                             → deploy.promote
    GET  /deployments             PROD / QA / previous PROD, stage history, Promote, Rollback
    POST /deployments/rollback    csrf, comment, to (a retired version)           → deploy.rollback

Every action calls the function the control API and the CLI call (`evertune.deploy`) with the
signed-in caller as the actor, after `check_form` (CSRF token and role): one code path, one
set of checks, the same audit rows. A refused move (LifecycleError: the lifecycle's own
message, listing the allowed moves) comes back as an error flash through ConsoleRoute.

The list pages read only what the registry's tags carry (ModelVersion.metrics, gate, stage);
the version page reads that version's evaluation report and latest system-test report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from evertune import deploy
from evertune.api.control import version_ref
from evertune.auth import Principal
from evertune.lifecycle import Stage, allowed_targets
from evertune.web.compare import comparison_chart, metric_rows
from evertune.web.render import back, page
from evertune.web.session import check_form

if TYPE_CHECKING:
    from markupsafe import Markup

    from evertune.evaluation.report import EvalReport, SplitReport
    from evertune.registry import AuditRecord, ModelVersion
    from evertune.web.compare import Row
    from evertune.web.deps import Console
    from evertune.workspace import Workspace

KEY_METRICS = 4  # metric columns on /models: the gated metrics first, then the losses
HISTORY_ROWS = 100  # stage moves listed on /deployments
MAX_COMMENT = 2000  # characters of a reason for the audit log, as the API's Comment allows
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # an eval report id is a folder name


@dataclass(frozen=True)
class SplitView:
    """One evaluated split as the version page shows it."""

    split: SplitReport
    rows: list[Row]
    chart: Markup | None  # the main split only: one chart per page keeps it readable


@dataclass(frozen=True)
class Actions:
    """Which forms the version page shows: what the caller's role and the lifecycle allow."""

    approve: bool = False
    force: bool = False  # the approve form carries the admin override (a rejected version)
    reject: bool = False
    promote: bool = False
    retry: bool = False  # the last QA attempt failed because of the environment: rerun it


def add_routes(router: APIRouter, c: Console) -> None:
    ws = c.ws

    @router.get("/models")
    def models_page(request: Request, me: Principal = Depends(c.signed_in)) -> HTMLResponse:  # noqa: B008
        versions = c.versions()
        return page(request, me, "models.html", title="Models", model=ws.config.model.name,
                    versions=versions, metrics=key_metrics(ws, versions))

    @router.get("/models/{version}")
    def model_page(request: Request, version: str,
                   me: Principal = Depends(c.signed_in)) -> HTMLResponse:  # noqa: B008
        reg = c.registry()
        mv = reg.resolve(version_ref(version))
        report, report_problem = eval_report(ws, mv)
        tests, tests_problem = system_test_report(ws, mv)
        actions = allowed_actions(me, mv)
        # deploy.approve refuses while another version sits in QA (one at a time); say so
        # before someone writes a comment for nothing.
        qa = reg.alias_version("qa") if actions.approve else None
        busy = qa is not None and qa.stage is Stage.QA and qa.version != mv.version
        return page(
            request, me, "model.html", title=f"{mv.ref} · {mv.name}", v=mv,
            report=report, report_problem=report_problem, splits=split_views(report),
            tests=tests, tests_problem=tests_problem, actions=actions,
            busy_qa=qa if busy else None, history=reg.audit_log(mv.version, limit=None),
            auto_promote=ws.config.deploy.auto_promote,
        )

    @router.post("/models/{version}/approve")
    def approve(request: Request, version: str, csrf: str = Form(""),  # noqa: B008
                comment: str = Form("", max_length=MAX_COMMENT), force: bool = Form(False),  # noqa: B008
                me: Principal = Depends(c.signed_in)) -> RedirectResponse:  # noqa: B008
        check_form(request, csrf, me, "approve")
        if not comment.strip():
            return back(request, "error", "Approving needs a comment: write in the “Why approve” "
                        "field what makes this version good enough (it goes to the audit log).",
                        to=_version_url(version))
        result = deploy.approve(ws, version_ref(version), me, comment, force=force)
        kind, message = outcome("approve", result)
        return back(request, kind, message, to=f"/models/{result.version}")

    @router.post("/models/{version}/retry")
    def retry_qa(request: Request, version: str, csrf: str = Form(""),  # noqa: B008
                 comment: str = Form("", max_length=MAX_COMMENT),  # noqa: B008
                 me: Principal = Depends(c.signed_in)) -> RedirectResponse:  # noqa: B008
        check_form(request, csrf, me, "approve")
        result = deploy.approve(ws, version_ref(version), me, comment, retry=True)
        kind, message = outcome("approve", result)
        return back(request, kind, message, to=f"/models/{result.version}")

    @router.post("/models/{version}/reject")
    def reject(request: Request, version: str, csrf: str = Form(""),  # noqa: B008
               comment: str = Form("", max_length=MAX_COMMENT),  # noqa: B008
               me: Principal = Depends(c.signed_in)) -> RedirectResponse:  # noqa: B008
        check_form(request, csrf, me, "reject")
        if not comment.strip():
            return back(request, "error", "Rejecting needs a comment: write in the “Why reject” "
                        "field what is wrong with this version (it goes to the audit log).",
                        to=_version_url(version))
        result = deploy.reject(ws, version_ref(version), me, comment)
        kind, message = outcome("reject", result)
        return back(request, kind, message, to=f"/models/{result.version}")

    @router.post("/models/{version}/promote")
    def promote(request: Request, version: str, csrf: str = Form(""),  # noqa: B008
                comment: str = Form("", max_length=MAX_COMMENT),  # noqa: B008
                next: str = Form(""), me: Principal = Depends(c.signed_in)) -> RedirectResponse:  # noqa: A002, B008
        check_form(request, csrf, me, "promote")
        result = deploy.promote(ws, version_ref(version), me, comment)
        kind, message = outcome("promote", result)
        # The form sits on the version page and on /deployments; go back to the one it was on.
        to = "/deployments" if next == "/deployments" else f"/models/{result.version}"
        return back(request, kind, message, to=to)

    @router.get("/deployments")
    def deployments_page(request: Request, me: Principal = Depends(c.signed_in)) -> HTMLResponse:  # noqa: B008
        versions = c.versions()
        by_alias = {alias: v for v in versions for alias in v.aliases}
        moves = deploy.history(ws, limit=None)
        return page(
            request, me, "deployments.html", title="Deployments", model=ws.config.model.name,
            prod=by_alias.get("prod"), qa=by_alias.get("qa"),
            previous=previous_prod(versions, moves),
            in_qa=next((v for v in versions if v.stage is Stage.QA), None),
            retired=[v for v in versions if v.stage is Stage.RETIRED],
            history=moves[:HISTORY_ROWS], more=max(0, len(moves) - HISTORY_ROWS),
            auto_promote=ws.config.deploy.auto_promote,
        )

    @router.post("/deployments/rollback")
    def rollback(request: Request, csrf: str = Form(""),  # noqa: B008
                 comment: str = Form("", max_length=MAX_COMMENT),  # noqa: B008
                 to: str = Form(""), me: Principal = Depends(c.signed_in)) -> RedirectResponse:  # noqa: B008
        check_form(request, csrf, me, "rollback")
        target = version_ref(to.strip(), param="to") if to.strip() else None
        result = deploy.rollback(ws, me, comment, to=target)
        kind, message = outcome("rollback", result)
        return back(request, kind, message, to="/deployments")


# -- what the pages show ---------------------------------------------------------------------
def key_metrics(ws: Workspace, versions: list[ModelVersion]) -> list[str]:
    """The metric columns of /models: gated metrics, then the final losses, that some version
    has in its `metrics` tag (at most KEY_METRICS)."""
    present = {name for v in versions for name in v.metrics}
    wanted = [rule.metric for rule in ws.config.gate.rules] + ["val_loss", "train_loss"]
    return list(dict.fromkeys(m for m in wanted if m in present))[:KEY_METRICS]


def eval_report(ws: Workspace, mv: ModelVersion) -> tuple[EvalReport | None, str | None]:
    """(report, None), or (None, why there is none to show) for the version page."""
    from evertune.evaluation.report import load_report

    if not mv.eval_report:
        return None, (f"{mv.ref} was registered without an evaluation, so there are no metrics "
                      f"to compare; `evertune eval {mv.ref}` evaluates it against PROD and base.")
    if not _SAFE_ID.fullmatch(mv.eval_report):
        return None, f"{mv.ref}'s eval_report tag {mv.eval_report!r} is not a report id."
    path = ws.evals_dir / mv.eval_report / "report.json"
    try:
        return load_report(path), None
    except FileNotFoundError:
        return None, (f"evaluation report {mv.eval_report} of {mv.ref} is missing ({path} does "
                      f"not exist); `evertune eval {mv.ref}` evaluates it again.")
    except (OSError, ValueError) as exc:  # ValidationError is a ValueError
        return None, f"evaluation report {path} could not be read: {_first_line(exc)}"


def split_views(report: EvalReport | None) -> list[SplitView]:
    """Every split of `report`, the main one first and charted."""
    if report is None:
        return []
    main = report.main_split
    others = [s for s in report.splits.values() if s is not main]
    return [SplitView(main, metric_rows(report, main), comparison_chart(report, main)),
            *(SplitView(s, metric_rows(report, s), None) for s in others)]


def system_test_report(
    ws: Workspace, mv: ModelVersion
) -> tuple[deploy.SystemTestReport | None, str | None]:
    """The version's latest QA system-test report (deploy tags its path on the version)."""
    raw = mv.tags.get(deploy.TESTS_REPORT_TAG)
    if not raw:
        return None, None
    folder = (ws.state_dir / deploy.REPORTS_DIR).resolve()
    path = Path(raw).resolve()
    # The tag is only a pointer; read nothing outside the workspace's report folder.
    if not path.is_relative_to(folder):
        return None, f"the system-test report path {raw} is outside {folder}; not shown."
    try:
        return deploy.SystemTestReport.model_validate_json(path.read_text("utf-8")), None
    except FileNotFoundError:
        return None, f"the system-test report {path} no longer exists."
    except (OSError, ValidationError) as exc:
        return None, f"the system-test report {path} could not be read: {_first_line(exc)}"


def allowed_actions(me: Principal, mv: ModelVersion) -> Actions:
    """The forms to show: the caller's role must allow the action and the lifecycle the move.

    Approve also shows for a version left `approved` by an interrupted rollout (approving again
    resumes it), and, with the override, for a rejected version to an admin.
    """
    moves = allowed_targets(mv.stage)
    override = (Stage.APPROVED not in moves and mv.stage is not Stage.APPROVED
                and Stage.APPROVED in allowed_targets(mv.stage, force=True) and me.can("override"))
    resume = mv.stage is Stage.APPROVED
    # qa → approved is the way back after an environment failure, not an approval to offer.
    fresh = Stage.APPROVED in moves and mv.stage is not Stage.QA
    return Actions(
        approve=me.can("approve") and (fresh or resume or override),
        force=override,
        reject=me.can("reject") and Stage.REJECTED in moves,
        promote=me.can("promote") and mv.stage is Stage.QA,
        retry=(me.can("approve") and resume
               and mv.tags.get(deploy.TESTS_TAG) == deploy.TESTS_ERROR),
    )


def previous_prod(versions: list[ModelVersion], moves: list[AuditRecord]) -> ModelVersion | None:
    """What `rollback` returns to: the version most recently retired from prod, if still
    retired (as Registry.previous_prod decides, from data this page already has)."""
    by_number = {v.version: v for v in versions}
    for rec in moves:
        if rec.from_stage == Stage.PROD and rec.to_stage == Stage.RETIRED:
            mv = by_number.get(rec.version)
            if mv is not None and mv.stage is Stage.RETIRED:
                return mv
    return None


def outcome(action: str, result: deploy.DeployResult) -> tuple[str, str]:
    """(flash kind, one-line summary) of a deploy operation, e.g. ("ok", "v3 approved: QA
    system tests passed (8/8), now in PROD"). A rollout the system tests stopped is an error:
    the version did not go where the person asked."""
    v = f"v{result.version}"
    moves = result.moves
    stages = [moves[0].from_stage, *(m.to_stage for m in moves)] if moves else []
    # The stages a version went through; a rollback's message already names both versions.
    trail = f" ({' → '.join(stages)})" if stages and action != "rollback" else ""
    tests = result.system_tests
    if tests is not None and not tests.passed and result.retry:
        return "error", (f"{v}'s QA system tests could not judge it (the environment, not the "
                         f"model): {tests.summary()}; it stays approved, use Retry QA once the "
                         f"machine is less busy{trail}")
    if tests is not None and not tests.passed:
        return "error", (f"{v} did not pass its QA system tests and is now rejected: "
                         f"{tests.summary()}{trail}")
    passed = f"QA system tests passed ({_tally(tests)})" if tests is not None else ""
    if action == "approve":
        if result.stage == Stage.PROD:
            return "ok", f"{v} approved: {passed}, now in PROD{trail}"
        if result.stage == Stage.QA:
            return "ok", (f"{v} approved: {passed}; it stays in QA until promoted "
                          f"(deploy.auto_promote is false){trail}")
    if action == "promote" and result.stage == Stage.PROD:
        return "ok", f"{v} promoted to PROD" + (f" after its {passed}" if passed else "") + trail
    return "ok", result.message + trail


def _tally(tests: deploy.SystemTestReport | None) -> str:
    if tests is None:
        return "not run"
    return f"{sum(1 for r in tests.results if r.passed)}/{len(tests.results)}"


def _version_url(version: str) -> str:
    """The version page for a version reference taken from a URL (only digits get through)."""
    m = re.fullmatch(r"[vV]?(\d+)", version.strip())
    return f"/models/{int(m.group(1))}" if m else "/models"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

