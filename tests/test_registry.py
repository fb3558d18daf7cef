"""The registry over a real MLflow (SQLite in tmp_path): versions, lineage, aliases, lifecycle."""

from __future__ import annotations

import filecmp
import json
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from evertune.errors import LifecycleError, NotFoundError, RegistryError
from evertune.lifecycle import Stage
from evertune.registry import Registry
from evertune.workspace import Workspace


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite DB with its schema migrated: ~3 s once instead of in every test."""
    ws, _ = Workspace.init(tmp_path_factory.mktemp("template"))
    Registry(ws).client.search_experiments()
    return ws.state_dir / "mlflow.db"


def new_workspace(root: Path, template: Path, overrides: list[str] = ()) -> Workspace:  # type: ignore[assignment]
    Workspace.init(root)
    ws = Workspace.open(root, overrides)
    shutil.copy(template, ws.state_dir / "mlflow.db")
    return ws


@pytest.fixture
def ws(tmp_path: Path, mlflow_template: Path) -> Workspace:
    return new_workspace(tmp_path / "ws", mlflow_template)


@pytest.fixture
def reg(ws: Workspace) -> Registry:
    return Registry(ws)


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    """A fake LoRA adapter folder: a config, binary weights, and a nested file."""
    folder = tmp_path / "job-result" / "adapter"
    (folder / "extra").mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "extra" / "notes.txt").write_text("trained on ds-abc\n")
    return folder


def make_job(job_id: str, adapter: Path, **extra: Any) -> SimpleNamespace:
    fields: dict[str, Any] = {
        "id": job_id,
        "model": "tiny-base",
        "training_file": "ds-abc123",
        "parent": None,
        "hyperparameters": {"n_epochs": 1, "learning_rate": 0.01, "lora": {"r": 8, "alpha": 16}},
        "result": {"path": str(adapter), "kind": "lora"},
        "run_id": "run-42",
        "status": "succeeded",
    }
    return SimpleNamespace(**{**fields, **extra})


def make_report(verdict: str = "pass", reasons: list[str] | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        id="eval-1",
        gate=SimpleNamespace(verdict=verdict, reasons=reasons or []),
        means={
            "candidate": {"rougeL": 0.52, "loss": 1.25, "embedding_cosine": 0.81},
            "base": {"rougeL": 0.40, "loss": 1.60, "embedding_cosine": 0.75},
        },
    )


HISTORY = [
    {
        "step": s,
        "created_at": 1_700_000_000 + s,
        "values": {"train_loss": 2.0 - 0.1 * s, "lr": 0.01},
    }
    for s in range(1, 11)
] + [{"step": 10, "created_at": 1_700_000_011, "values": {"val_loss": 1.5, "epoch": 1}}]


def register(reg: Registry, adapter: Path, job_id: str, **kw: Any) -> int:
    report = kw.pop("report", make_report())
    return reg.register_version(make_job(job_id, adapter, **kw), report, HISTORY).version


# -- registration --------------------------------------------------------------------------------
def test_register_records_tags_metrics_lineage_and_artifacts(reg: Registry, adapter: Path) -> None:
    from mlflow import MlflowClient

    mv = reg.register_version(make_job("ftjob-a1", adapter), make_report(), HISTORY)

    assert mv.version == 1 and mv.name == "assistant"
    assert mv.stage is Stage.PENDING and mv.approval_status == "PendingManualApproval"
    assert (mv.gate, mv.gate_reasons) == ("pass", [])
    assert (mv.job, mv.dataset, mv.base_model) == ("ftjob-a1", "ds-abc123", "tiny-base")
    assert (mv.parent_version, mv.pipeline_run) == (None, "run-42")
    assert mv.metrics == {
        "rougeL": 0.52,
        "loss": 1.25,
        "embedding_cosine": 0.81,
        "train_loss": pytest.approx(1.0),
        "val_loss": 1.5,
    }
    assert "ftjob-a1" in mv.description and "ds-abc123" in mv.description
    assert abs(mv.created_at - time.time()) < 60

    # The same facts, as MLflow itself stores them.
    client = MlflowClient(tracking_uri=reg.ws.tracking_uri)
    raw = client.get_model_version("assistant", "1")
    assert raw.tags["approval_status"] == "PendingManualApproval"
    assert raw.tags["job"] == "ftjob-a1" and raw.tags["dataset"] == "ds-abc123"
    assert raw.tags["gate"] == "pass" and raw.tags["pipeline_run"] == "run-42"
    assert json.loads(raw.tags["metrics"])["rougeL"] == 0.52
    assert raw.source == mv.source and raw.source.endswith("/adapter")

    run = client.get_run(mv.run_id)
    assert run.info.run_name == "ftjob-a1" and run.info.status == "FINISHED"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "assistant" and exp.artifact_location == reg.ws.artifact_location
    assert run.data.params["n_epochs"] == "1"
    assert run.data.params["lora.r"] == "8"  # nested hyperparameters are flattened
    assert run.data.params["dataset"] == "ds-abc123"
    assert run.data.metrics["eval.candidate.rougeL"] == 0.52
    assert run.data.metrics["eval.base.loss"] == 1.60
    artifacts = {a.path for a in client.list_artifacts(mv.run_id)}
    assert {"adapter", "eval"} <= artifacts
    report_file = Path(client.download_artifacts(mv.run_id, "eval/report.json", str(reg.ws.root)))
    assert json.loads(report_file.read_text())["gate"]["verdict"] == "pass"

    # One audit row for the registration.
    (rec,) = reg.audit_log()
    assert (rec.version, rec.action, rec.from_stage, rec.to_stage) == (
        1,
        "register",
        None,
        "pending",
    )


def test_metric_history_is_logged_with_steps(reg: Registry, adapter: Path) -> None:
    from mlflow import MlflowClient

    mv = reg.register_version(make_job("ftjob-h1", adapter), None, HISTORY)
    client = MlflowClient(tracking_uri=reg.ws.tracking_uri)
    loss = sorted(client.get_metric_history(mv.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, 11))
    assert [m.value for m in loss] == pytest.approx([2.0 - 0.1 * s for s in range(1, 11)])
    assert loss[0].timestamp == 1_700_000_001_000  # created_at seconds → ms
    (val,) = client.get_metric_history(mv.run_id, "val_loss")
    assert (val.step, val.value) == (10, 1.5)
    assert len(client.get_metric_history(mv.run_id, "lr")) == 10
    # No report: nothing evaluated, so the gate is "skipped" and the version is pending.
    assert (mv.gate, mv.stage) == ("skipped", Stage.PENDING)
    assert mv.metrics == {"train_loss": pytest.approx(1.0), "val_loss": 1.5}


def test_long_histories_are_logged_in_batches(reg: Registry, adapter: Path) -> None:
    from mlflow import MlflowClient

    history = [{"step": s, "train_loss": 1.0 / s, "lr": 0.001} for s in range(1, 801)]  # flat rows
    mv = reg.register_version(make_job("ftjob-long", adapter), None, history)
    client = MlflowClient(tracking_uri=reg.ws.tracking_uri)
    assert len(client.get_metric_history(mv.run_id, "train_loss")) == 800  # > 1000 metrics total


def test_registering_the_same_job_twice_yields_one_version(reg: Registry, adapter: Path) -> None:
    first = reg.register_version(make_job("ftjob-r1", adapter), make_report(), HISTORY)
    again = reg.register_version(make_job("ftjob-r1", adapter), make_report(), HISTORY)
    assert again.version == first.version and again.run_id == first.run_id
    assert [v.version for v in reg.list_versions()] == [first.version]
    runs = reg.client.search_runs([reg.experiment_id], "tags.job = 'ftjob-r1'")
    assert len(runs) == 1
    assert len(reg.audit_log()) == 1


def test_a_retry_after_a_crash_mid_logging_replaces_the_partial_run(
    reg: Registry, adapter: Path
) -> None:
    # A crash after create_run but before the version existed leaves a half-logged run.
    partial = reg.client.create_run(
        reg.experiment_id, run_name="ftjob-c1", tags={"job": "ftjob-c1"}
    )
    reg.client.log_metric(partial.info.run_id, "train_loss", 9.9, step=1)

    mv = reg.register_version(make_job("ftjob-c1", adapter), make_report(), HISTORY)
    assert mv.run_id != partial.info.run_id
    assert reg.client.get_run(partial.info.run_id).info.lifecycle_stage == "deleted"
    history = reg.client.get_metric_history(mv.run_id, "train_loss")
    assert len(history) == 10 and 9.9 not in [m.value for m in history]


def test_failed_gate_registers_rejected_with_reasons(reg: Registry, adapter: Path) -> None:
    reasons = ["rougeL: candidate 0.31 vs reference 0.40, CI low -0.12 < -0.02"]
    mv = reg.register_version(make_job("ftjob-g1", adapter), make_report("fail", reasons), HISTORY)
    assert mv.stage is Stage.REJECTED and mv.approval_status == "Rejected"
    assert mv.gate == "fail" and mv.gate_reasons == reasons
    assert reasons[0] in mv.description
    raw = reg.client.get_model_version("assistant", str(mv.version))
    assert raw.tags["approval_status"] == "Rejected" and raw.tags["gate"] == "fail"
    (rec,) = reg.audit_log(mv.version)
    assert rec.to_stage == "rejected" and rec.reason == reasons[0]


@pytest.mark.parametrize(("policy", "stage", "gate"), [
    ("review", Stage.PENDING, "inconclusive"),
    ("pass", Stage.PENDING, "pass"),
    ("fail", Stage.REJECTED, "fail"),
])
def test_gate_on_inconclusive_decides_the_registered_stage(
    reg: Registry, adapter: Path, policy: str, stage: Stage, gate: str
) -> None:
    """Issue 11: a golden split whose interval straddles the margin is not a rejection unless
    gate.on_inconclusive says so; under review the warning is on the version."""
    from evertune.evaluation.evaluate import gate_verdict

    notes: list[str] = []
    reasons = ["golden: exact_match: candidate 0.925 vs reference 0.925, 98.75% CI of "
               "difference [-0.0934, +0.0934] straddles the non-inferiority margin -0.02: "
               "inconclusive; the observed mean ... about 2860 paired examples (now 40)"]
    report = {"id": f"eval-{policy}", "verdict": gate_verdict(["pass", "inconclusive"], policy,
                                                              notes),
              "reasons": reasons, "splits": {}}
    mv = reg.register_version(make_job(f"ftjob-inc-{policy}", adapter), report, HISTORY)
    assert (mv.stage, mv.gate) == (stage, gate)
    assert mv.gate_reasons == reasons
    (rec,) = reg.audit_log(mv.version)
    if gate == "inconclusive":
        assert mv.approval_status == "PendingManualApproval"
        assert "inconclusive" in rec.reason and "2860 paired examples" in rec.reason
        assert "Quality gate: inconclusive." in (mv.description or "")


def test_report_as_a_model_dump_dict_and_lineage_with_a_parent(
    reg: Registry, adapter: Path
) -> None:
    register(reg, adapter, "ftjob-p1")
    report = {  # what EvalReport.model_dump() may look like: per-model blocks in a list
        "id": "eval-2",
        "gate": {"verdict": "pass", "reasons": [], "rules": [{"metric": "rougeL", "ci": [0, 1]}]},
        "models": [
            {"label": "candidate", "means": {"rougeL": {"mean": 0.6, "ci_low": 0.5}, "n": 8}},
            {"label": "prod", "means": {"rougeL": {"mean": 0.5, "ci_low": 0.4}}},
        ],
    }
    job = make_job("ftjob-p2", adapter, parent="v1", training_file=None, dataset="ds-2")
    mv = reg.register_version(job, report, [])
    assert mv.parent_version == 1 and mv.dataset == "ds-2" and mv.gate == "pass"
    assert mv.metrics == {"rougeL": 0.6, "n": 8.0}
    run = reg.client.get_run(mv.run_id)
    assert run.data.metrics["eval.prod.rougeL"] == 0.5
    assert run.data.params["parent_version"] == "1"


def test_an_eval_report_with_splits_uses_the_overall_verdict(reg: Registry, adapter: Path) -> None:
    """The EvalReport shape: per-split means, an overall verdict covering every split."""

    def split(name: str, cand: float, verdict: str) -> dict[str, Any]:
        return {
            "name": name,
            "n_examples": 8,
            "means": {
                "candidate": {"rougeL": cand, "loss": 1.1, "json_valid": None},
                "base": {"rougeL": 0.4, "loss": 1.6, "json_valid": None},
            },
            "gate": {"verdict": verdict, "reasons": [], "rules": []},
        }

    report = {
        "id": "eval-20261122-120000-ab12cd",
        "verdict": "fail",  # golden failed, although the main (test) split passed
        "reasons": ["golden: rougeL: candidate 0.30 is worse than base 0.40"],
        "splits": {"golden": split("golden", 0.30, "fail"), "test": split("test", 0.55, "pass")},
    }
    mv = reg.register_version(make_job("ftjob-e1", adapter), report, HISTORY)
    assert (mv.gate, mv.stage) == ("fail", Stage.REJECTED)
    assert mv.gate_reasons == report["reasons"]
    assert mv.eval_report == "eval-20261122-120000-ab12cd"
    assert mv.metrics == {
        "rougeL": 0.55,  # the main split is "test"
        "loss": 1.1,
        "golden.rougeL": 0.30,
        "golden.loss": 1.1,
        "train_loss": pytest.approx(1.0),
        "val_loss": 1.5,
    }
    metrics = reg.client.get_run(mv.run_id).data.metrics
    assert metrics["eval.candidate.rougeL"] == 0.55 and metrics["eval.base.loss"] == 1.6
    assert metrics["eval.golden.candidate.rougeL"] == 0.30
    assert not any("json_valid" in k for k in metrics)  # None = not computable: not logged


def test_a_job_without_a_result_cannot_be_registered(reg: Registry, tmp_path: Path) -> None:
    job = make_job("ftjob-x", tmp_path, result=None, status="failed")
    with pytest.raises(RegistryError, match="job ftjob-x has no result .status failed."):
        reg.register_version(job, None, [])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RegistryError, match="missing or empty"):
        reg.register_version(make_job("ftjob-y", empty), None, [])
    assert reg.list_versions() == []


# -- reading -------------------------------------------------------------------------------------
def test_get_version_of_a_missing_version_names_the_existing_ones(
    reg: Registry, adapter: Path
) -> None:
    with pytest.raises(NotFoundError, match="no versions are registered yet"):
        reg.get_version(1)
    for i in range(3):
        register(reg, adapter, f"ftjob-n{i}")
    with pytest.raises(NotFoundError) as err:
        reg.get_version("v7")
    assert str(err.value) == (
        "version 7 of model 'assistant' does not exist; existing versions: v1, v2, v3"
    )
    with pytest.raises(NotFoundError, match="not a model version"):
        reg.get_version("latest-ish")
    assert reg.get_version("v2").version == reg.get_version("2").version == 2
    assert [v.version for v in reg.list_versions()] == [3, 2, 1]  # newest first
    assert reg.find_by_job("ftjob-n1").version == 2  # type: ignore[union-attr]
    assert reg.find_by_job("ftjob-none") is None


def test_version_artifact_path_is_the_adapter_byte_for_byte(reg: Registry, adapter: Path) -> None:
    v = register(reg, adapter, "ftjob-f1")
    folder = reg.version_artifact_path(v)
    assert folder.is_dir()
    cmp = filecmp.dircmp(adapter, folder)
    assert cmp.left_only == cmp.right_only == cmp.diff_files == []
    assert cmp.subdirs["extra"].diff_files == [] and cmp.subdirs["extra"].left_only == []
    for name in ("adapter_config.json", "adapter_model.safetensors", "extra/notes.txt"):
        assert (folder / name).read_bytes() == (adapter / name).read_bytes()


def test_a_remote_source_is_downloaded_once_into_the_cache(reg: Registry, adapter: Path) -> None:
    # The remote path, driven through a file: URI (MLflow downloads it like any artifact URI).
    mv = reg.get_version(register(reg, adapter, "ftjob-d1"))
    cached = reg._download(mv)
    assert cached == reg.ws.state_dir / "registry-cache" / "assistant" / str(mv.version)
    for name in ("adapter_config.json", "adapter_model.safetensors", "extra/notes.txt"):
        assert (cached / name).read_bytes() == (adapter / name).read_bytes()
    (cached / "marker").write_text("kept")
    assert reg._download(mv) == cached and (cached / "marker").exists()  # not fetched again
    assert [p.name for p in cached.parent.iterdir()] == [str(mv.version)]  # no temp leftovers


def test_versions_on_an_s3_artifact_store(
    tmp_path: Path, mlflow_template: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At scale the artifacts live in S3: a moto server on loopback stands in for it."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="team-models")
        ws = new_workspace(
            tmp_path / "s3ws",
            mlflow_template,
            ["registry.artifact_location=s3://team-models/mlartifacts"],
        )
        reg = Registry(ws)
        mv = reg.register_version(make_job("ftjob-s3", adapter), make_report(), HISTORY)
        assert mv.source.startswith("s3://team-models/mlartifacts/")
        folder = reg.version_artifact_path(mv.version)
        assert folder == ws.state_dir / "registry-cache" / "assistant" / "1"
        for name in ("adapter_config.json", "adapter_model.safetensors", "extra/notes.txt"):
            assert (folder / name).read_bytes() == (adapter / name).read_bytes()
    finally:
        server.stop()


# -- aliases and lifecycle -----------------------------------------------------------------------
def test_custom_aliases(reg: Registry, adapter: Path) -> None:
    register(reg, adapter, "ftjob-al1")
    register(reg, adapter, "ftjob-al2")
    assert reg.alias_version("canary") is None
    assert reg.set_alias("canary", 2).aliases == ["canary"]
    assert reg.alias_version("canary").version == 2  # type: ignore[union-attr]
    assert reg.resolve("@canary").version == 2
    reg.set_alias("canary", "v1")
    assert reg.alias_version("canary").version == 1  # type: ignore[union-attr]
    assert [v.aliases for v in reg.list_versions()] == [[], ["canary"]]
    reg.delete_alias("canary")
    assert reg.alias_version("canary") is None
    with pytest.raises(NotFoundError, match="alias 'canary' of model 'assistant' does not exist"):
        reg.resolve("canary")
    with pytest.raises(RegistryError, match="follows the lifecycle"):
        reg.set_alias("prod", 1)
    with pytest.raises(RegistryError, match="reserved"):
        reg.set_alias("v3", 1)


def test_alias_before_any_registration_is_none(reg: Registry) -> None:
    assert reg.alias_version("prod") is None
    assert reg.list_versions() == []
    assert reg.previous_prod() is None


def test_lifecycle_through_qa_prod_replacement_and_rollback(reg: Registry, adapter: Path) -> None:
    v1 = register(reg, adapter, "ftjob-l1")
    v2 = register(reg, adapter, "ftjob-l2", parent=v1)

    mv = reg.transition(v1, "approved", actor="ana", reason="reviewed samples")
    assert (mv.stage, mv.approval_status) == (Stage.APPROVED, "Approved")
    assert reg.transition(v1, Stage.QA, actor="deploy", reason="rollout").aliases == ["qa"]
    mv = reg.transition(v1, "prod", actor="deploy", reason="system tests passed")
    assert mv.stage is Stage.PROD and mv.aliases == ["prod", "qa"]  # qa keeps what it tested

    reg.transition(v2, "approved", actor="ana", reason="better rougeL")
    reg.transition(v2, "qa", actor="deploy", reason="rollout")
    assert reg.alias_version("qa").version == v2  # type: ignore[union-attr]
    assert reg.alias_version("prod").version == v1  # type: ignore[union-attr]
    mv = reg.transition(v2, "prod", actor="deploy", reason="system tests passed")
    assert mv.aliases == ["prod", "qa"]
    old = reg.get_version(v1)
    assert (old.stage, old.approval_status, old.aliases) == (Stage.RETIRED, "Approved", [])
    assert reg.previous_prod().version == v1  # type: ignore[union-attr]

    # Rollback: the retired version comes back, the current one is retired.
    mv = reg.transition(v1, "prod", actor="ana", reason="latency regression in v2")
    assert mv.stage is Stage.PROD and reg.alias_version("prod").version == v1  # type: ignore[union-attr]
    assert reg.get_version(v2).stage is Stage.RETIRED
    assert reg.previous_prod().version == v2  # type: ignore[union-attr]
    assert [v.stage for v in reg.list_versions() if v.stage is Stage.PROD] == [Stage.PROD]

    trail = [(r.version, r.action, r.from_stage, r.to_stage) for r in reversed(reg.audit_log())]
    assert trail == [
        (v1, "register", None, "pending"),
        (v2, "register", None, "pending"),
        (v1, "transition", "pending", "approved"),
        (v1, "transition", "approved", "qa"),
        (v1, "transition", "qa", "prod"),
        (v2, "transition", "pending", "approved"),
        (v2, "transition", "approved", "qa"),
        (v1, "transition", "prod", "retired"),
        (v2, "transition", "qa", "prod"),
        (v2, "transition", "prod", "retired"),
        (v1, "transition", "retired", "prod"),
    ]
    newest = reg.audit_log(v1, limit=1)[0]
    assert (newest.actor, newest.reason) == ("ana", "latency regression in v2")
    assert reg.audit_log(v2, limit=None)[0].reason == f"replaced by version {v1}"


def test_illegal_transitions_say_what_is_allowed(reg: Registry, adapter: Path) -> None:
    v = register(reg, adapter, "ftjob-i1")
    with pytest.raises(LifecycleError) as err:
        reg.transition(v, "prod", actor="ana", reason="yolo")
    assert str(err.value) == (
        f"version {v} is pending; it cannot move to prod; allowed: approved, rejected"
    )
    assert reg.get_version(v).stage is Stage.PENDING  # nothing changed
    with pytest.raises(LifecycleError, match="known stages"):
        reg.transition(v, "production", actor="ana", reason="")
    with pytest.raises(NotFoundError, match="existing versions: v1"):
        reg.transition(9, "approved", actor="ana", reason="")


def test_qa_failure_rejects_and_frees_the_qa_slot(reg: Registry, adapter: Path) -> None:
    v1 = register(reg, adapter, "ftjob-q1")
    v2 = register(reg, adapter, "ftjob-q2")
    for v in (v1, v2):
        reg.transition(v, "approved", actor="ana", reason="ok")
    reg.transition(v1, "qa", actor="deploy", reason="rollout")
    with pytest.raises(LifecycleError, match=f"version {v1} is still in qa; promote it"):
        reg.transition(v2, "qa", actor="deploy", reason="rollout")

    mv = reg.transition(v1, "rejected", actor="deploy", reason="smoke prompts: empty outputs")
    assert (mv.stage, mv.approval_status, mv.aliases) == (Stage.REJECTED, "Rejected", [])
    assert reg.alias_version("qa") is None  # a rejected version is never served
    assert reg.transition(v2, "qa", actor="deploy", reason="rollout").aliases == ["qa"]


def test_admin_override_approves_a_gate_rejected_version(reg: Registry, adapter: Path) -> None:
    v = register(reg, adapter, "ftjob-o1", report=make_report("fail", ["loss regressed"]))
    with pytest.raises(LifecycleError, match="allowed: none .a rejected version can only be"):
        reg.transition(v, "approved", actor="ana", reason="looks fine to me")
    with pytest.raises(LifecycleError, match="needs the admin role"):
        reg.transition(v, "approved", actor="ana", reason="gate noise", force=True, role="approver")
    with pytest.raises(LifecycleError, match="needs a reason"):
        reg.transition(v, "approved", actor="root", reason=" ", force=True, role="admin")
    mv = reg.transition(
        v, "approved", actor="root", reason="gate noise on 8 examples", force=True, role="admin"
    )
    assert (mv.stage, mv.approval_status, mv.gate) == (Stage.APPROVED, "Approved", "fail")
    rec = reg.audit_log(v, limit=1)[0]
    assert rec.data == {"forced": True, "role": "admin"} and rec.from_stage == "rejected"


def test_a_repeated_transition_converges_like_a_retried_pipeline_step(
    reg: Registry, adapter: Path
) -> None:
    v = register(reg, adapter, "ftjob-rt1")
    reg.transition(v, "approved", actor="ana", reason="ok")
    # Simulate a crash inside transition(v, "qa"): the stage tag was written, the alias not.
    reg.client.set_model_version_tag("assistant", str(v), "stage", "qa")
    assert reg.alias_version("qa") is None

    mv = reg.transition(v, "qa", actor="deploy", reason="rollout (retried)")
    assert (mv.stage, mv.aliases) == (Stage.QA, ["qa"])
    rec = reg.audit_log(v, limit=1)[0]
    assert (rec.to_stage, rec.data) == ("qa", {"repeated": True})
    # Once complete, repeating it again changes nothing and adds no audit row.
    n = len(reg.audit_log(v))
    assert reg.transition(v, "qa", actor="deploy", reason="again").aliases == ["qa"]
    assert len(reg.audit_log(v)) == n
