"""Generate a small domain corpus for continued pretraining: a made-up railway's operations
handbook, written in vocabulary and facts no base model has seen.

    python examples/make_domain_corpus.py handbook.txt                 # 400 paragraphs
    python examples/make_domain_corpus.py handbook.txt --paragraphs 800 --seed 3

The output is a `.txt` file, one document per blank-line-separated paragraph (the `text`
format). The handbook's invented stations, rolling stock and procedures recur with their own
fixed relations ("the Vessany interlock is cleared from Orrin box"), so a model that reads it
predicts held-out paragraphs better: its perplexity on them drops, while the base model's,
which never saw the handbook, stays where it was. Everything is generated from templates and
slot values here, not copied from anywhere.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

# Each station has fixed facts: its signal box, its line colour and its platform count. The
# relations are what continued pretraining learns; the templates only vary the wording.
STATIONS = {
    "Vessany": ("Orrin box", "amber line", 3),
    "Quillmarsh": ("Tessaly box", "slate line", 2),
    "Drennock Halt": ("Orrin box", "amber line", 1),
    "Palisade Cross": ("Mirewick box", "cobalt line", 4),
    "Ullathorpe": ("Tessaly box", "slate line", 2),
    "Brackenfold": ("Mirewick box", "cobalt line", 3),
    "Sorrowby": ("Kestle box", "russet line", 2),
    "Hathergate": ("Kestle box", "russet line", 5),
}
STOCK = {
    "Corvane railcar": "a two-car diesel unit with a top speed of 70 mph",
    "Brisling shunter": "a six-wheel yard locomotive kept at Palisade Cross depot",
    "Tallowmere coach": "a corridor carriage fitted with vacuum brakes",
    "Ferrule wagon": "a covered van used for parcels on the russet line",
}
PROCEDURES = [
    "Before a {stock} enters {station}, the driver calls {box} on the lineside telephone and "
    "waits for the {line} token.",
    "At {station} the {line} token is returned to {box} after the last train of the day.",
    "When fog covers the {line}, trains between {station} and the next station run under "
    "caution and {box} logs each passing time.",
    "Only {platforms} platform(s) at {station} can take a {stock}; the others are too short.",
    "If the token instrument at {box} fails, the signaller at {station} issues a paper "
    "ticket and telephones {box} to confirm.",
    "A {stock} is {stock_desc}; on the {line} it may call at {station} on request.",
    "Staff at {station} report to {box} every morning at 05:40 before the first {stock} runs.",
    "The {line} timetable gives {station} a dwell of two minutes, three for a {stock}.",
]


def paragraph(rng: random.Random) -> str:
    """One handbook paragraph: two to four procedure sentences about one station."""
    station = rng.choice(list(STATIONS))
    box, line, platforms = STATIONS[station]
    sentences = []
    for template in rng.sample(PROCEDURES, rng.randint(2, 4)):
        stock = rng.choice(list(STOCK))
        sentences.append(template.format(station=station, box=box, line=line,
                                         platforms=platforms, stock=stock,
                                         stock_desc=STOCK[stock]))
    return " ".join(sentences)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="where to write the .txt corpus")
    p.add_argument("--paragraphs", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.paragraphs < 1:
        p.error("--paragraphs must be at least 1")
    rng = random.Random(args.seed)
    seen: set[str] = set()
    docs: list[str] = []
    for _ in range(args.paragraphs * 20):  # bounded: the template space is finite
        if len(docs) == args.paragraphs:
            break
        text = paragraph(rng)
        if text not in seen:  # duplicates would be dropped by dedup anyway
            seen.add(text)
            docs.append(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(docs) + "\n", "utf-8")
    print(f"wrote {len(docs)} paragraphs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
