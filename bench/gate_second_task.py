"""The gate on a second task: does a cumulative round that is as good on task A get through?

    python bench/gate_second_task.py                      # tiny model, ~2 min
    python bench/gate_second_task.py --model default      # SmolLM2-135M, ~30 min on 2 CPUs

The case that made the gate three-valued: a workspace has one task (support-ticket routing) in
PROD with a golden set of that task; a drop of a second task (sentiment labels) arrives, and
the cumulative round trains on both. The candidate should be about as good as PROD on task A's
golden set and far better on task B. The old gate (95 % bootstrap interval, margin 0.02)
refused such rounds whenever a few golden answers changed; this prints what the gate says now,
split by split, with the examples each inconclusive check would need. Everything runs through
the same steps as the pipeline (preprocess, finetune, evaluate, register, approve → QA →
system tests → PROD). Writes a JSON record to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

SENTIMENT = "Label the review's sentiment as positive or negative. Answer with the label only.\n"
GOOD = ["works perfectly", "arrived early and looks great", "exactly what I wanted",
        "my kids love it", "great value for the price", "sturdy and well made"]
BAD = ["broke after two days", "arrived damaged", "nothing like the photos",
       "stopped working within a week", "way too small and flimsy", "the battery dies fast"]
THINGS = ["headphones", "blender", "desk lamp", "backpack", "kettle", "keyboard", "jacket",
          "yoga mat", "phone case", "water bottle", "coffee grinder", "smart watch"]


def sentiment_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = rng.choice(["positive", "negative"])
        phrase = rng.choice(GOOD if label == "positive" else BAD)
        review = f"The {rng.choice(THINGS)} {phrase}. {rng.choice(['', 'Would ', 'Not '])}" \
                 f"{rng.choice(['recommend.', 'buy again.', 'sure yet.'])} #{rng.randint(1, 999)}"
        if review not in seen:
            seen.add(review)
            rows.append({"input": SENTIMENT + "Review: " + review, "output": label})
    return rows


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def _splits(report: Any) -> dict[str, Any]:
    out = {}
    for name, split in report.splits.items():
        out[name] = {
            "n": split.n_examples, "verdict": split.gate.verdict,
            "rules": [{"metric": r.metric, "outcome": r.outcome, "candidate": r.candidate_mean,
                       "reference": r.reference_mean, "ci": [r.ci_low, r.ci_high],
                       "method": r.method,
                       "examples_needed": [c.examples_needed for c in r.checks]}
                      for r in split.gate.rules],
            "exact_match": {role: m.get("exact_match") for role, m in split.means.items()},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--rows", type=int, default=240, help="rows per task")
    parser.add_argument("--golden", type=int, default=40, help="golden examples of task A")
    args = parser.parse_args()

    from evertune import deploy, steps
    from evertune.auth import local_principal
    from evertune.workspace import Workspace

    tmp = Path(tempfile.mkdtemp(prefix="evertune-second-task-"))
    if args.model == "tiny":
        from evertune.testing import build_tiny_model

        base = str(build_tiny_model(tmp / "tiny"))
    else:
        from evertune.config import DEFAULT_BASE_MODEL

        base = DEFAULT_BASE_MODEL
    make = [sys.executable, str(ROOT / "examples" / "make_sample_data.py")]
    subprocess.run([*make, str(tmp / "a.jsonl"), "--rows", str(args.rows)], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([*make, str(tmp / "golden.jsonl"), "--rows", str(args.golden), "--seed",
                    "99"], check=True, stdout=subprocess.DEVNULL)
    _write(tmp / "b.jsonl", sentiment_rows(args.rows, 1))

    root = tmp / "ws"
    Workspace.init(root)
    raw = yaml.safe_load((root / "evertune.yaml").read_text())
    raw["model"]["base"] = base
    raw["train"]["n_epochs"] = 1
    raw["data"]["golden_set"] = str(tmp / "golden.jsonl")
    raw["eval"]["max_examples"] = 32
    (root / "evertune.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ws = Workspace.open(root)
    me = local_principal(ws)

    record: dict[str, Any] = {"command": sys.argv, "rounds": []}
    for name, drop in (("task A", tmp / "a.jsonl"), ("task A + B", tmp / "b.jsonl")):
        started = time.time()
        steps.preprocess(ws, [drop])
        job = steps.finetune(ws, steps.training_data(ws))
        report = steps.evaluate(ws, job)
        mv = steps.register(ws, job, report)
        row = {"round": name, "version": mv.version, "gate": mv.gate,
               "reasons": mv.gate_reasons, "seconds": round(time.time() - started),
               "splits": _splits(report)}
        record["rounds"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        if name == "task A":
            result = deploy.approve(ws, mv.version, me, "round 1 of the case", force=True)
            print(result.message, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gate-second-task-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
