"""Wait until an Evertune server answers its health check (used by the quickstart).

    python examples/wait_ready.py http://127.0.0.1:8000/healthz --pid 1234 --log demo/up.log

Exits 0 once `/healthz` says `ok`; exits 1 (printing the end of the server's log) if the
process died or did not become ready within `--timeout` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--pid", type=int, help="The server's process id: stop waiting if it exits.")
    ap.add_argument("--log", type=Path, help="The server's log, shown if it fails to start.")
    ap.add_argument("--timeout", type=float, default=180.0)
    args = ap.parse_args()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if args.pid is not None and not _alive(args.pid):
            return _fail(f"the server (pid {args.pid}) exited before it was ready", args.log)
        try:
            with urllib.request.urlopen(args.url, timeout=2) as resp:
                if json.load(resp).get("status") == "ok":
                    print(f"server ready: {args.url}")
                    return 0
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass  # not listening yet, or still starting
        time.sleep(0.5)
    return _fail(f"{args.url} was not ready after {args.timeout:g} s", args.log)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail(message: str, log: Path | None) -> int:
    print(f"error: {message}", file=sys.stderr)
    if log is not None and log.is_file():
        print(f"--- last lines of {log} ---", file=sys.stderr)
        print("\n".join(log.read_text("utf-8", "replace").splitlines()[-30:]), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
