"""The whole core loop through the real `evertune` command, on the tiny model.

init → data add (with bad rows) → tune (train, evaluate, register) → models list/show → eval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def evertune(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "evertune.cli", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"evertune {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def test_init_data_tune_eval_models(tmp_path: Path, tiny_model: Path) -> None:
    ws = tmp_path / "demo"
    out = evertune("init", str(ws), cwd=tmp_path)
    assert "Workspace created" in out.stdout

    # Point the workspace at the tiny model with small settings, as a user would edit the YAML.
    cfg = yaml.safe_load((ws / "evertune.yaml").read_text())
    cfg["model"]["base"] = str(tiny_model)
    for section, values in TINY_SETTINGS.items():
        cfg[section].update(values)
    # the tiny tokenizer spends more tokens on a ticket than a real one
    cfg["data"]["max_seq_len"] = 384
    cfg["eval"]["general"] = True  # the forgetting guard's split, shown by `models show`
    (ws / "evertune.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    data = ws / "bucket" / "raw-data" / "tickets.jsonl"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_sample_data.py"), str(data),
         "--rows", "60", "--bad-rows", "3"],
        check=True, capture_output=True,
    )
    out = evertune("data", "add", str(data), cwd=ws)
    assert "3 row(s) rejected" in out.stdout
    rejected = [
        json.loads(line)
        for line in (ws / ".evertune" / "datasets").glob("*/rejected.jsonl").__next__()
        .read_text().splitlines()
    ]
    assert sorted(r["line"] for r in rejected) == [61, 62, 63]

    out = evertune("data", "list", cwd=ws)
    dataset_id = out.stdout.split("ds-", 1)[1].split()[0]

    out = evertune("tune", cwd=ws)
    assert "succeeded" in out.stdout
    assert "Registered assistant v1" in out.stdout

    out = evertune("models", "list", cwd=ws)
    assert "PendingManualApproval" in out.stdout or "Rejected" in out.stdout
    assert f"ds-{dataset_id}" in out.stdout

    out = evertune("models", "show", "1", cwd=ws)
    assert "job" in out.stdout and "ftjob-" in out.stdout
    # The gate split by split, the forgetting guard's general split among them.
    assert "gate by split (candidate vs base)" in out.stdout
    split_rows = {line.split()[1] for line in out.stdout.splitlines()
                  if line.startswith("│ ") and len(line.split()) > 2}
    assert {"test", "general"} <= split_rows, out.stdout

    out = evertune("jobs", "list", cwd=ws)
    assert "succeeded" in out.stdout

    out = evertune("eval", "1", cwd=ws)
    assert "rougeL" in out.stdout

    # A wrong argument and a missing version are explained, not tracebacks.
    bad = evertune("models", "show", "99", cwd=ws, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "99" in bad.stderr
    bad = evertune("tune", "--set", "train.n_epoch=1", cwd=ws, check=False)
    assert bad.returncode == 2 and "n_epoch" in bad.stderr
