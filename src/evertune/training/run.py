"""The training child process: `python -m evertune.training.run JOB_DIR`.

    python -m evertune.training.run .evertune/jobs/ftjob-…     # what start_job spawns

Reads JOB_DIR/job.json (written by `start_job`: workspace root, job id, config overrides),
opens the workspace for its state DB and paths, and runs the job's recipe. The recipe reads
its hyperparameters from the job's config snapshot, not from the current evertune.yaml.
With `train.backend: ray` this process is the driver instead: the recipe runs on the Ray
cluster's workers (`evertune.training.ray_run.drive`), and this process waits for them.
Exit status: 0 succeeded or cancelled, 1 failed, 2 the job folder is unusable.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from evertune.errors import EvertuneError
from evertune.training.jobs import fail_job, get_job
from evertune.training.recipes import RECIPES, available

START_WAIT_S = 30.0  # start_job marks the job running right after the spawn; allow for a slow DB


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m evertune.training.run JOB_DIR", file=sys.stderr)
        return 2
    spec_path = Path(args[0]) / "job.json"
    try:
        spec = json.loads(spec_path.read_text("utf-8"))
        root, job_id, overrides = Path(spec["workspace"]), spec["job_id"], spec.get("overrides", [])
    except (OSError, ValueError, KeyError) as exc:
        print(
            f"{spec_path}: cannot read the job spec ({exc}); start jobs with `evertune tune`",
            file=sys.stderr,
        )
        return 2

    from evertune.workspace import Workspace

    try:
        ws = Workspace.open(root, overrides)
        job = get_job(ws, job_id)
        deadline = time.monotonic() + START_WAIT_S
        while job.status == "queued" and time.monotonic() < deadline:
            time.sleep(0.2)
            job = get_job(ws, job_id)
        if job.status != "running":
            print(f"job {job_id} is {job.status}, not running; nothing to do", file=sys.stderr)
            return 2
        entry = RECIPES[job.method].entry
        module, _, func = entry.partition(":")
    except EvertuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError:
        msg = f"no recipe for method {job.method!r} (available: {', '.join(available())})"
        print(f"job {job_id}: {msg}", file=sys.stderr)
        with contextlib.suppress(EvertuneError):
            fail_job(ws, job_id, "invalid_job", msg)
        return 2

    import importlib
    import traceback

    ray = job.config.get("train", {}).get("backend") == "ray"
    print(
        f"[evertune] job {job_id}: {job.method} on {job.model} (dataset {job.training_file})"
        + (" on Ray Train" if ray else ""),
        flush=True,
    )
    try:
        if ray:
            from evertune.training.ray_run import drive, last_step

            final = drive(ws, job_id, Path(args[0]))
            step = last_step(ws, job_id)
        else:
            recipe = getattr(importlib.import_module(module), func)
            result = recipe(ws, job_id)
            final, step = result.job, result.step
    except BaseException as exc:
        # The recipe reports its own failures; this catches what escapes it (a broken
        # install, an import error) so the job says why instead of "process died".
        traceback.print_exc()
        with contextlib.suppress(EvertuneError):
            fail_job(
                ws, job_id, "internal", f"{type(exc).__name__}: {exc} (see {args[0]}/train.log)"
            )
        return 1
    print(
        f"[evertune] job {job_id} {final.status} at step {step}"
        + (f": {final.error}" if final.error else ""),
        flush=True,
    )
    return 1 if final.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
