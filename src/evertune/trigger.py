"""The bucket watcher: every new object version under `raw-data/` starts exactly one run.

    from evertune import pipeline
    from evertune.trigger import Watcher
    pipeline.launch(ws)
    watcher = Watcher(ws)          # bucket = ws.bucket_url (a folder, or s3:// through s3fs)
    watcher.start()                # daemon thread: scan every trigger.poll_seconds
    watcher.scan_once()            # one scan now; returns the run ids it started
    watcher.stop()

`evertune up` runs one watcher beside the pipeline runtime. A run's id is derived from the
bucket, the key and the object's version (ETag on S3, the content's sha256 for a folder), so a
new key or new content under an old key starts one run, and a restart, a second scan or a
second watcher never starts it again (the run id is the DBOS workflow id).

Which objects are picked up (keys under `trigger.prefix`, plus `feedback/` when
`trigger.feedback_starts_runs` is true):

- Names are ignored while they look like work in progress: any path part starting with `.`
  (temporary files of rsync, most upload tools and `Bucket.write_bytes`), or a name ending in
  `.tmp`, `.part`, `.partial`, `.crdownload` or `.uploading`. Write to such a name and rename
  when done, and the file is picked up at once.
- A file in a local folder must also have settled: unchanged size and mtime for
  `trigger.settle_seconds` (its mtime at least that old, or the same size and mtime seen for
  that long). A writer that pauses longer than that mid-file should use a temporary name.
- S3 objects appear whole (a PUT or a completed multipart upload is atomic), so they need no
  settling.

A bad file is not the watcher's business: its run fails at DataPreprocessing with the reason
(see `evertune runs show`), and the watcher goes on. Errors of the watcher itself (the bucket
folder is gone, the bucket is unreachable, a listing fails) are logged as errors, kept in
`Watcher.problem` (which `/healthz` reports as "degraded") and retried on the next scan; the
thread never dies.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from evertune import pipeline
from evertune.bucket import Bucket, ObjectInfo

if TYPE_CHECKING:
    from evertune.workspace import Workspace

log = logging.getLogger("evertune.trigger")

FEEDBACK_PREFIX = "feedback/"
IN_PROGRESS_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".uploading")
ERROR_LOG_EVERY_S = 60.0  # a bucket that stays unreachable is reported once a minute, not per scan


def in_progress(key: str) -> bool:
    """Whether a key names a file still being written (by the naming rules above)."""
    parts = key.split("/")
    return any(p.startswith(".") for p in parts) or parts[-1].endswith(IN_PROGRESS_SUFFIXES)


class Watcher:
    """Polls the landing bucket and starts one pipeline run per new object version."""

    def __init__(
        self,
        ws: Workspace,
        bucket: Bucket | None = None,
        *,
        poll_seconds: float | None = None,
        settle_seconds: float | None = None,
    ) -> None:
        cfg = ws.config.trigger
        self.ws = ws
        self.bucket = bucket or Bucket.for_workspace(ws)
        self.poll_seconds = cfg.poll_seconds if poll_seconds is None else poll_seconds
        self.settle_seconds = cfg.settle_seconds if settle_seconds is None else settle_seconds
        self.prefixes = [cfg.prefix] + ([FEEDBACK_PREFIX] if cfg.feedback_starts_runs else [])
        self._handled: set[tuple[str, str]] = set()  # (key, version) with a run already
        self._first_seen: dict[str, tuple[tuple[int, float], float]] = {}  # key -> (stat, when)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_report: dict[str, float] = {}  # message -> when it was last logged
        self.scans = 0  # completed scans (tests and /metrics read it)
        # What the last scan found wrong (bucket gone, listing failed), None when it was clean;
        # /healthz reports it as "degraded" with this reason, and so can the console.
        self.problem: str | None = None

    def __repr__(self) -> str:
        return f"Watcher({self.bucket.url!r}, prefixes={self.prefixes})"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Watcher:
        """Scan in a daemon thread every `poll_seconds` until `stop()`."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="evertune-watcher", daemon=True)
        self._thread.start()
        log.info("watching %s (%s) every %g s", self.bucket.url, self.prefixes, self.poll_seconds)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (waits for a scan in progress, at most `timeout` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception as exc:  # never let the thread die; report and retry next scan
                self._report(f"scan of {self.bucket.url} failed: {exc}")
            self._stop.wait(self.poll_seconds)

    # -- scanning --------------------------------------------------------------------------
    def scan_once(self) -> list[str]:
        """List the bucket once; start a run for each new, settled object; return their ids."""
        started: list[str] = []
        now = time.time()
        problems: list[str] = []
        broken = self.bucket.check()
        if broken is not None:
            # Listing a missing folder would return nothing: no runs, and no word of why.
            self._report(broken)
            self._set_problem([broken])
            self.scans += 1
            return started
        for prefix in self.prefixes:
            try:
                objects = self.bucket.list(prefix)
            except Exception as exc:
                problems.append(f"cannot list {self.bucket.url} prefix {prefix!r}: {exc}")
                self._report(problems[-1])
                continue
            present = {o.key for o in objects}
            for key in [k for k in self._first_seen if k.startswith(prefix) and k not in present]:
                del self._first_seen[key]
            for obj in objects:
                run_id = self._consider(obj, now)
                if run_id:
                    started.append(run_id)
        self._set_problem(problems)
        self.scans += 1
        return started

    def _set_problem(self, problems: list[str]) -> None:
        """Record this scan's problems (for /healthz); log when the watcher recovers."""
        problem = "; ".join(problems) or None
        if problem is None and self.problem is not None:
            log.warning("watcher: the bucket %s is usable again", self.bucket.url)
            self._last_report.clear()  # a relapse is news: log it at once
        self.problem = problem

    def _consider(self, obj: ObjectInfo, now: float) -> str | None:
        """Start the object's run if it is new and complete; return the run id if started."""
        ident = (obj.key, obj.version)
        if ident in self._handled or in_progress(obj.key):
            return None
        if self.bucket.is_local and not self._settled(obj, now):
            return None
        trigger: dict[str, Any] = {
            "source": "bucket",
            "bucket": self.bucket.url,
            "key": obj.key,
            "version": obj.version,
            "size": obj.size,
            "detected_at": now,
        }
        run_id = pipeline.run_id_for(trigger)
        try:
            existing = pipeline.run_status(self.ws, run_id)
            if existing is None or existing == "queued":
                # queued: maybe never enqueued (a crash in between); enqueuing is idempotent.
                pipeline.start_run(self.ws, trigger)
        except Exception as exc:
            self._report(f"cannot start a run for {obj.key}: {exc}")
            return None
        self._handled.add(ident)
        if existing is None:
            log.info("new object %s (version %s): run %s", obj.key, obj.version[:12], run_id)
            return run_id
        return None

    def _settled(self, obj: ObjectInfo, now: float) -> bool:
        """Local files: unchanged (size, mtime) for settle_seconds, judged by mtime age or by
        how long this watcher has seen the same size and mtime (covers clock skew)."""
        stat = (obj.size, obj.mtime)
        seen = self._first_seen.get(obj.key)
        if seen is None or seen[0] != stat:
            self._first_seen[obj.key] = (stat, now)
            seen_for = 0.0
        else:
            seen_for = now - seen[1]
        return max(now - obj.mtime, seen_for) >= self.settle_seconds

    def _report(self, message: str) -> None:
        """Log a problem, each distinct one at most once per ERROR_LOG_EVERY_S."""
        now = time.monotonic()
        if now - self._last_report.get(message, -ERROR_LOG_EVERY_S) >= ERROR_LOG_EVERY_S:
            self._last_report[message] = now
            # ERROR: no new data is picked up until this is fixed.
            log.error("watcher: %s (retrying every %g s)", message, self.poll_seconds)
