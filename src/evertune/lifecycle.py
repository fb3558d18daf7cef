"""The model-version lifecycle: a state per registered version and the moves allowed between them.

    from evertune.lifecycle import Stage, check_transition
    check_transition(Stage.PENDING, Stage.APPROVED, version=3)   # fine
    check_transition("rejected", "qa", version=3)
    # LifecycleError: version 3 is rejected; it cannot move to qa; allowed: none (a rejected
    # version can only be approved with an admin override: `evertune approve 3 --force`
    # (API: "force": true) by a user with the admin role)

`Registry.transition` (registry.py) calls `check_transition` before it touches MLflow, so every
path that moves a version (CLI, control API, deploy, pipeline) obeys the same rules:

    pending ──▶ approved ──▶ qa ──▶ prod ──▶ retired
       │           ▲          │       ▲          │
       │           └──────────┤       └──────────┘ rollback (retired → prod)
       │                      │  qa → approved: the QA attempt failed because of the
       │                      │  environment (latency, load error, out of memory), not the
       │                      │  model; `evertune approve N --retry` runs it again
       │                      │  (or a person rejects the approved version meanwhile)
       └──▶ rejected ◀────────┘
              │
              └──▶ approved   only with an admin override (`evertune approve N --force`,
                              role admin)

A version registered after a failed quality gate starts in `rejected` (`initial_stage`), one
whose gate was inconclusive (too few examples to tell) in `pending` with the warning; an
admin may still approve it, on purpose and on the record. Each stage maps to the MLflow tag
`approval_status` that the architecture names (`PendingManualApproval` | `Approved` |
`Rejected`); the finer-grained state is kept in the `stage` tag.
"""

from __future__ import annotations

from enum import StrEnum

from evertune.errors import LifecycleError

ADMIN_ROLE = "admin"


class Stage(StrEnum):
    """Where a registered model version stands. The value is what the `stage` tag stores."""

    PENDING = "pending"  # registered, waiting for a person to approve or reject it
    APPROVED = "approved"  # approved, not yet deployed to QA
    QA = "qa"  # serving on the QA stage; system tests decide prod or rejected
    PROD = "prod"  # serving production traffic (exactly one version at a time)
    RETIRED = "retired"  # was in prod, replaced; can come back by rollback
    REJECTED = "rejected"  # gate failed, a person rejected it, or QA system tests failed


class ApprovalStatus(StrEnum):
    """The MLflow `approval_status` tag, as the managed-cloud counterpart spells it."""

    PENDING = "PendingManualApproval"
    APPROVED = "Approved"
    REJECTED = "Rejected"


TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.PENDING: frozenset({Stage.APPROVED, Stage.REJECTED}),
    # approved → rejected: a version waiting for a QA retry can still be turned down.
    Stage.APPROVED: frozenset({Stage.QA, Stage.REJECTED}),
    # qa → approved: system tests could not judge the model (a busy machine, a load error);
    # the version goes back to wait for a retry instead of being rejected for good.
    Stage.QA: frozenset({Stage.APPROVED, Stage.PROD, Stage.REJECTED}),
    Stage.PROD: frozenset({Stage.RETIRED}),
    Stage.RETIRED: frozenset({Stage.PROD}),  # rollback
    Stage.REJECTED: frozenset(),
}
"""The moves anyone with the right to move versions may make."""

OVERRIDES: dict[Stage, frozenset[Stage]] = {
    Stage.REJECTED: frozenset({Stage.APPROVED}),
}
"""Extra moves allowed only with `force=True` by the admin role (a gate can be wrong)."""

# Shown next to a target in error messages, so the reader knows which command that move is.
_NOTES: dict[tuple[Stage, Stage], str] = {
    (Stage.RETIRED, Stage.PROD): "rollback",
    (Stage.QA, Stage.REJECTED): "system tests failed",
    (Stage.QA, Stage.APPROVED): "QA attempt failed for a reason outside the model; retry",
    (Stage.PROD, Stage.RETIRED): "replaced or withdrawn",
}

# Order used whenever stages are listed, so messages read in lifecycle order.
_ORDER = list(Stage)


def approval_status(stage: Stage | str) -> ApprovalStatus:
    """The `approval_status` tag for a stage: everything past approval counts as Approved."""
    stage = parse_stage(stage, "stage")
    if stage is Stage.PENDING:
        return ApprovalStatus.PENDING
    if stage is Stage.REJECTED:
        return ApprovalStatus.REJECTED
    return ApprovalStatus.APPROVED


def stage_from_status(status: str | None) -> Stage:
    """Best guess of the stage for a version that only has an `approval_status` tag.

    Versions registered by hand in the MLflow UI have no `stage` tag; Approved ones are
    treated as `approved` (not deployed), since nothing recorded a deployment.
    """
    if status == ApprovalStatus.APPROVED:
        return Stage.APPROVED
    if status == ApprovalStatus.REJECTED:
        return Stage.REJECTED
    return Stage.PENDING


def initial_stage(gate_verdict: str | None) -> Stage:
    """The stage a new version is registered in: `rejected` when the quality gate failed;
    `pending` otherwise, including an `inconclusive` gate (gate.on_inconclusive=review: a
    person decides, with the gate's warning in the version's gate_reasons)."""
    return Stage.REJECTED if gate_verdict == "fail" else Stage.PENDING


def allowed_targets(current: Stage | str, *, force: bool = False) -> list[Stage]:
    """The stages `current` may move to, in lifecycle order (overrides included when `force`)."""
    current = parse_stage(current, "stage")
    targets = set(TRANSITIONS[current])
    if force:
        targets |= OVERRIDES.get(current, frozenset())
    return [s for s in _ORDER if s in targets]


def check_transition(
    current: Stage | str,
    target: Stage | str,
    *,
    version: int | str | None = None,
    force: bool = False,
    role: str | None = None,
) -> None:
    """Raise LifecycleError unless a version may move from `current` to `target`.

    `force=True` allows the admin overrides in OVERRIDES (rejected → approved) and only when
    `role` is "admin"; it never allows any other jump (no pending → prod).
    """
    current = parse_stage(current, "current stage")
    target = parse_stage(target, "target stage")
    who = f"version {version}" if version is not None else "this version"
    if target is current:
        raise LifecycleError(f"{who} is already {current}; {_allowed_text(current, version)}")
    if target in TRANSITIONS[current]:
        return
    if target in OVERRIDES.get(current, frozenset()):
        if not force:
            raise LifecycleError(
                f"{who} is {current}; {_allowed_text(current, version)}. Moving it to {target} "
                f"needs an admin override ({_override_how(version)}, by a user with the admin "
                "role)"
            )
        if role != ADMIN_ROLE:
            raise LifecycleError(
                f"{who} is {current}; overriding that to {target} needs the admin role "
                f"(the caller's role is {role or 'not given'})"
            )
        return
    raise LifecycleError(
        f"{who} is {current}; it cannot move to {target}; {_allowed_text(current, version)}"
    )


def _override_how(version: int | str | None) -> str:
    """How a person asks for the override. The library's callers are people at the CLI, so
    the message names the CLI flag; the API's name for it follows in brackets."""
    ref = version if version is not None else "VERSION"
    return f'`evertune approve {ref} --force` (API: "force": true)'


def _allowed_text(current: Stage, version: int | str | None = None) -> str:
    targets = allowed_targets(current)
    if targets:
        shown = ", ".join(
            f"{t} ({_NOTES[(current, t)]})" if (current, t) in _NOTES else str(t) for t in targets
        )
        return f"allowed: {shown}"
    if OVERRIDES.get(current):
        return (
            f"allowed: none (a {current} version can only be approved with an admin override: "
            f"{_override_how(version)} by a user with the admin role)"
        )
    return "allowed: none"


def parse_stage(value: Stage | str, what: str = "stage") -> Stage:
    """A Stage from itself or its name ("QA", " prod "); LifecycleError lists the known ones."""
    if isinstance(value, Stage):
        return value
    try:
        return Stage(str(value).strip().lower())
    except ValueError:
        known = ", ".join(s.value for s in Stage)
        raise LifecycleError(f"unknown {what} {value!r}; known stages: {known}") from None
