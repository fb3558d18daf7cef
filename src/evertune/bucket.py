"""The landing bucket: list, read and write objects, and tell object versions apart.

    from evertune.bucket import Bucket
    bucket = Bucket.for_workspace(ws)                  # ws.bucket_url: a folder or s3://name/prefix
    bucket.write_bytes("raw-data/tickets.jsonl", data) # atomic on a local folder (temp + rename)
    for obj in bucket.list("raw-data/"):               # ObjectInfo(key, version, size, mtime)
        path = bucket.download(obj.key, Path("/tmp") / obj.key)

    # S3 (or anything S3-compatible) through s3fs; endpoint and keys from the usual AWS
    # variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …) or explicit storage options:
    Bucket("s3://team-data", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}})

An object is identified by its key plus a *version*: the ETag on S3 (S3 changes it whenever the
object's content changes; VersionId, then size+mtime, where a store has no ETag) and the
sha256 of the content for a local folder. The trigger derives one pipeline run per
(bucket, key, version), so rewriting a key with new content starts a new run and touching it
without changing the content does not.

Keys are `/`-separated paths relative to the bucket; a key with `..`, a leading `/`, a
backslash or an empty part is refused (DataError naming the key), so no object name can reach
outside the bucket. Names whose last part starts with `.` are never listed: they are the
temporary files of atomic writers (ours, rsync's, most upload tools').
"""

from __future__ import annotations

import builtins  # `Bucket.list` shadows the builtin inside the class body
import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from evertune.errors import DataError, NotFoundError

if TYPE_CHECKING:
    from evertune.workspace import Workspace

_HASH_CHUNK = 1 << 20  # bytes read at a time when hashing a local file


@dataclass(frozen=True)
class ObjectInfo:
    """One object: key, version (ETag on S3, sha256 locally), size in bytes, mtime (unix s)."""

    key: str
    version: str
    size: int
    mtime: float


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key; raise DataError naming it otherwise."""
    problem = None
    if not isinstance(key, str) or not key.strip():
        problem = "it is empty"
    elif "\\" in key:
        problem = "it contains a backslash"
    elif key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        problem = "it is an absolute path"
    elif "\x00" in key:
        problem = "it contains a NUL byte"
    else:
        parts = key.rstrip("/").split("/")
        if any(p in ("..", ".") for p in parts):
            problem = "it contains a '..' or '.' part"
        elif any(p == "" for p in parts):
            problem = "it contains an empty part ('//')"
    if problem:
        raise DataError(
            f"object key {key!r} is not allowed: {problem}; use a relative path such as "
            "'raw-data/tickets.jsonl'"
        )
    return key


def _hidden(key: str) -> bool:
    """Temporary files of atomic writers: any part of the key starts with a dot."""
    return any(part.startswith(".") for part in key.split("/"))


class Bucket:
    """A landing bucket at an fsspec URL (a plain path or file:// is a local folder)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self._local_root: Path | None = None
        self._fs: Any = None
        self._root = ""  # the bucket's path inside the fsspec filesystem (no trailing /)
        # (key, size, mtime_ns, inode) -> sha256: a local listing hashes only changed files.
        self._hashes: dict[tuple[str, int, int, int], str] = {}
        self._lock = threading.Lock()
        if url.startswith("file://") or "://" not in url:
            self._local_root = Path(url.removeprefix("file://")).expanduser().resolve()
        else:
            import fsspec

            options = dict(self.storage_options)
            # fsspec shares one filesystem object per set of options; ours reads its endpoint
            # and keys from the environment, which may change between buckets (tests).
            options.setdefault("skip_instance_cache", True)
            if url.startswith("s3://"):
                # A watcher polls the bucket: a cached listing would hide new objects.
                options.setdefault("use_listings_cache", False)
            self._fs, self._root = fsspec.core.url_to_fs(url, **options)
            self._root = self._root.rstrip("/")

    @classmethod
    def for_workspace(cls, ws: Workspace) -> Bucket:
        """The workspace's landing bucket (`storage.bucket`; S3 endpoint and keys from the env)."""
        return cls(ws.bucket_url)

    @property
    def is_local(self) -> bool:
        return self._local_root is not None

    def __repr__(self) -> str:
        return f"Bucket({self.url!r})"

    def check(self) -> str | None:
        """What is wrong with the bucket itself, or None when it looks usable.

        A local bucket folder that was deleted, unmounted or made unreadable would otherwise
        list as empty: the watcher would see no new data and say nothing. (On S3 a missing
        bucket or denied access makes the listing raise, which the watcher reports.)
        """
        root = self._local_root
        if root is None:
            return None
        if not root.exists():
            return (
                f"the bucket folder {root} does not exist (deleted, moved or not mounted); "
                f"recreate it (`mkdir -p {root}/raw-data`) or point storage.bucket in "
                "evertune.yaml at the right place"
            )
        if not root.is_dir():
            return f"the bucket {root} is not a folder; storage.bucket must name a folder"
        if not os.access(root, os.R_OK | os.X_OK):
            return (
                f"the bucket folder {root} cannot be read by this user; fix its permissions "
                f"(`chmod u+rx {root}`)"
            )
        return None

    # -- reading ---------------------------------------------------------------------------
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with `prefix`, sorted by key (hidden `.` names left out)."""
        if prefix:
            validate_key(prefix)
        infos = self._list_local(prefix) if self._local_root else self._list_remote(prefix)
        return sorted(infos, key=lambda o: o.key)

    def _list_local(self, prefix: str) -> builtins.list[ObjectInfo]:
        root = self._local_root
        assert root is not None
        # Walk only the deepest folder the prefix names; the rest of the prefix filters keys.
        folder = root / prefix if prefix.endswith("/") else root / PurePosixPath(prefix).parent
        if not folder.is_dir():
            return []
        out: list[ObjectInfo] = []
        seen: set[tuple[str, int, int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted between walk and stat
                    continue
                ident = (key, st.st_size, st.st_mtime_ns, st.st_ino)
                seen.add(ident)
                digest = self._hashes.get(ident)
                if digest is None:
                    try:
                        digest = _sha256(path)
                    except FileNotFoundError:
                        continue
                    with self._lock:
                        self._hashes[ident] = digest
                out.append(ObjectInfo(key, digest, st.st_size, st.st_mtime))
        with self._lock:
            # Forget hashes of files that changed or went away, so the cache stays small.
            for ident in [i for i in self._hashes if i[0].startswith(prefix) and i not in seen]:
                del self._hashes[ident]
        return out

    def _list_remote(self, prefix: str) -> builtins.list[ObjectInfo]:
        base = self._root + "/" if self._root else ""
        # List the folder part of the prefix; S3 keys that merely share the start of a name
        # (`raw` vs `raw-data/`) are filtered below.
        if prefix.endswith("/") or not prefix:
            folder = prefix
        else:
            folder = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        try:
            found = self._fs.find(base + folder, detail=True)
        except FileNotFoundError:
            return []
        out: list[ObjectInfo] = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            key = path[len(base) :] if path.startswith(base) else path
            if not key.startswith(prefix) or _hidden(key):
                continue
            out.append(
                ObjectInfo(key, _remote_version(info), int(info.get("size") or 0), _mtime(info))
            )
        return out

    def info(self, key: str) -> ObjectInfo:
        """One object's info; NotFoundError when there is no such key."""
        validate_key(key)
        if self._local_root:
            path = self._local_root / key
            if not path.is_file():
                raise NotFoundError(self._missing(key))
            st = path.stat()
            return ObjectInfo(key, _sha256(path), st.st_size, st.st_mtime)
        try:
            info = self._fs.info(self._path(key))
        except FileNotFoundError:
            raise NotFoundError(self._missing(key)) from None
        return ObjectInfo(key, _remote_version(info), int(info.get("size") or 0), _mtime(info))

    def read_bytes(self, key: str) -> bytes:
        """The object's content; NotFoundError when there is no such key."""
        validate_key(key)
        try:
            if self._local_root:
                return (self._local_root / key).read_bytes()
            return bytes(self._fs.cat_file(self._path(key)))
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError(self._missing(key)) from None

    def download(self, key: str, dest: Path) -> Path:
        """Copy the object to `dest` (written beside it, then renamed); returns `dest`."""
        validate_key(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if self._local_root:
                shutil.copyfile(self._local_root / key, tmp)
            else:
                self._fs.get_file(self._path(key), str(tmp))
            tmp.replace(dest)
        except FileNotFoundError:
            raise NotFoundError(self._missing(key)) from None
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    # -- writing ---------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Store `data` under `key` atomically (a watcher never sees half an object)."""
        validate_key(key)
        if self._local_root:
            path = self._local_root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            # A dot-name temp file in the same folder: hidden from listings, and the rename
            # onto the final name is atomic on one filesystem.
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp_name, path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
        else:
            self._fs.pipe_file(self._path(key), data)  # one PUT: atomic on S3
        return self.info(key)

    def delete(self, key: str) -> None:
        """Remove an object (missing is fine)."""
        validate_key(key)
        if self._local_root:
            (self._local_root / key).unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(self._path(key))

    # -- helpers ---------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if self._root else key

    def _missing(self, key: str) -> str:
        return f"no object {key!r} in bucket {self.url}; list what is there with Bucket.list()"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _remote_version(info: dict[str, Any]) -> str:
    """ETag (quotes stripped), else VersionId, else size+mtime: whatever the store offers."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    vid = info.get("VersionId")
    if vid and vid != "null":
        return str(vid)
    return f"{info.get('size', 0)}-{_mtime(info)}"


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or 0
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
