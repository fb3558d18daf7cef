"""What redaction costs per served request: the default redactors vs e-mail + phone only.

    python bench/redaction.py                 # 2 KB and 16 KB prompts, 300 calls each
    python bench/redaction.py --calls 1000

Every answered request is redacted (its prompt and completion, for the request log and the
served-responses record feedback is checked against), on the event loop's thread. This times
`redact()` on chat-like text with a few secrets, card numbers, addresses and phone numbers
mixed into ordinary prose, and on the same text with none, and prints microseconds per call
(median of the calls). Writes bench/results/redaction-<time>.json unless --no-save.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from evertune.monitoring.redact import DEFAULT_REDACTORS, redact, redact_emails, redact_phones

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

PROSE = (
    "Hello, I ordered 3 items on 2026-11-02 for 129.90 and the parcel has not arrived. "
    "The tracking page says it left the depot at 10:30 but nothing since. Can you check? "
)
SECRETS = (
    "My card 4111 1111 1111 1111 was charged twice; reach me at ana@example.com or "
    "+1 (555) 010-9999. Our integration uses sk-proj-Ab3dEf0123456789XYZabcdEF and "
    "password=hunter2 with Authorization: Bearer abcdef0123456789xyz. "
)


def text_of(size: int, with_secrets: bool) -> str:
    unit = PROSE + (SECRETS if with_secrets else PROSE)
    return (unit * (size // len(unit) + 1))[:size]


def time_calls(text: str, redactors: tuple, calls: int) -> float:
    """Median microseconds per `redact(text, redactors)`."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        redact(text, redactors)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)
    contenders = {
        "default (secrets, cards, e-mail, phone)": DEFAULT_REDACTORS,
        "e-mail + phone only (before)": (redact_emails, redact_phones),
    }
    rows = []
    for size in (2_048, 16_384):
        for with_secrets in (True, False):
            text = text_of(size, with_secrets)
            for name, redactors in contenders.items():
                us = time_calls(text, redactors, args.calls)
                rows.append({"chars": size, "secrets": with_secrets, "redactors": name, "us": us})
                print(f"{size:>6} chars  secrets={with_secrets!s:<5}  {name:<40} {us:9.1f} µs")
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"redaction-{time.strftime('%Y%m%d-%H%M%S')}.json"
        record = {
            "command": " ".join([sys.executable, *sys.argv]),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "rows": rows,
        }
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
