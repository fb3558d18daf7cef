"""Where a training job runs: a `Backend` starts the recipe for a job folder.

    evertune tune --set train.backend=local     # default: a child process on this machine
    evertune tune --set train.backend=ray       # needs `pip install 'evertune[ray]'`

Training never runs inside the control process (a crash or an OOM there must not take the
API down), so every backend starts `python -m evertune.training.run JOB_DIR` somewhere else
and reports back only through the state DB.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from evertune.errors import JobError

if TYPE_CHECKING:
    from evertune.training.jobs import Job
    from evertune.workspace import Workspace


class Backend(Protocol):
    """Starts a job's training process; returns (pid or None, host) for liveness checks."""

    name: str

    def start(self, ws: Workspace, job: Job, folder: Path) -> tuple[int | None, str]: ...


class LocalBackend:
    """A detached child process on this machine, logging to JOB_DIR/train.log."""

    name = "local"

    def start(self, ws: Workspace, job: Job, folder: Path) -> tuple[int | None, str]:
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
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


class RayBackend:
    """Ray Train on a Ray cluster (a local `ray.init()` when no address is configured)."""

    name = "ray"

    def start(self, ws: Workspace, job: Job, folder: Path) -> tuple[int | None, str]:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise JobError(
                "train.backend=ray needs Ray; install it with `pip install 'evertune[ray]'` or set "
                "--set train.backend=local"
            ) from None
        raise JobError(
            "train.backend=ray is not finished in this version; use --set train.backend=local"
        )


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
