"""Training throughput: Evertune's training loops vs the usual Hugging Face way, same everything.

    python bench/train_throughput.py                          # SFT: tiny model, 30 steps (~1 min)
    python bench/train_throughput.py --model default --steps 8  # SmolLM2-135M (~10 min on 2 CPUs)
    python bench/train_throughput.py --suite pretrain         # packing vs padding, same documents
    python bench/train_throughput.py --suite dpo              # DPO vs TRL's DPOTrainer, peak RSS
    python bench/train_throughput.py --suite ray              # local vs Ray Train, 1 and 2 workers

`--suite sft` (the default): one process, one model, one data set of examples whose lengths
spread from 16 to 400 tokens, the same LoRA settings (r 16, alpha 32, dropout 0.05, all linear
layers), batch size, learning rate, warmup, schedule, clipping and step count. Three contenders:

- `trainer`: `transformers.Trainer` + `DataCollatorForSeq2Seq` (dynamic padding to the
  batch's longest example, random order): what a plain HF fine-tuning script does;
- `evertune padded`: our loop (evertune.training.sft) with `train.batching=padded`,
  also random order and dynamic padding;
- `evertune grouped`: our loop with the default `train.batching=group_by_length`.

Throughput is non-pad tokens per second of training-loop time (model loading, tokenization
and, for our loop, checkpoints are outside the clock; our loop's per-step metric rows and
cancel checks in the state DB are inside it). Each contender runs `--repeats` times,
interleaved, and the median counts. Targets: padded ≥ 1.0× trainer, grouped ≥ 1.3× trainer.

`--suite pretrain`: continued pretraining (evertune.training.pretrain) on `steps × batch`
text documents of 20–400 tokens (`--lengths uniform`, or `lognormal`: median 64, a long tail, as
real corpora are), one pass, same block size: `packed` (train.pretrain.packing
true: documents concatenated into full blocks, positions restarting per document) against
`padded` (packing false, one document per row, train.batching=padded: random order, each
batch padded to its longest document), and for reference `unpacked grouped` (packing false,
group_by_length). Non-pad tokens/s of training-loop time. Target: packed ≥ 2× padded.

`--suite dpo`: `steps × batch` preference pairs; each contender runs in a fresh child process
(loads the model, trains, reports its training-loop time, tokens and peak RSS =
getrusage(RUSAGE_SELF).ru_maxrss, which never resets within a process; VmHWM is recorded as a
cross-check, and children are started through a forking shell because Linux carries the
spawner's RSS high-water mark into an exec'd child's ru_maxrss):

- `trl`: TRL's `DPOTrainer` with a PEFT LoRA config (its default: the reference log-probs
  come from a per-step forward with the adapter disabled);
- `trl precompute`: the same with `precompute_ref_log_probs=True` (its reference pass over
  the data before training: the same trade-off as ours);
- `evertune dpo`: our DPO recipe (reference log-probs of the starting weights computed once
  before the first step: `prepare_seconds`), `train.batching=padded` like TRL's random order;
- `evertune sft`: our SFT recipe on prompt + chosen of the same pairs, for the memory target;
- (on request) `evertune sft rows`: SFT on prompt + chosen and prompt + rejected at twice the
  batch size, the DPO run's rows, to tell the method's memory from its rows' memory.

Both DPO trainers get the same token sequences (evertune's templating; TRL's own tokenizing is
bypassed), LoRA settings, batch size, lr, schedule, steps, beta 0.1, sigmoid loss, max length
512, fp32, no gradient checkpointing, LoRA dropout on (TRL's defaults bf16, gradient
checkpointing and disable_dropout are switched off to match). Tokens = non-pad tokens of the
chosen + rejected rows of each step, counted from each trainer's batches. Targets: evertune dpo
≥ 1.0× trl tokens/s; evertune dpo peak RSS ≤ 1.3× evertune sft peak RSS. Without TRL
installed (`pip install -e '.[bench]'`), a plain PyTorch DPO loop with a per-step reference
forward under peft's `disable_adapter` (what TRL does with a PEFT model) stands in, labelled
`plain loop (no TRL)`.

`--suite ray` (needs `pip install -e '.[ray]'`): the same SFT job, as real jobs through
`start_job`, on three backends, every training process with `--ray-threads` torch threads
(default 1): `local` (the local backend's child process), `ray 1 worker` (one Ray Train worker:
the Ray path at the same hardware as local) and `ray 2 workers` (two workers, every batch split
between them, gradients all-reduced over gloo: the scale-out, with twice the cores). The
cluster is a `ray start --head` with 2 × `--ray-threads` CPUs on loopback started for the run
(or `--ray-address`). Throughput is the steady state read from each job's own metric rows:
non-pad tokens between the first and the last row over the seconds between them (the first
step, with its one-off costs, is outside); `startup` is job start → first metric row (process,
Ray, workers, model load) and `wall` job start → succeeded. One thread per process because a
second thread on a busy machine stalls at every op's barrier (see bench/README.md): with 2
threads the local baseline swung 10× between runs. `all` runs the three suites above, not this.

Each suite writes a JSON record to bench/results/ (gitignored) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
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
PRETRAIN_TARGET = 2.0  # packed ≥ 2× padded
DPO_SPEED_TARGET = 1.0  # evertune dpo ≥ 1.0× trl
DPO_RSS_TARGET = 1.3  # evertune dpo peak RSS ≤ 1.3× evertune sft peak RSS
LORA: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
LEARNING_RATE, WARMUP_STEPS, MAX_SEQ_LEN, BETA = 1e-3, 5, 512, 0.1
MIN_LEN = {"sft": 16, "pretrain": 20, "dpo": 16}
DPO_CONTENDERS = ["trl", "trl precompute", "evertune dpo", "evertune sft"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--suite",
        choices=["sft", "pretrain", "dpo", "ray", "all"],
        default="sft",
        help="sft: SFT loop vs transformers.Trainer; pretrain: packing vs padding; "
        "dpo: DPO vs TRL's DPOTrainer, with peak RSS per contender; ray: the local backend vs "
        "Ray Train with 1 and 2 workers; all: sft, pretrain and dpo",
    )
    p.add_argument("--ray-threads", type=int, default=1,
                   help="ray: torch threads (and Ray CPUs) per training process")
    p.add_argument("--ray-address", default="",
                   help="ray: an existing cluster (HOST:PORT) instead of a fresh local head")
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
        help="batches of data (default 30 tiny, 8 default): SFT and DPO run exactly this many "
        "steps; pretraining gets steps × batch documents (packed, they make fewer steps)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per contender; the median counts")
    p.add_argument(
        "--min-len", type=int, default=None, help="shortest example, tokens (16; 20 pretrain)"
    )
    p.add_argument("--max-len", type=int, default=400, help="longest example, tokens")
    p.add_argument("--block-size", type=int, default=512, help="pretrain: tokens per block")
    p.add_argument(
        "--lengths",
        choices=["uniform", "lognormal"],
        default="uniform",
        help="pretrain: document lengths uniform over [min, max], or lognormal (median 64 "
        "tokens, sigma 1, clipped to [min, max]: most documents short, a few long, as in real "
        "corpora)",
    )
    p.add_argument(
        "--contenders",
        default=",".join(DPO_CONTENDERS),
        help="dpo: comma-separated subset of: "
        + ", ".join(DPO_CONTENDERS)
        + "; also: evertune dpo grouped, evertune sft rows (SFT on the chosen and the rejected "
        "rows at twice the batch: a DPO step's rows), plain loop (no TRL)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(
            os.environ.get("EVERTUNE_MODEL_CACHE", Path.home() / ".cache" / "evertune" / "models")
        ),
        help="where the default model is converted once (~1 min the first time)",
    )
    # Internal: a DPO-suite contender in its own process (`--child NAME --spec FILE`).
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _text_maker(tokenizer: Any, rng: random.Random) -> Any:
    """`text(n)`: text of exactly `n` tokens (on re-encoding) built from WORDS."""

    def text(tokens: int) -> str:
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
            words.extend(rng.choices(WORDS, k=max(1, (tokens - len(words)) // 2)))
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:tokens]
        return tokenizer.decode(ids)

    return text


def make_records(tokenizer: Any, n: int, min_len: int, max_len: int, seed: int = 0) -> list[dict]:
    """`n` prompt/completion records whose tokenized lengths spread uniformly over
    [min_len, max_len] (prompt 30–70 % of it), built from words until the length is reached."""
    rng = random.Random(seed)
    text = _text_maker(tokenizer, rng)
    records = []
    for i in range(n):
        total = rng.randint(min_len, max_len) - 1  # -1: the EOS token the loop appends
        prompt = max(1, int(total * rng.uniform(0.3, 0.7)))
        records.append(
            {"prompt": f"{i}. " + text(prompt - 2), "completion": " " + text(total - prompt)}
        )
    return records


def make_documents(
    tokenizer: Any, n: int, min_len: int, max_len: int, seed: int = 0, dist: str = "uniform"
) -> list[dict]:
    """`n` text records of min_len–max_len tokens each, EOS included: lengths uniform, or
    lognormal (median 64, sigma 1; clipped to the range) like real document lengths."""
    rng = random.Random(seed)
    text = _text_maker(tokenizer, rng)
    docs = []
    for i in range(n):
        prefix = f"{i}. "
        used = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        if dist == "lognormal":
            length = min(max_len, max(min_len, round(rng.lognormvariate(math.log(64), 1.0))))
        else:
            length = rng.randint(min_len, max_len)
        docs.append({"text": prefix + text(max(1, length - used))})
    return docs


def make_pairs(tokenizer: Any, n: int, min_len: int, max_len: int, seed: int = 0) -> list[dict]:
    """`n` preference records: a prompt, and two answers of independent lengths; the raw
    prompt + either answer spreads over [min_len, max_len] tokens (the chat template, where the
    tokenizer has one, adds its own tokens around the prompt)."""
    rng = random.Random(seed)
    text = _text_maker(tokenizer, rng)
    records = []
    for i in range(n):
        total = rng.randint(min_len, max_len) - 1
        prompt = max(3, int(total * rng.uniform(0.3, 0.7)))
        chosen = max(1, total - prompt)
        rejected = max(1, rng.randint(min_len, max_len) - 1 - prompt)  # same spread, own draw
        records.append(
            {
                "prompt": f"{i}. " + text(prompt - 2),
                "chosen": " " + text(chosen),
                "rejected": " " + text(rejected),
            }
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
    # Everything in train; no validation split, so no contender evaluates. No replay: every
    # contender trains exactly the benchmark's examples (replay would add the base model's
    # answers to general prompts to ours only).
    cfg["data"].update(
        {
            "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
            "max_seq_len": MAX_SEQ_LEN,
            "replay": 0.0,
        }
    )
    cfg["train"].update(
        {
            "n_epochs": 1,
            "batch_size": args.batch_size,
            "learning_rate": LEARNING_RATE,
            "warmup_steps": WARMUP_STEPS,
            "checkpoint_every": steps + 1,
            "log_every": 1,
            "threads": args.threads,
            "seed": 0,
        }
    )
    cfg["train"]["lora"].update(
        {
            "r": LORA["r"],
            "alpha": LORA["alpha"],
            "dropout": LORA["dropout"],
            "target_modules": LORA["target_modules"],
        }
    )
    cfg["train"]["dpo"].update({"beta": BETA, "loss_type": "sigmoid", "label_smoothing": 0.0})
    cfg["train"]["pretrain"].update({"block_size": args.block_size})
    (scratch / "ws" / "evertune.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Workspace.open(scratch / "ws")


def add_dataset(ws: Any, scratch: Path, name: str, records: list[dict], tokenizer: Any):
    from evertune.data.store import add_files

    path = scratch / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (dataset,) = add_files(ws, [path], tokenizer=tokenizer).versions
    return dataset


def run_ours(
    ws: Any, dataset: Any, batching: str, recipe: Any = None, overrides: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One job of `dataset` through the harness, in this process; `recipe` None = SFT."""
    from evertune.training.harness import run_recipe
    from evertune.training.jobs import create_job, transition
    from evertune.training.sft import SftRecipe
    from evertune.workspace import Workspace

    w = Workspace.open(ws.root, [f"train.batching={batching}", *overrides])
    job = create_job(w, dataset)
    transition(w, job.id, "running", message="benchmark run in-process")
    result = run_recipe(w, job.id, recipe if recipe is not None else SftRecipe())
    assert result.job.status == "succeeded", result.job.error
    return {
        "steps": result.steps,
        "tokens": result.tokens_this_run,
        "positions": result.positions_this_run,
        "seconds": result.train_seconds,
        "prepare_seconds": result.prepare_seconds,
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


def machine_info(load_before: tuple[float, ...]) -> dict[str, Any]:
    import torch
    import transformers

    info = {
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
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


def write_record(
    args: argparse.Namespace, argv: list[str] | None, suite: str, record: dict
) -> None:
    record = {
        "command": "python bench/train_throughput.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "suite": suite,
        "model": args.model,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "lora": LORA,
        "learning_rate": LEARNING_RATE,
        "warmup_steps": WARMUP_STEPS,
        **record,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The SFT suite keeps its original file name.
    prefix = "train_throughput" if suite == "sft" else f"train_throughput-{suite}"
    out = RESULTS / f"{prefix}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


def length_summary(lengths: list[int]) -> dict[str, float]:
    return {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)}


def run_interleaved(contenders: dict[str, Any], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Each contender `repeats` times, the order rotating each repeat so no contender always
    runs first (or last)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out = contenders[name]()
            out["tokens_per_s"] = out["tokens"] / out["seconds"]
            runs[name].append(out)
            extra = f", peak RSS {out['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in out else ""
            print(
                f"  run {r + 1}/{repeats} {name:22} {out['tokens_per_s']:9.0f} tok/s "
                f"({out['steps']} steps, {out['seconds']:.1f} s{extra})",
                file=sys.stderr,
                flush=True,
            )
    return runs


def _median(outs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(x[key] for x in outs)


# -- suite sft: our SFT loop vs transformers.Trainer --------------------------------------------


def suite_sft(args: argparse.Namespace, argv: list[str] | None) -> None:
    steps = args.steps or (30 if args.model == "tiny" else 8)
    min_len = args.min_len or MIN_LEN["sft"]
    import torch

    from evertune.models import load_tokenizer
    from evertune.training.sft import tokenize_split

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="evertune-bench-") as tmp:
        scratch = Path(tmp)
        base = model_path(args, scratch)
        tokenizer = load_tokenizer(base)
        n = steps * args.batch_size  # one epoch of exactly `steps` batches
        records = make_records(tokenizer, n, min_len, args.max_len)
        ws = make_workspace(scratch, base, args, steps)
        dataset = add_dataset(ws, scratch, "train.jsonl", records, tokenizer)
        examples, _ = tokenize_split(dataset.records("train"), tokenizer, MAX_SEQ_LEN, False)
        lengths = [len(e.input_ids) for e in examples]
        assert len(examples) == n, f"{n - len(examples)} records were rejected; check --max-len"

        contenders = {
            "trainer": lambda: run_trainer(base, examples, args, steps, scratch),
            "evertune padded": lambda: run_ours(ws, dataset, "padded"),
            "evertune grouped": lambda: run_ours(ws, dataset, "group_by_length"),
        }
        warm_up(base, examples, args.batch_size)
        runs = run_interleaved(contenders, args.repeats)

    summary = {}
    base_tps = _median(runs["trainer"], "tokens_per_s")
    for name, outs in runs.items():
        tps = _median(outs, "tokens_per_s")
        summary[name] = {
            "tokens_per_s": tps,
            "speedup": tps / base_tps,
            "padding_fraction": outs[0]["padding_fraction"],
            "seconds": _median(outs, "seconds"),
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
    write_record(
        args,
        argv,
        "sft",
        {
            "steps": steps,
            "lengths": length_summary(lengths),
            "machine": machine_info(load_before),
            "summary": summary,
            "runs": runs,
        },
    )


# -- suite pretrain: packed blocks vs one padded document per row -------------------------------


def suite_pretrain(args: argparse.Namespace, argv: list[str] | None) -> None:
    steps = args.steps or (30 if args.model == "tiny" else 8)
    min_len = args.min_len or MIN_LEN["pretrain"]
    import torch

    from evertune.models import load_tokenizer
    from evertune.training.pretrain import PretrainRecipe, document_ids, split_documents

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="evertune-bench-") as tmp:
        scratch = Path(tmp)
        base = model_path(args, scratch)
        tokenizer = load_tokenizer(base)
        n = steps * args.batch_size  # one epoch of exactly `steps` padded batches
        docs = make_documents(tokenizer, n, min_len, args.max_len, dist=args.lengths)
        ws = make_workspace(scratch, base, args, steps)
        dataset = add_dataset(ws, scratch, "corpus.jsonl", docs, tokenizer)
        assert dataset.kind == "pretrain", dataset.kind
        ids = document_ids(dataset.records("train"), tokenizer)
        lengths = [len(d) for d in ids]
        assert len(ids) == n, f"{n - len(ids)} documents were rejected"
        assert max(lengths) <= args.block_size, "--max-len over --block-size: documents would split"

        contenders = {
            "padded": lambda: run_ours(ws, dataset, "padded", PretrainRecipe(packing=False)),
            "packed": lambda: run_ours(ws, dataset, "padded", PretrainRecipe(packing=True)),
            "unpacked grouped": lambda: run_ours(
                ws, dataset, "group_by_length", PretrainRecipe(packing=False)
            ),
        }
        warm_up(base, split_documents(ids, args.block_size), args.batch_size)
        runs = run_interleaved(contenders, args.repeats)

    summary = {}
    base_tps = _median(runs["padded"], "tokens_per_s")
    for name, outs in runs.items():
        tps = _median(outs, "tokens_per_s")
        summary[name] = {
            "tokens_per_s": tps,
            "vs_padded": tps / base_tps,
            "padding_fraction": outs[0]["padding_fraction"],
            "seconds": _median(outs, "seconds"),
            "steps": outs[0]["steps"],
            "tokens": outs[0]["tokens"],
            "target": PRETRAIN_TARGET if name == "packed" else None,
            "meets_target": tps / base_tps >= PRETRAIN_TARGET if name == "packed" else None,
        }

    print(
        f"\nmodel {args.model} ({base.name}), {n} documents of {min(lengths)}–{max(lengths)} "
        f"tokens ({args.lengths}, median {statistics.median(lengths):.0f}, mean "
        f"{statistics.mean(lengths):.0f}, EOS included), block size "
        f"{args.block_size}, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
        f"load average {load_before[0]:.1f} → {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'contender':18} {'tokens/s':>10} {'vs padded':>10} {'padding':>8} {'steps':>6} "
        f"{'target':>8}"
    )
    for name, s in summary.items():
        target = (
            ""
            if s["target"] is None
            else (f"≥{s['target']:.1f}× " + ("ok" if s["meets_target"] else "MISS"))
        )
        print(
            f"{name:18} {s['tokens_per_s']:10.0f} {s['vs_padded']:9.2f}× "
            f"{s['padding_fraction']:8.1%} {s['steps']:6d} {target:>8}"
        )
    write_record(
        args,
        argv,
        "pretrain",
        {
            "documents": n,
            "length_distribution": args.lengths,
            "block_size": args.block_size,
            "lengths": length_summary(lengths),
            "machine": machine_info(load_before),
            "summary": summary,
            "runs": runs,
        },
    )


# -- suite dpo: our DPO recipe vs TRL's DPOTrainer, one child process per run --------------------


def suite_dpo(args: argparse.Namespace, argv: list[str] | None) -> None:
    steps = args.steps or (30 if args.model == "tiny" else 8)
    min_len = args.min_len or MIN_LEN["dpo"]
    from evertune.data.templating import Example, to_example, to_preference, tokenize_example
    from evertune.models import load_tokenizer

    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    try:
        import trl  # noqa: F401
    except ImportError:
        print(
            "TRL is not installed (pip install -e '.[bench]'): a plain PyTorch DPO loop with a "
            "per-step reference forward stands in for it",
            file=sys.stderr,
        )
        names = [c for c in names if not c.startswith("trl")]
        if "plain loop (no TRL)" not in names:
            names.insert(0, "plain loop (no TRL)")
    unknown = set(names) - set(CHILDREN)
    assert not unknown, f"unknown contenders {sorted(unknown)}; choose from {sorted(CHILDREN)}"
    baseline = next(
        (n for n in ("trl", "plain loop (no TRL)", "trl precompute") if n in names), None
    )

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="evertune-bench-") as tmp:
        scratch = Path(tmp)
        base = model_path(args, scratch)
        tokenizer = load_tokenizer(base)
        n = steps * args.batch_size  # one epoch of exactly `steps` batches of pairs
        pairs = make_pairs(tokenizer, n, min_len, args.max_len)
        ws = make_workspace(scratch, base, args, steps)
        dpo_data = add_dataset(ws, scratch, "pairs.jsonl", pairs, tokenizer)
        assert dpo_data.kind == "dpo", dpo_data.kind
        # SFT on prompt + chosen: the same prompt rendering as a preference record's.
        chat = bool(getattr(tokenizer, "chat_template", None))
        sft_records = [
            {"input": r["prompt"], "output": r["chosen"]}
            if chat
            else {"prompt": r["prompt"], "completion": r["chosen"]}
            for r in dpo_data.records("train")
        ]
        sft_data = add_dataset(ws, scratch, "chosen.jsonl", sft_records, tokenizer)
        assert len(dpo_data.records("train")) == n == len(sft_data.records("train")), (
            "records were rejected or deduplicated"
        )
        # `evertune sft rows` (diagnostic): SFT on prompt + chosen and prompt + rejected at twice
        # the batch size: the DPO run's rows, as many per step, so its memory is DPO's minus
        # the method.
        rows_records = sft_records + [
            {"input": r["prompt"], "output": r["rejected"]}
            if chat
            else {"prompt": r["prompt"], "completion": r["rejected"]}
            for r in dpo_data.records("train")
        ]
        rows_data = add_dataset(ws, scratch, "rows.jsonl", rows_records, tokenizer)
        assert len(rows_data.records("train")) == 2 * n, "records were rejected or deduplicated"
        chosen_len, rejected_len = [], []
        # The store orders each version's records by its own hash: match them by prompt.
        sft_of = {r["input" if chat else "prompt"]: r for r in sft_data.records("train")}
        for rec in dpo_data.records("train"):
            sft = sft_of[rec["prompt"]]
            p = to_preference(rec, tokenizer)
            c = tokenize_example(Example(p.prompt, p.chosen), tokenizer, MAX_SEQ_LEN, False)
            r = tokenize_example(Example(p.prompt, p.rejected), tokenizer, MAX_SEQ_LEN, False)
            t = tokenize_example(to_example(sft, tokenizer), tokenizer, MAX_SEQ_LEN, False)
            assert c is not None and r is not None, "a pair is over max_seq_len; lower --max-len"
            assert t is not None and t.input_ids == c.input_ids, "SFT rows differ from chosen rows"
            chosen_len.append(len(c.input_ids))
            rejected_len.append(len(r.input_ids))

        spec = {
            "workspace": str(ws.root),
            "base": str(base),
            "dpo_dataset": dpo_data.id,
            "sft_dataset": sft_data.id,
            "sft_rows_dataset": rows_data.id,
            "steps": steps,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "scratch": str(scratch),
        }
        spec_path = scratch / "spec.json"
        spec_path.write_text(json.dumps(spec))

        def child(name: str) -> dict[str, Any]:
            # Through a shell that forks (`; exit $?` keeps it from exec-ing python in its
            # place): Linux carries the spawning process's RSS high-water mark into an exec'd
            # child's ru_maxrss, so a child spawned straight from this process would report at
            # least this process's peak. The shell's is a few MB.
            cmd = [
                "/bin/sh",
                "-c",
                '"$0" "$@"; exit $?',
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                name,
                "--spec",
                str(spec_path),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"contender {name!r} failed (exit {proc.returncode})")
            return json.loads(lines[-1][len("RESULT ") :])

        runs = run_interleaved(
            {name: (lambda name=name: child(name)) for name in names}, args.repeats
        )

    summary: dict[str, dict[str, Any]] = {}
    base_tps = _median(runs[baseline], "tokens_per_s") if baseline else None
    sft_rss = _median(runs["evertune sft"], "peak_rss_mb") if "evertune sft" in runs else None
    for name, outs in runs.items():
        tps = _median(outs, "tokens_per_s")
        prep = _median(outs, "prepare_seconds")
        with_prep = statistics.median(
            x["tokens"] / (x["seconds"] + x["prepare_seconds"]) for x in outs
        )
        rss = _median(outs, "peak_rss_mb")
        s: dict[str, Any] = {
            "tokens_per_s": tps,
            "tokens_per_s_with_prepare": with_prep,
            "prepare_seconds": prep,
            "seconds": _median(outs, "seconds"),
            "steps": outs[0]["steps"],
            "tokens": outs[0]["tokens"],
            "padding_fraction": outs[0]["padding_fraction"],
            "peak_rss_mb": rss,
            "rss_after_imports_mb": _median(outs, "rss_after_imports_mb"),
            "vm_hwm_mb": _median(outs, "vm_hwm_mb"),
        }
        if baseline and base_tps and not name.startswith("evertune sft"):
            base_with = statistics.median(
                x["tokens"] / (x["seconds"] + x["prepare_seconds"]) for x in runs[baseline]
            )
            s["vs_baseline"] = tps / base_tps
            s["vs_baseline_with_prepare"] = with_prep / base_with
        if sft_rss:
            s["rss_vs_sft"] = rss / sft_rss
        summary[name] = s
    if "evertune dpo" in summary:
        s = summary["evertune dpo"]
        s["speed_target"], s["rss_target"] = DPO_SPEED_TARGET, DPO_RSS_TARGET
        s["meets_speed_target"] = (
            s["vs_baseline"] >= DPO_SPEED_TARGET if "vs_baseline" in s else None
        )
        s["meets_rss_target"] = s["rss_vs_sft"] <= DPO_RSS_TARGET if "rss_vs_sft" in s else None

    all_len = chosen_len + rejected_len
    print(
        f"\nmodel {args.model} ({base.name}), {steps} steps × {args.batch_size} pairs, "
        f"{n} pairs: chosen rows {min(chosen_len)}–{max(chosen_len)} tokens (mean "
        f"{statistics.mean(chosen_len):.0f}), rejected rows {min(rejected_len)}–"
        f"{max(rejected_len)} (mean {statistics.mean(rejected_len):.0f}); torch threads "
        f"{args.threads or 'default'}, load average {load_before[0]:.1f} → "
        f"{os.getloadavg()[0]:.1f}; baseline: {baseline}"
    )
    head = (
        f"{'contender':22} {'tokens/s':>9} {'vs base':>8} {'prepare s':>9} "
        f"{'tok/s incl.':>11} {'vs base':>8} {'padding':>8} {'peak RSS MB':>11} "
        f"{'vs sft':>7} {'RSS after imports':>17}"
    )
    print(head)
    for name, s in summary.items():
        vs = f"{s['vs_baseline']:7.2f}×" if "vs_baseline" in s else " " * 8
        vs2 = f"{s['vs_baseline_with_prepare']:7.2f}×" if "vs_baseline" in s else " " * 8
        rv = f"{s['rss_vs_sft']:6.2f}×" if "rss_vs_sft" in s else " " * 7
        print(
            f"{name:22} {s['tokens_per_s']:9.0f} {vs} {s['prepare_seconds']:9.2f} "
            f"{s['tokens_per_s_with_prepare']:11.0f} {vs2} {s['padding_fraction']:8.1%} "
            f"{s['peak_rss_mb']:11.0f} {rv} {s['rss_after_imports_mb']:17.0f}"
        )
    for name, s in summary.items():
        if abs(s["peak_rss_mb"] - s["vm_hwm_mb"]) > 0.05 * s["vm_hwm_mb"]:
            print(
                f"note: {name}: ru_maxrss {s['peak_rss_mb']:.0f} MB but VmHWM "
                f"{s['vm_hwm_mb']:.0f} MB (the spawning process's peak leaked into ru_maxrss?)"
            )
    if "evertune dpo" in summary:
        s = summary["evertune dpo"]
        if s.get("meets_speed_target") is not None:
            print(
                f"target tokens/s ≥ {DPO_SPEED_TARGET:.1f}× {baseline}: "
                + ("ok" if s["meets_speed_target"] else "MISS")
            )
        if s.get("meets_rss_target") is not None:
            print(
                f"target peak RSS ≤ {DPO_RSS_TARGET:.1f}× evertune sft: "
                + ("ok" if s["meets_rss_target"] else "MISS")
            )
    write_record(
        args,
        argv,
        "dpo",
        {
            "steps": steps,
            "pairs": n,
            "beta": BETA,
            "loss_type": "sigmoid",
            "max_length": MAX_SEQ_LEN,
            "baseline": baseline,
            "lengths": {
                "chosen": length_summary(chosen_len),
                "rejected": length_summary(rejected_len),
                "all": length_summary(all_len),
            },
            "machine": machine_info(load_before),
            "summary": summary,
            "runs": runs,
        },
    )


# -- the DPO suite's contenders, each in its own process -------------------------------------------


def _rss_now_mb() -> float:
    """This process's resident set now (VmRSS), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    """This process's peak resident set so far: ru_maxrss is in KiB on Linux (bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _vm_hwm_mb() -> float:
    """The peak resident set of this process image since its exec (VmHWM), MB: a cross-check
    of ru_maxrss, which can also hold the spawning process's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _tokenized_pairs(spec: dict[str, Any], tokenizer: Any) -> list[Any]:
    """The suite's pairs as evertune tokenizes them (evertune.training.dpo.Pair)."""
    from evertune.data.store import get_dataset
    from evertune.data.templating import Example, to_preference, tokenize_example
    from evertune.training.dpo import Pair
    from evertune.workspace import Workspace

    ws = Workspace.open(Path(spec["workspace"]))
    out = []
    for rec in get_dataset(ws, spec["dpo_dataset"]).records("train"):
        p = to_preference(rec, tokenizer)
        c, r = (
            tokenize_example(Example(p.prompt, a), tokenizer, MAX_SEQ_LEN, False)
            for a in (p.chosen, p.rejected)
        )
        assert c is not None and r is not None
        out.append(Pair(c, r))
    return out


def _lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )


def child_ours(
    spec: dict[str, Any], dataset_key: str, batching: str, method: str, batch_factor: int = 1
) -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from evertune.data.store import get_dataset
    from evertune.training.dpo import DpoRecipe
    from evertune.training.sft import SftRecipe
    from evertune.workspace import Workspace

    rss_imports = _rss_now_mb()
    ws = Workspace.open(Path(spec["workspace"]))
    recipe = DpoRecipe() if method == "dpo" else SftRecipe()
    size = f"train.batch_size={spec['batch_size'] * batch_factor}"
    out = run_ours(ws, get_dataset(ws, spec[dataset_key]), batching, recipe, (size,))
    return {**out, "rss_after_imports_mb": rss_imports}


def child_trl(spec: dict[str, Any], precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from evertune.models import load_model, load_tokenizer

    rss_imports = _rss_now_mb()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    base = Path(spec["base"])
    tokenizer = load_tokenizer(base)
    rows = []
    for pair in _tokenized_pairs(spec, tokenizer):
        c, r = pair.chosen, pair.rejected
        k = sum(1 for x in c.labels if x == -100)  # the prompt's tokens
        assert c.input_ids[:k] == r.input_ids[:k]
        rows.append(
            {
                "prompt_ids": c.input_ids[:k],
                "chosen_ids": c.input_ids[k:],
                "rejected_ids": r.input_ids[k:],
            }
        )
    seen = {"tokens": 0, "positions": 0, "prepare": 0.0}
    clock: dict[str, float] = {}

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *a: Any, **k: Any) -> Any:
            # Already tokenized, by evertune's templating: both trainers see the same tokens.
            return dataset

        def _precompute_ref_logps(self, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            seen["prepare"] += time.perf_counter() - t0
            return out

        def compute_loss(self, model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
            seen["tokens"] += int(inputs["attention_mask"].sum())  # chosen + rejected rows
            seen["positions"] += inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, *a, **k)

    class Clock(TrainerCallback):  # the training loop only, as for ours
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            clock["end"] = time.perf_counter()

    dargs = DPOConfig(
        output_dir=str(Path(spec["scratch"]) / "trl"),
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=LEARNING_RATE,
        warmup_steps=WARMUP_STEPS,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=spec["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_SEQ_LEN,
        precompute_ref_log_probs=precompute,
        # TRL's defaults that differ from ours, set to what ours does: fp32, no activation
        # recomputation, LoRA dropout on.
        bf16=False,
        gradient_checkpointing=False,
        disable_dropout=False,
    )
    trainer = Trainer(
        model=load_model(base),
        args=dargs,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=_lora_config(),
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return {
        "steps": trainer.state.global_step,
        "tokens": seen["tokens"],
        "positions": seen["positions"],
        "seconds": clock["end"] - clock["start"],
        "prepare_seconds": seen["prepare"],
        "padding_fraction": 1 - seen["tokens"] / seen["positions"],
        "rss_after_imports_mb": rss_imports,
    }


def child_plain(spec: dict[str, Any]) -> dict:
    """The baseline when TRL is missing: a plain PyTorch DPO loop, random order, the reference
    log-probs from a forward with the LoRA adapter disabled at every step (as TRL does with a
    PEFT model). Log-probs through evertune's `token_logps` (the head on labelled positions
    only, as TRL's fused LM head)."""
    import torch
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    from evertune.models import load_model, load_tokenizer
    from evertune.training.dpo import collate_pairs, dpo_losses
    from evertune.training.harness import token_logps

    rss_imports = _rss_now_mb()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    base = Path(spec["base"])
    tokenizer = load_tokenizer(base)
    pairs = _tokenized_pairs(spec, tokenizer)
    torch.manual_seed(0)
    model = get_peft_model(load_model(base), _lora_config()).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    schedule = get_linear_schedule_with_warmup(optimizer, WARMUP_STEPS, spec["steps"])
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    size, pad_id = spec["batch_size"], int(tokenizer.pad_token_id)
    tokens = positions = steps = 0
    start = time.perf_counter()
    for i in range(0, spec["steps"] * size, size):
        batch = collate_pairs([pairs[j] for j in order[i : i + size]], pad_id)
        logps = token_logps(model, batch)
        with torch.no_grad(), model.disable_adapter():
            ref = token_logps(model, batch)
        n = logps.shape[0] // 2
        losses, _, _ = dpo_losses(logps[:n], logps[n:], ref[:n], ref[n:], BETA)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        positions += batch["input_ids"].numel()
        steps += 1
    return {
        "steps": steps,
        "tokens": tokens,
        "positions": positions,
        "seconds": time.perf_counter() - start,
        "prepare_seconds": 0.0,
        "padding_fraction": 1 - tokens / positions,
        "rss_after_imports_mb": rss_imports,
    }


CHILDREN = {
    "trl": lambda spec: child_trl(spec, precompute=False),
    "trl precompute": lambda spec: child_trl(spec, precompute=True),
    "plain loop (no TRL)": child_plain,
    "evertune dpo": lambda spec: child_ours(spec, "dpo_dataset", "padded", "dpo"),
    "evertune dpo grouped": lambda spec: child_ours(spec, "dpo_dataset", "group_by_length", "dpo"),
    "evertune sft": lambda spec: child_ours(spec, "sft_dataset", "padded", "sft"),
    "evertune sft rows": lambda spec: child_ours(spec, "sft_rows_dataset", "padded", "sft", 2),
}


def child_main(args: argparse.Namespace) -> int:
    """Run one DPO-suite contender in this (fresh) process; print its result as one line."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    spec = json.loads(args.spec.read_text())
    out = CHILDREN[args.child](spec)
    out["peak_rss_mb"] = _peak_rss_mb()  # model load + training: the whole child
    out["vm_hwm_mb"] = _vm_hwm_mb()
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# -- suite ray: the local backend vs Ray Train with 1 and 2 workers ----------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ray_head(cpus: int) -> Any:
    """A `ray start --head --block` on loopback for the run (its own temp dir and ports), ended
    through its process group: only the processes it started, never `ray stop`'s every Ray."""
    import signal

    temp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: Ray's socket paths
    port = _free_port()
    log_path = temp / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
             "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={cpus}",
             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
             "--object-store-memory=100000000", f"--temp-dir={temp}",
             f"--dashboard-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}",
             f"--dashboard-agent-grpc-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},  # no 30 s drain at the end
        )
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()  # `ray start` alone: it drains and stops its processes (~3 s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its session
        # Anything of this cluster that left the group: its command line names the temp dir.
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if str(temp).encode() in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def run_job(ws: Any, dataset: Any, overrides: list[str]) -> dict[str, Any]:
    """One real job (start_job → wait_job) with `overrides`; throughput from its metric rows."""
    from evertune.training.jobs import create_job, list_metrics, start_job, wait_job
    from evertune.workspace import Workspace

    w = Workspace.open(ws.root, overrides)
    t0 = time.time()
    job = start_job(w, create_job(w, dataset).id)
    job = wait_job(w, job.id, poll=0.2, timeout=3600)
    assert job.status == "succeeded", job.error
    rows = sorted((r for r in list_metrics(w, job.id) if "train_loss" in r),
                  key=lambda r: r["step"])
    first, last = rows[0], rows[-1]
    return {
        "steps": last["step"] - first["step"],  # timed steps: all but the first
        "tokens": last["trained_tokens"] - first["trained_tokens"],
        "seconds": last["created_at"] - first["created_at"],
        "padding_fraction": statistics.mean(r["padding_fraction"] for r in rows),
        "startup_seconds": first["created_at"] - t0,
        "wall_seconds": float(job.finished_at or time.time()) - t0,
        "final_loss": last["train_loss"],
    }


def suite_ray(args: argparse.Namespace, argv: list[str] | None) -> None:
    steps = args.steps or (30 if args.model == "tiny" else 8)
    min_len = args.min_len or MIN_LEN["sft"]
    threads = args.ray_threads
    # Ray sets OMP_NUM_THREADS to a worker's CPUs; the local child inherits this process's
    # environment, where OpenMP would otherwise size its own pool to every core (measured: a
    # local job ran 1.2x faster with it set). Same setting for all, so the ratio is Ray's.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    from evertune.models import load_tokenizer

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="evertune-bench-") as tmp:
        scratch = Path(tmp)
        base = model_path(args, scratch)
        tokenizer = load_tokenizer(base)
        records = make_records(tokenizer, steps * args.batch_size, min_len, args.max_len)
        ws = make_workspace(scratch, base, args, steps)
        dataset = add_dataset(ws, scratch, "train.jsonl", records, tokenizer)
        with (contextlib.nullcontext(args.ray_address) if args.ray_address
              else ray_head(2 * threads)) as address:
            each = [f"train.threads={threads}"]
            on_ray = [*each, "train.backend=ray", f"train.ray.address={address}",
                      f"train.ray.cpus_per_worker={threads}"]
            contenders = {
                "local": lambda: run_job(ws, dataset, each),
                "ray 1 worker": lambda: run_job(ws, dataset, [*on_ray, "train.ray.num_workers=1"]),
                "ray 2 workers": lambda: run_job(ws, dataset, [*on_ray,
                                                               "train.ray.num_workers=2"]),
            }
            runs = run_interleaved(contenders, args.repeats)

    summary = {}
    base_tps = _median(runs["local"], "tokens_per_s")
    for name, outs in runs.items():
        tps = _median(outs, "tokens_per_s")
        summary[name] = {
            "tokens_per_s": tps,
            "vs_local": tps / base_tps,
            "startup_seconds": _median(outs, "startup_seconds"),
            "wall_seconds": _median(outs, "wall_seconds"),
            "final_loss": outs[0]["final_loss"],
            "steps": outs[0]["steps"] + 1,
        }
    print(
        f"\nmodel {args.model} ({base.name}), {steps} steps × batch {args.batch_size}, "
        f"{threads} torch thread(s) per training process, "
        f"load average {load_before[0]:.1f} → {os.getloadavg()[0]:.1f}"
    )
    print(f"{'contender':15} {'tokens/s':>9} {'vs local':>9} {'startup':>8} {'wall':>7} "
          f"{'loss':>7}")
    for name, s in summary.items():
        print(f"{name:15} {s['tokens_per_s']:9.0f} {s['vs_local']:8.2f}× "
              f"{s['startup_seconds']:7.1f}s {s['wall_seconds']:6.1f}s {s['final_loss']:7.4f}")
    write_record(args, argv, "ray", {
        "steps": steps, "threads_per_process": threads, "machine": machine_info(load_before),
        "summary": summary, "runs": runs,
    })


SUITES = {"sft": suite_sft, "pretrain": suite_pretrain, "dpo": suite_dpo, "ray": suite_ray}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return child_main(args)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    for suite in ["sft", "pretrain", "dpo"] if args.suite == "all" else [args.suite]:
        if args.suite == "all":
            print(f"\n== suite {suite} ==", flush=True)
        SUITES[suite](args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
