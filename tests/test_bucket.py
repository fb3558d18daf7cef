"""The landing bucket on a local folder and on S3 (moto's real S3 server on loopback).

    .venv/bin/pytest tests/test_bucket.py -q

`moto_s3` / `s3_env` are imported by tests/test_trigger.py and tests/test_pipeline.py too.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from evertune.bucket import Bucket, validate_key
from evertune.errors import DataError, NotFoundError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto/s3fs at the moto server through the usual AWS variables; yields the endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return moto_s3


def make_s3_bucket(endpoint: str, name: str) -> str:
    """Create bucket `name` (with boto3: s3fs's mkdir trips on the location constraint)."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)
    return f"s3://{name}"


def test_local_write_list_read_download(tmp_path: Path) -> None:
    bucket = Bucket(str(tmp_path / "bucket"))
    info = bucket.write_bytes("raw-data/a.jsonl", b'{"input": "x", "output": "y"}\n')
    assert info.version == hashlib.sha256(b'{"input": "x", "output": "y"}\n').hexdigest()
    bucket.write_bytes("raw-data/sub/b.jsonl", b"b")
    bucket.write_bytes("feedback/c.jsonl", b"c")
    # Atomic writes leave no temp file behind, and dot-names (writers' temp files) are hidden.
    (tmp_path / "bucket" / "raw-data" / ".d.jsonl.part").write_bytes(b"half")

    listed = bucket.list("raw-data/")
    assert [o.key for o in listed] == ["raw-data/a.jsonl", "raw-data/sub/b.jsonl"]
    assert listed[0].size == 30 and listed[0].mtime > 0
    assert [o.key for o in bucket.list("raw")] == ["raw-data/a.jsonl", "raw-data/sub/b.jsonl"]
    assert [o.key for o in bucket.list()] == [
        "feedback/c.jsonl",
        "raw-data/a.jsonl",
        "raw-data/sub/b.jsonl",
    ]
    assert bucket.list("nothing/") == []
    assert bucket.read_bytes("raw-data/sub/b.jsonl") == b"b"
    dest = bucket.download("raw-data/a.jsonl", tmp_path / "out" / "a.jsonl")
    assert dest.read_bytes() == b'{"input": "x", "output": "y"}\n'
    assert [p.name for p in dest.parent.iterdir()] == ["a.jsonl"]  # no .part left over

    # New content under the same key is a new version; the same content is the same version.
    v1 = bucket.info("raw-data/a.jsonl").version
    bucket.write_bytes("raw-data/a.jsonl", b"other\n")
    v2 = bucket.list("raw-data/a")[0].version
    assert v2 != v1
    bucket.write_bytes("raw-data/a.jsonl", b"other\n")
    assert bucket.info("raw-data/a.jsonl").version == v2


def test_missing_objects_and_bad_keys(tmp_path: Path) -> None:
    bucket = Bucket(str(tmp_path / "bucket"))
    with pytest.raises(NotFoundError, match="raw-data/none.jsonl"):
        bucket.read_bytes("raw-data/none.jsonl")
    with pytest.raises(NotFoundError, match="raw-data/none.jsonl"):
        bucket.download("raw-data/none.jsonl", tmp_path / "x")
    for key in (
        "../escape.jsonl",
        "raw-data/../../x",
        "/etc/passwd",
        "raw-data\\x.jsonl",
        "",
        "a//b",
    ):
        with pytest.raises(DataError, match="not allowed") as err:
            bucket.write_bytes(key, b"x")
        assert repr(key) in str(err.value)
    assert not (tmp_path / "escape.jsonl").exists()
    assert validate_key("raw-data/ok file.jsonl") == "raw-data/ok file.jsonl"


def test_s3_write_list_read_download(s3_env: str, tmp_path: Path) -> None:
    url = make_s3_bucket(s3_env, "landing")
    bucket = Bucket(url)  # endpoint and keys from the environment, like a deployment
    assert not bucket.is_local
    assert bucket.list("raw-data/") == []
    info = bucket.write_bytes("raw-data/a.jsonl", b"one\n")
    bucket.write_bytes("raw-data/sub/b.jsonl", b"two\n")
    bucket.write_bytes("raw-data-old/c.jsonl", b"three\n")
    bucket.write_bytes("raw-data/.hidden.jsonl", b"tmp")

    listed = bucket.list("raw-data/")
    assert [o.key for o in listed] == ["raw-data/a.jsonl", "raw-data/sub/b.jsonl"]
    assert listed[0].version == info.version == hashlib.md5(b"one\n").hexdigest()  # the ETag
    assert listed[0].size == 4
    assert [o.key for o in bucket.list("raw-data")] == [
        "raw-data-old/c.jsonl",
        "raw-data/a.jsonl",
        "raw-data/sub/b.jsonl",
    ]
    assert bucket.read_bytes("raw-data/a.jsonl") == b"one\n"
    assert bucket.download("raw-data/sub/b.jsonl", tmp_path / "b.jsonl").read_bytes() == b"two\n"

    # A rewrite is seen at once (no cached listing) with a new version.
    bucket.write_bytes("raw-data/a.jsonl", b"one, edited\n")
    assert bucket.list("raw-data/a")[0].version != info.version
    with pytest.raises(NotFoundError, match="raw-data/none"):
        bucket.read_bytes("raw-data/none")
    with pytest.raises(DataError, match="not allowed"):
        bucket.read_bytes("../x")


def test_s3_explicit_storage_options(moto_s3: str) -> None:
    url = make_s3_bucket(moto_s3, "explicit")
    bucket = Bucket(
        url,
        {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": moto_s3, "region_name": "us-east-1"},
        },
    )
    bucket.write_bytes("raw-data/x.jsonl", b"x")
    assert [o.key for o in bucket.list("raw-data/")] == ["raw-data/x.jsonl"]


def test_check_reports_a_missing_or_unusable_local_bucket(tmp_path: Path) -> None:
    folder = tmp_path / "bucket"
    bucket = Bucket(str(folder))
    problem = bucket.check()
    assert problem is not None and str(folder) in problem and "does not exist" in problem
    assert "mkdir -p" in problem and "storage.bucket" in problem
    assert bucket.list("raw-data/") == []  # why check() exists: a listing cannot tell
    folder.write_text("not a folder")
    assert "is not a folder" in (bucket.check() or "")
    folder.unlink()
    folder.mkdir()
    assert bucket.check() is None
