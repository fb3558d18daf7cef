"""Training throughput: Evertune's SFT loop vs a plain `transformers.Trainer`, same everything.

    python bench/train_throughput.py                          # tiny model, 30 steps (~1 min)
    python bench/train_throughput.py --model default --steps 8  # SmolLM2-135M (~10 min on 2 CPUs)

One process, one model, one data set of examples whose lengths spread from 16 to 400 tokens,
the same LoRA settings (r 16, alpha 32, dropout 0.05, all linear layers), batch size, learning
rate, warmup, schedule, clipping and step count. Three contenders:

- `trainer`: `transformers.Trainer` + `DataCollatorForSeq2Seq` (dynamic padding to the
  batch's longest example, random order): what a plain HF fine-tuning script does;
- `evertune padded`: our loop (evertune.training.sft) with `train.batching=padded`,
  also random order and dynamic padding;
- `evertune grouped`: our loop with the default `train.batching=group_by_length`.

Throughput is non-pad tokens per second of training-loop time (model loading, tokenization
and, for our loop, checkpoints are outside the clock; our loop's per-step metric rows and
cancel checks in the state DB are inside it). Each contender runs `--repeats` times,
interleaved, and the median counts. Targets: padded ≥ 1.0× trainer, grouped ≥ 1.3× trainer.
Writes a JSON record to bench/results/ (gitignored) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Words the tiny model's tokenizer knows, so lengths in tokens track lengths in words.
_TEXT = (
    "please route this support ticket to the right team billing shipping account technical "
    "returns my card was charged twice for the same order and I want a refund the package has "
    "not arrived yet tracking number does work cannot log in after resetting password app "
    "crashes when open settings page on phone would like return these shoes they are too small"
)
WORDS = _TEXT.split()
TARGETS = {"evertune padded": 1.0, "evertune grouped": 1.3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=["tiny", "default"],
        default="tiny",
        help="tiny: the 2-layer test model; default: SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per contender (default 30 tiny, 8 default)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per contender; the median counts")
    p.add_argument("--min-len", type=int, default=16, help="shortest example, tokens")
    p.add_argument("--max-len", type=int, default=400, help="longest example, tokens")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(
            os.environ.get("EVERTUNE_MODEL_CACHE", Path.home() / ".cache" / "evertune" / "models")
        ),
        help="where the default model is converted once (~1 min the first time)",
    )
    return p.parse_args(argv)


def make_records(tokenizer: Any, n: int, min_len: int, max_len: int, seed: int = 0) -> list[dict]:
    """`n` prompt/completion records whose tokenized lengths spread uniformly over
    [min_len, max_len] (prompt 30–70 % of it), built from words until the length is reached."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
            words.extend(rng.choices(WORDS, k=max(1, (tokens - len(words)) // 2)))
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:tokens]
        return tokenizer.decode(ids)

    records = []
    for i in range(n):
        total = rng.randint(min_len, max_len) - 1  # -1: the EOS token the loop appends
        prompt = max(1, int(total * rng.uniform(0.3, 0.7)))
        records.append(
            {"prompt": f"{i}. " + text(prompt - 2), "completion": " " + text(total - prompt)}
        )
    return records


def model_path(args: argparse.Namespace, scratch: Path) -> Path:
    if args.model == "tiny":
        from evertune.testing import build_tiny_model

        return build_tiny_model(scratch / "tiny")
    from evertune.models import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct", args.cache)


def make_workspace(scratch: Path, base: Path, args: argparse.Namespace, steps: int):
    from evertune.workspace import Workspace

    Workspace.init(scratch / "ws")
    cfg = yaml.safe_load((scratch / "ws" / "evertune.yaml").read_text())
    cfg["model"]["base"] = str(base)
    # Everything in train; no validation split, so no contender evaluates.
    cfg["data"].update(
        {"split": {"train": 1.0, "validation": 0.0, "test": 0.0}, "max_seq_len": 512}
    )
    cfg["train"].update(
        {
            "n_epochs": 1,
            "batch_size": args.batch_size,
            "learning_rate": 1e-3,
            "warmup_steps": 5,
            "checkpoint_every": steps + 1,
            "log_every": 1,
            "threads": args.threads,
            "seed": 0,
        }
    )
    (scratch / "ws" / "evertune.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Workspace.open(scratch / "ws")


def run_ours(ws: Any, dataset: Any, batching: str) -> dict[str, Any]:
    from evertune.training.jobs import create_job, transition
    from evertune.training.sft import run_sft
    from evertune.workspace import Workspace

    w = Workspace.open(ws.root, [f"train.batching={batching}"])
    job = create_job(w, dataset)
    transition(w, job.id, "running", message="benchmark run in-process")
    result = run_sft(w, job.id)
    assert result.job.status == "succeeded", result.job.error
    return {
        "steps": result.steps,
        "tokens": result.tokens_this_run,
        "positions": result.positions_this_run,
        "seconds": result.train_seconds,
        "padding_fraction": result.padding_fraction,
    }


def run_trainer(
    base: Path, examples: list[Any], args: argparse.Namespace, steps: int, scratch: Path
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from evertune.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(base)
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(base),
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    seen = {"tokens": 0, "positions": 0}

    def collate(features: list[dict]) -> dict:
        batch = pad(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        seen["positions"] += batch["input_ids"].numel()
        return batch

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):  # the training loop only, as for our loop
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            clock["end"] = time.perf_counter()

    data = [
        {"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
        for e in examples
    ]
    targs = TrainingArguments(
        output_dir=str(scratch / "trainer"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3,
        warmup_steps=5,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Clock()]
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log row to stdout
    trainer.train()
    return {
        "steps": trainer.state.global_step,
        "tokens": seen["tokens"],
        "positions": seen["positions"],
        "seconds": clock["end"] - clock["start"],
        "padding_fraction": 1 - seen["tokens"] / seen["positions"],
    }


def warm_up(base: Path, examples: list[Any], batch_size: int) -> None:
    """Two untimed forward/backward passes on the longest batch: the first steps of a fresh
    process pay one-off costs (allocator growth, kernel selection) that must not land on
    whichever contender happens to run first."""
    import torch
    from peft import LoraConfig, get_peft_model

    from evertune.models import load_model, load_tokenizer
    from evertune.training.sft import collate

    model = get_peft_model(
        load_model(base), LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")
    ).train()
    longest = sorted(examples, key=lambda e: len(e.input_ids))[-batch_size:]
    batch = collate(longest, int(load_tokenizer(base).pad_token_id))
    for _ in range(2):
        model(**batch).loss.backward()
    del model
    torch.manual_seed(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = args.steps or (30 if args.model == "tiny" else 8)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from evertune.data.store import add_files
    from evertune.models import load_tokenizer
    from evertune.training.sft import tokenize_split

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="evertune-bench-") as tmp:
        scratch = Path(tmp)
        base = model_path(args, scratch)
        tokenizer = load_tokenizer(base)
        n = steps * args.batch_size  # one epoch of exactly `steps` batches
        records = make_records(tokenizer, n, args.min_len, args.max_len)
        ws = make_workspace(scratch, base, args, steps)
        data_file = scratch / "train.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
        dataset = next(v for v in add_files(ws, [data_file], tokenizer=tokenizer).versions)
        examples, _ = tokenize_split(dataset.records("train"), tokenizer, 512, False)
        lengths = [len(e.input_ids) for e in examples]
        assert len(examples) == n, f"{n - len(examples)} records were rejected; check --max-len"

        contenders = {
            "trainer": lambda: run_trainer(base, examples, args, steps, scratch),
            "evertune padded": lambda: run_ours(ws, dataset, "padded"),
            "evertune grouped": lambda: run_ours(ws, dataset, "group_by_length"),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
        warm_up(base, examples, args.batch_size)
        names = list(contenders)
        for r in range(args.repeats):
            # Rotate the order each repeat, so no contender always runs first (or last).
            for name in names[r % len(names) :] + names[: r % len(names)]:
                out = contenders[name]()
                out["tokens_per_s"] = out["tokens"] / out["seconds"]
                runs[name].append(out)
                print(
                    f"  run {r + 1}/{args.repeats} {name:17} {out['tokens_per_s']:9.0f} tok/s "
                    f"({out['steps']} steps, {out['seconds']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )

    summary = {}
    base_tps = statistics.median(x["tokens_per_s"] for x in runs["trainer"])
    for name, outs in runs.items():
        tps = statistics.median(x["tokens_per_s"] for x in outs)
        summary[name] = {
            "tokens_per_s": tps,
            "speedup": tps / base_tps,
            "padding_fraction": outs[0]["padding_fraction"],
            "seconds": statistics.median(x["seconds"] for x in outs),
            "steps": outs[0]["steps"],
            "target": TARGETS.get(name),
            "meets_target": None if name not in TARGETS else tps / base_tps >= TARGETS[name],
        }

    print(
        f"\nmodel {args.model} ({base.name}), {steps} steps × batch {args.batch_size}, "
        f"{len(lengths)} examples of {min(lengths)}–{max(lengths)} tokens "
        f"(mean {statistics.mean(lengths):.0f}), torch threads {torch.get_num_threads()}, "
        f"load average {load_before[0]:.1f} → {os.getloadavg()[0]:.1f}"
    )
    print(f"{'contender':18} {'tokens/s':>10} {'vs trainer':>11} {'padding':>8} {'target':>8}")
    for name, s in summary.items():
        target = (
            ""
            if s["target"] is None
            else f"≥{s['target']:.1f}× " + ("ok" if s["meets_target"] else "MISS")
        )
        print(
            f"{name:18} {s['tokens_per_s']:10.0f} {s['speedup']:10.2f}× "
            f"{s['padding_fraction']:8.1%} {target:>8}"
        )

    record = {
        "command": "python bench/train_throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": args.model,
        "steps": steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "lengths": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "learning_rate": 1e-3,
        "warmup_steps": 5,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            # Other processes on the machine skew timings; the 1-minute load average
            # before and after tells a reader how quiet it was.
            "loadavg_before": load_before[0],
            "loadavg_after": os.getloadavg()[0],
        },
        "summary": summary,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"train_throughput-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
