"""Approvals and deployment over a real MLflow registry and real system tests on the tiny model.

Versions are real LoRA adapters of the tiny model (tests/api/helpers.py) registered with the
real Registry; system tests load them with `load_for_inference` and generate with
`generation.generate`, as serving will.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evertune import deploy
from evertune.auth import Principal
from evertune.errors import LifecycleError, PermissionDenied
from evertune.lifecycle import Stage
from evertune.registry import Registry
from evertune.workspace import Workspace
from tests.api.helpers import (
    FAST_TESTS,
    add_dataset,
    register,
    trained_adapter,
    untrained_adapter,
    use_mlflow_template,
    write_jsonl,
)
from tests.conftest import make_workspace
from tests.e2e.test_cli import evertune

ANA = Principal("ana", "approver")
ROOT = Principal("root", "admin")
VIEWER = Principal("vic", "viewer")


def new_ws(tmp_path: Path, tiny: Path, **deploy_cfg: object) -> tuple[Workspace, str]:
    """A workspace with fast system tests, a migrated MLflow DB and the TICKETS dataset."""
    ws = make_workspace(tmp_path / "ws", tiny, deploy={**FAST_TESTS, **deploy_cfg})
    use_mlflow_template(ws)
    return ws, add_dataset(ws, tmp_path)


def moves(ws: Workspace) -> list[tuple[int, str | None, str | None, str]]:
    """(version, from, to, actor) of every transition, oldest first."""
    return [(r.version, r.from_stage, r.to_stage, r.actor) for r in reversed(deploy.history(ws))]


# Golden texts whose first halves the tiny model continues with output the sanity rules pass
# (its answers are not *right*, but nothing in a system test can tell): with these as the only
# smoke prompts, a version's output is fine and only the environment can fail its tests. The
# untrained LoRA keeps the seeded tiny model as it is, so this holds whatever training does.
PLAUSIBLE = [
    {"text": "where is my parcel ? it was due"},
    {"text": "I was charged twice for one order today"},
    {"text": "please route my shipping question to the team"},
]


def plausible_version(tmp_path: Path, tiny: Path, **system_tests: object) -> tuple[Workspace, int]:
    """A workspace whose smoke prompts are PLAUSIBLE (set in evertune.yaml, so the CLI sees it
    too) and a pending version whose answers to them pass the output checks."""
    ws, _ = new_ws(tmp_path, tiny, system_tests={"max_prompts": 3, "max_new_tokens": 4,
                                                  "latency_budget_s": 30.0, **system_tests})
    golden = write_jsonl(tmp_path / "golden.jsonl", PLAUSIBLE)
    cfg_path = ws.root / "evertune.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["golden_set"] = str(golden)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ws = Workspace.open(ws.root)
    # The dataset is not in the workspace: the golden set is the only source of prompts.
    return ws, register(ws, untrained_adapter(tiny), "ds-elsewhere", "ftjob-1").version


def set_budget(ws: Workspace, seconds: float) -> Workspace:
    cfg_path = ws.root / "evertune.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["deploy"]["system_tests"]["latency_budget_s"] = seconds
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Workspace.open(ws.root)


def test_approve_rolls_out_to_prod_and_rollback_returns(tmp_path: Path, tiny_model: Path) -> None:
    ws, ds = new_ws(tmp_path, tiny_model)
    golden = write_jsonl(tmp_path / "golden.jsonl", [{"input": "Where is my parcel?",
                                                       "output": "shipping"}])
    ws = Workspace.open(ws.root, [f"data.golden_set={golden}"])
    adapter = trained_adapter(tiny_model)
    v1 = register(ws, adapter, ds, "ftjob-1")
    v2 = register(ws, adapter, ds, "ftjob-2")

    first = deploy.approve(ws, v1.ref, ANA, "  better on billing  ")
    assert first.stage == "prod", first.message
    assert [(m.from_stage, m.to_stage) for m in first.moves] == [
        ("pending", "approved"), ("approved", "qa"), ("qa", "prod")]
    tests = first.system_tests
    assert tests is not None and tests.passed and tests.failures == []
    # Smoke prompts come from the golden set and the dataset's test split, run for real.
    assert {r.source for r in tests.results} == {"golden", "test"}
    assert all(r.output.strip() and r.latency_s > 0 for r in tests.results)
    golden_prompt = next(r for r in tests.results if r.source == "golden")
    assert golden_prompt.input == "Where is my parcel?"
    assert "<|im_start|>assistant" in golden_prompt.prompt  # templated as in training
    saved = json.loads(Path(tests.path or "").read_text())
    assert saved["passed"] is True and saved["version"] == v1.version

    reg = Registry(ws)
    assert reg.alias_version("prod").version == v1.version  # type: ignore[union-attr]
    assert reg.get_version(v1.version).tags["system_tests"] == "pass"

    deploy.approve(ws, v2.version, ANA, "newer data")
    assert reg.alias_version("prod").version == v2.version  # type: ignore[union-attr]
    assert reg.get_version(v1.version).stage is Stage.RETIRED

    back = deploy.rollback(ws, ANA, "v2 misroutes refunds")
    assert back.version == v1.version and back.stage == "prod"
    assert [(m.version, m.from_stage, m.to_stage) for m in back.moves] == [
        (2, "prod", "retired"), (1, "retired", "prod")]
    assert reg.alias_version("prod").version == v1.version  # type: ignore[union-attr]
    assert reg.get_version(v2.version).stage is Stage.RETIRED

    assert moves(ws) == [
        (1, "pending", "approved", "ana"), (1, "approved", "qa", "ana"), (1, "qa", "prod", "ana"),
        (2, "pending", "approved", "ana"), (2, "approved", "qa", "ana"),
        (1, "prod", "retired", "ana"), (2, "qa", "prod", "ana"),
        (2, "prod", "retired", "ana"), (1, "retired", "prod", "ana"),
    ]
    records = deploy.history(ws)
    newest_first = [r.created_at for r in records]
    assert newest_first == sorted(newest_first, reverse=True)
    approve_row = next(r for r in records if r.to_stage == "approved" and r.version == 1)
    assert approve_row.reason == "better on billing"  # the comment, trimmed
    rollback_row = next(r for r in records if r.to_stage == "prod" and r.from_stage == "retired")
    assert rollback_row.reason == "v2 misroutes refunds (rollback from v2)"
    now = deploy.current(ws)
    assert now.prod["version"] == 1 and now.previous_prod["version"] == 2  # type: ignore[index]


def test_without_auto_promote_the_version_waits_in_qa(tmp_path: Path, tiny_model: Path) -> None:
    ws, ds = new_ws(tmp_path, tiny_model, auto_promote=False)
    adapter = trained_adapter(tiny_model)
    v1 = register(ws, adapter, ds, "ftjob-1")
    v2 = register(ws, adapter, ds, "ftjob-2")

    result = deploy.approve(ws, v1.version, ANA, "ok")
    assert result.stage == "qa" and "evertune promote v1" in result.message
    # Another approval is refused before it changes anything: QA holds one version at a time.
    with pytest.raises(LifecycleError, match="version 1 is still in qa; promote it"):
        deploy.approve(ws, v2.version, ANA, "also ok")
    assert Registry(ws).get_version(v2.version).stage is Stage.PENDING
    # Promote refuses a version that is not in QA, naming what its stage allows.
    with pytest.raises(LifecycleError, match=r"version 2 is pending; only a version in qa can "
                       r"be promoted to prod \(allowed from pending: approved, rejected\)"):
        deploy.promote(ws, v2.version, ANA)

    promoted = deploy.promote(ws, None, ANA, "QA looks fine")
    assert promoted.version == v1.version and promoted.stage == "prod"
    assert promoted.system_tests is None  # they passed at approval; not run again
    assert moves(ws)[-1] == (1, "qa", "prod", "ana")
    with pytest.raises(LifecycleError, match="no version is in qa"):
        deploy.promote(ws, None, ANA)


def test_illegal_moves_are_refused_with_the_allowed_ones(tmp_path: Path, tiny_model: Path) -> None:
    ws, ds = new_ws(tmp_path, tiny_model)
    adapter = trained_adapter(tiny_model)
    gated = register(ws, adapter, ds, "ftjob-gated", gate="fail")
    assert gated.stage is Stage.REJECTED
    pending = register(ws, adapter, ds, "ftjob-ok")

    with pytest.raises(LifecycleError, match=r"version 1 is rejected; allowed: none \(a rejected "
                       r"version can only be approved with an admin override") as refused:
        deploy.approve(ws, gated.version, ANA, "looks fine to me")
    # The message is read at the CLI: it names the flag, not the Python keyword.
    assert "`evertune approve 1 --force`" in str(refused.value)
    assert "force=True" not in str(refused.value)
    with pytest.raises(PermissionDenied, match="role approver, which cannot override"):
        deploy.approve(ws, gated.version, ANA, "looks fine to me", force=True)
    with pytest.raises(LifecycleError, match="needs a comment"):
        deploy.reject(ws, pending.version, ANA, "   ")
    with pytest.raises(LifecycleError, match="no previous PROD version"):
        deploy.rollback(ws, ANA)
    with pytest.raises(PermissionDenied, match="token 'vic' has role viewer, which cannot "
                       "approve; ask for an approver or admin token"):
        deploy.approve(ws, pending.version, VIEWER, "sneaky")
    assert moves(ws) == []  # nothing above moved anything

    deploy.reject(ws, pending.version, ANA, "wrong export")
    with pytest.raises(LifecycleError, match="version 2 is rejected"):
        deploy.approve(ws, pending.version, ANA, "changed my mind")

    # An admin may override the gate, on the record.
    forced = deploy.approve(ws, gated.version, ROOT, "gate metric was noisy", force=True)
    assert forced.stage == "prod"
    row = next(r for r in deploy.history(ws) if r.to_stage == "approved")
    assert (row.actor, row.reason, row.data["forced"]) == ("root", "gate metric was noisy", True)


def test_broken_output_rejects_the_version(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, ds = new_ws(tmp_path, tiny_model, system_tests={"max_prompts": 2, "max_new_tokens": 4,
                                                        "latency_budget_s": 30.0})
    ws = Workspace.open(ws.root, ["notify.webhook_url=http://127.0.0.1:9/hook"])
    sent: list[dict[str, object]] = []
    monkeypatch.setattr("evertune.notify.post", lambda url, event: sent.append(event) or True)
    # The untrained LoRA leaves the random tiny model as it is: it answers with newlines.
    v1 = register(ws, untrained_adapter(tiny_model), ds, "ftjob-1")

    result = deploy.approve(ws, v1.version, ANA, "ship it")
    assert result.stage == "rejected" and not result.retry
    report = result.system_tests
    assert report is not None and not report.passed and not report.environment
    assert report.results and all(r.problems[0].startswith("empty output") for r in report.results)
    mv = Registry(ws).get_version(v1.version)
    assert (mv.stage, mv.approval_status, mv.tags["system_tests"]) == (
        Stage.REJECTED, "Rejected", "fail")
    assert Registry(ws).alias_version("qa") is None and Registry(ws).alias_version("prod") is None
    last = deploy.history(ws)[0]
    assert (last.from_stage, last.to_stage, last.actor) == ("qa", "rejected", "ana")
    assert "system tests failed" in last.reason and "empty output" in last.reason
    assert report.path and report.path in last.reason
    (event,) = sent  # the webhook hears the outcome
    assert (event["event"], event["version"], event["stage"], event["actor"]) == (
        "model.approve", 1, "rejected", "ana")
    assert "empty output" in str(event["system_tests"])


def test_a_busy_machine_leaves_a_correct_version_approved_and_retry_deploys_it(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every prompt over budget (the budget is 1 µs): what a training run beside QA did to a
    # version with perfect answers. The machine failed, not the model.
    ws, v1 = plausible_version(tmp_path, tiny_model, latency_budget_s=1e-6)
    ws = Workspace.open(ws.root, ["notify.webhook_url=http://127.0.0.1:9/hook"])
    sent: list[dict[str, object]] = []
    monkeypatch.setattr("evertune.notify.post", lambda url, event: sent.append(event) or True)
    v2 = register(ws, untrained_adapter(tiny_model), "ds-elsewhere", "ftjob-2").version

    result = deploy.approve(ws, v1, ANA, "ship it")
    assert result.stage == "approved" and result.retry, result.message
    assert "`evertune approve 1 --retry`" in result.message
    report = result.system_tests
    assert report is not None and not report.passed and report.environment
    assert len(report.results) == 3 and {r.source for r in report.results} == {"golden"}
    assert all(r.over_budget and r.output_ok for r in report.results), report.failures
    assert all("over the latency budget 1e-06 s" in r.problems[0] for r in report.results)
    mv = Registry(ws).get_version(v1)
    assert (mv.stage, mv.approval_status, mv.tags["system_tests"]) == (
        Stage.APPROVED, "Approved", "error")
    assert Registry(ws).alias_version("qa") is None and Registry(ws).alias_version("prod") is None
    # The failed attempt is on the record: the way into QA and the way back, with the report.
    assert moves(ws) == [(1, "pending", "approved", "ana"), (1, "approved", "qa", "ana"),
                         (1, "qa", "approved", "ana")]
    last = deploy.history(ws)[0]
    assert last.reason.startswith("QA attempt failed because of the environment, not the model")
    assert report.path and report.path in last.reason and "approve 1 --retry" in last.reason
    assert json.loads(Path(report.path).read_text())["environment"] is True
    (event,) = sent
    assert (event["event"], event["stage"]) == ("model.approve", "approved")

    # --retry is for an approved version; a pending one is approved the normal way.
    with pytest.raises(LifecycleError, match=r"version 2 is pending; --retry reruns the QA "
                       r"system tests .* approve it with `evertune approve 2 -m WHY`"):
        deploy.approve(ws, v2, ANA, "", retry=True)
    assert Registry(ws).get_version(v2).stage is Stage.PENDING

    # The machine is quiet again (budget back to 30 s): the CLI retries, no comment needed.
    set_budget(ws, 30.0)
    out = evertune("-w", str(ws.root), "approve", "1", "--retry", cwd=tmp_path)
    assert "v1 passed its system tests and is now in prod" in out.stdout
    mv = Registry(ws).get_version(v1)
    assert mv.stage is Stage.PROD and mv.tags["system_tests"] == "pass"
    assert [(m[1], m[2]) for m in moves(ws)][-2:] == [("approved", "qa"), ("qa", "prod")]
    assert deploy.history(ws)[1].reason.startswith("rollout to QA after approval (retry of the "
                                                    "QA system tests by ")


def test_wrong_output_rejects_even_when_the_machine_is_slow_too(
    tmp_path: Path, tiny_model: Path
) -> None:
    # Over budget *and* empty answers: the output decides, the version is rejected.
    ws, ds = new_ws(tmp_path, tiny_model, system_tests={"max_prompts": 2, "max_new_tokens": 4,
                                                        "latency_budget_s": 1e-6})
    v1 = register(ws, untrained_adapter(tiny_model), ds, "ftjob-1")
    result = deploy.approve(ws, v1.version, ANA, "ship it")
    assert result.stage == "rejected" and not result.retry
    assert result.system_tests is not None and not result.system_tests.environment


def test_each_smoke_prompt_is_timed_on_its_own(tmp_path: Path, tiny_model: Path) -> None:
    ws, v1 = plausible_version(tmp_path, tiny_model)
    report = deploy.run_system_tests(ws, v1)
    assert report.passed and len(report.results) == 3, report.failures
    # In one batch every prompt was charged the batch's time: latencies adding up to about
    # three times the generation's wall time. Each prompt's own time adds up to at most that.
    assert report.generate_s is not None
    assert sum(r.latency_s for r in report.results) <= report.generate_s


def test_a_version_that_cannot_load_stays_approved_until_it_can(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws, v1 = plausible_version(tmp_path, tiny_model)
    artifact = Registry(ws).version_artifact_path(v1)
    away = artifact.with_name("moved-away")
    artifact.rename(away)  # the artifact store is unreachable (a real load error)

    result = deploy.approve(ws, v1, ANA, "ok")
    report = result.system_tests
    assert result.stage == "approved" and report is not None and report.environment
    assert report.error and report.summary().startswith("error: ")
    assert Registry(ws).get_version(v1).stage is Stage.APPROVED

    away.rename(artifact)
    again = deploy.approve(ws, v1, ANA, "", retry=True)
    assert again.stage == "prod", again.message
    assert [(m.from_stage, m.to_stage) for m in again.moves] == [("approved", "qa"),
                                                                  ("qa", "prod")]


def test_output_sanity_catches_a_broken_model(tmp_path: Path, tiny_model: Path) -> None:
    ws, ds = new_ws(tmp_path, tiny_model)
    # The untrained LoRA leaves the random tiny model as it is: it answers with newlines.
    v1 = register(ws, untrained_adapter(tiny_model), ds, "ftjob-1")
    report = deploy.run_system_tests(ws, v1.ref)
    assert not report.passed
    assert report.results and all(r.problems == [f"empty output ({r.output!r})"]
                                  for r in report.results)
    assert report.summary().startswith(f"{len(report.results)} of {len(report.results)} smoke")
    assert Registry(ws).get_version(v1.version).stage is Stage.PENDING  # tests alone move nothing


@pytest.mark.parametrize("text, problem", [
    ("billing", None),
    ("Your refund is on its way; expect it in 3 days.", None),
    ("", "empty output"),
    ("\n \n", "empty output"),
    ("the the the the the the the the the", "degenerate repetition: 1 distinct of 9"),
    ("!!!!!!!!!!!!!!!!", "degenerate repetition: '!' repeated"),
    ("abababababababab", "degenerate repetition: 'ab' repeated"),
])
def test_sanity_rules(text: str, problem: str | None) -> None:
    found = deploy._sanity(text)
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith(problem)


def test_smoke_prompts_fall_back_to_builtins(tmp_path: Path, tiny_model: Path) -> None:
    ws, _ = new_ws(tmp_path, tiny_model)
    v1 = register(ws, trained_adapter(tiny_model), "ds-gone", "ftjob-1")
    records, notes = deploy._smoke_records(ws, Registry(ws).get_version(v1.version), 3)
    assert [s for s, _ in records] == ["builtin", "builtin"]
    assert "ds-gone" in notes[0] and "built-in prompts" in notes[1]
