"""Pipeline overhead (object landed → registered, less training and evaluation); approve → PROD.

    python bench/pipeline_overhead.py                      # 3 drops into a local bucket (~2 min)
    python bench/pipeline_overhead.py --bucket s3 --runs 2 # the same through moto's S3 server
    python bench/pipeline_overhead.py --stack --runs 2     # Postgres, MLflow server, S3 (~3 min)
    python bench/pipeline_overhead.py --stack --ray --runs 2   # … and training on Ray (~5 min)

What `evertune up` does, in one process on the tiny model (`evertune.testing.build_tiny_model`):
the pipeline runtime (DBOS on SQLite) and the bucket watcher run; a JSON Lines file of 40
tickets is written into `raw-data/`; the clock runs from the moment the write returns to the
moment MLflow created the model version. From that span the time inside the training job
(its process, start to end, as the job records it) and inside evaluation (the ModelEvaluation
step) are taken out: what is left is the pipeline's own cost — noticing the object, queueing,
preprocessing, starting and polling the job, registration, the steps' bookkeeping.

Then each new version is approved (`evertune.deploy.approve`, auto-promote on, system tests
with 2 smoke prompts of 8 tokens), and the clock runs from the call to the `prod` alias
pointing at the version.

The runtime is warm, as in a server that has been up for a while: the run waits for the
launch-time warm-up (imports, MLflow store) before the first drop. The watcher polls every
0.2 s with `trigger.settle_seconds: 0` (S3 never settles; a local folder's default 2 s
settle time is a deliberate safety margin against half-written files and is reported apart).
With --stack every engine is a server on loopback, as in the scale tests (started by the
helpers under tests/): the state DB and DBOS on Debian's postgresql, the registry on an `mlflow
server` (Postgres store, artifacts on S3), the bucket on moto's S3 server; --ray also trains
on a local 2-CPU Ray head with 2 workers (`train.backend: ray`).
Targets: overhead < 2 s, approve → PROD < 1 s. Writes a JSON record to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
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
TARGETS = {"overhead_s": 2.0, "approve_to_prod_s": 1.0}
TEAMS = ["billing", "shipping", "account", "technical", "returns"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="data drops, one run each (default 3)")
    p.add_argument(
        "--bucket",
        choices=["local", "s3"],
        default="local",
        help="local folder (default) or s3:// on moto's server on loopback",
    )
    p.add_argument(
        "--stack",
        action="store_true",
        help="Postgres state DB, mlflow server and S3 bucket on loopback (implies s3)",
    )
    p.add_argument("--ray", action="store_true", help="with --stack: train.backend ray")
    p.add_argument("--poll", type=float, default=0.2, help="trigger.poll_seconds (default 0.2)")
    p.add_argument("--rows", type=int, default=40, help="records per drop (default 40)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the workspace here")
    return p.parse_args(argv)


def tickets(n: int, tag: str) -> bytes:
    rows = [
        {"input": f"ticket {i} {tag}: my {TEAMS[i % 5]} issue", "output": TEAMS[i % 5]}
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def make_workspace(
    root: Path, base: Path, bucket: str, poll: float, extra: dict[str, dict[str, Any]]
) -> Any:
    from evertune.workspace import Workspace

    Workspace.init(root)
    cfg_path = root / "evertune.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model"]["base"] = str(base)
    raw["storage"]["bucket"] = bucket
    # Enough epochs that the tiny model answers with a team name: the system tests of the
    # approve step refuse empty output. Training time is measured and taken out anyway.
    raw["train"].update(n_epochs=15, batch_size=4, checkpoint_every=50, learning_rate=0.01)
    raw["data"]["max_seq_len"] = 128
    raw["eval"].update(
        max_examples=8, max_new_tokens=8, batch_size=8, metrics=["loss", "rouge", "exact_match"]
    )
    raw["gate"].update(
        bootstrap_samples=200,
        rules=[{"metric": "loss", "higher_is_better": False, "non_inferiority_margin": 10.0}],
    )
    raw["trigger"].update(poll_seconds=poll, settle_seconds=0)
    raw["deploy"]["auto_promote"] = True
    raw["deploy"]["system_tests"].update(max_prompts=2, max_new_tokens=8)
    for section, values in extra.items():
        raw[section].update(values)
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Workspace.open(root)


def start_moto() -> tuple[Any, str]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return server, "s3://bench"


def start_stack(stack: contextlib.ExitStack, scratch: Path, ray: bool) -> dict[str, Any]:
    """Postgres, moto S3, an mlflow server (and a Ray head) on loopback; the workspace
    settings that point at them. `stack` stops them all."""
    sys.path.insert(0, str(ROOT))  # tests/ holds the engine starters the scale tests use
    import boto3

    from tests.mlflow_server import ARTIFACT_BUCKET, mlflow_server
    from tests.postgres import PostgresServer

    pg = stack.enter_context(PostgresServer())
    moto, bucket = start_moto()
    stack.callback(moto.stop)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket=ARTIFACT_BUCKET
    )
    tracking = stack.enter_context(
        mlflow_server(pg.create_database("mlflow"), endpoint, scratch / "mlflow-server.log")
    )
    extra: dict[str, Any] = {
        "storage": {"bucket": bucket, "state_db": pg.create_database("evertune")},
        "registry": {"tracking_uri": tracking},
    }
    if ray:
        from tests.ray_cluster import ray_head

        address = stack.enter_context(ray_head())
        extra["train"] = {"backend": "ray", "ray": {"address": address, "num_workers": 2}}
    return extra


def measure_run(ws: Any, key: str, landed: float, run: Any) -> dict[str, Any]:
    """Split one finished run's span into the pipeline's part and training/evaluation."""
    from evertune.training.jobs import get_job

    steps = {s.name: s for s in run.steps}
    job = get_job(ws, steps["FineTuning"].outputs["job"])
    registered = float(steps["RegisterModel"].outputs["registered_at"])
    train_s = job.finished_at - job.started_at
    ev = steps["ModelEvaluation"]
    eval_s = ev.finished_at - ev.started_at
    total = registered - landed
    dp, ft, rm = steps["DataPreprocessing"], steps["FineTuning"], steps["RegisterModel"]
    parts = {
        "detect_s": run.created_at - landed,  # watcher noticed it, run row + enqueue
        "dequeue_s": run.started_at - run.created_at,  # DBOS queue picked it up
        "preprocess_s": dp.finished_at - dp.started_at,
        "job_start_and_poll_s": (ft.finished_at - ft.started_at) - train_s,
        "register_s": registered - rm.started_at,
    }
    parts["step_transitions_s"] = total - train_s - eval_s - sum(parts.values())
    return {
        "key": key,
        "run_id": run.id,
        "version": run.version,
        "landed_to_registered_s": total,
        "train_job_s": train_s,
        "evaluation_s": eval_s,
        "overhead_s": total - train_s - eval_s,
        "overhead_parts": parts,
    }


def approve_to_prod(ws: Any, version: int) -> dict[str, Any]:
    from evertune import deploy
    from evertune.auth import Principal
    from evertune.registry import Registry

    reg = Registry(ws)
    t0 = time.time()
    result = deploy.approve(ws, version, Principal("bench", "approver"), "benchmark rollout")
    prod = reg.alias_version("prod")
    t1 = time.time()
    tests = result.system_tests
    return {
        "version": version,
        "reached_prod": prod is not None and prod.version == version,
        "message": result.message,
        "approve_to_prod_s": t1 - t0,
        "system_tests_s": tests.duration_s if tests else None,
        "system_tests_load_s": tests.load_s if tests else None,
        "moves": [f"{m.from_stage}->{m.to_stage}" for m in result.moves],
        "how": "evertune.deploy.approve (auto_promote)",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    from evertune import pipeline
    from evertune.bucket import Bucket
    from evertune.testing import build_tiny_model
    from evertune.trigger import Watcher

    load_before = os.getloadavg()
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="evertune-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    base = build_tiny_model(scratch / "tiny")
    moto = None
    bucket_url = "bucket"
    engines = contextlib.ExitStack()
    extra: dict[str, Any] = {}
    if args.stack:
        args.bucket = "s3"
        extra = start_stack(engines, scratch, args.ray)
        bucket_url = extra["storage"]["bucket"]
    elif args.bucket == "s3":
        moto, bucket_url = start_moto()
    ws = make_workspace(scratch / "ws", base, bucket_url, args.poll, extra)

    t0 = time.time()
    pipeline.launch(ws)
    launch_s = time.time() - t0
    for th in threading.enumerate():  # a server that has been up a while is past its warm-up
        if th.name == "evertune-warm-up":
            th.join()
    warm_s = time.time() - t0
    watcher = Watcher(ws).start()
    bucket = Bucket.for_workspace(ws)

    runs: list[dict[str, Any]] = []
    approvals: list[dict[str, Any]] = []
    try:
        for i in range(args.runs):
            key = f"raw-data/drop-{i}.jsonl"
            info = bucket.write_bytes(key, tickets(args.rows, tag=f"drop {i}"))
            landed = time.time()
            trigger = {
                "source": "bucket",
                "bucket": bucket.url,
                "key": key,
                "version": info.version,
            }
            run_id = pipeline.run_id_for(trigger)
            while pipeline.find_run(ws, run_id) is None:
                time.sleep(0.01)
            run = pipeline.wait_run(ws, run_id, timeout=900, poll=0.05)
            if run.status != "succeeded":
                raise SystemExit(f"run {run_id} {run.status}: {run.error}")
            runs.append(measure_run(ws, key, landed, run))
            r = runs[-1]
            print(
                f"run {i + 1}: landed→registered {r['landed_to_registered_s']:.2f} s = "
                f"train {r['train_job_s']:.2f} + eval {r['evaluation_s']:.2f} + "
                f"overhead {r['overhead_s']:.2f}",
                flush=True,
            )
            a = approve_to_prod(ws, run.version)
            approvals.append(a)
            outcome = "" if a["reached_prod"] else f" — NOT in prod: {a['message']}"
            print(
                f"       approve v{run.version} → prod {a['approve_to_prod_s']:.2f} s{outcome}",
                flush=True,
            )
    finally:
        watcher.stop()
        pipeline.shutdown()
        if moto is not None:
            moto.stop()
        engines.close()

    overheads = [r["overhead_s"] for r in runs]
    # Only rollouts that ended in prod count (a rejection by the system tests ends earlier).
    approve_s = [a["approve_to_prod_s"] for a in approvals if a["reached_prod"]] or [float("nan")]
    summary = {
        "overhead_s_median": statistics.median(overheads),
        "overhead_s_max": max(overheads),
        "train_job_s_median": statistics.median(r["train_job_s"] for r in runs),
        "evaluation_s_median": statistics.median(r["evaluation_s"] for r in runs),
        "landed_to_registered_s_median": statistics.median(
            r["landed_to_registered_s"] for r in runs
        ),
        "approve_to_prod_s_median": statistics.median(approve_s),
        "approve_to_prod_s_max": max(approve_s),
        "overhead_parts_median": {
            k: statistics.median(r["overhead_parts"][k] for r in runs)
            for k in runs[0]["overhead_parts"]
        },
        "launch_s": launch_s,
        "warm_up_s": warm_s,
    }

    print()
    print(
        f"{'run':>4} {'landed→registered':>18} {'train job':>10} {'evaluation':>11} "
        f"{'overhead':>9} {'approve→prod':>13}"
    )
    for i, (r, a) in enumerate(zip(runs, approvals, strict=True), 1):
        print(
            f"{i:>4} {r['landed_to_registered_s']:>16.2f} s {r['train_job_s']:>8.2f} s "
            f"{r['evaluation_s']:>9.2f} s {r['overhead_s']:>7.2f} s "
            f"{a['approve_to_prod_s']:>11.2f} s"
        )
    print(
        f"{'med':>4} {summary['landed_to_registered_s_median']:>16.2f} s "
        f"{summary['train_job_s_median']:>8.2f} s {summary['evaluation_s_median']:>9.2f} s "
        f"{summary['overhead_s_median']:>7.2f} s {summary['approve_to_prod_s_median']:>11.2f} s"
    )
    print()
    print("overhead, median per part:")
    for k, v in summary["overhead_parts_median"].items():
        print(f"  {k:22} {v:6.3f} s")
    print()
    for name, target in TARGETS.items():
        got = summary[f"{name}_median"]
        print(
            f"{name:18} median {got:.2f} s  target < {target:g} s  "
            f"{'OK' if got < target else 'MISSED'}"
        )

    import torch

    record = {
        "command": "python bench/pipeline_overhead.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "bucket": args.bucket,
        "stack": ("postgres+mlflow-server+s3" + ("+ray" if args.ray else ""))
        if args.stack
        else None,
        "runs_requested": args.runs,
        "rows_per_drop": args.rows,
        "trigger": {"poll_seconds": args.poll, "settle_seconds": 0},
        "targets": TARGETS,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            # Other processes on the machine skew timings; the load average tells how quiet.
            "loadavg_before": load_before[0],
            "loadavg_after": os.getloadavg()[0],
        },
        "summary": summary,
        "runs": runs,
        "approvals": approvals,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    label = ("stack-ray" if args.ray else "stack") if args.stack else args.bucket
    out = RESULTS / f"pipeline_overhead-{label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
