"""Generate a support-ticket routing dataset: a task the base model does poorly and learns fast.

    python examples/make_sample_data.py demo/bucket/raw-data/tickets.jsonl          # 480 rows
    python examples/make_sample_data.py out.jsonl --rows 1000 --seed 7 --bad-rows 3

Each row is `{"input": "<instruction + ticket>", "output": "<team>"}` (the input/output
format). The five teams and their cues are invented here; an instruct model answers in free
prose and misses the exact label, while a LoRA fine-tune learns the mapping in a few minutes
of CPU training, so the evaluation shows a clear, measurable gain (exact match, ROUGE).
The tickets are generated from templates and slot values, not copied from anywhere.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = (
    "Route the support ticket to exactly one team: billing, shipping, account, technical or "
    "returns. Answer with the team name only.\nTicket: "
)

PRODUCTS = ["headphones", "blender", "running shoes", "desk lamp", "backpack", "coffee grinder",
            "phone case", "yoga mat", "keyboard", "water bottle", "jacket", "smart watch"]
AMOUNTS = ["$12.99", "$49.00", "$129.50", "$8.75", "$240.00", "$19.99", "$64.30"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend", "last week"]
DEVICES = ["iPhone", "Android phone", "tablet", "laptop", "Chromebook", "desktop browser"]

TEMPLATES: dict[str, list[str]] = {
    "billing": [
        "I was charged {amount} twice for my {product}. Please fix the double charge.",
        "My invoice shows {amount} but the {product} was on sale. Why the difference?",
        "The payment for my {product} failed on {day} but money left my account.",
        "Can I get a receipt for the {amount} I paid for the {product}?",
        "I see an unknown charge of {amount} on my credit card statement from {day}.",
        "Please update the card you bill me with; my old card expired.",
    ],
    "shipping": [
        "My {product} has not arrived yet; it was supposed to come {day}.",
        "The tracking number for my {product} shows no updates since {day}.",
        "The courier left my {product} at the wrong address.",
        "Can you ship my {product} with express delivery instead?",
        "The box with my {product} arrived crushed and wet from the delivery truck.",
        "How long does delivery of a {product} take to Canada?",
    ],
    "account": [
        "I cannot log in to my account since {day}; the password reset email never comes.",
        "Please change the email address on my profile.",
        "My account was locked after too many sign-in attempts on my {device}.",
        "How do I delete my account and all my personal data?",
        "Someone else may have accessed my account on {day}; I want to secure it.",
        "I want to merge two accounts that I created by mistake.",
    ],
    "technical": [
        "The app crashes every time I open the settings page on my {device}.",
        "The website shows an error 500 when I try to view my {product} order.",
        "Notifications stopped working on my {device} after the last update.",
        "The checkout page freezes on my {device} when I press the pay button.",
        "Pictures of the {product} do not load in the app on my {device}.",
        "The search bar returns nothing when I type {product}.",
    ],
    "returns": [
        "I would like to return my {product}; it is too small.",
        "How do I send back the {product} I received on {day}?",
        "The {product} is not what I ordered and I want to exchange it.",
        "Can I return a {product} after thirty days if it is unused?",
        "I need a return label for the broken {product}.",
        "The {product} stopped working after a week; I want to send it back for a replacement.",
    ],
}

OPENERS = ["", "Hello, ", "Hi team, ", "Good morning. ", "Urgent: ", "Hey, "]
CLOSERS = ["", " Thanks.", " Thank you!", " Please help.", " Regards, Sam.", " Cheers."]


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` distinct ticket rows, balanced across teams, deterministic for a seed."""
    rng = random.Random(seed)
    teams = sorted(TEMPLATES)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n and attempts < n * 50:
        attempts += 1
        team = teams[len(rows) % len(teams)]
        text = rng.choice(TEMPLATES[team]).format(
            product=rng.choice(PRODUCTS), amount=rng.choice(AMOUNTS),
            day=rng.choice(DAYS), device=rng.choice(DEVICES),
        )
        ticket = rng.choice(OPENERS) + text + rng.choice(CLOSERS)
        if ticket in seen:
            continue
        seen.add(ticket)
        rows.append({"input": INSTRUCTION + ticket, "output": team})
    rng.shuffle(rows)
    return rows


BAD_ROWS = [
    '{"input": "Where is my parcel?", "output": ""}',  # empty field
    '{"input": "My card was declined", "output": 3}',  # wrong type
    '{"input": "Refund please", "output": "billing"',  # malformed JSON
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSONL file to write (folders are created)")
    parser.add_argument("--rows", type=int, default=480, help="number of valid rows (default 480)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bad-rows", type=int, default=0, choices=range(0, len(BAD_ROWS) + 1),
                        help="append up to 3 invalid rows to see validation at work")
    args = parser.parse_args()
    rows = make_rows(args.rows, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + BAD_ROWS[: args.bad_rows]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} rows (+{args.bad_rows} invalid) to {args.out}")


if __name__ == "__main__":
    main()
