"""Data: validate JSONL drops, dedup, split, and store content-addressed dataset versions.

    from evertune.data import add_files, training_dataset, to_example, tokenize_example
    add_files(ws, [Path("drop.jsonl")], tokenizer=tok)     # evertune data add drop.jsonl
    ds = training_dataset(ws, kind="sft")
    ex = to_example(ds.records("train")[0], tok)

Modules: `formats` (the five record formats, per-row checks), `validate` (one file),
`split` (dedup + hash split), `store` (versions on disk), `templating` (records to tokens).
"""

from evertune.data.formats import (
    FORMATS,
    KIND,
    Format,
    Kind,
    RowProblem,
    detect_format,
    normalize_record,
    record_key,
    validate_row,
)
from evertune.data.split import SPLITS, Split, dedup, split_of, split_records
from evertune.data.store import (
    AddResult,
    DatasetVersion,
    add_files,
    get_dataset,
    list_datasets,
    load_golden,
    training_dataset,
)
from evertune.data.templating import (
    IGNORE_INDEX,
    Example,
    PreferenceExample,
    TokenizedExample,
    to_example,
    to_preference,
    token_length,
    tokenize_example,
)
from evertune.data.validate import FileResult, Reject, validate_file

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "KIND",
    "SPLITS",
    "AddResult",
    "DatasetVersion",
    "Example",
    "FileResult",
    "Format",
    "Kind",
    "PreferenceExample",
    "Reject",
    "RowProblem",
    "Split",
    "TokenizedExample",
    "add_files",
    "dedup",
    "detect_format",
    "get_dataset",
    "list_datasets",
    "load_golden",
    "normalize_record",
    "record_key",
    "split_of",
    "split_records",
    "to_example",
    "to_preference",
    "token_length",
    "tokenize_example",
    "training_dataset",
    "validate_file",
    "validate_row",
]
