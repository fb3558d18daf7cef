"""Data: validate JSONL drops, dedup, split, and store content-addressed dataset versions."""

from evertune.data.formats import FORMATS, KIND, Format, Kind, detect_format, validate_row
from evertune.data.templating import (
    Example,
    PreferenceExample,
    TokenizedExample,
    to_example,
    to_preference,
    tokenize_example,
)

__all__ = [
    "FORMATS",
    "KIND",
    "Example",
    "Format",
    "Kind",
    "PreferenceExample",
    "TokenizedExample",
    "detect_format",
    "to_example",
    "to_preference",
    "tokenize_example",
    "validate_row",
]
