"""The bucket watcher: one run per new object version, unfinished files left alone.

    .venv/bin/pytest tests/test_trigger.py -q

Runs here get files that are not JSON Lines, so each fails at DataPreprocessing within
milliseconds: the trigger's behaviour is what is tested, not training (see test_pipeline.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from evertune import pipeline
from evertune.bucket import Bucket
from evertune.trigger import Watcher, in_progress
from evertune.workspace import Workspace
from tests.conftest import make_workspace
from tests.test_bucket import make_s3_bucket, moto_s3, s3_env  # noqa: F401 (fixtures)

BAD = b"this is not JSON Lines\n"


@pytest.fixture
def ws(tmp_path: Path, tiny_model: Path) -> Iterator[Workspace]:
    """A workspace with the pipeline runtime launched (DBOS is one per process)."""
    ws = make_workspace(
        tmp_path / "ws", tiny_model, trigger={"settle_seconds": 0, "poll_seconds": 0.1}
    )
    pipeline.launch(ws, warm=False)
    yield ws
    pipeline.shutdown()


def _wait_all_final(ws: Workspace, n: int, timeout: float = 30) -> list[pipeline.Run]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = pipeline.list_runs(ws)
        if len(runs) >= n and all(r.finished for r in runs):
            return runs
        time.sleep(0.1)
    raise AssertionError(f"runs not final after {timeout} s: {pipeline.list_runs(ws)}")


def test_in_progress_names() -> None:
    for key in (
        "raw-data/.a.jsonl",
        "raw-data/.tmp/a.jsonl",
        "raw-data/a.jsonl.part",
        "raw-data/a.tmp",
        "raw-data/a.jsonl.partial",
        "raw-data/a.crdownload",
        "raw-data/a.jsonl.uploading",
    ):
        assert in_progress(key), key
    for key in (
        "raw-data/a.jsonl",
        "raw-data/sub/a.txt",
        "raw-data/part.jsonl",
        "raw-data/tmp/a.jsonl",
    ):
        assert not in_progress(key), key


def test_one_run_per_object_version(ws: Workspace) -> None:
    bucket = Bucket.for_workspace(ws)
    watcher = Watcher(ws)
    bucket.write_bytes("raw-data/a.jsonl", BAD)
    bucket.write_bytes("raw-data/b.jsonl", BAD + b"x\n")
    bucket.write_bytes("other/c.jsonl", BAD)  # outside trigger.prefix

    first = watcher.scan_once()
    assert len(first) == 2
    assert watcher.scan_once() == []  # nothing new
    assert Watcher(ws).scan_once() == []  # a second watcher (or a restart) starts nothing either

    # The run id is derived from bucket, key and version: the same object gives the same id.
    a = bucket.info("raw-data/a.jsonl")
    trig = {"source": "bucket", "bucket": bucket.url, "key": a.key, "version": a.version}
    assert pipeline.run_id_for(trig) in first
    assert pipeline.start_run(ws, trig) in first  # starting it by hand is a no-op

    # Same content again (a touch, a re-upload) is the same version: no run.
    bucket.write_bytes("raw-data/a.jsonl", BAD)
    assert watcher.scan_once() == []
    # New content under an old key is a new version: one new run.
    bucket.write_bytes("raw-data/a.jsonl", BAD + b"edited\n")
    again = watcher.scan_once()
    assert len(again) == 1 and again[0] not in first

    runs = {r.id: r for r in _wait_all_final(ws, 3)}
    assert len(runs) == 3
    for run in runs.values():
        # A bad file fails only its own run, at DataPreprocessing, with a clear error.
        assert run.status == "failed"
        assert run.error.startswith(f"DataPreprocessing: {run.trigger['key']}")
        assert run.step("DataPreprocessing").status == "failed"
        assert run.step("FineTuning").status == "pending"
    assert "is not JSON Lines" in runs[again[0]].error
    # The first version of a.jsonl was replaced before its run fetched it: that run says so
    # (unless it was fast enough to fetch the old content first).
    old = runs[pipeline.run_id_for(trig)]
    assert "changed since it was detected" in old.error or "is not JSON Lines" in old.error
    assert {r.trigger["key"] for r in runs.values()} == {"raw-data/a.jsonl", "raw-data/b.jsonl"}


def test_files_being_written_are_not_picked_up(tmp_path: Path, tiny_model: Path) -> None:
    ws = make_workspace(
        tmp_path / "ws", tiny_model, trigger={"settle_seconds": 30, "poll_seconds": 0.1}
    )
    pipeline.launch(ws, warm=False)
    try:
        raw = ws.root / "bucket" / "raw-data"
        watcher = Watcher(ws)
        (raw / "a.jsonl.part").write_bytes(BAD)
        (raw / ".b.jsonl").write_bytes(BAD)
        (raw / "c.tmp").write_bytes(BAD)
        growing = raw / "d.jsonl"
        growing.write_bytes(BAD)
        assert watcher.scan_once() == []  # d.jsonl was modified just now: not settled

        # Still being appended to: each change restarts the settle clock.
        old = time.time() - 10
        os.utime(growing, (old, old))
        assert watcher.scan_once() == []
        with growing.open("ab") as f:
            f.write(b"more\n")
        assert watcher.scan_once() == []

        # Unchanged for settle_seconds (its mtime is that old): picked up. Renaming a finished
        # temp file into place is picked up the same way once settled.
        old = time.time() - 31
        os.utime(growing, (old, old))
        (raw / "a.jsonl.part").rename(raw / "a.jsonl")
        os.utime(raw / "a.jsonl", (old, old))
        started = watcher.scan_once()
        assert len(started) == 2
        keys = {pipeline.get_run(ws, r).trigger["key"] for r in started}
        assert keys == {"raw-data/d.jsonl", "raw-data/a.jsonl"}
    finally:
        pipeline.shutdown()


def test_watcher_thread_keeps_going(ws: Workspace) -> None:
    bucket = Bucket.for_workspace(ws)
    watcher = Watcher(ws).start()
    try:
        bucket.write_bytes("raw-data/bad.jsonl", BAD)
        assert _wait_all_final(ws, 1)[0].status == "failed"
        # The listing itself failing (the bucket folder vanished) is logged, not fatal.
        moved = ws.root / "bucket-moved"
        (ws.root / "bucket").rename(moved)
        scans = watcher.scans
        deadline = time.monotonic() + 10
        while watcher.scans < scans + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        moved.rename(ws.root / "bucket")
        assert watcher.running
        bucket.write_bytes("raw-data/next.jsonl", BAD + b"2\n")
        runs = _wait_all_final(ws, 2)
        assert {r.trigger["key"] for r in runs} == {"raw-data/bad.jsonl", "raw-data/next.jsonl"}
    finally:
        watcher.stop()
    assert not watcher.running


def test_watcher_on_s3(s3_env: str, tmp_path: Path, tiny_model: Path) -> None:  # noqa: F811
    url = make_s3_bucket(s3_env, "drops")
    ws = make_workspace(
        tmp_path / "ws", tiny_model, storage={"bucket": url}, trigger={"poll_seconds": 0.1}
    )
    pipeline.launch(ws, warm=False)
    try:
        bucket = Bucket.for_workspace(ws)
        watcher = Watcher(ws)  # settle_seconds (2 s by default) does not apply: S3 PUTs are atomic
        bucket.write_bytes("raw-data/a.jsonl", BAD)
        bucket.write_bytes("raw-data/b.jsonl.part", BAD)
        started = watcher.scan_once()
        assert len(started) == 1
        assert watcher.scan_once() == []
        bucket.write_bytes("raw-data/a.jsonl", BAD + b"v2\n")  # new ETag
        assert len(watcher.scan_once()) == 1
        runs = _wait_all_final(ws, 2)
        versions = {r.trigger["version"] for r in runs}
        assert len(versions) == 2
        for run in runs:
            # DataPreprocessing fetched the object from S3, then refused its content.
            assert run.trigger["bucket"] == url
            assert "fetched raw-data/a.jsonl" in " ".join(
                line["message"] for line in run.step("DataPreprocessing").logs
            ) or "changed since it was detected" in (run.error or "")
            assert run.error.startswith("DataPreprocessing: raw-data/a.jsonl")
    finally:
        pipeline.shutdown()


def test_a_deleted_bucket_folder_is_an_error_not_an_empty_bucket(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model, trigger={"settle_seconds": 0})
    watcher = Watcher(ws)
    assert watcher.scan_once() == [] and watcher.problem is None
    folder = ws.root / "bucket"
    shutil.rmtree(folder)
    with caplog.at_level(logging.WARNING, logger="evertune.trigger"):
        assert watcher.scan_once() == []
    assert watcher.problem is not None
    assert f"the bucket folder {folder} does not exist" in watcher.problem
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and str(folder) in errors[0].getMessage()
    (folder / "raw-data").mkdir(parents=True)  # the fix the message suggests
    assert watcher.scan_once() == [] and watcher.problem is None
