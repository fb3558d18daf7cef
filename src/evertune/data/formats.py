"""The six record formats Evertune accepts, how to tell them apart, and per-row checks.

    from evertune.data.formats import detect_format, validate_row, clean_record, rated_label
    fmt = detect_format({"input": "2+2?", "output": "4"})     # "input_output"
    validate_row({"input": "", "output": 4}, fmt)              # two RowProblems
    rated_label({"prompt": "2+2=", "completion": "5", "label": False})   # False

| format            | one JSON object per line                                        | kind     |
|-------------------|-----------------------------------------------------------------|----------|
| input_output      | {"input": str, "output": str}                                   | sft      |
| prompt_completion | {"prompt": str, "completion": str}                              | sft      |
| chat              | {"messages": [{"role": "system|user|assistant", "content": str}]} | sft    |
| preference        | {"prompt": str, "chosen": str, "rejected": str}                 | dpo      |
| rated             | {"prompt": str, "completion": str, "label": true|false}         | kto      |
| text              | {"text": str}                                                   | pretrain |

A rated row is TRL's unpaired-preference shape: an answer and whether it is desirable. Any
SFT shape plus a boolean `label` is rated (`{"messages": [..., assistant], "label": false}`
too); a `label` that is not a boolean (`"label": "billing"` in a classification export) is an
ignored extra key, so such rows stay supervised.

A `.txt` file is the text format too: one record per paragraph, paragraphs separated by one
or more blank lines (see `read_txt_records`).

Extra keys in a row are allowed and ignored (`clean_record` drops them), so exports from
other tools with ids or metadata load as they are. The one extra key kept is `feedback`
(serving's feedback records: who sent it, which response): provenance, not content, so it is
left out of the dedup/split/version key (`record_key`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, cast

Format = Literal["input_output", "prompt_completion", "chat", "preference", "rated", "text"]
Kind = Literal["sft", "dpo", "pretrain", "kto"]

FORMATS: tuple[Format, ...] = (
    "input_output", "prompt_completion", "chat", "preference", "rated", "text"
)
KIND: dict[str, Kind] = {
    "input_output": "sft",
    "prompt_completion": "sft",
    "chat": "sft",
    "preference": "dpo",
    "rated": "kto",
    "text": "pretrain",
}
KINDS: tuple[Kind, ...] = ("sft", "dpo", "pretrain", "kto")
# What the records of each kind look like, for messages that say what data to add.
KIND_DATA: dict[str, str] = {
    "sft": "input/output, prompt/completion or chat records",
    "pretrain": 'text ({"text": …} rows or .txt files)',
    "dpo": 'preference pairs ({"prompt", "chosen", "rejected"})',
    "kto": 'rated answers ({"prompt", "completion", "label": true|false})',
}
# The string fields of each flat format; chat is checked separately (a list of messages), and
# rated as the SFT shape it carries plus its boolean `label`.
FIELDS: dict[str, tuple[str, ...]] = {
    "input_output": ("input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "rated": ("prompt", "completion", "label"),
    "text": ("text",),
}
PROVENANCE = "feedback"  # the extra key clean_record keeps (serving's feedback metadata)
ROLES = ("system", "user", "assistant")

# What a row of each format looks like, for error messages that show the fix.
EXAMPLES: dict[str, str] = {
    "input_output": '{"input": "What is 2+2?", "output": "4"}',
    "prompt_completion": '{"prompt": "2+2=", "completion": "4"}',
    "chat": '{"messages": [{"role": "user", "content": "Hi"}, '
    '{"role": "assistant", "content": "Hello!"}]}',
    "preference": '{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}',
    "rated": '{"prompt": "2+2=", "completion": "5", "label": false}',
    "text": '{"text": "Any document text."}',
}


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with one row; `code` groups problems in reports, `reason` is for people."""

    field: str  # "output", "messages[2].role", or "" for the row as a whole
    code: str  # missing_field | empty | wrong_type | unknown_role | bad_chat | not_object | ...
    reason: str


def detect_format(row: dict[str, Any]) -> Format | None:
    """The format whose fields are all present in `row` (values unchecked), or None.

    Checked most specific first: a preference row also has `prompt`, so it must win over
    prompt/completion; an SFT row with a boolean `label` is rated. Extra keys do not matter.
    """
    fmt = sft_shape(row)
    if fmt is not None:
        return "rated" if isinstance(row.get("label"), bool) else fmt
    if not isinstance(row, dict):
        return None
    if {"prompt", "chosen", "rejected"} <= row.keys():
        return "preference"
    if "text" in row:
        return "text"
    return None


def sft_shape(row: Any) -> Format | None:
    """The SFT format whose fields `row` has (chat, prompt_completion, input_output), or None;
    for a rated row, the shape of its answer."""
    if not isinstance(row, dict):
        return None
    keys = row.keys()
    if "messages" in keys:
        return "chat"
    if {"prompt", "chosen", "rejected"} <= keys:
        return None  # preference
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"input", "output"} <= keys:
        return "input_output"
    return None


def rated_label(record: dict[str, Any]) -> bool:
    """Whether a rated record's answer is desirable (its `label`); ValueError for a record
    that is not rated, naming what it lacks."""
    label = record.get("label") if isinstance(record, dict) else None
    if not isinstance(label, bool) or sft_shape(record) is None:
        raise ValueError(
            f"not a rated record (keys {sorted(record) if isinstance(record, dict) else record}); "
            f"expected {EXAMPLES['rated']}"
        )
    return label


def _type_name(value: Any) -> str:
    # JSON names, because the person reading this wrote JSON, not Python.
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _check_string(row: dict[str, Any], key: str, where: str) -> list[RowProblem]:
    if key not in row:
        return [RowProblem(where, "missing_field", f"missing field '{key}'")]
    value = row[key]
    if not isinstance(value, str):
        return [RowProblem(where, "wrong_type",
                           f"'{where}' must be a string, got {_type_name(value)}")]
    if not value.strip():
        return [RowProblem(where, "empty", f"'{where}' is empty; write the {where.split('.')[-1]} "
                           "or drop the row")]
    return []


def _check_messages(row: dict[str, Any]) -> list[RowProblem]:
    if "messages" not in row:
        return [RowProblem("messages", "missing_field", "missing field 'messages'")]
    messages = row["messages"]
    if not isinstance(messages, list):
        return [RowProblem("messages", "wrong_type",
                           f"'messages' must be an array, got {_type_name(messages)}")]
    if not messages:
        return [RowProblem("messages", "empty", "'messages' is empty")]
    problems: list[RowProblem] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            problems.append(RowProblem(where, "wrong_type",
                                       f"'{where}' must be an object, got {_type_name(msg)}"))
            continue
        role = msg.get("role")
        if "role" not in msg:
            problems.append(RowProblem(f"{where}.role", "missing_field", "missing field 'role'"))
        elif not isinstance(role, str):
            problems.append(RowProblem(f"{where}.role", "wrong_type",
                                       f"'{where}.role' must be a string, got {_type_name(role)}"))
        elif role not in ROLES:
            problems.append(RowProblem(f"{where}.role", "unknown_role",
                                       f"unknown role {role!r}; use one of {', '.join(ROLES)}"))
        elif role == "system" and i != 0:
            # Chat templates accept a system prompt only at the start.
            problems.append(RowProblem(f"{where}.role", "bad_chat",
                                       "a system message may only be the first message"))
        problems += _check_string(msg, "content", f"{where}.content")
    if problems:
        return problems
    if messages[-1]["role"] != "assistant":
        # The last assistant turn is what the model learns; without it there is nothing to train.
        problems.append(RowProblem(f"messages[{len(messages) - 1}].role", "bad_chat",
                                   "the last message must have role 'assistant' (the reply "
                                   f"to learn), got {messages[-1]['role']!r}"))
    if not any(m["role"] == "user" for m in messages):
        problems.append(RowProblem("messages", "bad_chat", "no message has role 'user'"))
    return problems


def validate_row(row: Any, fmt: Format) -> list[RowProblem]:
    """Every problem with `row` read as format `fmt`; an empty list means the row is usable."""
    if not isinstance(row, dict):
        return [RowProblem("", "not_object", f"row must be a JSON object, got {_type_name(row)}")]
    if fmt == "chat":
        return _check_messages(row)
    if fmt == "rated":
        return _check_rated(row)
    problems: list[RowProblem] = []
    for key in FIELDS[fmt]:
        problems += _check_string(row, key, key)
    if fmt == "preference" and not problems and (
        normalize_text(row["chosen"]) == normalize_text(row["rejected"])
    ):
        problems.append(RowProblem(
            "rejected", "same_answers",
            "'chosen' and 'rejected' are the same answer (ignoring whitespace), so the pair "
            "prefers nothing; put the worse answer in 'rejected' or drop the row"))
    return problems


def _check_rated(row: dict[str, Any]) -> list[RowProblem]:
    """A rated row: the SFT shape of its answer (prompt/completion by default) + a boolean label."""
    shape = sft_shape(row) or "prompt_completion"
    problems = validate_row(row, shape)
    if "label" not in row:
        problems.append(RowProblem("label", "missing_field",
                                   "missing field 'label' (true: a good answer, false: a bad one)"))
    elif not isinstance(row["label"], bool):
        problems.append(RowProblem(
            "label", "wrong_type",
            f"'label' must be true or false (a good or a bad answer), got "
            f"{_type_name(row['label'])} {json.dumps(row['label'], ensure_ascii=False)[:40]}"))
    return problems


def clean_record(row: dict[str, Any], fmt: Format) -> dict[str, Any]:
    """The row with only the fields of its format (extra keys dropped); strings kept verbatim.

    Whitespace is not touched here: it can matter (code, poems). Only the dedup/split key
    (`normalize_record`) collapses it. A `feedback` object (provenance) is kept as it is.
    """
    if fmt == "rated":
        shape = sft_shape(row) or "prompt_completion"
        record = {k: v for k, v in clean_record(row, shape).items() if k != PROVENANCE}
        record["label"] = row["label"]
    elif fmt == "chat":
        record = {"messages": [{"role": m["role"], "content": m["content"]}
                               for m in row["messages"]]}
    else:
        record = {key: row[key] for key in FIELDS[fmt]}
    meta = row.get(PROVENANCE)
    if isinstance(meta, dict):
        record[PROVENANCE] = meta
    return record


def normalize_text(s: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(s.split())


def normalize_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record with every string (nested ones too) whitespace-normalised."""

    def norm(value: Any) -> Any:
        if isinstance(value, str):
            return normalize_text(value)
        if isinstance(value, list):
            return [norm(v) for v in value]
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        return value

    return cast(dict[str, Any], norm(record))


def record_key(record: dict[str, Any]) -> str:
    """Canonical JSON of the normalised record: equal keys = duplicates (order of keys ignored).

    The `feedback` provenance is left out: the same answer sent by two people is one record."""
    content = {k: v for k, v in record.items() if k != PROVENANCE}
    return json.dumps(normalize_record(content), sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))


def record_format(record: dict[str, Any]) -> Format:
    """The format of a cleaned record (one that passed validation)."""
    fmt = detect_format(record)
    assert fmt is not None, f"not a cleaned record: {sorted(record)}"
    return fmt


def read_txt_records(text: str) -> list[tuple[int, str]]:
    """Split a `.txt` file into (first line number, paragraph) pairs; blank lines separate them.

    Lines inside a paragraph keep their newlines; a paragraph is stripped of leading and
    trailing blank space only.
    """
    records: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            records.append((start, "\n".join(current).strip()))
            current = []
    if current:
        records.append((start, "\n".join(current).strip()))
    return records
