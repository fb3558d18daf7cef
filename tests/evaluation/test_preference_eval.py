"""Evaluating text, preference and rated data on the tiny model:
pytest tests/evaluation/test_preference_eval.py

- text (pretraining) data: loss and perplexity per example for every model, gated by the loss
  rule alone, no generation;
- preference pairs: preference_accuracy and reward_margin for candidate, reference and base,
  gated by gate.preference_rules (loss rules give way);
- rated (KTO) answers: desirable ones are supervised examples, rated-down ones are scored by
  their log-probability only.

The preference candidate is tests.api.helpers.trained_adapter: a LoRA trained (SFT) to answer
"the team for this ticket is <team>", the chosen answer of every pair below, on the same
chat-templated prompt a preference pair is rendered with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rich.console import Console

from evertune.evaluation import ModelRef, evaluate_candidate, print_report
from evertune.evaluation import metrics as M
from evertune.workspace import Workspace
from tests.api.helpers import ANSWER, TEAMS, trained_adapter, untrained_adapter

if TYPE_CHECKING:
    from evertune.data.store import DatasetVersion

ISSUES = ["my card was charged twice", "the package has not arrived", "I cannot log in",
          "the app crashes on settings", "these shoes are too small"]
REFUSAL = "no idea"  # a rated-down answer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def prompt(i: int) -> str:
    # The shape trained_adapter was trained on.
    return f"Ticket {i}: please route my {TEAMS[i % 5]} question"


def reversed_words(text: str) -> str:
    return " ".join(reversed(text.split()))


def pair_rows(n: int) -> list[dict]:
    # The rejected answer is the chosen one's words in reverse order: about as many tokens, so
    # the random base model (about the same log-probability per token for anything) prefers
    # either at chance (a shorter rejected answer would win on length alone: log-probabilities
    # are summed), while a model taught the chosen answers prefers them.
    return [{"prompt": prompt(i), "chosen": ANSWER.format(TEAMS[i % 5]),
             "rejected": reversed_words(ANSWER.format(TEAMS[i % 5]))} for i in range(n)]


def add(ws: Workspace, name: str, rows: list[dict]) -> DatasetVersion:
    from evertune.data.store import add_files

    return add_files(ws, [write_jsonl(ws.root / name, rows)]).versions[0]


def half_test(ws: Workspace, *more: str) -> Workspace:
    return Workspace.open(ws.root, overrides=[
        "data.split.train=0.5", "data.split.validation=0.0", "data.split.test=0.5",
        "eval.max_examples=16", *more,
    ])


# -- metrics -----------------------------------------------------------------------------


def test_preference_metrics_from_log_probabilities() -> None:
    nan = math.nan
    acc = M.preference_accuracy([-1.0, -5.0, -2.0, nan], [-3.0, -1.0, -2.0, -1.0])
    assert acc[:3] == [1.0, 0.0, 0.0] and math.isnan(acc[3])  # a tie is not a preference
    margin = M.reward_margin([-1.0, -4.0], [-3.0, -4.0], [-2.0, -4.0], [-2.0, -4.0], beta=0.1)
    # 0.1 x ((-1 - -2) - (-3 - -2)) = 0.2; a model equal to the base has margin 0.
    assert margin == pytest.approx([0.2, 0.0])
    gap = M.kto_logp_gap([-1.0, -1.0], [-2.0, -2.0], [True, False])
    assert gap == [1.0, -1.0]  # more likely: good for a desirable answer, bad for a rated-down one
    with pytest.raises(ValueError, match="pair up"):
        M.preference_accuracy([1.0], [])


def test_completion_logprobs_agree_with_the_loss(tiny_model: Path) -> None:
    from evertune.data.templating import Example
    from evertune.models import load_model, load_tokenizer

    tok, model = load_tokenizer(tiny_model), load_model(tiny_model)
    examples = [Example("Say hi: ", "hello world"), Example("", "The quick brown fox."),
                Example("x " * 300, "too long a prompt")]
    scored = M.completion_logprobs(model, tok, examples, max_seq_len=64, batch_size=2)
    losses = M.example_losses(model, tok, examples, max_seq_len=64, batch_size=2)
    for (logp, n), loss in zip(scored[:2], losses[:2], strict=True):
        assert n > 0 and logp < 0 and -logp / n == pytest.approx(loss, rel=1e-5)
    assert math.isnan(scored[2][0]) and scored[2][1] == 0 and math.isnan(losses[2])


def test_every_rated_answer_becomes_an_example(tiny_model: Path) -> None:
    from evertune.evaluation.evaluate import _item
    from evertune.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    # Rendered as the SFT shape they carry: a raw prompt here, the chat template below.
    good = _item({"prompt": "Say hi", "completion": "Hi!", "label": True}, tok)
    assert (good.kind, good.generative, good.expected, good.rejected) == ("desirable", True,
                                                                          "Hi!", None)
    assert (good.input, good.prompt) == ("Say hi", "Say hi")
    bad = _item({"messages": [{"role": "user", "content": "Say hi"},
                              {"role": "assistant", "content": "No."}], "label": False}, tok)
    assert (bad.kind, bad.generative, bad.expected, bad.rejected) == ("undesirable", False,
                                                                      "", "No.")
    assert bad.input == "Say hi" and bad.prompt.endswith("<|im_start|>assistant\n")
    pair = _item({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}, tok)
    assert (pair.kind, pair.expected, pair.rejected) == ("preference", "Hi!", "No.")
    # A label that is not a boolean is not a rating: a plain prompt/completion record.
    plain = _item({"prompt": "2+2=", "completion": "4", "label": "yes"}, tok)
    assert (plain.kind, plain.prompt, plain.rejected) == ("sft", "2+2=", None)


# -- text data ---------------------------------------------------------------------------


def test_text_split_reports_perplexity_per_model_and_is_gated_by_loss(
    workspace: Workspace, tiny_model: Path
) -> None:
    ws = half_test(workspace)
    rows = [{"text": f"Ticket {i}: {ISSUES[i % 5]}, sent to {TEAMS[i % 5]}."} for i in range(24)]
    dataset = add(ws, "notes.jsonl", rows)
    assert dataset.kind == "pretrain"
    calls: list[str] = []
    report = evaluate_candidate(
        ws, ModelRef("cand", adapter=trained_adapter(tiny_model)), dataset,
        reference=ModelRef("v1 (prod)", adapter=untrained_adapter(tiny_model), version="1"),
        progress=lambda label, done, total: calls.append(label),
    )
    test = report.splits["test"]
    assert set(report.models) == set(test.means) == {"candidate", "reference", "base"}
    # Loss and perplexity only: no generation metric, no latency, nothing generated.
    for role in ("candidate", "reference", "base"):
        assert set(test.means[role]) == {"loss", "perplexity"}
        assert test.means[role]["loss"] > 0
    assert not any("generating" in label for label in calls)
    for row in test.rows:
        assert row.prompt == "" and row.expected == row.input and row.rejected is None
        for out in row.outputs.values():
            assert out.text is None and out.latency_s is None
            assert out.scores["perplexity"] == pytest.approx(math.exp(out.scores["loss"]))
    # A zero LoRA is the base model: the reference's scores are the base's.
    assert test.means["reference"]["loss"] == pytest.approx(test.means["base"]["loss"], abs=1e-5)

    # The verdict rests on the loss rule alone, the other rules skipped with a note.
    assert [r.metric for r in test.gate.rules] == ["loss"]
    loss_rule = test.gate.rules[0]
    assert loss_rule.n == test.n_examples and not loss_rule.higher_is_better
    assert loss_rule.difference == pytest.approx(
        test.means["candidate"]["loss"] - test.means["reference"]["loss"], rel=1e-6)
    assert test.gate.verdict == loss_rule.outcome
    assert all(reason.startswith("loss") for reason in report.reasons)
    assert any("rules on embedding_cosine, rougeL skipped: text (pretraining)" in n
               for n in report.notes)
    assert report.metrics == M.metric_names(ws.config.eval.metrics)  # no preference metrics

    console = Console(record=True, width=160)
    print_report(report, console)
    text = console.export_text()
    assert "perplexity" in text and "rougeL" not in text.split("note:")[0]
    assert "candidate:" not in text  # no generated answer to show in regressions


# -- preference pairs --------------------------------------------------------------------


def test_preference_pairs_are_gated_by_preference_accuracy(
    workspace: Workspace, tiny_model: Path
) -> None:
    ws = half_test(workspace)
    dataset = add(ws, "pairs.jsonl", pair_rows(40))
    assert dataset.kind == "dpo"
    report = evaluate_candidate(
        ws, ModelRef("cand", adapter=trained_adapter(tiny_model)), dataset,
        reference=ModelRef("v1 (prod)", adapter=untrained_adapter(tiny_model), version="1"),
    )
    test = report.splits["test"]
    means = test.means
    for role in ("candidate", "reference", "base"):
        assert means[role]["preference_accuracy"] is not None
        assert means[role]["reward_margin"] is not None
    # Trained towards the chosen answers: it prefers them; the random base is at chance.
    # Margins are relative to the base: 0 for it and
    # for the zero LoRA that computes what it does.
    assert means["candidate"]["preference_accuracy"] > means["base"]["preference_accuracy"]
    assert means["candidate"]["preference_accuracy"] >= 0.9
    assert means["base"]["reward_margin"] == 0.0
    assert means["reference"]["reward_margin"] == pytest.approx(0.0, abs=1e-3)
    assert means["candidate"]["reward_margin"] > 0
    assert {"preference_accuracy", "reward_margin"} <= set(report.metrics)

    # gate.rules on generated answers (compared with `chosen`) plus gate.preference_rules;
    # the loss rule gives way (DPO may lower the chosen answer's likelihood).
    expected = [r.metric for r in ws.config.gate.rules if r.metric != "loss"]
    expected += [r.metric for r in ws.config.gate.preference_rules]
    assert [r.metric for r in test.gate.rules] == expected
    assert expected[-1] == "preference_accuracy"
    pref_rule = test.gate.rule("preference_accuracy")
    assert pref_rule is not None and pref_rule.outcome == "pass", report.reasons
    assert pref_rule.method.startswith("exact McNemar") and pref_rule.n == test.n_examples
    assert any("rules on loss skipped: preference pairs" in n for n in report.notes)
    assert test.gate.comparisons == len(expected)
    assert report.verdict == "pass", report.reasons

    row = test.rows[0]
    assert row.expected.startswith("the team for this ticket is")
    assert row.rejected == reversed_words(row.expected)
    assert row.outputs["candidate"].text is not None  # still generated, compared with chosen
    assert row.outputs["base"].scores["reward_margin"] == 0.0
    # The chosen answer's loss is still reported per example, only not gated.
    assert row.outputs["candidate"].scores["loss"] is not None


def test_reward_margin_without_the_base_as_a_model(workspace: Workspace, tiny_model: Path) -> None:
    ws = half_test(workspace, "eval.compare_base=false")
    dataset = add(ws, "pairs.jsonl", pair_rows(24))
    report = evaluate_candidate(
        ws, ModelRef("cand", adapter=trained_adapter(tiny_model)), dataset,
        reference=ModelRef("v1 (prod)", adapter=untrained_adapter(tiny_model), version="1"),
    )
    test = report.splits["test"]
    assert set(test.means) == {"candidate", "reference"}
    # The base was loaded for its log-probabilities only.
    assert test.means["candidate"]["reward_margin"] > 0
    assert any("scored for log-probabilities only" in n for n in report.notes)


# -- rated answers -----------------------------------------------------------------------


def test_rated_answers_score_desirable_and_rated_down_apart(
    workspace: Workspace, tiny_model: Path
) -> None:
    ws = half_test(workspace)
    # Input/output rows with a label: rendered with the chat template trained_adapter knows.
    rows = [{"input": prompt(i), "output": ANSWER.format(TEAMS[i % 5]), "label": True}
            for i in range(20)]
    rows += [{"input": prompt(100 + i), "output": REFUSAL + f" ({i})", "label": False}
             for i in range(20)]
    dataset = add(ws, "rated.jsonl", rows)
    assert dataset.kind == "kto"
    report = evaluate_candidate(ws, ModelRef("cand", adapter=trained_adapter(tiny_model)),
                                dataset)
    test = report.splits["test"]
    good = [row for row in test.rows if row.rejected is None]
    bad = [row for row in test.rows if row.rejected is not None]
    assert good and bad
    for row in good:
        assert row.outputs["candidate"].text is not None
        assert row.outputs["candidate"].scores["loss"] is not None
        assert row.outputs["candidate"].scores["undesirable_logp"] is None
    for row in bad:
        cand = row.outputs["candidate"]
        assert cand.text is None and row.rejected.startswith(REFUSAL) and row.expected == ""
        assert cand.scores["loss"] is None and cand.scores["undesirable_logp"] < 0
        assert cand.scores["rougeL"] is None
    # Trained towards the desirable answers: their log-probability rose over the base's.
    assert all(row.outputs["candidate"].scores["kto_logp_gap"] > 0 for row in good)
    assert all(row.outputs["base"].scores["kto_logp_gap"] == 0.0 for row in test.rows)
    assert {"kto_logp_gap", "undesirable_logp"} <= set(test.means["candidate"])
    # Rules on loss and on generated text compare the desirable answers only.
    assert [r.metric for r in test.gate.rules] == [r.metric for r in ws.config.gate.rules]
    assert all(rule.n == len(good) for rule in test.gate.rules)
    assert any("test: rules on loss leave out its rated-down answers" in n for n in report.notes)
