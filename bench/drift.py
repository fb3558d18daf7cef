"""Drift figures with the packaged embedding model: same-kind vs other-kind served prompts.

    python bench/drift.py                    # reference 1000 prompts, windows of 30 and 200
    python bench/drift.py --repeats 20       # more draws per scenario (steadier rates)

The "training" prompts are support tickets from a generator (30 issues in five teams, with
openers, closers, order numbers); each scenario draws a served window and runs the monitor's
test (`evertune.monitoring.drift.mmd_test`: unbiased MMD², RBF kernel, 1000 permutations) on
all-MiniLM-L6-v2 embeddings, exactly as `DriftMonitor` does (prompts go through the same
`prompt_texts` / `record_prompt`). The embedding model does not depend on the served LLM, so
these are the figures a deployment sees for such traffic. Prints per scenario and window size
the median MMD², the median and largest p-value and the share of draws flagged at the default
threshold (p < 0.01): for `same kind` that share is the false-alarm rate (about 1 %
expected), for the others the detection rate. Also times one check's parts. Writes
bench/results/drift-<time>.json unless --no-save.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from evertune.evaluation.metrics import embedding_model
from evertune.monitoring.drift import PERMUTATIONS, mmd_test, prompt_texts, record_prompt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
THRESHOLD = 0.01  # monitor.drift.threshold's default

ISSUES = {
    "billing": [
        "I was charged twice for order {n}", "my invoice {n} shows the wrong amount",
        "I want a refund for my last payment", "my card was declined although it is valid",
        "I was billed after I cancelled my subscription",
        "the discount code {code} was not applied to my bill",
    ],
    "shipping": [
        "my package {n} has not arrived yet", "the tracking number {n} does not work",
        "the courier left my parcel at the wrong address", "my order {n} arrived damaged",
        "the delivery is a week late", "can I change the delivery address of order {n}",
    ],
    "account": [
        "I cannot log in after resetting my password",
        "how do I change the e-mail address on my account",
        "my account was locked after too many attempts", "please delete my account and my data",
        "I never received the verification code", "two-factor authentication keeps failing",
    ],
    "technical": [
        "the app crashes when I open the settings page",
        "the website shows error {n} at checkout", "notifications stopped working on my phone",
        "the app is very slow since the last update", "I cannot upload a photo to my profile",
        "the search returns no results for any product",
    ],
    "returns": [
        "I want to return shoes that are too small", "how long does a refund take after a return",
        "the return label {n} is not valid", "can I exchange a jacket for another size",
        "my return {n} was received but not refunded", "the item I got is not what I ordered",
    ],
}
OPENERS = ["", "Hi,", "Hello,", "Hi team,", "Urgent:", "Good morning,"]
CLOSERS = ["", "Please help.", "Thanks.", "What should I do?", "Can you check?",
           "This is the second time I write."]

COOKING = [
    "How long should I {cook} {food}?", "What can I use instead of {ingredient} in {dish}?",
    "Give me a quick {diet} recipe with {food}.", "Why does my {dish} come out {problem}?",
    "What wine goes well with {dish}?", "Can I freeze {dish} and reheat it later?",
]
COOK_WORDS = {
    "cook": ["roast", "boil", "bake", "grill", "steam"],
    "food": ["chicken thighs", "salmon", "sweet potatoes", "lentils", "broccoli", "rice"],
    "ingredient": ["eggs", "butter", "buttermilk", "cream", "flour"],
    "dish": ["banana bread", "risotto", "lasagna", "pancakes", "curry", "bread"],
    "diet": ["vegan", "gluten-free", "low-carb", "vegetarian"],
    "problem": ["dry", "too dense", "soggy", "bland", "burnt on the bottom"],
}
CODING = [
    "How do I {task} in {lang}?", "Why does my {lang} code raise {error} when I {task}?",
    "What is the fastest way to {task} in {lang}?", "Explain {concept} in {lang} with an example.",
]
CODE_WORDS = {
    "task": ["read a CSV file", "sort a dictionary by value", "parse JSON", "reverse a list",
             "open a socket", "merge two arrays"],
    "lang": ["Python", "JavaScript", "Rust", "Go", "Java"],
    "error": ["a KeyError", "a null pointer exception", "a type error", "a stack overflow"],
    "concept": ["closures", "generics", "async functions", "pattern matching"],
}
HR = [  # near kind: an employee's questions to another help desk
    "How many vacation days do I have left this year?", "When is payroll for {month} paid?",
    "How do I report sick leave for {days} days?", "Can I change my pension contribution?",
    "Who approves my overtime for {month}?", "How do I update my bank details for salary?",
    "Is there a budget for training courses in {month}?",
]
MONTHS = ["January", "March", "June", "September", "November"]


def _fill(template: str, words: dict[str, list[str]], rng: random.Random) -> str:
    return template.format(**{k: rng.choice(v) for k, v in words.items()},
                           n=rng.randint(1000, 99999),
                           code="".join(rng.choice("ABCDEFGHJKMNPQRSTUVWXYZ") for _ in range(6)))


def ticket(rng: random.Random, teams: list[str] | None = None) -> str:
    team = rng.choice(teams or list(ISSUES))
    text = _fill(rng.choice(ISSUES[team]), {}, rng)
    return " ".join(p for p in (rng.choice(OPENERS), text + ".", rng.choice(CLOSERS)) if p)


def cooking(rng: random.Random) -> str:
    return _fill(rng.choice(COOKING), COOK_WORDS, rng)


def coding(rng: random.Random) -> str:
    return _fill(rng.choice(CODING), CODE_WORDS, rng)


def hr(rng: random.Random) -> str:
    return _fill(rng.choice(HR), {"month": MONTHS, "days": ["2", "3", "5", "10"]}, rng)


def mixed(share: float, other: Callable[[random.Random], str]) -> Callable[[random.Random], str]:
    def draw(rng: random.Random) -> str:
        return other(rng) if rng.random() < share else ticket(rng)
    return draw


SCENARIOS: dict[str, Callable[[random.Random], str]] = {
    "same kind (held-out tickets)": ticket,
    "tickets, billing only (mix shift)": lambda rng: ticket(rng, ["billing"]),
    "10 % cooking in tickets": mixed(0.10, cooking),
    "25 % cooking in tickets": mixed(0.25, cooking),
    "HR questions (near kind)": hr,
    "cooking questions": cooking,
    "coding questions": coding,
}


def embed(texts: list[str]) -> np.ndarray:
    vectors = embedding_model().encode(texts, batch_size=64, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=int, default=1000, help="training prompts compared")
    p.add_argument("--windows", type=int, nargs="+", default=[30, 200], help="served prompts")
    p.add_argument("--repeats", type=int, default=10, help="served windows drawn per scenario")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # as the monitor embeds (DriftMonitor._encode)
    t0 = time.perf_counter()
    embedding_model()
    load_s = time.perf_counter() - t0
    # Training records as a dataset stores them; the served side as the request log does.
    train_rng = random.Random(1)
    records = [{"input": ticket(train_rng), "output": "routed"} for _ in range(args.reference)]
    t0 = time.perf_counter()
    reference = embed([t for t in (record_prompt(r) for r in records) if t])
    ref_s = time.perf_counter() - t0

    rows = []
    print(f"reference: {len(reference)} training tickets; {PERMUTATIONS} permutations; "
          f"flagged = p < {THRESHOLD}")
    print(f"{'scenario':<36} {'n':>4} {'MMD² med':>9} {'p med':>7} {'p max':>7} {'flagged':>8}")
    timing: dict[str, float] = {}
    for name, draw in SCENARIOS.items():
        for n in args.windows:
            stats, ps = [], []
            for rep in range(args.repeats):
                rng = random.Random(f"{name}/{n}/{rep}")
                messages = [[{"role": "user", "content": draw(rng)}] for _ in range(n)]
                texts = [t for m in messages for t in prompt_texts(m)]
                t0 = time.perf_counter()
                served = embed(texts)
                t1 = time.perf_counter()
                stat, pv = mmd_test(served, reference, seed=rep)
                t2 = time.perf_counter()
                timing.setdefault(f"embed {n} prompts", t1 - t0)
                timing.setdefault(f"test {n} vs {len(reference)}", t2 - t1)
                stats.append(stat)
                ps.append(pv)
            flagged = sum(pv < THRESHOLD for pv in ps) / len(ps)
            row = {"scenario": name, "n": n, "statistic_median": statistics.median(stats),
                   "p_median": statistics.median(ps), "p_max": max(ps), "flagged": flagged,
                   "p_values": ps, "statistics": stats}
            rows.append(row)
            print(f"{name:<36} {n:>4} {row['statistic_median']:>9.4f} {row['p_median']:>7.3f} "
                  f"{row['p_max']:>7.3f} {flagged:>7.0%}")
    t0 = time.perf_counter()
    embed([ticket(train_rng) for _ in range(5)])
    timing["embed 5 prompts (a steady check's new ones)"] = time.perf_counter() - t0
    print(f"\nembedding model load {load_s:.1f} s; reference embedding {ref_s:.1f} s "
          f"({len(reference)} prompts, once per dataset version, then cached)")
    for k, v in timing.items():
        print(f"{k}: {v * 1000:.0f} ms")
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"drift-{time.strftime('%Y%m%d-%H%M%S')}.json"
        record = {
            "command": " ".join([sys.executable, *sys.argv]),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "load_s": load_s,
            "reference_s": ref_s,
            "timing_s": timing,
            "rows": rows,
        }
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
