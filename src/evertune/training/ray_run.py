"""Training on a Ray cluster (`train.backend: ray`): the driver, and what each worker runs.

    evertune tune --set train.backend=ray --set train.ray.num_workers=4
    evertune tune --set train.backend=ray --set train.ray.address=10.0.0.5:6379 \\
        --set train.ray.use_gpu=true
    python -m evertune.training.run JOB_DIR             # the driver: start_job spawns it
    python -m evertune.training.ray_run --probe ADDRESS  # a cluster's CPUs and GPUs, as JSON

How a job runs:

    RayBackend.start (training.backends): Ray installed? address answers? enough CPUs/GPUs?
      → spawns `python -m evertune.training.run JOB_DIR`, the local backend's command, so
        liveness checks, `evertune jobs cancel` and `evertune jobs resume` work unchanged
    run.py sees train.backend=ray → `drive()`: ray.init(train.ray.address) and a TorchTrainer
      of train.ray.num_workers workers (gloo on CPU, NCCL with use_gpu)
    each worker (`train_worker`): opens the workspace, notes its pid in JOB_DIR/workers/,
      runs the job's recipe; the harness sees torch.distributed and splits each batch
      (harness.Ranks); rank 0 writes events, metric rows, checkpoints and the result

Failures:
- a worker dies (kill -9, OOM killer, a lost node): the others fail in their next collective,
  Ray Train restarts the worker group (up to `train.ray.max_failures` times) and the harness
  resumes from the newest checkpoint in the job folder, as a resumed local job does;
- the driver dies: Ray ends the workers it owns; `check_alive` finds the driver's pid gone
  and marks the job `process_died`, and `evertune jobs resume` starts a new driver;
- retries used up, or an error Ray cannot retry: the driver marks the job failed with the
  workers' error (traceback in JOB_DIR/train.log, where Ray forwards the workers' output).

Every worker opens the workspace by its path: on several nodes that path must be a shared
volume (job folders, datasets, model cache) and the state DB a server (Postgres), not SQLite.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertune.config import Config
from evertune.errors import EvertuneError
from evertune.training.jobs import fail_job, get_job, list_metrics, record_event
from evertune.training.recipes import RECIPES

if TYPE_CHECKING:
    from evertune.training.jobs import Job
    from evertune.workspace import Workspace

WORKERS_DIR = "workers"  # JOB_DIR/workers/rank-N.json: each worker's pid and host
# Environment the workers need from the driver's (model cache, offline flags, test knobs):
# workers started by `ray start` do not inherit the driver's environment. Nothing that looks
# like a secret: Ray shows a job's runtime environment in its dashboard and state API, so
# workers get tokens (HF_TOKEN for a gated hub model) from their own environment.
PROPAGATE = ("EVERTUNE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")
# Seconds a collective may wait (torch.distributed's timeout). Generous: the other ranks wait
# while rank 0 alone computes what it caches (DPO/KTO reference log-probs: a forward pass over
# the data) or writes a checkpoint. A dead worker does not wait this out: its peers' sockets
# close and Ray notices the actor's death.
PG_TIMEOUT_S = 4 * 3600


def train_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the job's recipe, one rank of it."""
    # The driver's environment (PROPAGATE), set before the libraries below read it. Passed in
    # the loop config rather than as a Ray runtime env: a runtime env makes Ray start fresh
    # worker processes for the job instead of reusing the idle ones it keeps warm.
    os.environ.update(config.get("env", {}))
    import ray.train
    import torch

    from evertune.workspace import Workspace

    folder = Path(config["job_dir"])
    spec = json.loads((folder / "job.json").read_text("utf-8"))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    workers = folder / WORKERS_DIR
    workers.mkdir(exist_ok=True)
    (workers / f"rank-{rank}.json").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()})
        + "\n",
        "utf-8",
    )
    ws = Workspace.open(Path(spec["workspace"]), spec.get("overrides", []))
    job = get_job(ws, spec["job_id"])
    t = Config.model_validate(job.config).train
    if t.threads == 0:  # torch's default is every core of the node, for each worker
        torch.set_num_threads(max(1, int(t.ray.cpus_per_worker)))
    if rank == 0:
        kind = "GPU workers (NCCL)" if t.ray.use_gpu else "CPU workers (gloo)"
        record_event(ws, job.id, f"Ray Train started {world} {kind}; rank 0 on "
                                 f"{socket.gethostname()}", data={"ranks": world})
    module, _, func = RECIPES[job.method].entry.partition(":")
    getattr(importlib.import_module(module), func)(ws, job.id)


def drive(ws: Workspace, job_id: str, folder: Path) -> Job:
    """Run running job `job_id` on its Ray cluster until it ends; returns the final job."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from evertune.training.backends import cluster_address

    job = get_job(ws, job_id)
    r = Config.model_validate(job.config).train.ray
    address = cluster_address(r)
    folder = folder.resolve()
    env = {k: v for k, v in os.environ.items()
           if k.startswith(PROPAGATE) and not any(w in k.upper() for w in SECRET_WORDS)}
    # No address: a Ray of its own for this job ("local": never a cluster that `ray start` left
    # running here, which `auto` asks for), ending with it; its dashboard would only cost
    # memory. Connecting to a cluster takes no such option.
    extra: dict[str, Any] = {} if address else {"include_dashboard": False}
    ray.init(address=address or "local", log_to_driver=True, **extra)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job_dir": str(folder), "env": env},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=PG_TIMEOUT_S),
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,
            resources_per_worker={"CPU": r.cpus_per_worker},
        ),
        run_config=RunConfig(
            # Ray Train's own run records (it keeps no checkpoints of ours): one folder per
            # driver start, so a resumed job does not meet the previous driver's run.
            name=f"{job_id}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(folder / "ray"),
            failure_config=FailureConfig(max_failures=r.max_failures),
        ),
    )
    error: BaseException | None = None
    try:
        trainer.fit()
    except Exception as exc:  # TrainingFailedError: retries used up, or not retryable
        error = exc
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
    job = get_job(ws, job_id)
    if job.status == "running":  # the workers ended without saying how: say it for them
        code, message = _failure(job_id, folder, r.max_failures, error)
        with contextlib.suppress(EvertuneError):
            fail_job(ws, job_id, code, message)
        job = get_job(ws, job_id)
    return job


def _failure(
    job_id: str, folder: Path, max_failures: int, error: BaseException | None
) -> tuple[str, str]:
    """(code, message) for a job whose Ray workers ended while it was still running."""
    if error is None:
        return "internal", (
            f"the Ray Train workers of {job_id} ended without finishing the job (see "
            f"{folder}/train.log); `evertune jobs resume {job_id}` retries"
        )
    failures = getattr(error, "worker_failures", None) or {}
    first = next(iter(failures.values()), error)
    lines = [line for line in str(first).strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else type(first).__name__
    text = str(error).lower()
    if "out of memory" in text or "outofmemoryerror" in text or "low on memory" in text:
        return "out_of_memory", (
            f"a Ray Train worker ran out of memory ({detail[:300]}); lower train.batch_size, "
            f"train.micro_batch_size or data.max_seq_len and run `evertune jobs resume {job_id}`"
        )
    return "internal", (
        f"the Ray Train workers failed (after up to train.ray.max_failures={max_failures} "
        f"restarts): {detail[:500]} (traceback in {folder}/train.log; "
        f"`evertune jobs resume {job_id}` retries from the newest checkpoint)"
    )


def last_step(ws: Workspace, job_id: str) -> int:
    """The newest training step in the job's metric rows (0 before the first)."""
    return max((int(r["step"]) for r in list_metrics(ws, job_id) if "train_loss" in r), default=0)


def probe(address: str) -> dict[str, float]:
    """The CPUs and GPUs of the Ray cluster at `address` (connects as a short-lived driver),
    and `autoscaler` 1.0 when an autoscaler runs there (then the cluster can grow to fit)."""
    import logging

    import ray

    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    try:
        out = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        out["autoscaler"] = 1.0 if _autoscaler_runs() else 0.0
        return out
    finally:
        ray.shutdown()


def _autoscaler_runs() -> bool:
    """Whether the connected cluster can add nodes: the v2 autoscaler's flag in the GCS, or a
    v1 autoscaler status (what `ray status` reads) naming configured node types. Every head
    runs a v1 monitor; without an autoscaling config it only mirrors the nodes it has, as types
    `node_<id>`. Ray-internal keys: when they cannot be read, say no (the check stays strict)."""
    try:
        from ray._private import ray_constants
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
        types = {*(report.get("active_nodes") or {}), *(report.get("idle_nodes") or {}),
                 *(report.get("pending_launches") or {}),
                 *(report.get("node_type_mapping") or {}).values()}
        return any(not str(t).startswith("node_") for t in types)
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--probe":
        print("usage: python -m evertune.training.ray_run --probe ADDRESS", file=sys.stderr)
        return 2
    try:
        print(json.dumps(probe(args[1])), flush=True)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
