"""Every error Evertune raises on purpose.

Each message says what went wrong, names the input, and says how to fix it. The CLI prints
the message of any `EvertuneError` without a traceback and exits with status 1 (2 for
`ConfigError`, like a usage error).

    EvertuneError
    ├── ConfigError            evertune.yaml or a --set override is invalid
    ├── WorkspaceError         no workspace here, or it is damaged
    │   └── WorkspaceLocked    another live `evertune up` holds the workspace (names it)
    ├── StorageError           a store cannot be read or written (permissions, disk, mount)
    ├── DataError              a data file cannot be used at all (not UTF-8, no valid row, …)
    ├── NotFoundError          a dataset, job, model version or file id does not exist
    ├── JobError               a job cannot do what was asked (cancel a finished job, …)
    ├── LifecycleError         an illegal model-version transition (lists the allowed ones)
    ├── ModelError             a base model cannot be resolved or loaded
    ├── RegistryError          the model registry refused an operation
    ├── JudgeError             the LLM judge (eval.judge) is down, refuses the key, or has no model
    └── PermissionDenied       a token's role may not do this (or the token is not valid)
"""

from __future__ import annotations


class EvertuneError(Exception):
    """Base class: the message is meant for the person at the keyboard."""

    exit_code: int = 1


class ConfigError(EvertuneError):
    """Invalid configuration; carries every problem found, not only the first."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "evertune.yaml") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem(s)):\n{lines}")


class WorkspaceError(EvertuneError):
    pass


class WorkspaceLocked(WorkspaceError):
    """Another live process holds the workspace lock; the message names its host and PID."""


class StorageError(EvertuneError):
    """A file or database the workspace needs cannot be read or written: the message names it
    and the likely fix (permissions, free disk space, a missing mount). The API answers 503:
    the request was fine and can be retried once the storage is repaired."""


class DataError(EvertuneError):
    pass


class NotFoundError(EvertuneError):
    pass


class JobError(EvertuneError):
    pass


class LifecycleError(EvertuneError):
    pass


class ModelError(EvertuneError):
    pass


class RegistryError(EvertuneError):
    pass


class JudgeError(EvertuneError):
    """The LLM judge endpoint cannot be used (down, key refused, unknown model or URL): the
    message names base_url and model and the fix; the evaluation step fails and can be retried."""


class PermissionDenied(EvertuneError):
    """The caller's token may not do this; the message names the token, its role and who can.

    The control API answers 403 (401 for `auth.InvalidToken`, a subclass: no valid token at all).
    """

    exit_code = 3


# What SQLite and the OS say when a store is not writable or the disk is full: a problem of the
# machine (permissions, a read-only mount, free space), never of the request or of our code.
_STORAGE_MESSAGES = (
    "attempt to write a readonly database",
    "unable to open database file",
    "database or disk is full",
    "disk i/o error",
    "read-only file system",
    "no space left on device",
    "permission denied",
)
_STORAGE_ERRNOS = {1, 13, 28, 30, 122}  # EPERM, EACCES, ENOSPC, EROFS, EDQUOT


def storage_problem(exc: BaseException) -> str | None:
    """The first line of the storage failure behind `exc` (following its causes and SQLAlchemy's
    `orig`), or None when `exc` is not one. Used where a raw driver error would otherwise reach
    the user: the CLI's top level, the API, the MLflow wrapper."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageError):
            return str(e)
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            where = f" ({e.filename})" if e.filename else ""
            return f"{e.strerror or e}{where}"
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        driver = type(e).__module__ == "sqlite3" or "OperationalError" in type(e).__name__
        if driver and any(m in text.lower() for m in _STORAGE_MESSAGES):
            # SQLAlchemy prefixes the driver's class: "(sqlite3.OperationalError) …"
            return text.split(") ", 1)[1] if text.startswith("(") and ") " in text else text
        todo.extend([getattr(e, "orig", None), e.__cause__, e.__context__])
    return None


def as_storage_error(exc: BaseException, store: str | None = None) -> StorageError | None:
    """`exc` as a StorageError naming `store` and the fix, or None when it is no storage failure.
    A StorageError comes back as it is."""
    if isinstance(exc, StorageError):
        return exc
    problem = storage_problem(exc)
    if problem is None:
        return None
    what = store or "a workspace database or file"
    return StorageError(
        f"cannot write {what}: {problem}; check that this user may write the file and its "
        "folder (permissions, a read-only mount) and that the disk is not full"
    )
