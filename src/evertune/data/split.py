"""Dedup records and split them into train/validation/test by a hash of their content.

    from evertune.data.split import dedup, split_records
    unique, dropped = dedup(records)
    splits = split_records(unique, ws.config.data.split)   # {"train": [...], "validation": ...}

The split of a record depends only on the record (sha256 of its whitespace-normalised,
key-sorted JSON), never on which other records are present. So a record keeps its split
across data drops, and a record that was in a test split never shows up in a later train split
(as long as the ratios stay the same).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Protocol

from evertune.data.formats import record_key

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


class Ratios(Protocol):
    """Anything with the three ratios, such as `config.DataArgs.split` (`SplitArgs`)."""

    train: float
    validation: float
    test: float


def record_hash(record: dict[str, Any]) -> str:
    """sha256 hex of the normalised record: the identity used for dedup, split and versions."""
    return hashlib.sha256(record_key(record).encode()).hexdigest()


def split_of(record: dict[str, Any], ratios: Ratios) -> Split:
    """The split of `record`: the first 64 bits of its hash as a number in [0, 1) vs the ratios."""
    u = int(record_hash(record)[:16], 16) / 2**64
    if u < ratios.train:
        return "train"
    if u < ratios.train + ratios.validation:
        return "validation"
    return "test"


def dedup(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(records without exact duplicates after whitespace normalisation, number dropped).

    The first occurrence is kept, in the original order.
    """
    seen: set[str] = set()
    unique: list[dict[str, Any]] = []
    for record in records:
        key = record_key(record)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique, len(records) - len(unique)


def split_records(
    records: list[dict[str, Any]], ratios: Ratios
) -> dict[Split, list[dict[str, Any]]]:
    """Records grouped by `split_of`, keeping their order within each split."""
    out: dict[Split, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for record in records:
        out[split_of(record, ratios)].append(record)
    return out
