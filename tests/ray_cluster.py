"""A real Ray cluster for tests: a 2-CPU head on loopback, in its own temp dir and ports.

    with ray_head() as address:        # "127.0.0.1:PORT", ~10-30 s to start
        ...                            # train.ray.address=<address>

`ray start --head --block` runs as a child in a new session: the teardown stops `ray start`,
then kills what is left of that session's process group, so it ends exactly the Ray processes
this helper started (`ray stop` would end every Ray on the machine). `ray start` rather than
`ray.init()` in a helper process because jobs connect to it by address, as they would to a
production cluster, and the address tests need one that answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.postgres import free_port


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[str]:
    """Start a Ray head on loopback; yield its address; stop it and all its processes."""
    # Short: Ray's unix socket paths live under the temp dir and must fit in 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    port = free_port()
    log = open(temp / "ray-start.log", "wb")  # noqa: SIM115 (open for the cluster's life)
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false",
         "--disable-usage-stats", "--object-store-memory=100000000", f"--temp-dir={temp}",
         f"--dashboard-port={free_port()}",  # its job API runs even without the dashboard
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # No drain at SIGTERM: nothing here to hand over, and it would wait up to 30 s.
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
    )
    try:
        deadline = time.monotonic() + 120
        while (b"Ray runtime started" not in (temp / "ray-start.log").read_bytes()
               and proc.poll() is None):
            if time.monotonic() > deadline:
                raise AssertionError("the Ray head did not start in 120 s:\n"
                                     + (temp / "ray-start.log").read_text())
            time.sleep(0.1)
        assert proc.poll() is None, (temp / "ray-start.log").read_text()
        yield f"127.0.0.1:{port}"
    finally:
        # SIGTERM to `ray start` alone: it stops its processes (~3 s; killed first, they would
        # leave it waiting for them).
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session's group: whatever is left
        # Anything of this cluster that left the group (its command line names the temp dir).
        for pid in ours(temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def ours(temp: Path) -> list[int]:
    """Pids of live processes whose command line names `temp` (this cluster)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(temp).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
    return found
