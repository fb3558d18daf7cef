"""Canary rollouts: compare the canary with PROD on live traffic, then promote or roll back.

    evertune promote 4 --canary 10      # 10% of the callers of NAME get v4, the rest PROD
    GET /api/deployments                # the canary, its percent, the live figures

    from evertune.canary import CanaryMonitor, compare
    monitor = CanaryMonitor(ws); monitor.start(); …; monitor.stop()   # in the leader (server.py)
    monitor.check()                     # one decision now: CanaryDecision
    compare(ws, reg.canary(), prod_version).to_dict()

The gateway splits the callers of `NAME` by a stable hash of who asks (evertune.serving.
gateway) and logs the canary's requests with stage `canary`, PROD's with stage `prod`. Every
`deploy.canary.check_seconds` the leader reads the request log since the canary started and,
per arm: requests, error rate, latency p50/p95 (seconds, answered requests), and the share
of answers rated down where feedback came in. Two tests of "the canary is worse": Fisher's
exact test on the error counts and the Mann-Whitney U test on the latencies (scipy), both
one-sided at `alpha`. Then:

- SLO breach (with at least `min_requests` canary requests: an error rate above
  `max_error_rate`, a p95 above `max_p95_latency_s`, an error rate significantly above
  PROD's, or a median `max_latency_ratio` times PROD's and significantly slower) → automatic
  rollback: the version is rejected (qa → rejected, which ends the canary; the audit row
  carries the figures) and every caller is back on PROD. Rejected rather than back to QA:
  real traffic judged the model, and a version left in QA would block the next approval;
  an admin can still override (`evertune approve N --force`).
- `window_seconds` passed, at least `min_requests`, nothing regressed → automatic
  promotion through `deploy.promote` (deploy lock, audit, the previous PROD retired for
  `rollback`), which ends the canary.
- otherwise: keep watching.

Counts are of logged requests: with `serve.request_log_sample` below 1 both arms are thinned
alike, so the comparison holds, but `min_requests` counts logged ones.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import select

from evertune.db import request_log

if TYPE_CHECKING:
    from evertune.registry import CanaryState
    from evertune.workspace import Workspace

log = logging.getLogger("evertune.canary")

ACTOR = "canary-monitor"  # the audit rows' actor of automatic decisions
Outcome = Literal["wait", "promote", "rollback", "none"]


@dataclass
class Arm:
    """One side of the comparison (the canary or PROD) since the canary started."""

    version: str  # "v4"
    requests: int = 0
    errors: int = 0
    error_rate: float | None = None
    p50_s: float | None = None
    p95_s: float | None = None
    rated: int = 0  # answers that got feedback
    rated_down_ratio: float | None = None


@dataclass
class Comparison:
    """The canary against PROD: both arms, the tests, and what is wrong (empty: nothing)."""

    canary: Arm
    prod: Arm
    since: float  # unix seconds: the canary's start
    elapsed_s: float
    error_p_value: float | None = None  # Fisher, one-sided: the canary errs more often
    latency_p_value: float | None = None  # Mann-Whitney U, one-sided: the canary is slower
    breaches: list[str] = field(default_factory=list)  # SLO breaches: roll back
    enough: bool = False  # at least min_requests canary requests
    window_done: bool = False  # window_seconds have passed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for audit reasons and logs."""

        def arm(a: Arm) -> str:
            rate = f"{a.error_rate:.1%}" if a.error_rate is not None else "-"
            p95 = f"{a.p95_s:.3g} s" if a.p95_s is not None else "-"
            return f"{a.version}: {a.requests} requests, {rate} errors, p95 {p95}"

        return f"canary {arm(self.canary)}; prod {arm(self.prod)}"


@dataclass
class CanaryDecision:
    """What one check decided and did."""

    outcome: Outcome
    comparison: Comparison | None = None
    message: str = ""


def compare(ws: Workspace, state: CanaryState, prod_version: int | None) -> Comparison:
    """Both arms' figures and tests from the request log since `state.started_at`.

    compare(ws, Registry(ws).canary(), 3).to_dict()
    """
    cfg = ws.config.deploy.canary
    canary_label, prod_label = f"v{state.version}", f"v{prod_version}" if prod_version else "base"
    t = request_log
    query = select(t.c.id, t.c.version, t.c.stage, t.c.status, t.c.duration_s).where(
        t.c.created_at >= state.started_at, t.c.stage.in_(("canary", "prod"))
    )
    with ws.engine.connect() as conn:
        rows = conn.execute(query).all()
    # The canary arm: requests the split sent to it. PROD's: requests for NAME that stayed on
    # PROD's version (not NAME@vN calls, which the split never touches).
    canary_rows = [r for r in rows if r.stage == "canary" and r.version == canary_label]
    prod_rows = [r for r in rows if r.stage == "prod" and r.version == prod_label]
    ratings = _ratings(ws, {r.id for r in canary_rows + prod_rows}, state.started_at)
    out = Comparison(
        canary=_arm(canary_label, canary_rows, ratings),
        prod=_arm(prod_label, prod_rows, ratings),
        since=state.started_at,
        elapsed_s=max(0.0, time.time() - state.started_at),
    )
    out.enough = out.canary.requests >= cfg.min_requests
    out.window_done = out.elapsed_s >= cfg.window_seconds
    _tests(out, canary_rows, prod_rows)
    if not out.enough:
        return out
    c, p = out.canary, out.prod
    if c.error_rate is not None and c.error_rate > cfg.max_error_rate:
        out.breaches.append(
            f"error rate {c.error_rate:.1%} above deploy.canary.max_error_rate "
            f"{cfg.max_error_rate:.1%} ({c.errors} of {c.requests})"
        )
    if c.p95_s is not None and c.p95_s > cfg.max_p95_latency_s:
        out.breaches.append(
            f"p95 latency {c.p95_s:.3g} s above deploy.canary.max_p95_latency_s "
            f"{cfg.max_p95_latency_s:g} s"
        )
    if (
        out.error_p_value is not None
        and out.error_p_value < cfg.alpha
        and (c.error_rate or 0) > (p.error_rate or 0)
    ):
        out.breaches.append(
            f"error rate {c.error_rate:.1%} significantly above prod's {p.error_rate:.1%} "
            f"(Fisher p={out.error_p_value:.2g} < alpha {cfg.alpha:g})"
        )
    if (
        out.latency_p_value is not None
        and out.latency_p_value < cfg.alpha
        and c.p50_s
        and p.p50_s
        and c.p50_s > cfg.max_latency_ratio * p.p50_s
    ):
        out.breaches.append(
            f"median latency {c.p50_s:.3g} s over {cfg.max_latency_ratio:g}× prod's "
            f"{p.p50_s:.3g} s (Mann-Whitney p={out.latency_p_value:.2g} < alpha {cfg.alpha:g})"
        )
    return out


def _arm(label: str, rows: list[Any], ratings: dict[str, bool]) -> Arm:
    import numpy as np

    arm = Arm(version=label, requests=len(rows))
    arm.errors = sum(1 for r in rows if r.status != "ok")
    arm.error_rate = arm.errors / arm.requests if arm.requests else None
    latencies = [r.duration_s for r in rows if r.status == "ok" and r.duration_s is not None]
    if latencies:
        arm.p50_s, arm.p95_s = (float(x) for x in np.percentile(latencies, [50, 95]))
    rated = [ratings[r.id] for r in rows if r.id in ratings]
    arm.rated = len(rated)
    arm.rated_down_ratio = sum(rated) / len(rated) if rated else None
    return arm


def _tests(out: Comparison, canary_rows: list[Any], prod_rows: list[Any]) -> None:
    """One-sided tests that the canary is worse: Fisher (errors), Mann-Whitney U (latency)."""
    from scipy.stats import fisher_exact, mannwhitneyu

    c, p = out.canary, out.prod
    if c.requests and p.requests:
        table = [[c.errors, c.requests - c.errors], [p.errors, p.requests - p.errors]]
        out.error_p_value = float(fisher_exact(table, alternative="greater").pvalue)
    slow_c = [r.duration_s for r in canary_rows if r.status == "ok" and r.duration_s is not None]
    slow_p = [r.duration_s for r in prod_rows if r.status == "ok" and r.duration_s is not None]
    if len(slow_c) >= 2 and len(slow_p) >= 2:
        out.latency_p_value = float(mannwhitneyu(slow_c, slow_p, alternative="greater").pvalue)


def _ratings(ws: Workspace, ids: set[str], since: float) -> dict[str, bool]:
    """{response id: rated down} from the bucket's feedback; {} when it cannot be read (the
    ratings are a figure to show, never a reason to stop deciding)."""
    if not ids:
        return {}
    from evertune.monitoring.drift import feedback_on

    try:
        return feedback_on(ws, ids, since=since)
    except Exception as exc:  # noqa: BLE001 - an unreachable bucket must not stop the check
        log.warning("canary: could not read feedback: %s", exc)
        return {}


class CanaryMonitor:
    """Decides running canaries in the leader: `check()` once, or `start()` a thread that
    checks every `deploy.canary.check_seconds` until `stop()`.

        monitor = CanaryMonitor(ws); monitor.start(); …; monitor.stop()
    """

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.cfg = ws.config.deploy.canary
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: CanaryDecision | None = None

    def start(self) -> None:
        """Check in a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="evertune-canary", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a decision under way finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.check_seconds):
            try:
                self.last = self.check()
            except Exception:  # never stop watching: the registry may be back next time
                log.exception("canary check failed; retrying in %ss", self.cfg.check_seconds)

    def check(self) -> CanaryDecision:
        """Compare the running canary with PROD once, and promote or roll it back if due."""
        from evertune import deploy
        from evertune.auth import Principal
        from evertune.registry import Registry

        reg = Registry(self.ws)
        state = reg.canary()
        if state is None:
            return CanaryDecision("none", message="no canary is running")
        prod = reg.alias_version("prod")
        cmp = compare(self.ws, state, prod.version if prod else None)
        # The automation acts with the approver's rights, through the same deploy functions
        # (deploy lock, lifecycle checks, audit) a person would use.
        me = Principal(ACTOR, "approver")
        figures = {"comparison": cmp.to_dict()}
        if cmp.breaches:
            reason = (
                f"canary rolled back automatically: {'; '.join(cmp.breaches)} ({cmp.summary()})"
            )
            self._rollback(reg, state, reason, figures)
            log.warning("%s", reason)
            return CanaryDecision("rollback", cmp, reason)
        if cmp.window_done and cmp.enough:
            reason = (
                f"canary promoted automatically after {cmp.elapsed_s:.0f} s "
                f"(deploy.canary.window_seconds {self.cfg.window_seconds:g}) with no "
                f"regression: {cmp.summary()}"
            )
            result = deploy.promote(self.ws, state.version, me, reason, canary_data=figures)
            log.info("%s", result.message)
            return CanaryDecision("promote", cmp, result.message)
        return CanaryDecision("wait", cmp, "watching: " + cmp.summary())

    def _rollback(self, reg: Any, state: CanaryState, reason: str, data: dict[str, Any]) -> None:
        """End the canary (audit row with the figures), then reject the version, under the
        deploy lock so no promote or rollback interleaves."""
        from evertune import deploy
        from evertune.auth import Principal
        from evertune.lifecycle import Stage

        with deploy._locked(self.ws):
            current = reg.canary()
            if current is None or current.version != state.version:
                return  # a person ended or promoted it meanwhile
            # Alias first, so serving sends everybody to PROD before anything else moves.
            reg.end_canary(ACTOR, reason, "canary_rollback", {"outcome": "automatic", **data})
            mv = reg.get_version(state.version)
            moves: list[deploy.Move] = []
            if mv.stage is Stage.QA:
                reg.transition(mv.version, Stage.REJECTED, ACTOR, reason, role="approver")
                moves.append(
                    deploy.Move(
                        version=mv.version,
                        from_stage=mv.stage.value,
                        to_stage=Stage.REJECTED.value,
                        reason=reason,
                    )
                )
            stage = reg.get_version(mv.version).stage.value
        deploy._done(
            self.ws,
            "canary_rollback",
            Principal(ACTOR, "approver"),
            deploy.DeployResult(version=mv.version, stage=stage, moves=moves, message=reason),
        )
