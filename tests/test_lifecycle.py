"""The model-version state machine: legal moves pass, illegal ones say what is allowed."""

from __future__ import annotations

import pytest

from evertune.errors import LifecycleError
from evertune.lifecycle import (
    OVERRIDES,
    TRANSITIONS,
    ApprovalStatus,
    Stage,
    allowed_targets,
    approval_status,
    check_transition,
    initial_stage,
    parse_stage,
    stage_from_status,
)

LEGAL = [(a, b) for a, targets in TRANSITIONS.items() for b in targets]
ILLEGAL = [
    (a, b)
    for a in Stage
    for b in Stage
    if b not in TRANSITIONS[a] and b not in OVERRIDES.get(a, frozenset()) and a is not b
]


def test_the_transition_table_is_the_documented_one() -> None:
    assert set(LEGAL) == {
        (Stage.PENDING, Stage.APPROVED),
        (Stage.PENDING, Stage.REJECTED),
        (Stage.APPROVED, Stage.QA),
        (Stage.APPROVED, Stage.REJECTED),  # while it waits for a QA retry
        (Stage.QA, Stage.APPROVED),  # the QA attempt failed because of the environment
        (Stage.QA, Stage.PROD),
        (Stage.QA, Stage.REJECTED),
        (Stage.PROD, Stage.RETIRED),
        (Stage.RETIRED, Stage.PROD),
    }
    assert dict(OVERRIDES) == {Stage.REJECTED: frozenset({Stage.APPROVED})}


@pytest.mark.parametrize(("current", "target"), LEGAL)
def test_legal_transitions_pass(current: Stage, target: Stage) -> None:
    check_transition(current, target, version=1)
    check_transition(current.value, target.value.upper(), version=1)  # names work too


@pytest.mark.parametrize(("current", "target"), ILLEGAL)
def test_illegal_transitions_name_version_state_and_allowed_targets(
    current: Stage, target: Stage
) -> None:
    with pytest.raises(LifecycleError) as err:
        check_transition(current, target, version=7)
    message = str(err.value)
    assert message.startswith(f"version 7 is {current.value};")
    assert "allowed: " in message
    for allowed in allowed_targets(current):
        assert allowed.value in message.split("allowed: ", 1)[1]


def test_messages_read_well() -> None:
    with pytest.raises(LifecycleError) as err:
        check_transition("pending", "prod", version=3)
    assert str(err.value) == (
        "version 3 is pending; it cannot move to prod; allowed: approved, rejected"
    )

    with pytest.raises(LifecycleError) as err:
        check_transition("retired", "qa", version=2)
    assert str(err.value).endswith("allowed: prod (rollback)")

    with pytest.raises(LifecycleError) as err:
        check_transition(Stage.REJECTED, Stage.QA, version=3)
    assert str(err.value) == (
        "version 3 is rejected; it cannot move to qa; allowed: none (a rejected version can "
        'only be approved with an admin override: `evertune approve 3 --force` (API: "force": '
        'true) by a user with the admin role)'
    )

    with pytest.raises(LifecycleError) as err:
        check_transition("qa", "retired", version=4)
    assert str(err.value).endswith(
        "allowed: approved (QA attempt failed for a reason outside the model; retry), prod, "
        "rejected (system tests failed)"
    )


def test_refusals_name_the_cli_flag_not_the_python_keyword() -> None:
    # The CLI user reads these messages: `force=True` means nothing at a shell prompt.
    for current, target in (("rejected", "approved"), ("rejected", "qa")):
        with pytest.raises(LifecycleError) as err:
            check_transition(current, target, version=6)
        assert "`evertune approve 6 --force`" in str(err.value)
        assert "force=True" not in str(err.value)

    with pytest.raises(LifecycleError, match="version 4 is already prod"):
        check_transition("prod", "prod", version=4)


def test_admin_override_approves_a_rejected_version_and_nothing_else() -> None:
    with pytest.raises(LifecycleError, match="needs an admin override"):
        check_transition("rejected", "approved", version=5)
    with pytest.raises(LifecycleError, match="needs the admin role .the caller's role is approver"):
        check_transition("rejected", "approved", version=5, force=True, role="approver")
    with pytest.raises(LifecycleError, match="role is not given"):
        check_transition("rejected", "approved", version=5, force=True)
    check_transition("rejected", "approved", version=5, force=True, role="admin")

    # force is no skeleton key: an admin still cannot jump stages.
    with pytest.raises(LifecycleError, match="cannot move to prod"):
        check_transition("pending", "prod", version=5, force=True, role="admin")
    with pytest.raises(LifecycleError, match="cannot move to prod"):
        check_transition("rejected", "prod", version=5, force=True, role="admin")
    assert allowed_targets("rejected") == []
    assert allowed_targets("rejected", force=True) == [Stage.APPROVED]


def test_approval_status_tag_mapping() -> None:
    assert approval_status(Stage.PENDING) is ApprovalStatus.PENDING
    assert approval_status("rejected") is ApprovalStatus.REJECTED
    for stage in (Stage.APPROVED, Stage.QA, Stage.PROD, Stage.RETIRED):
        assert approval_status(stage).value == "Approved"
    assert ApprovalStatus.PENDING.value == "PendingManualApproval"
    assert stage_from_status("Approved") is Stage.APPROVED
    assert stage_from_status("Rejected") is Stage.REJECTED
    assert stage_from_status(None) is Stage.PENDING


def test_a_failed_gate_registers_rejected() -> None:
    assert initial_stage("fail") is Stage.REJECTED
    assert initial_stage("pass") is Stage.PENDING
    assert initial_stage(None) is Stage.PENDING  # registered without an evaluation


def test_unknown_stage_names_the_known_ones() -> None:
    with pytest.raises(LifecycleError, match="unknown target stage 'production'; known stages: "):
        check_transition("qa", "production", version=1)
    assert parse_stage(" QA ") is Stage.QA
