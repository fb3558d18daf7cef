"""The forgetting guard and replay: pytest tests/evaluation/test_forgetting_guard.py

The base is the tiny model taught one general ability (repeating a general-set prompt back,
`teach_general_ability`), so there is behaviour to forget. A narrow round on ticket routing:
the default LoRA round keeps it and passes the guard; a full fine-tune at a high learning rate
destroys it and is rejected on the general split; replay keeps more of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evertune import steps
from evertune.errors import DataError
from evertune.evaluation.general import base_answers, general_examples, load_prompts, part_of
from evertune.testing import build_tiny_model, teach_general_ability
from evertune.workspace import Workspace

TEAMS = ["billing", "shipping", "account", "technical", "returns"]
ISSUES = ["my card was charged twice", "the package has not arrived", "I cannot log in",
          "the app crashes on settings", "these shoes are too small", "the tracking number fails"]


@pytest.fixture(scope="module")
def able_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return teach_general_ability(build_tiny_model(tmp_path_factory.mktemp("able-tiny")),
                                 steps=120)


@pytest.fixture(scope="module")
def tickets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"input": f"Route ticket {i}: {ISSUES[i % 6]}.",
             "output": f"the team for this ticket is {TEAMS[i % 5]}"} for i in range(40)]
    path = tmp_path_factory.mktemp("tickets") / "tickets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def _workspace(root: Path, base: Path, train: dict, **sections: dict) -> Workspace:
    Workspace.init(root)
    raw = yaml.safe_load((root / "evertune.yaml").read_text())
    raw["model"]["base"] = str(base)
    raw["train"].update(train)
    raw["data"]["max_seq_len"] = 128
    raw["eval"].update({"max_examples": 8, "max_new_tokens": 8, "batch_size": 16})
    raw["gate"]["bootstrap_samples"] = 300
    for section, values in sections.items():
        raw[section].update(values)
    (root / "evertune.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return Workspace.open(root)


def test_full_finetune_at_a_high_rate_trips_the_guard_and_default_lora_passes(
    able_model: Path, tickets: Path, tmp_path: Path
) -> None:
    from evertune.registry import Registry

    outcomes = {}
    for name, train in [("lora", {}),  # train.* defaults: LoRA r16, lr 1e-3, 3 epochs
                        ("full", {"full_finetune": True, "learning_rate": 0.01})]:
        # Without replay, so the guard alone is what stands between forgetting and PROD
        # (replay would teach this tiny model its one ability back; see the next test).
        ws = _workspace(tmp_path / name, able_model, train, data={"replay": 0.0})
        dataset = steps.preprocess(ws, [tickets]).versions[0]
        job = steps.finetune(ws, dataset)
        report = steps.evaluate(ws, job)
        mv = steps.register(ws, job, report)
        general = report.splits["general"]
        assert general.n_examples == ws.config.eval.general_max_examples
        assert "answered by the base model" in general.source
        # The base's own answers are the references: its loss on them is the floor.
        assert general.means["base"]["loss"] < general.means["candidate"]["loss"] + 0.5
        assert [r.metric for r in general.gate.rules] == ["loss"]
        outcomes[name] = (report, general, mv)
        # Shown with the version: its own split in the registry's metrics.
        assert "general.loss" in Registry(ws).get_version(mv.version).metrics

    report, general, mv = outcomes["lora"]
    assert general.gate.verdict == "pass", general.gate.reasons
    assert not any(r.startswith("general:") for r in report.reasons)
    assert mv.gate != "fail" or not any(r.startswith("general:") for r in mv.gate_reasons)

    report, general, mv = outcomes["full"]
    assert general.gate.verdict == "fail"
    assert mv.gate == "fail" and report.verdict == "fail"
    assert any(r.startswith("general: loss") for r in mv.gate_reasons), mv.gate_reasons
    # The full fine-tune forgot far more than the LoRA round.
    lora_drift = (outcomes["lora"][1].means["candidate"]["loss"]
                  - outcomes["lora"][1].means["base"]["loss"])
    full_drift = general.means["candidate"]["loss"] - general.means["base"]["loss"]
    assert full_drift > 5 * max(lora_drift, 0.05)


def test_replay_keeps_more_of_the_base_behaviour(
    able_model: Path, tickets: Path, tmp_path: Path
) -> None:
    from evertune.facts import read_facts
    from evertune.training.jobs import list_events

    # An aggressive LoRA round (high rate) forgets; the same round with replay forgets less.
    train = {"n_epochs": 2, "batch_size": 4, "learning_rate": 0.01}
    losses = {}
    for replay in (0.0, 0.3):
        ws = _workspace(tmp_path / f"replay-{replay}", able_model, train,
                        data={"replay": replay})
        dataset = steps.preprocess(ws, [tickets]).versions[0]
        job = steps.finetune(ws, dataset)
        report = steps.evaluate(ws, job)
        losses[replay] = report.splits["general"].means["candidate"]["loss"]
        facts = read_facts(Path(job.result["path"]))
        assert facts.replay == replay
        events = [e.message for e in list_events(ws, job.id)]
        if replay:
            n_train = dataset.counts["train"]
            expected = round(replay * n_train / (1 - replay))
            assert any(m.startswith(f"Replay: {expected} general-set examples") for m in events)
    assert losses[0.3] < losses[0.0] - 0.5, losses


def test_base_answers_are_generated_once_per_base_and_cached(
    able_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import evertune.generation

    monkeypatch.setenv("EVERTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    ws = _workspace(tmp_path / "ws", able_model, {})
    guard = general_examples(ws.config, ws.root, able_model, "guard")
    replay = general_examples(ws.config, ws.root, able_model, "replay")
    prompts, _ = load_prompts(ws.config, ws.root)
    assert len(guard) + len(replay) == len(prompts)
    # The halves never overlap: replay never trains on what the guard evaluates.
    assert not {r["input"] for r in guard} & {r["input"] for r in replay}
    assert all(part_of({"input": r["input"]}) == "guard" for r in guard)
    # The taught base repeats the prompt back: the references are its own greedy answers.
    assert all(r["output"].startswith("You asked") for r in guard[:5]), guard[:5]

    cached = list((tmp_path / "cache" / "general").glob("*.jsonl"))
    assert len(cached) == 1
    calls = []
    monkeypatch.setattr(evertune.generation, "generate",
                        lambda *a, **k: calls.append(1) or [])
    again = general_examples(ws.config, ws.root, able_model, "guard")
    assert again == guard and calls == []
    # Another base (or other generation settings) gets its own answers.
    other = build_tiny_model(tmp_path / "other", seed=1)
    monkeypatch.undo()
    monkeypatch.setenv("EVERTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    base_answers(other, prompts[:3], max_new_tokens=4)
    assert len(list((tmp_path / "cache" / "general").glob("*.jsonl"))) == 2


def test_a_teams_own_general_set_and_its_errors(able_model: Path, tmp_path: Path) -> None:
    ws = _workspace(tmp_path / "ws", able_model, {},
                    eval={"general_set": "mine.jsonl"})
    with pytest.raises(DataError, match=r"mine\.jsonl.*does not exist"):
        load_prompts(ws.config, ws.root)
    (ws.root / "mine.jsonl").write_text('{"input": "Say hi."}\n{"output": "no input"}\n')
    with pytest.raises(DataError, match=r"mine\.jsonl line 2: a general-set row needs"):
        load_prompts(ws.config, ws.root)
    (ws.root / "mine.jsonl").write_text('{"input": "Say hi."}\nnot json\n')
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        load_prompts(ws.config, ws.root)
    rows = [{"input": f"Name a colour number {i}."} for i in range(6)]
    rows.append({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Name a fruit."}]})
    (ws.root / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, name = load_prompts(ws.config, ws.root)
    assert name == "mine.jsonl" and len(prompts) == 7
    examples = (general_examples(ws.config, ws.root, able_model, "guard")
                + general_examples(ws.config, ws.root, able_model, "replay"))
    assert len(examples) == 7
    chat = [e for e in examples if "messages" in e]
    assert chat and chat[0]["messages"][-1]["role"] == "assistant"


def test_replay_keeps_the_base_behaviour_through_continued_pretraining(
    able_model: Path, tmp_path: Path
) -> None:
    """A domain corpus pulls the model away from what it could do; with data.replay the
    base's own conversations are packed in as documents and it forgets less."""
    from evertune.facts import read_facts
    from evertune.training.jobs import list_events

    corpus = tmp_path / "ledger.txt"
    corpus.write_text("\n\n".join(
        f"ledger {i}: account {TEAMS[i % 5]} settled {ISSUES[i % 6]} on day {i % 7}"
        for i in range(60)) + "\n", "utf-8")
    train = {"n_epochs": 2, "batch_size": 4, "learning_rate": 0.01}
    losses = {}
    for replay in (0.0, 0.3):
        ws = _workspace(tmp_path / f"cpt-{replay}", able_model, train, data={"replay": replay})
        dataset = steps.preprocess(ws, [corpus]).versions[0]
        assert dataset.kind == "pretrain"
        job = steps.finetune(ws, dataset)
        assert job.method == "pretrain" and job.status == "succeeded", job.error
        report = steps.evaluate(ws, job)
        losses[replay] = report.splits["general"].means["candidate"]["loss"]
        assert read_facts(Path(job.result["path"])).replay == replay
        events = [e.message for e in list_events(ws, job.id)]
        assert any(m.startswith("Replay:") for m in events) == bool(replay)
    assert losses[0.3] < losses[0.0] - 0.5, losses
