"""Uploaded training files (OpenAI `POST /v1/files`, purpose `fine-tune`), validated on arrival.

    obj = store_upload(ws, "tickets.jsonl", fileobj, "fine-tune")   # FileObject, or ApiError 400
    file_path(ws, obj.id)                                           # the stored copy
    list_files(ws); get_file(ws, "file-…")
    delete_file(ws, "file-…")      # 409 while a job made from it is not finished

Layout: `.evertune/files/<file-id>/{meta.json, <safe filename>, jobs.txt}` (jobs.txt: the jobs
created from the file, one id per line). Deleting a file removes that folder only: the
dataset versions made from it are content-addressed and may be shared by other files, jobs
and registered versions, so they stay. A file is checked the way the
DataPreprocessing step will read it (`data.validate.validate_file` with the base model's
tokenizer and the workspace's `data` limits) and refused as a whole when any row is bad, as
the OpenAI API refuses a training file: the 400 names the lines, fields and reasons, so the
person fixes the file before a run is ever started.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from pydantic import BaseModel

from evertune.api.errors import ApiError
from evertune.errors import DataError

if TYPE_CHECKING:
    from evertune.workspace import Workspace

FILES_DIR = "files"  # under ws.state_dir
PURPOSES = ("fine-tune",)  # what clients may upload
RESULTS_PURPOSE = "fine-tune-results"  # what Evertune writes: a job's evaluation report
MAX_SHOWN_PROBLEMS = 10  # rows listed in a refusal; the count says how many more
USES = "jobs.txt"  # in a file's folder: the ids of jobs created from it, one per line
_CHUNK = 1 << 20
_ID = re.compile(r"file-[0-9a-f]{24}")


class FileDeleted(BaseModel):
    """OpenAI's answer to `DELETE /v1/files/{id}`."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FileObject(BaseModel):
    """The OpenAI file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    # Evertune extras (OpenAI clients ignore unknown fields): what validation found.
    format: str | None = None
    rows: int | None = None


def safe_filename(name: str | None) -> str:
    """The upload's base name with only [A-Za-z0-9._-]; never a path, never hidden."""
    base = Path((name or "").replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base[:128] or "upload.jsonl"


def store_upload(
    ws: Workspace, filename: str | None, stream: IO[bytes], purpose: str
) -> FileObject:
    """Save and validate an upload; ApiError 400 (file kept nowhere) when it cannot train."""
    if purpose not in PURPOSES:
        raise ApiError(400, f"purpose {purpose!r} is not supported; Evertune accepts training "
                       "files only: purpose 'fine-tune'", param="purpose", code="invalid_purpose")
    name = safe_filename(filename)
    file_id = "file-" + secrets.token_hex(12)
    folder = ws.state_dir / FILES_DIR / file_id
    folder.mkdir(parents=True)
    path = folder / name
    try:
        size = copy_capped(stream, path, ws.config.data.max_file_mb, name)
        fmt, rows = _validate(ws, path, name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    obj = FileObject(id=file_id, bytes=size, created_at=int(time.time()), filename=name,
                     purpose=purpose, format=fmt, rows=rows)
    (folder / "meta.json").write_text(obj.model_dump_json(indent=2), "utf-8")
    return obj


# Room for the multipart framing and the other form fields around an uploaded file.
FORM_SLACK_BYTES = 1 << 20


def max_upload_bytes(ws: Workspace) -> int:
    """The largest upload request the API reads: the file cap plus the form around it."""
    return int(ws.config.data.max_file_mb * 1024 * 1024) + FORM_SLACK_BYTES


def copy_capped(stream: IO[bytes], path: Path, max_mb: float, name: str) -> int:
    """Stream an upload to `path`, refusing it (ApiError 413) once it passes `max_mb`, or 400
    when it is empty; the caller removes `path` on a refusal. Returns the size in bytes."""
    limit = int(max_mb * 1024 * 1024)
    size = 0
    with path.open("wb") as out:
        while chunk := stream.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"{name} is over data.max_file_mb={max_mb:g} MB; split "
                               "it into several files", param="file", code="file_too_large")
            out.write(chunk)
    if size == 0:
        raise ApiError(400, f"{name} is empty; upload a JSON Lines file with one record per line",
                       param="file", code="invalid_file")
    return size


def _validate(ws: Workspace, path: Path, name: str) -> tuple[str, int]:
    from evertune import steps
    from evertune.data.validate import validate_file

    cfg = ws.config.data
    try:
        result = validate_file(path, max_file_mb=cfg.max_file_mb, max_row_kb=cfg.max_row_kb,
                               tokenizer=steps.base_tokenizer(ws), max_seq_len=cfg.max_seq_len,
                               overlong=cfg.overlong)
    except DataError as exc:
        # The message names our stored copy; the person knows the file by its upload name.
        raise ApiError(400, str(exc).replace(str(path), name), param="file",
                       code="invalid_file") from None
    if result.rejects:
        shown = "; ".join(f"line {r.line}: {r.field or 'row'}: {r.reason}"
                          for r in result.rejects[:MAX_SHOWN_PROBLEMS])
        more = len(result.rejects) - MAX_SHOWN_PROBLEMS
        extra = f"; and {more} more problem(s)" if more > 0 else ""
        raise ApiError(
            400,
            f"{name} has {result.rejected_rows} invalid row(s) of {result.rows} "
            f"({result.format} format): {shown}{extra}. Fix them and upload the file again",
            param="file", code="invalid_file",
        )
    return result.format, result.rows


def _folder(ws: Workspace, file_id: str) -> Path:
    # The id becomes a path: accept only the exact shape we mint (no traversal possible).
    folder = ws.state_dir / FILES_DIR / file_id
    if not _ID.fullmatch(file_id) or not (folder / "meta.json").is_file():
        raise ApiError(404, f"no such file: {file_id!r} (upload one with POST /v1/files)",
                       param="file_id", code="file_not_found")
    return folder


def get_file(ws: Workspace, file_id: str) -> FileObject:
    """The stored file object; ApiError 404 for an unknown id."""
    return FileObject.model_validate(json.loads((_folder(ws, file_id) / "meta.json").read_text()))


def file_path(ws: Workspace, file_id: str) -> Path:
    """The stored copy of an uploaded file."""
    obj = get_file(ws, file_id)
    return _folder(ws, file_id) / obj.filename


def result_file(ws: Workspace, source: Path, filename: str) -> FileObject:
    """`source` (a job's evaluation report, say) as a downloadable file of purpose
    `fine-tune-results`, as the OpenAI API lists in a job's `result_files`.

    The id is derived from `filename`, so asking again returns the same file; the copy is
    written to a temporary folder and renamed, so two callers at once see one whole file.
    """
    file_id = "file-" + hashlib.sha256(filename.encode()).hexdigest()[:24]
    folder = ws.state_dir / FILES_DIR / file_id
    if not (folder / "meta.json").is_file():
        tmp = folder.with_name(f".{file_id}-{secrets.token_hex(4)}")
        tmp.mkdir(parents=True)
        try:
            shutil.copyfile(source, tmp / filename)
            obj = FileObject(id=file_id, bytes=(tmp / filename).stat().st_size,
                             created_at=int(time.time()), filename=filename,
                             purpose=RESULTS_PURPOSE)
            (tmp / "meta.json").write_text(obj.model_dump_json(), "utf-8")
            tmp.rename(folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not another caller's copy: a real error
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return get_file(ws, file_id)


def list_files(ws: Workspace) -> list[FileObject]:
    """Every uploaded file, newest first."""
    root = ws.state_dir / FILES_DIR
    if not root.is_dir():
        return []
    objs = [FileObject.model_validate(json.loads(p.read_text()))
            for p in root.glob("file-*/meta.json")]
    return sorted(objs, key=lambda o: (o.created_at, o.id), reverse=True)


@contextmanager
def file_guard(ws: Workspace, file_id: str) -> Iterator[None]:
    """Held (an exclusive lock across threads and processes of this machine) while a job is
    created from the file and while the file is deleted, so a delete never slips between a
    job's creation and `record_use`."""
    if not _ID.fullmatch(file_id):  # the id becomes a path: only the shape we mint
        _folder(ws, file_id)  # raises the 404
    from evertune.models import file_lock

    with file_lock(ws.state_dir / FILES_DIR / f".{file_id}.lock"):
        yield


def record_use(ws: Workspace, file_id: str, job_id: str) -> None:
    """Note that job `job_id` was created from the file (read by `delete_file`)."""
    with (_folder(ws, file_id) / USES).open("a", encoding="utf-8") as fh:
        fh.write(job_id + "\n")


def jobs_using(ws: Workspace, file_id: str) -> list[str]:
    """The ids of the jobs created from the file, oldest first, each once."""
    path = _folder(ws, file_id) / USES
    if not path.is_file():
        return []
    return list(dict.fromkeys(line for line in path.read_text("utf-8").split() if line))


def delete_file(ws: Workspace, file_id: str) -> FileDeleted:
    """Delete an uploaded (or result) file: its bytes and record. ApiError 404 for an unknown
    id, 409 while a job created from it is not finished (its pipeline run reads the file).
    The dataset versions made from it stay: other files, jobs and versions may share them."""
    from evertune.errors import NotFoundError
    from evertune.training.jobs import get_job

    _folder(ws, file_id)  # 404 before taking a lock for an id that never existed
    with file_guard(ws, file_id):
        folder = _folder(ws, file_id)  # 404 when another request deleted it meanwhile
        busy: list[str] = []
        for job_id in jobs_using(ws, file_id):
            try:
                job = get_job(ws, job_id)
            except NotFoundError:
                continue
            if not job.finished:
                busy.append(f"{job.id} ({job.status})")
        if busy:
            raise ApiError(
                409,
                f"file {file_id} is the training file of job(s) not finished yet: "
                f"{', '.join(busy)}; wait until they end, or cancel them (POST "
                "/v1/fine_tuning/jobs/{id}/cancel), then delete the file",
                param="file_id", code="file_in_use",
            )
        # Renamed away first, so a reader sees the whole file or a 404, never half a folder.
        trash = folder.with_name(f".deleted-{file_id}-{secrets.token_hex(4)}")
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    (ws.state_dir / FILES_DIR / f".{file_id}.lock").unlink(missing_ok=True)
    return FileDeleted(id=file_id)
