"""Generate preference pairs for a behaviour a program can check: answers as one JSON object.

    python examples/make_preference_pairs.py pairs.jsonl               # 300 pairs
    python examples/make_preference_pairs.py pairs.jsonl --pairs 600 --seed 3

Each row is `{"prompt", "chosen", "rejected"}` (the preference format). The prompt is a
support ticket with the request to answer with the team and a one-line reply. The chosen
answer is that, as compact JSON (`{"team": "billing", "reply": "…"}`); the rejected answer
says the same words in one line of prose, about as long, so neither length nor content gives
the preference away: only the format does. An instruct model prefers prose, so the base's
held-out preference accuracy (log p(chosen) > log p(rejected)) is low; after DPO it and the
share of generated answers that parse as JSON (`json_valid`) both rise, which Evertune
measures automatically.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Which team handles this ticket? Reply with a short answer for the customer.\n"
TICKETS = {
    "billing": ["I was charged twice for my {product}.",
                "The invoice for my {product} shows the wrong amount.",
                "My card was billed {amount} but I cancelled the {product} order."],
    "shipping": ["My {product} has not arrived after {days} days.",
                 "The tracking page for my {product} has not moved in {days} days.",
                 "The {product} was delivered to the wrong address."],
    "returns": ["I want to return the {product}; it does not fit.",
                "How do I send back a broken {product}?",
                "Can I exchange the {product} for another colour?"],
    "account": ["I cannot log in to order another {product}.",
                "Please change the email on my account; I bought a {product} last week.",
                "My password reset link for the shop does not work."],
}
REPLIES = {
    "billing": "We will refund the extra charge within 5 days.",
    "shipping": "We are tracing the parcel and will update you within 24 hours.",
    "returns": "We have emailed you a prepaid return label.",
    "account": "We have sent a new sign-in link to your email.",
}
# One-line prose carrying the same team and reply as the JSON answer (similar length, so a
# model cannot score well by preferring the shorter answer).
PROSE = [
    "The {team} team handles this. {reply}",
    "This goes to the {team} team. {reply}",
    "Our {team} team will help. {reply}",
    "Team: {team}. {reply}",
]
PRODUCTS = ["blender", "rain jacket", "desk lamp", "headphones", "backpack", "kettle",
            "yoga mat", "keyboard", "phone case", "water bottle"]
AMOUNTS = ["$12.99", "$49.00", "$129.50", "$240.00"]


def pair(rng: random.Random) -> dict[str, str]:
    team = rng.choice(list(TICKETS))
    ticket = rng.choice(TICKETS[team]).format(product=rng.choice(PRODUCTS),
                                              amount=rng.choice(AMOUNTS),
                                              days=rng.randint(3, 20))
    chosen = json.dumps({"team": team, "reply": REPLIES[team]})
    rejected = rng.choice(PROSE).format(team=team, reply=REPLIES[team])
    return {"prompt": INSTRUCTION + "Ticket: " + ticket, "chosen": chosen, "rejected": rejected}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="where to write the JSONL pairs")
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    rng = random.Random(args.seed)
    rows: dict[str, dict[str, str]] = {}
    for _ in range(args.pairs * 20):  # bounded: the template space is finite
        if len(rows) == args.pairs:
            break
        row = pair(rng)
        rows.setdefault(row["prompt"] + row["rejected"], row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows.values()), "utf-8")
    print(f"wrote {len(rows)} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
