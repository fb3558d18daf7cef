"""Fixtures for the training tests: a small SFT dataset and an in-process job runner."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from evertune.workspace import Workspace

_TEXT = (
    "please route this support ticket to the right team billing shipping account technical "
    "returns my card was charged twice for the same order and I want a refund"
)
WORDS = _TEXT.split()


def sft_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` input/output records of varied length (about 10 to 70 tokens with the tiny model)."""
    rng = random.Random(seed)
    return [
        {
            "input": f"{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(2, 24))),
            "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
        }
        for i in range(n)
    ]


def add_sft_dataset(ws: Workspace, n: int = 64, seed: int = 0):  # -> DatasetVersion
    from evertune.data.store import add_files

    path = ws.root / f"train-{n}-{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(n, seed)), "utf-8")
    result = add_files(ws, [path])
    (version,) = [v for v in result.versions if v.kind == "sft"]
    return version


@pytest.fixture
def workspace(workspace: Workspace) -> Workspace:
    """The shared tiny-model workspace, training on one thread: the tiny model's ops are too
    small to gain from a second thread, and on a busy 2-core machine a second thread waits at
    every op's barrier for a core another process holds (steps ran 10-30x slower)."""
    return Workspace.open(workspace.root, ["train.threads=1"])


@pytest.fixture
def sft_dataset(workspace: Workspace):
    """An SFT dataset version of 64 records in the `workspace` (about 50 in its train split)."""
    return add_sft_dataset(workspace)


@pytest.fixture
def make_sft_dataset() -> Callable[..., object]:
    """`make_sft_dataset(ws, n=64, seed=0)` → a DatasetVersion of `n` varied records."""
    return add_sft_dataset


@pytest.fixture
def run_inline() -> Callable[..., object]:
    """Run a queued job's recipe in this process (as the child would): returns the SftResult."""
    import torch

    from evertune.training.jobs import transition
    from evertune.training.sft import run_sft

    def run(ws: Workspace, job_id: str):
        transition(ws, job_id, "running", message="Started in-process (test)")
        threads = torch.get_num_threads()
        try:
            return run_sft(ws, job_id)
        finally:
            torch.set_num_threads(threads)  # the recipe sets it for its process: this one

    return run
