"""The regression suite: .venv/bin/pytest tests/evaluation/test_regression_suite.py -q

The store on its own (content addressing, idempotent and concurrent adds, the seeded sample,
exclusion from new datasets), its hook in Registry.transition over a real MLflow registry,
and the issue's whole story on the tiny model with the real steps (`-m slow`): a round in
PROD, then a drop of the same inputs with consistently wrong labels is refused on the
regression split although its own test split looks fine.
"""

from __future__ import annotations

import json
import logging
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest

from evertune import deploy, steps
from evertune.auth import Principal
from evertune.data.split import record_hash
from evertune.data.store import add_files
from evertune.errors import DataError
from evertune.evaluation import regression_suite as suite
from evertune.evaluation.evaluate import evaluated_records
from evertune.lifecycle import Stage
from evertune.registry import ModelVersion, Registry
from evertune.workspace import Workspace
from tests.api.helpers import FAST_TESTS, use_mlflow_template, write_jsonl
from tests.conftest import make_workspace

TEAMS = ["billing", "shipping", "account", "technical", "returns"]
ANA = Principal("ana", "approver")


def rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [{"input": f"question {i}", "output": f"answer {i}"} for i in range(offset, offset + n)]


def version(number: int, report: str | None, name: str = "assistant") -> ModelVersion:
    """A registered version as the registry returns it (only the fields the suite reads matter)."""
    return ModelVersion(
        version=number, name=name, stage=Stage.PROD, approval_status="Approved", gate="pass",
        dataset="ds-0123456789abcdef", job=f"ftjob-{number}", base_model=None,
        parent_version=None, pipeline_run=None, metrics={}, created_at=0.0, run_id=None,
        source="", description="", eval_report=report,
    )


def keep(ws: Workspace, report_id: str, records: list[dict[str, Any]]) -> None:
    """What evaluate_candidate leaves behind: the records its test split scored."""
    write_jsonl(_mkdir(ws.evals_dir / report_id / "examples") / "test.jsonl", records)
    assert evaluated_records(ws, report_id) == records


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- the store ------------------------------------------------------------------------------
def test_records_are_stored_once_under_their_content_address(workspace: Workspace) -> None:
    assert suite.suite_keys(workspace) == set()
    assert suite.suite_records(workspace, 8, "s") == ([], 0)
    records = rows(3)
    assert suite.add_records(workspace, records) == 3
    # The same record with its keys reordered and extra spaces is the same content.
    same = {"output": "  answer 0 ", "input": "question   0"}
    assert record_hash(same) == record_hash(records[0])
    assert suite.add_records(workspace, [same, *records]) == 0

    files = sorted((suite.suite_dir(workspace) / "records").iterdir())
    assert [p.name for p in files] == sorted(f"{record_hash(r)}.json" for r in records)
    assert suite.suite_keys(workspace) == {record_hash(r) for r in records}
    got, total = suite.suite_records(workspace, 8, "s")
    assert total == 3 and sorted(got, key=record_hash) == sorted(records, key=record_hash)

    # A hand-edited file is an error that names it, not a silently wrong example.
    files[0].write_text('{"input": "edited", "output": "x"}')
    with pytest.raises(DataError, match=files[0].name):
        suite.suite_records(workspace, 8, "s")


def test_add_version_is_idempotent_and_says_why_it_adds_nothing(
    workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    keep(workspace, "eval-1", rows(5))
    keep(workspace, "eval-2", rows(5, offset=3))  # overlaps eval-1 by two records
    assert suite.add_version(workspace, version(1, "eval-1")) == 5
    assert suite.add_version(workspace, version(1, "eval-1")) == 0  # a retried promotion
    assert suite.add_version(workspace, version(2, "eval-2")) == 3  # only the new ones
    assert len(suite.suite_keys(workspace)) == 8

    with caplog.at_level(logging.WARNING, logger=suite.__name__):
        assert suite.add_version(workspace, version(3, None)) == 0
        assert suite.add_version(workspace, version(4, "eval-old")) == 0  # report keeps none
    assert "v3 was registered without an evaluation" in caplog.text
    assert "evaluation report eval-old of v4 kept no test records" in caplog.text

    info = suite.suite_info(workspace, examples=2)
    assert info.total == 8 and len(info.examples) == 2
    assert [(s["version"], s["records"], s["added"]) for s in info.sources] == [
        (1, 5, 5), (2, 5, 3), (3, 0, 0), (4, 0, 0)]
    assert info.sources[3]["note"].startswith("evaluation report eval-old of v4")


def test_the_cli_shows_size_sources_and_examples(workspace: Workspace) -> None:
    from tests.e2e.test_cli import evertune

    keep(workspace, "eval-1", rows(5))
    suite.add_version(workspace, version(1, "eval-1"))
    out = evertune("data", "suite", "-n", "1", cwd=workspace.root).stdout
    assert "5 record(s) in" in out and "eval-1" in out
    assert out.count('{"input": "question ') == 1


def test_the_sample_is_seeded_stable_and_capped(workspace: Workspace) -> None:
    suite.add_records(workspace, rows(30))
    first, total = suite.suite_records(workspace, 10, seed="ds-aaaa")
    again, _ = suite.suite_records(workspace, 10, seed="ds-aaaa")
    other, _ = suite.suite_records(workspace, 10, seed="ds-bbbb")
    assert total == 30 and len(first) == 10
    assert first == again  # same seed, same examples, same order
    assert first != other
    keys = [record_hash(r) for r in first]
    assert keys == sorted(keys)  # the suite's stable order, whatever the seed drew
    everything, total = suite.suite_records(workspace, 64, seed="ds-aaaa")
    assert total == 30 and len(everything) == 30


def _add_in_process(root: str, records: list[dict[str, Any]], start: Any, out: Any) -> None:
    ws = Workspace.open(Path(root))
    start.wait()  # all processes add at the same moment
    out.put(suite.add_records(ws, records))


def test_concurrent_adds_neither_corrupt_nor_count_twice(workspace: Workspace) -> None:
    shared = rows(300)
    batches = [shared[k * 50:] + shared[: k * 50] + rows(5, offset=1000 + 10 * k)
               for k in range(4)]  # the same records, each process from another place
    # Forked, not spawned: a spawned child takes seconds to import, so the adds would not
    # overlap; the children never touch torch, so forking a process that holds it is safe.
    ctx = get_context("fork")
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_add_in_process, args=(str(workspace.root), b, start, out))
             for b in batches]
    for p in procs:
        p.start()
    added = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sum(added) == 300 + 4 * 5  # every record counted as added exactly once
    folder = suite.suite_dir(workspace) / "records"
    assert not [p for p in folder.iterdir() if not p.name.endswith(".json")]  # no temp left
    got, total = suite.suite_records(workspace, 1000, "s")  # reads and checks every file
    assert total == 320 and {record_hash(r) for r in got} == {
        record_hash(r) for batch in batches for r in batch}


def test_suite_records_are_never_trained_on(workspace: Workspace, tmp_path: Path) -> None:
    drop = rows(20)
    suite.add_records(workspace, drop[:6])
    result = add_files(workspace, [write_jsonl(tmp_path / "drop.jsonl", drop)])
    ds = result.versions[0]
    assert ds.counts["total"] == 14
    assert ds.report["in_regression_suite"] == 6 and result.report["in_regression_suite"] == 6
    stored = [r for s in ("train", "validation", "test") for r in ds.records(s)]
    assert not {record_hash(r) for r in stored} & suite.suite_keys(workspace)

    # A drop made only of suite records trains on nothing: a clear error, like the golden set.
    with pytest.raises(DataError, match=r"every sft record in old\.jsonl .* regression suite"):
        add_files(workspace, [write_jsonl(tmp_path / "old.jsonl", drop[:6])])

    # Turned off, the suite is not held out (nor grown, nor evaluated).
    off = Workspace.open(workspace.root, overrides=["eval.regression_suite=false"])
    assert add_files(off, [write_jsonl(tmp_path / "old.jsonl", drop[:6])]).versions[0].counts[
        "total"] == 6


# -- the hook -------------------------------------------------------------------------------
def _register(ws: Workspace, job_id: str, report_id: str) -> ModelVersion:
    """A version with evaluation report `report_id` (the adapter is never loaded here)."""
    adapter = _mkdir(ws.root / job_id)
    (adapter / "adapter_config.json").write_text("{}")
    job = {"id": job_id, "model": ws.config.model.base, "training_file": "ds-0123456789abcdef",
           "hyperparameters": {}, "result": {"path": str(adapter)}}
    return Registry(ws).register_version(job, {"id": report_id, "verdict": "pass",
                                               "reasons": []})


def _to_prod(reg: Registry, v: int) -> None:
    for stage in ("approved", "qa", "prod"):
        reg.transition(v, stage, actor="ana", reason="test")


def test_every_way_into_prod_grows_the_suite(
    workspace: Workspace, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = use_mlflow_template(workspace)
    reg = Registry(ws)
    keep(ws, "eval-1", rows(4))
    keep(ws, "eval-2", rows(4, offset=10))
    v1, v2 = _register(ws, "ftjob-1", "eval-1"), _register(ws, "ftjob-2", "eval-2")
    reg.transition(v1.version, "approved", actor="ana", reason="test")
    assert suite.suite_keys(ws) == set()  # approved is not PROD
    _to_prod(reg, v1.version)
    assert suite.suite_keys(ws) == {record_hash(r) for r in rows(4)}

    # While the hook is broken (a full disk), the promotion still happens and says why not.
    def broken(*_: object) -> int:
        raise OSError("No space left on device")

    monkeypatch.setattr(suite, "add_version", broken)
    with caplog.at_level(logging.ERROR, logger=suite.__name__):
        _to_prod(reg, v2.version)
    assert reg.alias_version("prod").version == v2.version  # type: ignore[union-attr]
    assert "test records of v2 were not added: No space left" in caplog.text
    monkeypatch.undo()

    # Rolling back (v1 again) and re-applying a move are the same idempotent add; the sync
    # picks up what the broken hook missed.
    reg.transition(v1.version, "prod", actor="ana", reason="rollback")
    reg.transition(v1.version, "prod", actor="ana", reason="retried step")
    assert len(suite.suite_keys(ws)) == 4
    assert suite.add_prod_history(ws) == 4
    assert len(suite.suite_keys(ws)) == 8


# -- the issue, end to end ------------------------------------------------------------------
def tickets(wrong: bool = False) -> list[dict[str, Any]]:
    """Sixty tickets for five teams; `wrong`: the same inputs as exported by a bug that wrote
    the default team on every row (the team column was lost), i.e. consistently wrong labels."""
    return [{"input": f"Ticket {i}: please route my {TEAMS[i % 5]} question",
             "output": f"team {TEAMS[0] if wrong else TEAMS[i % 5]}"} for i in range(60)]


# Full fine-tuning: a LoRA cannot move the tiny model's random 64-wide output head, which caps
# every logit near zero (token losses stay close to ln 512 whatever it learns), while training
# all ~100k weights learns which team a ticket names in a few seconds, like a real model would.
ROUNDS: dict[str, dict[str, Any]] = {
    "train": {"full_finetune": True, "n_epochs": 40, "batch_size": 8, "learning_rate": 0.003,
              "warmup_steps": 0, "checkpoint_every": 1000, "threads": 1},
    "data": {"max_seq_len": 128, "mode": "latest",
             "split": {"train": 0.7, "validation": 0.0, "test": 0.3}},
    # No embedding model to load and no forgetting guard: the gate here is the task's rules.
    "eval": {"max_examples": 8, "max_new_tokens": 6, "batch_size": 8,
             "metrics": ["loss", "rouge", "exact_match"], "general": False,
             "compare_base": False},
    "gate": {"bootstrap_samples": 500, "rules": [
        {"metric": "rougeL", "higher_is_better": True, "non_inferiority_margin": 0.02},
        {"metric": "loss", "higher_is_better": False, "non_inferiority_margin": 0.05}]},
    "deploy": FAST_TESTS,
}


@pytest.mark.slow
def test_a_drop_with_consistently_wrong_labels_is_refused_on_the_regression_split(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws = use_mlflow_template(make_workspace(tmp_path / "ws", tiny_model, **ROUNDS))
    assert ws.config.data.golden_set is None

    # Round 1: right labels, registered, approved, system-tested and promoted to PROD.
    steps.preprocess(ws, [write_jsonl(tmp_path / "tickets.jsonl", tickets())])
    job1 = steps.finetune(ws, steps.training_data(ws))
    report1 = steps.evaluate(ws, job1)
    assert report1.verdict == "pass", report1.reasons
    v1 = steps.register(ws, job1, report1)
    assert deploy.approve(ws, v1.version, ANA, "routes tickets").stage == "prod"
    kept = evaluated_records(ws, report1.id)
    assert len(kept) == 8 and suite.suite_keys(ws) == {record_hash(r) for r in kept}

    # Round 2: the buggy export, in `latest` mode (it alone is trained on). Suite records it
    # repeats exactly (the billing tickets) are held out of it.
    added = steps.preprocess(ws, [write_jsonl(tmp_path / "export.jsonl", tickets(wrong=True))])
    dataset = added.versions[0]
    assert dataset.report["in_regression_suite"] == sum(r["output"] == "team billing"
                                                        for r in kept)
    job2 = steps.finetune(ws, steps.training_data(ws))
    assert job2.training_file == dataset.id
    report2 = steps.evaluate(ws, job2)

    # Its own test split (the same bug) looks fine against PROD; only the suite knows better.
    # Without the suite there would be no regression split and the version would pass.
    assert set(report2.splits) == {"test", "regression"}
    assert report2.splits["test"].gate.verdict == "pass", report2.splits["test"].gate.reasons
    regression = report2.splits["regression"]
    assert regression.gate.verdict == "fail", regression.gate.reasons
    assert regression.n_examples == len(kept)  # none of them is in its (buggy) test split
    assert report2.reference_role == "reference"  # gated against PROD v1, not the base
    v2 = steps.register(ws, job2, report2)
    assert v2.gate == "fail" and v2.stage is Stage.REJECTED
    assert v2.gate_reasons and all(r.startswith("regression: ") for r in v2.gate_reasons)
    assert json.loads((ws.evals_dir / report2.id / "report.json").read_text())["verdict"] == "fail"
