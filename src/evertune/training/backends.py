"""Where a training job runs: a `Backend` starts the recipe for a job folder.

    evertune tune --set train.backend=local     # default: a child process on this machine
    evertune tune --set train.backend=ray       # needs `pip install 'evertune[ray]'`

Training never runs inside the control process (a crash or an OOM there must not take the
API down), so every backend starts `python -m evertune.training.run JOB_DIR` somewhere else
and reports back only through the state DB. Under `ray` that process is the driver of a Ray
Train run (`evertune.training.ray_run`); its pid and host are what liveness checks watch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from evertune.errors import JobError

if TYPE_CHECKING:
    from evertune.config import RayArgs
    from evertune.training.jobs import Job
    from evertune.workspace import Workspace

ANSWER_TIMEOUT_S = 3.0  # a Ray head that does not accept a connection in this long is down
PROBE_TIMEOUT_S = 60.0  # connecting to a cluster and asking its resources


class Backend(Protocol):
    """Starts a job's training process; returns (pid or None, host) for liveness checks."""

    name: str

    def start(self, ws: Workspace, job: Job, folder: Path) -> tuple[int | None, str]: ...


class LocalBackend:
    """A detached child process on this machine, logging to JOB_DIR/train.log."""

    name = "local"

    def start(self, ws: Workspace, job: Job, folder: Path) -> tuple[int | None, str]:
        return spawn_training_process(folder)


class RayBackend:
    """Ray Train on a Ray cluster (`train.ray`; a local Ray when no address is configured).

    Checks the cluster first (so a job that cannot run fails at start, with the setting to
    fix), then starts the same detached child as `local`, which drives the Ray run."""

    name = "ray"

    def start(self, ws: Workspace, job: Job, folder: Path) -> tuple[int | None, str]:
        from evertune.config import Config

        check_cluster(Config.model_validate(job.config).train.ray)
        # Ray's usage statistics would phone home from a self-hosted install: off unless the
        # user turned them on.
        return spawn_training_process(folder, {"RAY_USAGE_STATS_ENABLED": "0"})


def spawn_training_process(
    folder: Path, defaults: dict[str, str] | None = None
) -> tuple[int, str]:
    """Start `python -m evertune.training.run JOB_DIR` detached; returns (pid, host)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key, value in (defaults or {}).items():
        env.setdefault(key, value)
    # Append: a resumed job keeps its earlier log. The child holds its own copy of the
    # file descriptor, so closing ours right after the spawn is fine.
    with open(folder / "train.log", "ab") as log:
        # A new session: Ctrl-C in the terminal that started the job (or the end of the
        # CLI process) does not kill training; `evertune jobs cancel` stops it cleanly.
        proc = subprocess.Popen(
            [sys.executable, "-m", "evertune.training.run", str(folder)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd=str(folder),
        )
    return proc.pid, socket.gethostname()


def check_cluster(r: RayArgs) -> None:
    """Raise JobError, naming the setting and the fix, when a Ray run of `r` cannot start:
    Ray not installed, an address that does not answer, fewer CPUs (or GPUs) than the
    workers need (unless an autoscaler runs there: it adds nodes when the workers ask)."""
    check_reachable(r)
    address = cluster_address(r)
    if address:
        # Name the setting the address came from: the config, or Ray's own variable.
        setting = "train.ray.address" if r.address else "RAY_ADDRESS (train.ray.address is empty)"
        where = f"the Ray cluster at {setting}={address!r}"
        have = _probe(address, setting)
        if have.get("autoscaler"):
            return  # it adds nodes for the workers' request (KubeRay with autoscaling)
    else:
        where, have = "this machine (a local Ray for the job)", _local_resources(r.use_gpu)
    need = r.num_workers * r.cpus_per_worker
    if need > have.get("CPU", 0.0) + 1e-9:
        raise JobError(
            f"train.ray.num_workers={r.num_workers} x train.ray.cpus_per_worker="
            f"{r.cpus_per_worker:g} needs {need:g} CPUs, but {where} has "
            f"{have.get('CPU', 0.0):g}; lower train.ray.num_workers or train.ray.cpus_per_worker, "
            "or add nodes to the cluster"
        )
    if r.use_gpu and r.num_workers > have.get("GPU", 0.0) + 1e-9:
        raise JobError(
            f"train.ray.use_gpu=true needs {r.num_workers} GPUs (one per worker, "
            f"train.ray.num_workers), but {where} has "
            f"{have.get('GPU', 0.0):g}; lower train.ray.num_workers, set "
            "train.ray.use_gpu=false, or add GPU nodes"
        )


def check_reachable(r: RayArgs) -> None:
    """The fast part of `check_cluster`, for `evertune up` at start: Ray is installed and the
    cluster's address answers (no probe of its CPUs: that starts a Ray driver child)."""
    if not _ray_installed():
        raise JobError(
            "train.backend=ray needs Ray; install it with `pip install 'evertune[ray]'` or set "
            "--set train.backend=local"
        )
    address = cluster_address(r)
    if address:
        setting = "train.ray.address" if r.address else "RAY_ADDRESS (train.ray.address is empty)"
        _check_answers(address, setting)


def cluster_address(r: RayArgs) -> str:
    """The address a run of `r` connects to: train.ray.address, else $RAY_ADDRESS (as
    `ray.init()` reads it); "" for a local Ray started for the job (no address, or `local`)."""
    if r.address == "local":
        return ""
    return r.address or os.environ.get("RAY_ADDRESS", "")


def _ray_installed() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def _check_answers(address: str, setting: str) -> None:
    """Fail fast, with the setting named, when nothing listens at HOST:PORT (ray.init would
    retry for a minute before saying so). `auto` is left to the probe."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=ANSWER_TIMEOUT_S):
            pass
    except OSError as exc:
        raise JobError(
            f"{setting}={address!r} does not answer ({exc.strerror or exc}); start the "
            "cluster's head there (`ray start --head`) and set train.ray.address to the address "
            "it prints, or set train.ray.address=local to start a local Ray for the job"
        ) from None


def _probe(address: str, setting: str) -> dict[str, float]:
    """The cluster's CPUs and GPUs, asked by a short-lived child (connecting here would make
    the control process a Ray driver)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "evertune.training.ray_run", "--probe", address],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
    except subprocess.TimeoutExpired:
        raise JobError(
            f"{setting}={address!r} did not answer as a Ray cluster within "
            f"{PROBE_TIMEOUT_S:g} s; check that a Ray head runs there (`ray status --address "
            f"{address}`) or set train.ray.address=local for a local Ray"
        ) from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise JobError(
            f"{setting}={address!r}: cannot connect to a Ray cluster ({detail[:300]}); "
            f"check it with `ray status --address {address}` or set train.ray.address=local for "
            "a local Ray"
        )
    resources: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return resources


def _local_resources(use_gpu: bool) -> dict[str, float]:
    """What `ray.init()` would find on this machine: its usable CPUs, and GPUs if asked."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {"CPU": float(cpus or 1)}
    if use_gpu:
        import torch

        out["GPU"] = float(torch.cuda.device_count())
    return out


BACKENDS: dict[str, type[LocalBackend] | type[RayBackend]] = {
    "local": LocalBackend,
    "ray": RayBackend,
}


def get_backend(name: str) -> Backend:
    """The backend called `name` (config `train.backend`)."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise JobError(
            f"unknown train.backend {name!r}; use one of: {', '.join(BACKENDS)}"
        ) from None
