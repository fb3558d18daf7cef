"""Approvals and deployment: approve → QA + system tests → PROD, reject, promote, rollback.

    from evertune import auth, deploy
    me = auth.local_principal(ws)                       # or the API's bearer-token Principal
    deploy.approve(ws, "v3", me, "better on billing tickets")
    # v3: pending → approved → qa (alias qa) → system tests → prod (alias prod, auto_promote)
    deploy.promote(ws, None, me, "QA looks fine")       # with deploy.auto_promote: false
    deploy.rollback(ws, me, "v3 answers in French")     # prod → the previous PROD version
    deploy.promote(ws, 4, me, "real traffic", canary=10) # 10% of callers on v4 (evertune.canary)
    deploy.reject(ws, 4, me, "trained on the wrong export")
    deploy.history(ws)                                  # every stage move, newest first

The CLI (`evertune approve/reject/promote/rollback`) and the control API
(`POST /api/models/{v}/approve`, …) both call these functions: one code path, one set of
checks. Each takes the caller as an `auth.Principal` and checks its role first
(PermissionDenied names the role and who may). Version moves go through
`Registry.transition`, so the lifecycle state machine (evertune.lifecycle) refuses illegal
moves with the allowed ones listed, the `qa`/`prod` aliases that serving follows always agree
with the stages, and every move is an audit row (actor, time, from, to, reason).

System tests (`run_system_tests`) load the version the way serving does
(`models.load_for_inference`: base + adapter, merged) and run smoke prompts from the version's
dataset test split and the golden set through `generation.generate`, the code serving calls,
one prompt at a time so each is timed on its own (a batch would charge every prompt the whole
batch's time). A prompt fails when its completion is empty, degenerate repetition, or slower
than `deploy.system_tests.latency_budget_s`. Two kinds of failure, two outcomes:

- wrong or broken output (empty, degenerate) rejects the version (`qa → rejected`);
- a failure of the environment (a prompt over the latency budget on a busy machine, the model
  could not be loaded, out of memory) says nothing about the model: the version goes back to
  `approved` (`qa → approved`, audited with the report) and `approve(…, retry=True)`
  (`evertune approve N --retry`, `POST /api/models/{v}/retry`, the console's Retry QA) runs
  the tests again.

Either way the report is saved under `.evertune/system-tests/`.

Each operation ends with a webhook event (`model.approve`, `model.promote`, `model.reject`,
`model.rollback`; `notify.webhook_url`, if set) carrying the moves and the outcome.

Deploy operations hold the workspace's deploy lock (`evertune.locks.exclusive`: a Postgres
advisory lock when the state DB is Postgres, so replicas on several hosts queue; a file lock
beside a SQLite state DB) so the CLI, a server and its replicas never interleave two rollouts;
the registry's own checks (one version in QA at a time) stay the last line of defence.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from evertune.auth import Principal, require
from evertune.errors import DataError, LifecycleError, NotFoundError
from evertune.lifecycle import Stage, allowed_targets, check_transition

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from evertune.registry import AuditRecord, ModelVersion, Registry
    from evertune.workspace import Workspace

Source = Literal["test", "validation", "golden", "builtin"]
log = logging.getLogger("evertune.deploy")

REPORTS_DIR = "system-tests"  # under ws.state_dir: one JSON report per system-test run
LOCK_NAME = "deploy"  # evertune.locks.exclusive: deploy.lock beside SQLite, advisory on Postgres
LOCK_TIMEOUT_S = 600.0  # a rollout (model load + smoke prompts) rarely takes longer
TESTS_TAG = "system_tests"  # version tag: pass | fail | error (promote re-runs unless pass)
TESTS_ERROR = "error"  # TESTS_TAG value: the last attempt failed because of the environment
TESTS_REPORT_TAG = "system_tests_report"  # version tag: path of the latest report
# Audit actions of a canary's life (Registry.start_canary/end_canary), shown in `history`.
CANARY_ACTIONS = ("canary_start", "canary_promote", "canary_rollback", "canary_end")

# Output sanity. A completion is degenerate when it has at least this many words and fewer
# than this share of them are distinct ("the the the the …"), or when it is one short unit
# repeated ("!!!!!!!!!!!!", "ababababab"). Thresholds are loose on purpose: a terse but real
# answer ("billing") must pass; only the looping a broken model produces must not.
REPEAT_MIN_WORDS = 8
REPEAT_MIN_DISTINCT = 0.3
REPEAT_MIN_CHARS = 12
REPEAT_MAX_UNIT = 4

# Used only when a version has neither a test split nor a golden set to draw prompts from:
# smoke tests still check that the model loads and answers.
BUILTIN_PROMPTS = (
    "Hello! What can you help me with?",
    "Summarize in one sentence: the order arrived late.",
)


# -- results ---------------------------------------------------------------------------------
class SmokeResult(BaseModel):
    """One smoke prompt: what went in, what came out, how long it took, what was wrong."""

    source: Source
    input: str  # the user-visible input (the templated prompt is `prompt`)
    prompt: str
    output: str
    latency_s: float
    completion_tokens: int
    finish_reason: str
    problems: list[str] = Field(default_factory=list)
    # The latency problem is the machine's, not the model's: kept apart so a slow but correct
    # answer does not reject the version.
    over_budget: bool = False

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def output_ok(self) -> bool:
        """The completion itself is fine (it may still have been too slow)."""
        return len(self.problems) == (1 if self.over_budget else 0)


class SystemTestReport(BaseModel):
    """The outcome of one system-test run against a version (saved as JSON)."""

    version: int
    passed: bool
    started_at: float  # unix seconds
    duration_s: float
    load_s: float | None = None  # time to load base + adapter
    generate_s: float | None = None  # wall time of all prompts (each run and timed on its own)
    max_prompts: int
    max_new_tokens: int
    latency_budget_s: float
    results: list[SmokeResult] = Field(default_factory=list)
    failures: list[str] = Field(default_factory=list)  # one line per failed check
    notes: list[str] = Field(default_factory=list)
    error: str | None = None  # the model could not be loaded or run at all
    # True when the tests failed only for reasons outside the model (latency over budget,
    # load error, out of memory): the version is not rejected, the tests can be retried.
    environment: bool = False
    path: str | None = None  # where this report is saved

    def summary(self) -> str:
        """One line for audit reasons and CLI output."""
        n = len(self.results)
        bad = sum(1 for r in self.results if not r.passed)
        if self.error:
            return f"error: {self.error}"
        if self.environment:
            first = "; ".join(self.failures[:2])
            more = f"; +{len(self.failures) - 2} more" if len(self.failures) > 2 else ""
            return (f"{bad} of {n} smoke prompt(s) over the latency budget with correct-looking "
                    f"output (the machine, not the model): {first}{more}")
        if self.passed:
            worst = max((r.latency_s for r in self.results), default=0.0)
            return (f"{n} smoke prompt(s) passed, slowest {worst:.3g} s "
                    f"(budget {self.latency_budget_s:g} s)")
        first = "; ".join(self.failures[:3])
        more = f"; +{len(self.failures) - 3} more" if len(self.failures) > 3 else ""
        return f"{bad} of {n} smoke prompt(s) failed: {first}{more}"


class Move(BaseModel):
    """One stage change made by a deploy operation."""

    version: int
    from_stage: str
    to_stage: str
    reason: str


class DeployResult(BaseModel):
    """What a deploy operation did: the moves made, where the version ended, the tests."""

    version: int
    stage: str  # the version's stage at the end
    moves: list[Move] = Field(default_factory=list)
    system_tests: SystemTestReport | None = None
    # True when the system tests failed because of the environment: the version stays
    # approved and `approve(…, retry=True)` reruns them.
    retry: bool = False
    message: str  # one line for the person who asked


class Deployments(BaseModel):
    """Which versions the stage aliases point at now, and what rollback would return to."""

    model: str
    prod: dict[str, Any] | None
    qa: dict[str, Any] | None
    previous_prod: dict[str, Any] | None
    auto_promote: bool
    # The running canary: version, percent, started_at, actor and `comparison` (the live
    # figures, evertune.canary.Comparison); None when none runs.
    canary: dict[str, Any] | None = None


# -- public operations -----------------------------------------------------------------------
def approve(
    ws: Workspace,
    version: int | str,
    actor: Principal,
    comment: str,
    *,
    force: bool = False,
    retry: bool = False,
) -> DeployResult:
    """Approve a version and roll it out: approved → qa → system tests → prod or rejected.

        deploy.approve(ws, "v3", me, "better on billing tickets")
        deploy.approve(ws, "v3", me, "", retry=True)   # rerun QA after an environment failure

    Needs the approve permission (approver, admin) and a comment (the audit log's why).
    `force=True` lets an admin approve a version the quality gate or the system tests
    rejected (the override is on the record). Without `deploy.auto_promote` the version stops
    in QA after passing its tests; `promote` finishes the job. A version left `approved` by
    an interrupted rollout, or by system tests that failed because of the environment, is
    rolled out again by approving it once more; `retry=True` says that is what is meant
    (refused for a version that is not `approved`) and needs no new comment.
    """
    require(actor, "approve")
    if force:
        require(actor, "override")
    if retry and not (comment or "").strip():
        comment = f"retry of the QA system tests by {actor.name}"
    reason = _comment(comment, "approving")
    with _locked(ws):
        reg = _registry(ws)
        mv = reg.resolve(version)
        moves: list[Move] = []
        if retry and mv.stage is not Stage.APPROVED:
            raise LifecycleError(
                f"version {mv.version} is {mv.stage.value}; --retry reruns the QA system tests "
                f"of an approved version whose last attempt failed because of the environment "
                f"(see `evertune audit`); " + _approve_hint(mv.version, mv.stage)
            )
        if mv.stage is Stage.QA:
            # qa → approved is the lifecycle's way back after an environment failure, not a
            # fresh approval: a version in QA is promoted or rejected.
            raise LifecycleError(
                f"version {mv.version} is already in qa; promote it (`evertune promote "
                f"v{mv.version}`) or reject it (`evertune reject {mv.version} -m WHY`)"
            )
        if mv.stage is not Stage.APPROVED:
            # Check both rules before moving anything, so a refusal leaves no half-done state.
            check_transition(mv.stage, Stage.APPROVED, version=mv.version, force=force,
                             role=actor.role)
            _check_qa_free(reg, mv.version)
            _move(reg, mv, Stage.APPROVED, actor, reason, moves, force=force)
        else:
            _check_qa_free(reg, mv.version)
        return _done(ws, "approve", actor, _rollout(ws, reg, mv.version, actor, reason, moves))


def _approve_hint(version: int, stage: Stage) -> str:
    if stage is Stage.PENDING:
        return f"approve it with `evertune approve {version} -m WHY`"
    if stage is Stage.REJECTED:
        return (f"an admin may override that with `evertune approve {version} -m WHY --force` "
                '(API: "force": true)')
    return "there is nothing to retry"


def reject(ws: Workspace, version: int | str, actor: Principal, comment: str) -> DeployResult:
    """Reject a pending version (or one approved and waiting for a QA retry, or one in QA): it
    can then never be deployed without an admin override.

        deploy.reject(ws, 4, me, "trained on the wrong export")
    """
    require(actor, "reject")
    reason = _comment(comment, "rejecting")
    with _locked(ws):
        reg = _registry(ws)
        mv = reg.resolve(version)
        moves: list[Move] = []
        _move(reg, mv, Stage.REJECTED, actor, reason, moves)
        return _done(ws, "reject", actor, DeployResult(
            version=mv.version, stage=Stage.REJECTED.value, moves=moves,
            message=f"v{mv.version} rejected: {reason}"))


def promote(
    ws: Workspace,
    version: int | str | None,
    actor: Principal,
    comment: str = "",
    *,
    canary: int | None = None,
    canary_data: dict[str, Any] | None = None,
) -> DeployResult:
    """Promote the version in QA (or `version`, which must be in QA) to PROD.

        deploy.promote(ws, None, me, "QA looks fine")
        deploy.promote(ws, 3, me, "try it on real traffic", canary=10)   # 10% of callers first

    Used when `deploy.auto_promote` is false. If the version's system tests have not passed
    (an interrupted rollout), they run first: bad output rejects it instead, a failure of the
    environment sends it back to approved for `approve(…, retry=True)`. With `canary`, see
    `start_canary`; without it during a canary, the canary version is promoted at once and
    the canary ends (`canary_data`: the comparison figures for the audit row, from
    evertune.canary's automatic promotion).
    """
    if canary is not None:
        return start_canary(ws, version, actor, canary, comment)
    require(actor, "promote")
    with _locked(ws):
        reg = _registry(ws)
        if version is None:
            mv = reg.alias_version("qa")
            if mv is None or mv.stage is not Stage.QA:
                raise LifecycleError(
                    "no version is in qa, so there is nothing to promote; approve a pending "
                    "version first (`evertune approve VERSION -m WHY`)"
                )
        else:
            mv = reg.resolve(version)
        if mv.stage is not Stage.QA:
            allowed = ", ".join(t.value for t in allowed_targets(mv.stage)) or "none"
            raise LifecycleError(
                f"version {mv.version} is {mv.stage.value}; only a version in qa can be promoted "
                f"to prod (allowed from {mv.stage.value}: {allowed})"
            )
        moves: list[Move] = []
        report: SystemTestReport | None = None
        if mv.tags.get(TESTS_TAG) != "pass":
            report = _system_tests(ws, reg, mv.version)
            if not report.passed:
                return _done(ws, "promote", actor,
                             _tests_failed(ws, reg, mv.version, actor, report, moves))
        reason = comment.strip() or f"promoted to prod by {actor.name}"
        trial = reg.canary()
        _move(reg, reg.get_version(mv.version), Stage.PROD, actor, reason, moves)
        message = f"v{mv.version} is now in prod"
        if trial is not None and trial.version == mv.version:
            # Registry.transition already dropped the alias (a version leaving QA ends its
            # trial); this row says how the canary ended and with which figures.
            reg.end_canary(actor.name, reason, "canary_promote",
                           {"outcome": "promoted", **(canary_data or {})}, state=trial)
            message += f" (its {trial.percent}% canary ended: all traffic on v{mv.version})"
        return _done(ws, "promote", actor, DeployResult(
            version=mv.version, stage=Stage.PROD.value, moves=moves, system_tests=report,
            message=message))


def rollback(
    ws: Workspace, actor: Principal, comment: str = "", *, to: int | str | None = None
) -> DeployResult:
    """Point PROD back at the previous PROD version (or at retired version `to`).

        deploy.rollback(ws, me, "v5 answers in French")

    The version now in prod is retired (it may come back the same way). Refused, with the
    reason, when nothing was ever retired from prod.
    """
    require(actor, "rollback")
    with _locked(ws):
        reg = _registry(ws)
        trial = reg.canary()
        if trial is not None and to is None:
            # The last deploy step was starting the canary: undoing it sends every caller
            # back to PROD, which never moved. The version stays in QA for a person to
            # promote, retry as a canary or reject (the automatic rollback rejects it).
            reason = comment.strip() or f"canary ended by {actor.name}"
            reg.end_canary(actor.name, reason, "canary_rollback", {"outcome": "manual"})
            prod = reg.alias_version("prod")
            return _done(ws, "rollback", actor, DeployResult(
                version=trial.version, stage=Stage.QA.value,
                message=(f"canary of v{trial.version} ended: all traffic back on "
                         f"{f'v{prod.version}' if prod else 'the base model'} (prod); "
                         f"v{trial.version} stays in qa: `evertune promote v{trial.version}` "
                         f"or `evertune reject {trial.version} -m WHY`")))
        current = reg.alias_version("prod")
        target = reg.resolve(to) if to is not None else reg.previous_prod()
        if target is None:
            where = f"v{current.version} is in prod" if current else "nothing is in prod"
            raise LifecycleError(
                f"there is no previous PROD version to roll back to ({where}, and no version "
                "was ever retired from prod)"
            )
        if target.stage is not Stage.RETIRED:
            raise LifecycleError(
                f"version {target.version} is {target.stage.value}; rollback returns prod to a "
                "retired version (one that was in prod before)"
            )
        was = f"v{current.version}" if current else "nothing"
        reason = comment.strip() or f"rollback by {actor.name}"
        moves: list[Move] = []
        _move(reg, target, Stage.PROD, actor, f"{reason} (rollback from {was})", moves)
        if current is not None:
            # Registry.transition retired the old prod version first (and audited it).
            moves.insert(0, Move(version=current.version, from_stage=Stage.PROD.value,
                                 to_stage=Stage.RETIRED.value,
                                 reason=f"replaced by version {target.version}"))
        return _done(ws, "rollback", actor, DeployResult(
            version=target.version, stage=Stage.PROD.value, moves=moves,
            message=f"prod rolled back from {was} to v{target.version}"))


def history(ws: Workspace, limit: int | None = 100) -> list[AuditRecord]:
    """Every stage move (approve, qa, prod, retire, reject, rollback), newest first.

        for rec in deploy.history(ws): print(rec.version, rec.from_stage, rec.to_stage, rec.actor)
    """
    reg = _registry(ws)
    # Registrations and custom aliases are in the same table; a deploy history is the moves.
    rows = reg.audit_log(limit=None)
    moves = [r for r in rows if r.action == "transition" or r.action in CANARY_ACTIONS]
    return moves if limit is None else moves[:limit]


def current(ws: Workspace) -> Deployments:
    """What PROD and QA serve now, and what `rollback` would return to.

        deploy.current(ws).prod["version"]
    """
    reg = _registry(ws)
    prod, qa, prev = reg.alias_version("prod"), reg.alias_version("qa"), reg.previous_prod()
    trial = reg.canary()
    live: dict[str, Any] | None = None
    if trial is not None:
        from evertune.canary import compare

        # The figures the leader's monitor decides on, computed now from the request log.
        live = {**trial.to_dict(),
                "comparison": compare(ws, trial, prod.version if prod else None).to_dict()}
    return Deployments(
        model=reg.name,
        prod=prod.to_dict() if prod else None,
        qa=qa.to_dict() if qa else None,
        previous_prod=prev.to_dict() if prev else None,
        auto_promote=ws.config.deploy.auto_promote,
        canary=live,
    )


def start_canary(
    ws: Workspace, version: int | str | None, actor: Principal, percent: int, comment: str = ""
) -> DeployResult:
    """Give the QA version (or `version`, in QA with passed system tests) `percent`% of the
    callers of `NAME` while PROD keeps the rest.

        deploy.start_canary(ws, 3, me, 10, "first real traffic")   # evertune promote 3 --canary 10

    The `canary` alias points at it and the registered model's tags hold the percent and the
    start (evertune.registry.CanaryState); the gateway follows them. The leader's canary
    monitor (evertune.canary) promotes it after `deploy.canary.window_seconds` or rolls it
    back on an SLO breach; `promote` (without canary) finishes it at once, `rollback` ends it.
    """
    require(actor, "promote")
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 99:
        raise LifecycleError(
            f"canary percent must be a whole number from 1 to 99, got {percent!r}; e.g. "
            f"`evertune promote v3 --canary 10` (use `evertune promote v3` for all traffic)"
        )
    with _locked(ws):
        reg = _registry(ws)
        running = reg.canary()
        if running is not None:
            raise LifecycleError(
                f"a canary is already running: v{running.version} at {running.percent}% since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(running.started_at))}; end it "
                f"with `evertune rollback` (all traffic back to prod) or finish it with "
                f"`evertune promote v{running.version}`"
            )
        if version is None:
            mv = reg.alias_version("qa")
            if mv is None or mv.stage is not Stage.QA:
                raise LifecycleError(
                    "no version is in qa, so there is nothing to try as a canary; approve a "
                    "pending version first (`evertune approve VERSION -m WHY`, with "
                    "deploy.auto_promote: false so it stops in qa)"
                )
        else:
            mv = reg.resolve(version)
        if mv.stage is not Stage.QA:
            raise LifecycleError(
                f"version {mv.version} is {mv.stage.value}; only a version in qa whose system "
                f"tests passed can be a canary (approve it with deploy.auto_promote: false "
                f"so it stops in qa)"
            )
        tests = mv.tags.get(TESTS_TAG)
        if tests != "pass":
            raise LifecycleError(
                f"version {mv.version}'s system tests have not passed ({TESTS_TAG}: "
                f"{tests or 'never run'}); `evertune promote v{mv.version}` runs them and "
                f"promotes, or rerun them with `evertune approve {mv.version} --retry`"
            )
        prod = reg.alias_version("prod")
        if prod is None:
            raise LifecycleError(
                f"nothing is in prod for the canary of v{mv.version} to be compared with; "
                f"promote it outright (`evertune promote v{mv.version}`)"
            )
        reason = comment.strip() or f"canary at {percent}% started by {actor.name}"
        reg.start_canary(mv.version, percent, actor.name, reason)
        cfg = ws.config.deploy.canary
        return _done(ws, "canary", actor, DeployResult(
            version=mv.version, stage=Stage.QA.value,
            message=(f"v{mv.version} is a canary: {percent}% of callers get it, the rest stay "
                     f"on v{prod.version} (prod); it is promoted after "
                     f"{cfg.window_seconds:g} s with at least {cfg.min_requests} requests and "
                     f"no regression, rolled back on an SLO breach; `evertune promote "
                     f"v{mv.version}` finishes it now, `evertune rollback` ends it")))


# -- system tests ----------------------------------------------------------------------------
def run_system_tests(ws: Workspace, version: int | str) -> SystemTestReport:
    """Smoke-test a registered version the way serving will run it; never raises for a model
    that fails (the report says why), only for a version that does not exist.

        report = deploy.run_system_tests(ws, 3)
        report.passed, report.summary(), report.failures

    Prompts: up to `deploy.system_tests.max_prompts`, drawn (seeded by the dataset id) from the
    golden set and the version's dataset test split (validation when test is empty), each
    through `generation.generate` with `max_new_tokens` from the same section. Checks per
    prompt: a non-empty completion, no degenerate repetition, latency within
    `latency_budget_s`. The report is saved under `.evertune/system-tests/`.
    """
    reg = _registry(ws)
    mv = reg.resolve(version)
    return _system_tests(ws, reg, mv.version)


def _system_tests(ws: Workspace, reg: Registry, version: int) -> SystemTestReport:
    """Run the tests and record the outcome on the version (tags read by `promote`)."""
    report = _run_tests(ws, reg, version)
    _tag_tests(reg, version, report)
    return report


def _run_tests(ws: Workspace, reg: Registry, version: int) -> SystemTestReport:
    from evertune.facts import folder_base
    from evertune.generation import generate
    from evertune.models import load_for_inference, load_tokenizer

    cfg = ws.config.deploy.system_tests
    started = time.time()
    report = SystemTestReport(version=version, passed=False, started_at=started, duration_s=0.0,
                              max_prompts=cfg.max_prompts, max_new_tokens=cfg.max_new_tokens,
                              latency_budget_s=cfg.latency_budget_s)
    model = None
    try:
        mv = reg.get_version(version)
        # The version's own base (its facts), never the live model.base.
        artifact = reg.version_artifact_path(version)
        base = folder_base(artifact, ws.models_dir, mv.base_model or ws.config.model.base,
                           what=f"v{version}")
        tokenizer = load_tokenizer(base)
        records, notes = _smoke_records(ws, mv, cfg.max_prompts)
        report.notes += notes
        items = [_smoke_prompt(src, rec, tokenizer) for src, rec in records]
        loaded = time.perf_counter()
        model = load_for_inference(base, artifact)
        report.load_s = round(time.perf_counter() - loaded, 3)
        generating = time.perf_counter()
        for source, shown, prompt in items:
            # One prompt per call: its latency is its own time, as one serving request's
            # would be. In a batch every row was charged the whole batch's time, so on a busy
            # machine (a training run beside us) correct answers went over budget.
            [out] = generate(model, tokenizer, [prompt], max_new_tokens=cfg.max_new_tokens,
                             temperature=0.0, batch_size=1)
            problems = _sanity(out.text)
            slow = out.latency_s > cfg.latency_budget_s
            if slow:
                problems.append(
                    f"took {out.latency_s:.3g} s, over the latency budget "
                    f"{cfg.latency_budget_s:g} s (deploy.system_tests.latency_budget_s)"
                )
            report.results.append(SmokeResult(
                source=source, input=shown, prompt=prompt, output=out.text,
                latency_s=round(out.latency_s, 6), completion_tokens=out.completion_tokens,
                finish_reason=out.finish_reason, problems=problems, over_budget=slow))
        report.generate_s = round(time.perf_counter() - generating, 6)
        report.failures = [f"{r.source} prompt {r.input[:40]!r}: {p}"
                           for r in report.results for p in r.problems]
        report.passed = not report.failures
        # Only wrong or broken output is the model's fault; slowness alone is the machine's.
        report.environment = not report.passed and all(r.output_ok for r in report.results)
    except Exception as exc:  # noqa: BLE001 - any failure to load or generate fails the tests
        # A model that cannot be loaded or run (missing artifact, out of memory, a busy GPU)
        # has not been judged: the failure is the environment's, so the version is not
        # rejected and the tests can be retried once it is fixed. The traceback goes to the
        # log for the bug hunt.
        log.warning("system tests of version %s could not run", version, exc_info=True)
        report.error = f"{type(exc).__name__}: {exc}"
        report.failures = [report.error]
        report.passed = False
        report.environment = True
    finally:
        del model
        gc.collect()  # a model is hundreds of MB; do not keep it until the next collection
    report.duration_s = round(time.time() - started, 3)
    report.path = str(_save_report(ws, report))
    return report


def _smoke_records(
    ws: Workspace, mv: ModelVersion, limit: int
) -> tuple[list[tuple[Source, dict[str, Any]]], list[str]]:
    """(source, record) pairs: golden first (frozen, always meaningful), then the test split."""
    from evertune.data.store import get_dataset, load_golden

    notes: list[str] = []
    golden = load_golden(ws) or []
    split_name: Source = "test"
    split: list[dict[str, Any]] = []
    seed = mv.dataset or f"v{mv.version}"
    if mv.dataset:
        try:
            ds = get_dataset(ws, mv.dataset)
        except NotFoundError:
            notes.append(f"dataset {mv.dataset} of v{mv.version} is not in this workspace; "
                         "smoke prompts come from the golden set only")
        else:
            split = ds.records("test")
            if not split:
                split_name, split = "validation", ds.records("validation")
    # Half the budget for the golden set, the rest (and whatever golden leaves) for the split.
    n_golden = min(len(golden), max(limit - len(split), (limit + 1) // 2))
    chosen: list[tuple[Source, dict[str, Any]]] = [
        ("golden", r) for r in _sample(golden, n_golden, seed)
    ]
    chosen += [(split_name, r) for r in _sample(split, limit - len(chosen), seed)]
    if not chosen:
        notes.append("no test split and no golden set: used built-in prompts (they check that "
                     "the model loads and answers, not what it knows)")
        chosen = [("builtin", {"input": p, "output": ""}) for p in BUILTIN_PROMPTS[:limit]]
    return chosen, notes


def _sample(records: list[dict[str, Any]], n: int, seed: str) -> list[dict[str, Any]]:
    # Seeded by the dataset id: re-running the tests on a version uses the same prompts.
    if n <= 0:
        return []
    if len(records) <= n:
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def _smoke_prompt(
    source: Source, record: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> tuple[Source, str, str]:
    """(source, shown input, templated prompt) for one record, templated as in training."""
    from evertune.data.formats import detect_format
    from evertune.data.templating import to_example, to_preference

    fmt = detect_format(record)
    if fmt == "text":
        # Continued-pretraining text has no prompt: continue its first half.
        words = record["text"].split()
        head = " ".join(words[: max(1, len(words) // 2)])
        return source, head, head
    if fmt == "preference":
        return source, record["prompt"], to_preference(record, tokenizer).prompt
    if fmt is None:
        raise DataError(f"{source} record {str(record)[:80]} has no known format")
    prompt = to_example(record, tokenizer).prompt
    if fmt == "input_output":
        shown = record["input"]
    elif fmt == "chat":
        users = [m["content"] for m in record["messages"] if m.get("role") == "user"]
        shown = users[-1] if users else prompt
    else:
        shown = record["prompt"]
    return source, shown, prompt


def _sanity(text: str) -> list[str]:
    """Problems with one completion's text: empty, or degenerate repetition."""
    stripped = text.strip()
    if not stripped:
        return [f"empty output ({text!r})" if text else "empty output"]
    words = stripped.split()
    if len(words) >= REPEAT_MIN_WORDS and len(set(words)) / len(words) < REPEAT_MIN_DISTINCT:
        return [f"degenerate repetition: {len(set(words))} distinct of {len(words)} words "
                f"({stripped[:40]!r}…)"]
    compact = "".join(words)
    if len(compact) >= REPEAT_MIN_CHARS:
        for k in range(1, REPEAT_MAX_UNIT + 1):
            unit = compact[:k]
            if (unit * (len(compact) // k + 1))[: len(compact)] == compact:
                return [f"degenerate repetition: {unit!r} repeated ({stripped[:40]!r})"]
    return []


def _save_report(ws: Workspace, report: SystemTestReport) -> Path:
    folder = ws.state_dir / REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(report.started_at))
    path = folder / f"v{report.version}-{stamp}-{int(report.started_at * 1000) % 1000:03d}.json"
    report.path = str(path)
    path.write_text(report.model_dump_json(indent=2), "utf-8")
    return path


# -- the rollout ----------------------------------------------------------------------------
def _rollout(
    ws: Workspace, reg: Registry, version: int, actor: Principal, reason: str, moves: list[Move]
) -> DeployResult:
    """approved → qa → system tests → prod (auto_promote) | stays in qa | rejected."""
    mv = reg.get_version(version)
    _move(reg, mv, Stage.QA, actor, f"rollout to QA after approval ({reason})", moves)
    report = _system_tests(ws, reg, version)
    if not report.passed:
        return _tests_failed(ws, reg, version, actor, report, moves)
    if ws.config.deploy.auto_promote:
        _move(reg, reg.get_version(version), Stage.PROD, actor,
              f"system tests passed ({report.summary()}); deploy.auto_promote", moves)
        return DeployResult(version=version, stage=Stage.PROD.value, moves=moves,
                            system_tests=report,
                            message=f"v{version} passed its system tests and is now in prod")
    return DeployResult(
        version=version, stage=Stage.QA.value, moves=moves, system_tests=report,
        message=(f"v{version} passed its system tests and is in qa; deploy.auto_promote is "
                 f"false, so promote it with `evertune promote v{version}`"),
    )


def _done(ws: Workspace, action: str, actor: Principal, result: DeployResult) -> DeployResult:
    """Tell the webhook (notify.webhook_url, if set) what a deploy operation did."""
    from evertune import notify

    notify.send(ws, {
        "event": f"model.{action}", "model": ws.config.model.name, "version": result.version,
        "stage": result.stage, "actor": actor.name, "text": result.message,
        "moves": [m.model_dump() for m in result.moves],
        "system_tests": result.system_tests.summary() if result.system_tests else None,
    })
    return result


def _tests_failed(
    ws: Workspace,
    reg: Registry,
    version: int,
    actor: Principal,
    report: SystemTestReport,
    moves: list[Move],
) -> DeployResult:
    """Reject the version for bad output; send it back to approved for an environment failure."""
    if report.environment:
        return _attempt_failed(reg, version, actor, report, moves)
    reason = f"system tests failed: {report.summary()}; report {report.path}"
    _move(reg, reg.get_version(version), Stage.REJECTED, actor, reason, moves)
    return DeployResult(version=version, stage=Stage.REJECTED.value, moves=moves,
                        system_tests=report, message=f"v{version} rejected: {reason}")


def _attempt_failed(
    reg: Registry, version: int, actor: Principal, report: SystemTestReport, moves: list[Move]
) -> DeployResult:
    """qa → approved: the QA attempt failed for a reason outside the model. It is on the
    record (an audit row naming the report, the `system_tests=error` tag) and can be retried."""
    retry = f"`evertune approve {version} --retry`"
    reason = (f"QA attempt failed because of the environment, not the model: "
              f"{report.summary()}; report {report.path}; the version stays approved, "
              f"rerun the tests with {retry}")
    _move(reg, reg.get_version(version), Stage.APPROVED, actor, reason, moves)
    _drop_qa_alias(reg, version)
    return DeployResult(
        version=version, stage=Stage.APPROVED.value, moves=moves, system_tests=report,
        retry=True,
        message=(f"v{version} stays approved: its QA system tests could not judge it "
                 f"({report.summary()}); once the machine is less busy or the fault is fixed, "
                 f"rerun them with {retry} (API: POST /api/models/{version}/retry)"),
    )


def _drop_qa_alias(reg: Registry, version: int) -> None:
    # The `qa` alias follows the stage: a version sent back to approved no longer holds QA.
    # (Registry.transition drops it for rejected; approved is a move it does not special-case.)
    if "qa" in reg.get_version(version).aliases:
        reg.client.delete_registered_model_alias(reg.name, "qa")


def _tag_tests(reg: Registry, version: int, report: SystemTestReport) -> None:
    # Tags let `promote` (and the console) see whether this version's tests passed.
    client, name = reg.client, reg.name
    value = "pass" if report.passed else TESTS_ERROR if report.environment else "fail"
    client.set_model_version_tag(name, str(version), TESTS_TAG, value)
    if report.path:
        client.set_model_version_tag(name, str(version), TESTS_REPORT_TAG, report.path)


def _move(
    reg: Registry,
    mv: ModelVersion,
    target: Stage,
    actor: Principal,
    reason: str,
    moves: list[Move],
    *,
    force: bool = False,
) -> None:
    reg.transition(mv.version, target, actor.name, reason, force=force, role=actor.role)
    moves.append(Move(version=mv.version, from_stage=mv.stage.value, to_stage=target.value,
                      reason=reason))


def _check_qa_free(reg: Registry, version: int) -> None:
    qa = reg.alias_version("qa")
    if qa is not None and qa.stage is Stage.QA and qa.version != version:
        raise LifecycleError(
            f"version {qa.version} is still in qa; promote it (`evertune promote v{qa.version}`) "
            f"or reject it before approving version {version}"
        )


def _comment(comment: str | None, doing: str) -> str:
    text = (comment or "").strip()
    if not text:
        raise LifecycleError(
            f"{doing} a version needs a comment saying why (it goes to the audit log), "
            "e.g. -m 'better on billing tickets'"
        )
    return text


def _registry(ws: Workspace) -> Registry:
    from evertune.registry import Registry

    return Registry(ws)


@contextlib.contextmanager
def _locked(ws: Workspace, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Serialise deploy operations of this workspace across processes and hosts (CLI, server
    replicas): evertune.locks.exclusive, an advisory lock on a Postgres state DB."""
    from evertune.locks import exclusive

    def busy(waited: float) -> LifecycleError:
        return LifecycleError(
            f"another deploy operation on this workspace has held the deploy lock for over "
            f"{waited:g} s; wait for it or check `evertune audit`"
        )

    with exclusive(ws, LOCK_NAME, timeout, busy):
        yield
