"""Model names clients use: `NAME`, `NAME@prod`, `NAME@qa`, `NAME@base`, `NAME@vN`.

    parse_model_name("assistant@v3", "assistant")    # Target(kind="version", version=3)
    parse_model_name("assistant", "assistant")       # Target(kind="prod")
    parse_model_name("other", "assistant")           # None: not a name this gateway serves

`NAME` is `NAME@prod`. Before any version reaches prod, the prod stage serves the base
model (answers say `NAME@base`), so a fresh workspace serves at once. `NAME@vN` is any
registered version, loaded on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["prod", "qa", "base", "version"]
MAX_VERSION = 2**31 - 1
"""The largest version number a name can ask for: MLflow stores versions in a 32-bit column
on some databases, and a larger number (`NAME@v99999999999999999999`) must be a plain 404
rather than a registry query that overflows."""
# ASCII digits only (`\d` also matches other scripts' digits), at most 10 of them: int() of
# thousands of digits is refused by Python and slow before that.
_SUFFIX = re.compile(r"(?:(prod|qa|base)|[vV]([0-9]{1,10}))")


@dataclass(frozen=True)
class Target:
    """What a model name asks for: a stage pointer, the base model, or one version."""

    kind: Kind
    version: int | None = None

    @property
    def stage(self) -> str:
        """The `stage` metric label: prod | qa | base | version."""
        return self.kind


def parse_model_name(raw: str, name: str) -> Target | None:
    """The target of `raw` for the model called `name`; None when `raw` is not one of ours."""
    if raw == name:
        return Target("prod")
    head, sep, suffix = raw.partition("@")
    if head != name or not sep:
        return None
    m = _SUFFIX.fullmatch(suffix)
    if m is None:
        return None
    if m.group(1):
        return Target(m.group(1))  # type: ignore[arg-type]  # the regex allows only Kind values
    number = int(m.group(2))
    return Target("version", number) if 1 <= number <= MAX_VERSION else None


def version_label(version: int | None) -> str:
    """`v3`, or `base` for the base model."""
    return "base" if version is None else f"v{version}"


def display_name(name: str, version: int | None) -> str:
    """The `model` field of a response: `NAME@v3` or `NAME@base`."""
    return f"{name}@{version_label(version)}"
