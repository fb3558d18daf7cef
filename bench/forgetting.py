"""Forgetting: how far a narrow round moves a model from the base, and what replay does.

    python bench/forgetting.py                              # tiny model, ~1 min
    python bench/forgetting.py --model default --rows 240   # SmolLM2-135M, ~25 min on 2 CPUs

One narrow task (the support-ticket routing data of examples/make_sample_data.py), one round
per contender, each evaluated by `evaluate_candidate` against the base model exactly as the
pipeline does (no PROD, so the reference is the base):

- `lora`: the default LoRA round (train.* defaults, `--epochs`);
- `lora + replay`: the same with `data.replay` = `--replay` (the base's own answers to the
  replay half of the general set mixed into the training set);
- `full, high lr`: a full fine-tune at `--full-lr` (far above the ~2e-5 full fine-tunes want).

For each: the task (test split exact match), and the general split (the forgetting guard):
the teacher-forced loss of the base's own answers under the candidate (a KL proxy; the base's
own value is the floor), the ROUGE-L of the candidate's answers against the base's, and the
guard's outcome under `gate.general_rules`. Writes a JSON record to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _workspace(root: Path, base: str, train: dict[str, Any], replay: float,
               args: argparse.Namespace) -> Any:
    from evertune.workspace import Workspace

    Workspace.init(root)
    raw = yaml.safe_load((root / "evertune.yaml").read_text())
    raw["model"]["base"] = base
    raw["train"].update(train)
    raw["data"]["replay"] = replay
    raw["eval"].update({"max_examples": args.test_examples,
                        "general_max_examples": args.general_examples})
    if args.model == "tiny":
        raw["eval"].update({"max_new_tokens": 16})
        raw["data"]["max_seq_len"] = 128
    (root / "evertune.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return Workspace.open(root)


def _round(name: str, root: Path, base: str, data: Path, train: dict[str, Any], replay: float,
           args: argparse.Namespace) -> dict[str, Any]:
    from evertune import steps
    from evertune.evaluation import ModelRef, evaluate_candidate

    ws = _workspace(root / name.replace(" ", "_").replace(",", ""), base, train, replay, args)
    dataset = steps.preprocess(ws, [data]).versions[0]
    started = time.time()
    job = steps.finetune(ws, dataset)
    trained = time.time() - started
    report = evaluate_candidate(ws, ModelRef("candidate", adapter=Path(job.result["path"])),
                                dataset)
    general, test = report.splits["general"], report.splits["test"]
    rule = general.gate.rules[0]
    row = {
        "contender": name, "train": train, "replay": replay, "train_s": round(trained, 1),
        "eval_s": report.duration_s,
        "test_exact_match": test.means["candidate"].get("exact_match"),
        "base_test_exact_match": test.means["base"].get("exact_match"),
        "general_loss": general.means["candidate"]["loss"],
        "base_general_loss": general.means["base"]["loss"],
        "general_rougeL": general.means["candidate"].get("rougeL"),
        "guard": general.gate.verdict,
        "guard_ci": [rule.ci_low, rule.ci_high],
        "verdict": report.verdict, "reasons": report.reasons,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--rows", type=int, default=240, help="task rows generated")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--replay", type=float, default=0.1)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--test-examples", type=int, default=16)
    parser.add_argument("--general-examples", type=int, default=32)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="evertune-forgetting-"))
    if args.model == "tiny":
        from evertune.testing import build_tiny_model

        base = str(build_tiny_model(tmp / "tiny"))
    else:
        from evertune.config import DEFAULT_BASE_MODEL

        base = DEFAULT_BASE_MODEL
    data = tmp / "tickets.jsonl"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_sample_data.py"), str(data),
                    "--rows", str(args.rows)], check=True, stdout=subprocess.DEVNULL)
    lora = {"n_epochs": args.epochs}
    contenders = [
        ("lora", lora, 0.0),
        ("lora + replay", lora, args.replay),
        ("full, high lr", {**lora, "full_finetune": True, "learning_rate": args.full_lr}, 0.0),
    ]
    rows = [_round(name, tmp, base, data, train, replay, args)
            for name, train, replay in contenders]
    print()
    print(f"{'contender':<16} {'train s':>8} {'task EM':>8} {'gen loss':>9} {'(base)':>7} "
          f"{'gen R-L':>8}  guard")
    for r in rows:
        print(f"{r['contender']:<16} {r['train_s']:>8.0f} {r['test_exact_match']:>8.3f} "
              f"{r['general_loss']:>9.3f} {r['base_general_loss']:>7.3f} "
              f"{r['general_rougeL']:>8.3f}  {r['guard']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"forgetting-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"command": sys.argv, "machine": platform.platform(),
                               "load": os.getloadavg(), "rows": rows}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
