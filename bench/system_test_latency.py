"""QA system-test latency per prompt: charged by a batch vs each prompt timed on its own.

    python bench/system_test_latency.py                 # tiny model, 8 prompts, idle and busy
    python bench/system_test_latency.py --model default --new-tokens 32   # SmolLM2-135M
    python bench/system_test_latency.py --hogs 0        # idle machine only

Why: `approve` ran the 8 smoke prompts as one batch, and `generation.generate` gives each row
the time from the batch's start to the step the row finished, so every prompt that ran to
`max_new_tokens` was charged the whole batch's time. While a training run used the cores, a
batch took 30.1 s and a correct version went over the 30 s budget. The system tests now run
each prompt on its own (`deploy._run_tests`), so each is charged its own time.

Contenders, on the same model and prompts in the same process:
- `batched`: one `generate` call with batch_size 8 (the old system tests);
- `one at a time`: one call per prompt (what the system tests do now).
Each runs on an idle machine and then with `--hogs` CPU-bound processes beside it (a stand-in
for a training run: a matmul loop per process). Reported: the worst latency charged to a
prompt (what the budget is checked against), the sum of charged latencies and the wall time.
Writes a JSON record to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TEAMS = ["billing", "shipping", "account", "technical", "returns"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (built on the fly) or default (SmolLM2)")
    p.add_argument("--prompts", type=int, default=8, help="smoke prompts (default 8)")
    p.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens (default 16)")
    p.add_argument("--hogs", type=int, default=2, help="CPU-bound processes when busy (default 2)")
    return p.parse_args(argv)


def _hog(stop: Any) -> None:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = (a @ a).tanh()


def _model(spec: str, work: Path) -> Path:
    if spec == "tiny":
        from evertune.testing import build_tiny_model

        return build_tiny_model(work / "tiny")
    from evertune.models import resolve_base_model

    return resolve_base_model(spec, work / "models")


def _measure(model: Any, tok: Any, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    from evertune.generation import generate

    out: dict[str, Any] = {}
    start = time.perf_counter()
    batch = generate(model, tok, prompts, max_new_tokens=new_tokens, temperature=0.0,
                     batch_size=len(prompts))
    wall = time.perf_counter() - start
    lat = [g.latency_s for g in batch]
    out["batched"] = {"max_s": max(lat), "sum_s": sum(lat), "wall_s": wall}
    start = time.perf_counter()
    lat = [generate(model, tok, [p], max_new_tokens=new_tokens, temperature=0.0,
                    batch_size=1)[0].latency_s for p in prompts]
    wall = time.perf_counter() - start
    out["one at a time"] = {"max_s": max(lat), "sum_s": sum(lat), "wall_s": wall}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from evertune.data.templating import to_example
    from evertune.models import load_model, load_tokenizer

    with tempfile.TemporaryDirectory(prefix="evertune-bench-") as tmp:
        path = _model(args.model, Path(tmp))
        tok = load_tokenizer(path)
        model = load_model(path).eval()
        prompts = [to_example({"input": f"Ticket {i}: my {TEAMS[i % 5]} question, please route "
                                        "it to the right team", "output": ""}, tok).prompt
                   for i in range(args.prompts)]
        _measure(model, tok, prompts[:2], 2)  # warm-up, untimed
        results = {"idle": _measure(model, tok, prompts, args.new_tokens)}
        if args.hogs:
            ctx = mp.get_context("spawn")
            stop = ctx.Event()
            hogs = [ctx.Process(target=_hog, args=(stop,), daemon=True) for _ in range(args.hogs)]
            for h in hogs:
                h.start()
            time.sleep(2.0)  # let them spin up
            try:
                results[f"busy ({args.hogs} hogs)"] = _measure(model, tok, prompts,
                                                                args.new_tokens)
            finally:
                stop.set()
                for h in hogs:
                    h.join(10)

    print(f"{args.prompts} prompts, max_new_tokens {args.new_tokens}, model {args.model}")
    print(f"{'machine':<16} {'contender':<14} {'worst charged':>14} {'sum charged':>12} "
          f"{'wall':>8}")
    for machine, by in results.items():
        for name, r in by.items():
            print(f"{machine:<16} {name:<14} {r['max_s']:>13.3f}s {r['sum_s']:>11.3f}s "
                  f"{r['wall_s']:>7.3f}s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([sys.executable, *sys.argv]), "machine": platform.node(),
              "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "args": vars(args),
              "results": results}
    out = RESULTS / f"system-test-latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
