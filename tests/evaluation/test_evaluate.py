"""evaluate_candidate end to end on the tiny model: pytest tests/evaluation/test_evaluate.py"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rich.console import Console

from evertune.errors import ConfigError
from evertune.evaluation import ModelRef, evaluate_candidate, load_report, print_report
from evertune.evaluation.evaluate import gate_verdict
from evertune.workspace import Workspace

if TYPE_CHECKING:
    from evertune.data.store import DatasetVersion

    WithData = tuple[Workspace, DatasetVersion]

TEAMS = ["billing", "shipping", "account", "technical", "returns"]
ISSUES = ["my card was charged twice", "the package has not arrived", "I cannot log in",
          "the app crashes on settings", "these shoes are too small", "the tracking number fails"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def ticket_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"input": f"Route ticket {i}: {ISSUES[i % len(ISSUES)]}.",
             "output": TEAMS[i % len(TEAMS)]} for i in range(offset, offset + n)]


def make_adapter(base: Path, out: Path, *, random_init: bool, seed: int = 0) -> Path:
    """A LoRA adapter saved with PEFT; random_init=False gives one that changes nothing."""
    import torch
    from peft import LoraConfig, get_peft_model

    from evertune.models import load_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear",
                      init_lora_weights=not random_init)
    get_peft_model(load_model(base), lora).save_pretrained(str(out))
    return out


@pytest.fixture
def ws_with_data(workspace: Workspace) -> WithData:
    from evertune.data.store import add_files

    write_jsonl(workspace.root / "golden.jsonl", ticket_rows(3, offset=1000))
    # Half the rows go to test so a small file gives the gate something to compare.
    ws = Workspace.open(workspace.root, overrides=[
        "data.split.train=0.5", "data.split.validation=0.0", "data.split.test=0.5",
        "data.golden_set=golden.jsonl", "eval.general=true",
    ])
    result = add_files(ws, [write_jsonl(ws.root / "drop.jsonl", ticket_rows(30))])
    return ws, result.versions[0]


def test_evaluate_candidate_writes_a_gated_report(
    ws_with_data: WithData, tiny_model: Path, tmp_path: Path
) -> None:
    ws, dataset = ws_with_data
    adapter = make_adapter(tiny_model, tmp_path / "cand", random_init=True)
    calls: list[tuple[str, int, int]] = []
    report = evaluate_candidate(
        ws, ModelRef("cand-1", adapter=adapter), dataset,
        progress=lambda label, done, total: calls.append((label, done, total)),
    )

    # Test split (at most eval.max_examples = 8), golden set and the forgetting guard's
    # general set, candidate vs base.
    assert set(report.splits) == {"test", "golden", "general"}
    test, golden = report.splits["test"], report.splits["golden"]
    assert test.n_examples == min(8, dataset.counts["test"]) and golden.n_examples == 3
    assert report.reference_role == "base" and set(report.models) == {"candidate", "base"}
    assert set(test.means) == {"candidate", "base"}
    for metric in ("loss", "perplexity", "rouge1", "rouge2", "rougeL", "embedding_cosine",
                   "exact_match", "latency_s"):
        assert test.means["candidate"][metric] is not None
    row = test.rows[0]
    assert row.input.startswith("Route ticket") and row.expected in TEAMS
    assert "<|im_start|>assistant" in row.prompt
    assert row.outputs["candidate"].text is not None and row.outputs["candidate"].latency_s > 0
    assert row.outputs["candidate"].completion_tokens <= ws.config.eval.max_new_tokens

    # The gate ran the configured rules on both splits; reasons name split and metric.
    assert [r.metric for r in test.gate.rules] == [r.metric for r in ws.config.gate.rules]
    assert all(r.ci_low <= r.difference <= r.ci_high for r in test.gate.rules)
    verdicts = {split.gate.verdict for split in report.splits.values()}
    assert report.verdict == ("fail" if "fail" in verdicts else
                              "inconclusive" if "inconclusive" in verdicts else "pass")
    # Bonferroni over every rule on every split, stated in each split's gate.
    general = report.splits["general"]
    guard_rules = [r.metric for r in ws.config.gate.general_rules]
    assert [r.metric for r in general.gate.rules] == guard_rules
    k = 2 * len(ws.config.gate.rules) + len(ws.config.gate.general_rules)
    assert test.gate.comparisons == golden.gate.comparisons == general.gate.comparisons == k
    assert test.gate.correction.startswith(f"Bonferroni over {k} comparisons")
    assert len(report.reasons) == sum(len(s.gate.reasons) for s in (test, golden, general))
    n_test = len(test.gate.reasons)
    assert all(r.startswith("golden: ")
               for r in report.reasons[n_test:n_test + len(golden.gate.reasons)])
    assert all(r.startswith("general: ")
               for r in report.reasons[n_test + len(golden.gate.reasons):])
    assert len(test.worst_regressions) <= 10
    assert all(reg.change < 0 for reg in test.worst_regressions)

    # Saved as plain JSON and read back identically.
    path = ws.evals_dir / report.id / "report.json"
    assert load_report(path) == report
    json.loads(path.read_text())  # strict JSON: no NaN
    assert report.summary_metrics()["test.candidate.rougeL"] == test.means["candidate"]["rougeL"]

    assert ("candidate (cand-1): generating (test)", test.n_examples, test.n_examples) in calls
    assert any(label.startswith("base: loss (golden)") for label, _, _ in calls)

    console = Console(record=True, width=160)
    print_report(report, console)
    text = console.export_text()
    assert "rougeL" in text and "embedding_cosine" in text
    assert f"gate: {report.verdict.upper()}" in text


def test_unchanged_candidate_passes_against_prod(
    ws_with_data: WithData, tiny_model: Path, tmp_path: Path
) -> None:
    ws, dataset = ws_with_data
    # A zero-initialised LoRA adapter computes exactly what the base model does.
    same = make_adapter(tiny_model, tmp_path / "same", random_init=False)
    prod = make_adapter(tiny_model, tmp_path / "prod", random_init=False)
    report = evaluate_candidate(ws, ModelRef("cand", adapter=same), dataset,
                                reference=ModelRef("v1 (prod)", adapter=prod, version="1"))
    assert report.reference_role == "reference"
    assert set(report.models) == {"candidate", "reference", "base"}
    assert report.verdict == "pass", report.reasons
    for rule in report.gate.rules:
        assert rule.difference == pytest.approx(0, abs=1e-4)
    assert report.splits["test"].worst_regressions == []


def test_rule_on_an_uncomputed_metric_fails_before_loading_models(ws_with_data: WithData) -> None:
    ws, dataset = ws_with_data
    ws = Workspace.open(ws.root, overrides=["gate.rules=[{metric: bleu, threshold: 0.1}]",
                                           "eval.metrics=[rouge]"])
    with pytest.raises(ConfigError, match="'bleu' is not computed"):
        evaluate_candidate(ws, ModelRef("cand", adapter=Path("/nonexistent")), dataset)


def test_text_data_is_gated_on_loss_only(workspace: Workspace, tiny_model: Path,
                                         tmp_path: Path) -> None:
    from evertune.data.store import add_files

    # No test split at all: the validation split stands in, with a note.
    ws = Workspace.open(workspace.root, overrides=[
        "data.split.train=0.5", "data.split.validation=0.5", "data.split.test=0.0",
    ])
    rows = [{"text": f"Ticket {i}: {ISSUES[i % len(ISSUES)]}, sent to {TEAMS[i % len(TEAMS)]}."}
            for i in range(16)]
    dataset = add_files(ws, [write_jsonl(ws.root / "notes.jsonl", rows)]).versions[0]
    assert dataset.kind == "pretrain"
    same = make_adapter(tiny_model, tmp_path / "same", random_init=False)
    report = evaluate_candidate(ws, ModelRef("cand", adapter=same), dataset)
    assert [r.metric for r in report.gate.rules] == ["loss"]
    assert report.verdict == "pass"
    assert any("validation split instead" in n for n in report.notes)
    assert any("rules on embedding_cosine, rougeL skipped" in n for n in report.notes)
    row = report.splits["test"].rows[0]
    assert row.outputs["candidate"].text is None
    assert row.outputs["candidate"].scores["loss"] is not None
    assert row.outputs["candidate"].scores.get("rougeL") is None


def test_every_record_format_becomes_an_example(tiny_model: Path) -> None:
    from evertune.evaluation.evaluate import _item
    from evertune.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    chat = _item({"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"}]}, tok)
    assert (chat.input, chat.expected, chat.generative) == ("Hi", "Hello!", True)
    assert chat.prompt.endswith("<|im_start|>assistant\n") and "Be brief." in chat.prompt
    io = _item({"input": "2+2?", "output": "4"}, tok)
    assert (io.input, io.expected) == ("2+2?", "4") and "2+2?" in io.prompt
    pc = _item({"prompt": "2+2=", "completion": "4"}, tok)
    assert (pc.input, pc.prompt, pc.expected) == ("2+2=", "2+2=", "4")
    pref = _item({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}, tok)
    assert (pref.input, pref.expected, pref.generative) == ("Say hi", "Hi!", True)
    text = _item({"text": "Some document."}, tok)
    assert (text.prompt, text.expected, text.generative) == ("", "Some document.", False)


@pytest.mark.parametrize(("policy", "expected"), [
    ("review", "inconclusive"), ("pass", "pass"), ("fail", "fail"),
])
def test_gate_on_inconclusive_decides_the_report_verdict(policy: str, expected: str) -> None:
    notes: list[str] = []
    assert gate_verdict(["pass", "inconclusive"], policy, notes) == expected
    assert len(notes) == 1 and f"gate.on_inconclusive={policy}" in notes[0]
    # A failed split fails whatever the policy; all passing splits pass, with no note.
    assert gate_verdict(["inconclusive", "fail"], policy, []) == "fail"
    quiet: list[str] = []
    assert gate_verdict(["pass", "pass"], policy, quiet) == "pass" and not quiet
