"""Shared round steps: the training set a new round uses, feedback from serving folded in.

    pytest tests/test_steps.py
"""

from __future__ import annotations

import json
from pathlib import Path

from evertune import steps
from evertune.monitoring.feedback import build_record, write_feedback
from evertune.workspace import Workspace
from tests.conftest import make_workspace

SERVED = {"endpoint": "chat", "prompt": [{"role": "user", "content": "Where is my parcel?"}],
          "completion": "No idea.", "version": "v1", "model": "assistant@prod"}


def drop(ws: Workspace, tmp_path: Path) -> None:
    path = tmp_path / "drop.jsonl"
    path.write_text("".join(json.dumps({"input": f"Ticket {i}: refund please", "output": "billing"})
                            + "\n" for i in range(20)), "utf-8")
    steps.preprocess(ws, [path])


def answers(ws: Workspace) -> list[str]:
    data = steps.training_data(ws)
    return sorted(r["messages"][-1]["content"] for split in ("train", "validation", "test")
                  for r in data.records(split) if "messages" in r)


def rate(ws: Workspace, response_id: str, rating: int, correction: str | None = None) -> None:
    record = build_record(SERVED, response_id=response_id, rating=rating, correction=correction)
    write_feedback(ws, record, response_id)


def test_a_round_trains_on_corrections_and_liked_answers_never_on_disliked_ones(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model)
    drop(ws, tmp_path)
    assert answers(ws) == []  # no feedback yet: the drop alone

    rate(ws, "chatcmpl-down", -1)
    assert answers(ws) == []  # only a rated-down answer: nothing to train on, the round goes on
    rate(ws, "chatcmpl-up", 1)
    rate(ws, "chatcmpl-fixed", -1, correction="Your parcel ships tomorrow.")
    off = Workspace.open(ws.root, ["data.include_feedback=false"])
    assert steps.training_data(off).counts["total"] == 20
    logged: list[str] = []
    first = steps.training_data(ws, log=logged.append)
    assert answers(ws) == ["No idea.", "Your parcel ships tomorrow."]
    assert any("3 object(s)" in line and "1 row(s) not trained on" in line for line in logged)
    # Unchanged feedback is the same dataset version: a re-run (or a restart) stores nothing new.
    assert steps.training_data(ws).id == first.id

    latest = Workspace.open(ws.root, ["data.mode=latest"])
    assert all("messages" not in r for r in steps.training_data(latest).records("train"))
