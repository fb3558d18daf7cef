"""Console render times: every page of the web console with 100 pipeline runs and 50 versions.

    python bench/console_render.py                # build the workspace (~2 min), time each page
    python bench/console_render.py --requests 50  # more samples per page (default 20)
    python bench/console_render.py --json         # the JSON record on stdout, not the table

What `evertune up` serves, in one process: `server.create_app(ws, serving=False)` (the control
API and the console, with the pipeline runtime and bucket watcher in its lifespan; no model
gateway, which a console page never calls) under uvicorn on a loopback port, and an httpx
client that signs in through `POST /login` and times each page over HTTP: one untimed warm-up
GET, then `--requests` timed GETs, one after another. A page that answers anything but 200 is
reported with its status and not timed (pages still being written answer 404).

The workspace is built with the real parts, quickly:
- a dataset version from `steps.preprocess` (tickets plus a few bad rows: rejects, a report);
- a LoRA adapter folder of the tiny model (PEFT, saved untrained: rendering never loads it)
  and one real evaluation report (`evaluate_candidate`: candidate vs base on the test split),
  copied per version under a new report id (every 7th with a failed gate);
- 50 training jobs through `training.jobs` (create_job → running → succeeded, loss and
  validation rows, checkpoints, events), each registered in MLflow by the pipeline's own
  RegisterModel step, inside one of 100 pipeline runs recorded by the pipeline module
  (`_run_started`, the DataPreprocessing and RegisterModel steps themselves, `_recorded` for
  FineTuning and ModelEvaluation with the outputs and log lines they write, `_run_finished`);
  the other 50 fail (half on a missing dataset, half on a failed job), and one more still runs;
- versions moved through the lifecycle with the real Registry: five successive PROD versions
  (audit history, retired ones), one in QA, the rest pending or rejected;
- `--log-rows` request-log rows over the last 6 hours through `RequestLog` (prod / qa / base),
  and 30 feedback records through `monitoring.feedback.write_feedback`.

Target: every page < 200 ms (p95). Writes bench/results/console_render-<time>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGET_MS = 200.0
TEAMS = ["billing", "shipping", "account", "technical", "returns"]
PROD_CHAIN = (10, 20, 30, 41, 48)  # promoted in turn: each retires the one before
QA_VERSION = 49


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100, help="pipeline runs (default 100)")
    p.add_argument("--versions", type=int, default=50, help="registered versions (default 50)")
    p.add_argument("--requests", type=int, default=20, help="timed GETs per page (default 20)")
    p.add_argument("--log-rows", type=int, default=5000, help="request-log rows (default 5000)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the workspace here")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)
    if args.versions > args.runs:
        p.error("--versions cannot exceed --runs: each version is registered by a run")
    if args.versions < max(PROD_CHAIN + (QA_VERSION,)):
        p.error(f"--versions must be at least {QA_VERSION} (the PROD and QA versions)")
    return args


def say(args: argparse.Namespace, message: str) -> None:
    """Progress lines: on stderr with --json, so stdout stays one JSON document."""
    print(message, file=sys.stderr if args.json else sys.stdout, flush=True)


# -- the workspace -----------------------------------------------------------------------------


def make_workspace(root: Path, base: Path) -> Any:
    from evertune.workspace import Workspace

    Workspace.init(root)
    cfg_path = root / "evertune.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model"]["base"] = str(base)
    raw["data"]["max_seq_len"] = 128
    raw["eval"].update(max_examples=8, max_new_tokens=8, batch_size=8)
    raw["gate"]["bootstrap_samples"] = 200
    raw["serve"]["request_log_sample"] = 0.5  # the page scales counts: exercise that path
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Workspace.open(root)


def tickets_file(path: Path) -> Path:
    rows: list[Any] = [
        {"input": f"Ticket {i}: please route my {TEAMS[i % 5]} question about order {i}",
         "output": TEAMS[i % 5]}
        for i in range(80)
    ]
    rows += [{"input": "no answer here"}, {"output": "no question"}, "not an object"]  # rejects
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lora_adapter(base: Path, folder: Path) -> Path:
    """A real PEFT LoRA folder of the tiny model (untrained: only its files matter here)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from evertune.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_model(base),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.save_pretrained(str(folder))
    return folder


def training_job(ws: Any, dataset: Any, run_id: str, adapter: Path, rng: random.Random,
                 fail: bool = False) -> Any:
    """A job with the rows a real run leaves: loss every step, validation, checkpoints, events."""
    from evertune.training import jobs

    job = jobs.create_job(ws, dataset, run_id=run_id)
    job = jobs.transition(ws, job.id, "running", message="Job started", pid=os.getpid(),
                          host=platform.node())
    total, loss = 60, 3.0 + rng.random()
    for step in range(1, total + 1):
        loss *= 0.97 + rng.random() * 0.02
        jobs.record_metrics(ws, job.id, step, {
            "train_loss": loss, "lr": 1e-3 * min(1.0, step / 5) * (1 - step / (total + 1)),
            "grad_norm": 1.0 + rng.random(), "tokens_per_s": 900 + 50 * rng.random(),
            "epoch": step / 20, "total_steps": total, "trained_tokens": step * 1200,
            "eta_s": (total - step) * 0.4,
        })
        if step % 20 == 0:
            val = loss * 1.05
            jobs.record_metrics(ws, job.id, step, {"val_loss": val, "val_perplexity": math.exp(val),
                                                   "epoch": step / 20, "total_steps": total})
            jobs.record_event(ws, job.id, f"Step {step}/{total}: validation loss={val:.4f}")
            path = jobs.job_dir(ws, job.id) / "checkpoints" / f"step-{step:06d}"
            jobs.record_checkpoint(ws, job.id, step, path, {"train_loss": loss, "val_loss": val})
            jobs.record_event(ws, job.id, f"Checkpoint saved at step {step}/{total}",
                              data={"path": str(path)})
        if fail and step == 30:
            return jobs.fail_job(ws, job.id, "training_failed",
                                 "the loss became NaN at step 30; lower train.learning_rate")
    jobs.record_event(ws, job.id, f"New fine-tuned model created: {adapter}",
                      data={"path": str(adapter), "kind": "lora"})
    return jobs.transition(ws, job.id, "succeeded", result={"path": str(adapter), "kind": "lora"},
                           trained_tokens=total * 1200,
                           message="The job has successfully completed")


def copy_report(ws: Any, report: Any, n: int) -> Any:
    """The real report under a new id (as if each version had been evaluated)."""
    rid = f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    update: dict[str, Any] = {"id": rid, "created_at": time.time()}
    if n % 7 == 5:
        update |= {"verdict": "fail", "reasons": ["test: rougeL: the candidate is worse than base "
                                                  "(CI upper bound -0.04 < margin -0.02)"]}
    copy = report.model_copy(update=update)
    copy.save(ws.evals_dir / rid / "report.json")
    return copy


def build(ws: Any, base: Path, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Fill `ws`; returns ids the pages are timed with. Needs the pipeline runtime (launched)."""
    from evertune import pipeline, steps
    from evertune.errors import JobError
    from evertune.evaluation import ModelRef, evaluate_candidate
    from evertune.registry import Registry

    rng = random.Random(0)
    t0 = time.time()
    added = steps.preprocess(ws, [tickets_file(scratch / "tickets.jsonl")])
    dataset = added.versions[0]
    adapter = lora_adapter(base, scratch / "adapter")
    report = evaluate_candidate(ws, ModelRef("candidate", adapter), dataset, include_base=True)
    say(args, f"dataset {dataset.id}, adapter and one evaluation in {time.time() - t0:.1f} s")

    t0 = time.time()
    first_run, first_job, registered, failed = None, None, 0, 0
    for i in range(args.runs):
        run_id = f"run-bench-{i:04d}"
        trigger = {"source": "api", "run_id": run_id, "dataset": dataset.id}
        # `versions` successes spread evenly over the runs; the failures alternate between a
        # dataset that is gone (DataPreprocessing fails) and a job that failed (FineTuning).
        ok = (i * args.versions) // args.runs != ((i + 1) * args.versions) // args.runs
        if not ok:
            failed += 1
            if failed % 2:
                trigger["dataset"] = "ds-deleted"
        pipeline._run_started(run_id, trigger)
        try:
            data = pipeline.data_preprocessing(run_id, trigger)
            job = training_job(ws, dataset, run_id, adapter, rng, fail=not ok)
            with pipeline._recorded(ws, run_id, "FineTuning") as ctx:
                ctx.outputs["job"] = job.id
                ctx.log(f"job {job.id} started on {data['training_dataset']} (pid {job.pid})")
                for step in (20, 40):
                    ctx.log(f"step {step}/60, loss {2.0 - step / 100:.4f}")
                if job.status != "succeeded":
                    raise JobError(f"job {job.id} failed: {job.error['message']}")
                ctx.outputs.update(job=job.id, adapter=str(adapter),
                                   trained_tokens=job.trained_tokens,
                                   job_started_at=job.started_at, job_finished_at=job.finished_at)
                ctx.log(f"job {job.id} succeeded: {job.trained_tokens} tokens trained")
            tuned = dict(ctx.outputs)
            with pipeline._recorded(ws, run_id, "ModelEvaluation") as ctx:
                rep = copy_report(ws, report, registered + 1)
                means = rep.means.get("candidate", {})
                candidate = {k: v for k, v in means.items() if v is not None}
                ctx.outputs.update(report=rep.id, verdict=rep.verdict, reasons=list(rep.reasons),
                                   reference=rep.reference_role, candidate=candidate,
                                   eval_seconds=rep.duration_s)
                ctx.log(f"report {rep.id}: gate {rep.verdict}")
            evaluated = dict(ctx.outputs)
            registered_out = pipeline.register_model(run_id, trigger, tuned, evaluated)
            registered += 1
            first_run = first_run or run_id
            first_job = first_job or job.id
            pipeline._run_finished(run_id, trigger, registered_out, None)
        except pipeline.PipelineError as exc:
            pipeline._run_finished(run_id, trigger, None, str(exc))
        if (i + 1) % 20 == 0:
            say(args, f"  {i + 1} runs, {registered} versions ({time.time() - t0:.0f} s)")
    # One run still training: the overview and runs list show a live run.
    live = "run-bench-live"
    pipeline._run_started(live, {"source": "api", "run_id": live, "dataset": dataset.id})
    pipeline.data_preprocessing(live, {"source": "api", "run_id": live, "dataset": dataset.id})

    reg = Registry(ws)
    for n in PROD_CHAIN:
        reg.transition(n, "approved", "ana", "metrics hold up; reviewed the regressions")
        reg.transition(n, "qa", "ana", "deploy to QA")
        reg.transition(n, "prod", "ana", "system tests passed")
    reg.transition(QA_VERSION, "approved", "ana", "looks good")
    reg.transition(QA_VERSION, "qa", "ana", "deploy to QA")

    request_log(ws, args.log_rows, rng)
    feedback(ws, rng)
    say(args, f"{args.runs} runs, {registered} versions, {args.log_rows} request-log rows in "
              f"{time.time() - t0:.0f} s")
    return {"run": first_run, "job": first_job, "dataset": dataset.id, "version": QA_VERSION}


def request_log(ws: Any, rows: int, rng: random.Random) -> None:
    from evertune.monitoring.request_log import RequestLog

    log = RequestLog(ws, sample=ws.config.serve.request_log_sample)
    now = time.time()
    targets = [(f"v{PROD_CHAIN[-1]}", "prod", 0.7), (f"v{QA_VERSION}", "qa", 0.2),
               ("base", "base", 0.1)]
    for i in range(rows):
        version, stage, _ = rng.choices(targets, weights=[t[2] for t in targets])[0]
        error = rng.random() < 0.02
        ttft = rng.lognormvariate(-1.8, 0.4)
        tokens = 0 if error else rng.randint(2, 64)
        log.record({
            "id": f"chatcmpl-bench{i:06d}", "created_at": now - rng.random() * 6 * 3600,
            "model": f"assistant@{stage}", "version": version, "stage": stage, "endpoint": "chat",
            "status": "error" if error else "ok",
            # An e-mail address the writer redacts, as the gateway's log would hold it.
            "prompt": [{"role": "user", "content": f"Ticket {i}: customer{i}@example.com has a "
                                                   f"{TEAMS[i % 5]} issue"}],
            "completion": None if error else TEAMS[i % 5],
            "finish_reason": None if error else "stop",
            "prompt_tokens": 30, "completion_tokens": tokens, "ttft_s": None if error else ttft,
            "duration_s": ttft + tokens * 0.03, "params": {"max_tokens": 64, "stream": False},
            "error": "engine overloaded: retry later" if error else None,
        })
    log.flush(timeout=120)
    log.close()


def feedback(ws: Any, rng: random.Random) -> None:
    from evertune.monitoring.feedback import build_record, write_feedback

    for i in range(30):
        rid = f"chatcmpl-bench{i:06d}"
        source = {"endpoint": "chat", "prompt": [{"role": "user", "content": f"Ticket {i}"}],
                  "completion": TEAMS[i % 5], "version": f"v{PROD_CHAIN[-1]}",
                  "model": "assistant@prod"}
        correction = TEAMS[(i + 1) % 5] if i % 3 == 0 else None
        write_feedback(ws, build_record(source, response_id=rid, rating=rng.choice([-1, 1]),
                                        correction=correction), rid)


# -- serving and timing ------------------------------------------------------------------------


def serve(app: Any) -> tuple[str, Any, threading.Thread]:
    """`app` under uvicorn on a free loopback port, in a daemon thread; waits until it answers."""
    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz").json().get("status") == "ok":
                return url, server, thread
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not become ready within 120 s")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 20 samples is the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class GcPauses:
    """Garbage-collector pauses of this process (server and client share it) while timing.

    A full (generation 2) collection walks every object of the process: with torch, MLflow
    and DBOS loaded that is millions of them, and it stalls whichever request is running."""

    def __init__(self) -> None:
        self.pauses: list[dict[str, Any]] = []
        self._t0 = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif info["generation"] == 2:
            self.pauses.append({"ms": (time.perf_counter() - self._t0) * 1000,
                                "collected": info["collected"]})


def time_pages(url: str, token: str, pages: list[str], n: int) -> list[dict[str, Any]]:
    import httpx

    out = []
    with httpx.Client(base_url=url, follow_redirects=False, timeout=60) as client:
        r = client.post("/login", data={"token": token, "next": "/"})
        if r.status_code != 303:
            raise SystemExit(f"sign-in failed: HTTP {r.status_code}: {r.text[:300]}")
        for path in pages:
            warm = client.get(path)
            row: dict[str, Any] = {"page": path, "status": warm.status_code,
                                   "bytes": len(warm.content)}
            if warm.status_code != 200:
                row["note"] = _reason(warm.text)
                out.append(row)
                continue
            ms = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = client.get(path)
                ms.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    row["status"] = r.status_code
            row |= {"n": n, "p50_ms": statistics.median(ms), "p95_ms": percentile(ms, 95),
                    "max_ms": max(ms), "ok": percentile(ms, 95) < TARGET_MS, "ms": ms}
            out.append(row)
    return out


def _reason(html: str) -> str:
    """The error page's message (data-testid="error"), or the start of the body."""
    import re

    found = re.search(r'data-testid="error">(.*?)<', html, re.S)
    return (found.group(1) if found else html[:160]).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("evertune.pipeline").setLevel(logging.ERROR)  # the failing runs log errors
    import torch

    from evertune.server import create_app
    from evertune.testing import build_tiny_model

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="evertune-console-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    base = build_tiny_model(scratch / "tiny")
    ws = make_workspace(scratch / "ws", base)
    # The app first: its lifespan launches the pipeline runtime the run records go through.
    url, server, thread = serve(create_app(ws, serving=False))
    for th in threading.enumerate():  # a server up for a while is past its warm-up
        if th.name == "evertune-warm-up":
            th.join()
    try:
        ids = build(ws, base, scratch, args)
        pages = ["/", "/runs", f"/runs/{ids['run']}", "/jobs", f"/jobs/{ids['job']}", "/datasets",
                 f"/datasets/{ids['dataset']}", "/models", f"/models/{ids['version']}",
                 "/deployments", "/serving", "/serving?window=24h"]
        token = ws.create_token("bench", "approver")
        load_start = os.getloadavg()
        with GcPauses() as gc_pauses:
            results = time_pages(url, token, pages, args.requests)
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    record = {
        "command": "python bench/console_render.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": args.runs,
        "versions": args.versions,
        "request_log_rows": args.log_rows,
        "requests_per_page": args.requests,
        "target_ms": TARGET_MS,
        "transport": "httpx → uvicorn on loopback, create_app(ws, serving=False)",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # Other processes on the machine skew timings; the load average tells how quiet.
            "loadavg_before_build": load_before[0],
            "loadavg_before_timing": load_start[0],
            "loadavg_after": os.getloadavg()[0],
        },
        "workspace": str(scratch / "ws"),
        "gc_full_collections": gc_pauses.pauses,
        "pages": results,
    }
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print()
        print(f"{'page':44} {'status':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'KB':>6}  "
              f"< {TARGET_MS:g} ms")
        for r in results:
            if "p50_ms" not in r:
                print(f"{r['page'][:44]:44} {r['status']:>6} {'—':>8} {'—':>8} {'—':>8} "
                      f"{r['bytes'] / 1024:>6.1f}  not timed: {r.get('note', '')[:60]}")
                continue
            print(f"{r['page'][:44]:44} {r['status']:>6} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
                  f"{r['max_ms']:>8.1f} {r['bytes'] / 1024:>6.1f}  {'OK' if r['ok'] else 'MISSED'}")
        print(f"\nload average: {load_start[0]:.1f} at the start of timing, "
              f"{record['machine']['loadavg_after']:.1f} at the end ({os.cpu_count()} CPUs)")
        pauses = ", ".join(f"{p['ms']:.0f} ms" for p in gc_pauses.pauses) or "none"
        print(f"full garbage collections while timing (they stall the request in flight): {pauses}")
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"console_render-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        say(args, f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
