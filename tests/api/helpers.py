"""Test helpers shared by tests/test_deploy.py and tests/api/: real LoRA adapters of the tiny
model, a migrated MLflow DB to copy, and registering versions with the real Registry.

Expensive things are built once per test session (functools.cache) and copied or reused:
- `trained_adapter(tiny)`: a PEFT LoRA of the tiny model trained in-process for 150 steps on
  TICKETS answered as "the team for this ticket is billing", so its answers are words
  (non-empty, not degenerate): system tests pass on it. (Trained on the bare team names, the
  random tiny model's LoRA learns little beyond the end-of-turn token's frequency, and with
  some library versions its greedy answer is that token: empty. A constant lead-in is
  learnt in a few dozen steps whatever the versions.) Training it with the real
  `steps.finetune` costs a child process (~20 s on the shared CI cores) and tests/training
  already covers that path.
- `untrained_adapter(tiny)`: the same LoRA saved before any step: the random tiny model
  answers with a run of newlines, which the system tests' output-sanity check rejects.
- `mlflow_template()`: an MLflow SQLite DB whose schema is migrated (~3 s on a new DB).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from evertune.registry import ModelVersion, Registry
from evertune.workspace import Workspace

TEAMS = ["billing", "shipping", "account", "technical", "returns"]
TICKETS = [
    {"input": f"Ticket {i}: please route my {TEAMS[i % 5]} question", "output": TEAMS[i % 5]}
    for i in range(40)
]
ANSWER = "the team for this ticket is {}"  # what trained_adapter learns to answer
# deploy.system_tests settings that keep a system-test run well under a second.
FAST_TESTS = {"system_tests": {"max_prompts": 3, "max_new_tokens": 6, "latency_budget_s": 30.0}}


def _tempdir(prefix: str) -> Path:
    """A temporary folder removed when the test process exits (it outlives single tests)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def _lora(tiny: Path, steps: int, folder: Path) -> Path:
    rows = [{"input": r["input"], "output": ANSWER.format(r["output"])} for r in TICKETS]
    return train_lora(tiny, rows, steps, folder)


def train_lora(base: Path, records: list[dict[str, str]], steps: int, folder: Path,
               lr: float = 1e-2) -> Path:
    """A LoRA adapter of `base` trained in-process on input/output `records`, saved at `folder`.

    1e-2 for 300 steps learns a sentence answer on the tiny model; 2e-2 for 150 left it garbled
    after "the team for" (measured with transformers 5.24 / peft 0.21).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from evertune.data.templating import to_example, tokenize_example
    from evertune.models import load_model, load_tokenizer

    torch.manual_seed(0)
    # One thread: on shared CI cores torch's thread pool spins against other processes and a
    # 2-second training takes 30 (measured); a model this small gains nothing from threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = load_tokenizer(base)
        model = get_peft_model(
            load_model(base),
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        examples = [tokenize_example(to_example(r, tok), tok, 128, False) for r in records]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for step in range(steps):
            batch = [examples[(step * 8 + j) % len(examples)] for j in range(8)]
            width = max(len(e.input_ids) for e in batch)  # type: ignore[union-attr]
            ids = torch.tensor([e.input_ids + [tok.pad_token_id] * (width - len(e.input_ids))
                                for e in batch])  # type: ignore[union-attr]
            labels = torch.tensor([e.labels + [-100] * (width - len(e.labels))
                                   for e in batch])  # type: ignore[union-attr]
            mask = (torch.arange(width)[None, :] < torch.tensor(
                [len(e.input_ids) for e in batch])[:, None]).long()  # type: ignore[union-attr]
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        model.save_pretrained(folder)
    finally:
        torch.set_num_threads(threads)
    return folder


@functools.cache
def trained_adapter(tiny: Path) -> Path:
    """A LoRA adapter of the tiny model that answers with a team name."""
    return _lora(tiny, 300, _tempdir("evertune-lora-") / "adapter")


@functools.cache
def untrained_adapter(tiny: Path) -> Path:
    """A LoRA adapter with zero-initialised B matrices: the random base model's answers."""
    return _lora(tiny, 0, _tempdir("evertune-lora0-") / "adapter")


@functools.cache
def mlflow_template() -> Path:
    """A migrated MLflow DB; copy it into a new workspace before its first Registry use."""
    root = _tempdir("evertune-mlflow-")
    ws, _ = Workspace.init(root / "ws")
    Registry(ws).client.search_experiments()
    return ws.state_dir / "mlflow.db"


def use_mlflow_template(ws: Workspace) -> Workspace:
    shutil.copy(mlflow_template(), ws.state_dir / "mlflow.db")
    return ws


def add_dataset(ws: Workspace, tmp: Path) -> str:
    """Store TICKETS, answered the way trained_adapter answers (ANSWER), as a dataset version
    of `ws`; its id. Evaluated on it, trained_adapter clearly beats the base model."""
    from evertune import steps

    rows = [{"input": r["input"], "output": ANSWER.format(r["output"])} for r in TICKETS]
    return steps.preprocess(ws, [write_jsonl(tmp / "tickets.jsonl", rows)]).versions[0].id


def register(
    ws: Workspace, adapter: Path, dataset: str, job_id: str, gate: str | None = "pass"
) -> ModelVersion:
    """Register `adapter` as a new version via the real Registry (the job is a plain record
    with the fields register_version reads; tests/training covers real jobs)."""
    job = SimpleNamespace(
        id=job_id, model=ws.config.model.base, training_file=dataset, parent=None,
        hyperparameters={"n_epochs": 1}, result={"path": str(adapter), "kind": "lora"},
        run_id=None, status="succeeded", method="supervised",
    )
    report = None if gate is None else {"verdict": gate, "reasons": [] if gate == "pass"
                                        else ["rougeL below the reference"]}
    return Registry(ws).register_version(job, report, [])
