"""Every error Evertune raises on purpose.

Each message says what went wrong, names the input, and says how to fix it. The CLI prints
the message of any `EvertuneError` without a traceback and exits with status 1 (2 for
`ConfigError`, like a usage error).

    EvertuneError
    ├── ConfigError            evertune.yaml or a --set override is invalid
    ├── WorkspaceError         no workspace here, or it is damaged
    ├── DataError              a data file cannot be used at all (not UTF-8, no valid row, …)
    ├── NotFoundError          a dataset, job, model version or file id does not exist
    ├── JobError               a job cannot do what was asked (cancel a finished job, …)
    ├── LifecycleError         an illegal model-version transition (lists the allowed ones)
    ├── ModelError             a base model cannot be resolved or loaded
    ├── RegistryError          the model registry refused an operation
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


class PermissionDenied(EvertuneError):
    """The caller's token may not do this; the message names the token, its role and who can.

    The control API answers 403 (401 for `auth.InvalidToken`, a subclass: no valid token at all).
    """

    exit_code = 3
