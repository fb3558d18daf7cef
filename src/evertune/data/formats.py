"""The five record formats Evertune accepts, how to tell them apart, and per-row checks.

    from evertune.data.formats import detect_format, validate_row, clean_record
    fmt = detect_format({"input": "2+2?", "output": "4"})     # "input_output"
    validate_row({"input": "", "output": 4}, fmt)              # two RowProblems

| format            | one JSON object per line                                        | kind     |
|-------------------|-----------------------------------------------------------------|----------|
| input_output      | {"input": str, "output": str}                                   | sft      |
| prompt_completion | {"prompt": str, "completion": str}                              | sft      |
| chat              | {"messages": [{"role": "system|user|assistant", "content": str}]} | sft    |
| preference        | {"prompt": str, "chosen": str, "rejected": str}                 | dpo      |
| text              | {"text": str}                                                   | pretrain |

A `.txt` file is the text format too: one record per paragraph, paragraphs separated by one
or more blank lines (see `read_txt_records`).

Extra keys in a row are allowed and ignored (`clean_record` drops them), so exports from
other tools with ids or metadata load as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, cast

Format = Literal["input_output", "prompt_completion", "chat", "preference", "text"]
Kind = Literal["sft", "dpo", "pretrain"]

FORMATS: tuple[Format, ...] = ("input_output", "prompt_completion", "chat", "preference", "text")
KIND: dict[str, Kind] = {
    "input_output": "sft",
    "prompt_completion": "sft",
    "chat": "sft",
    "preference": "dpo",
    "text": "pretrain",
}
# The string fields of each flat format; chat is checked separately (a list of messages).
FIELDS: dict[str, tuple[str, ...]] = {
    "input_output": ("input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")

# What a row of each format looks like, for error messages that show the fix.
EXAMPLES: dict[str, str] = {
    "input_output": '{"input": "What is 2+2?", "output": "4"}',
    "prompt_completion": '{"prompt": "2+2=", "completion": "4"}',
    "chat": '{"messages": [{"role": "user", "content": "Hi"}, '
    '{"role": "assistant", "content": "Hello!"}]}',
    "preference": '{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}',
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
    prompt/completion. Extra keys do not matter.
    """
    if not isinstance(row, dict):
        return None
    keys = row.keys()
    if "messages" in keys:
        return "chat"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"input", "output"} <= keys:
        return "input_output"
    if "text" in keys:
        return "text"
    return None


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
        return [RowProblem(where, "empty", f"'{where}' is empty")]
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
    problems: list[RowProblem] = []
    for key in FIELDS[fmt]:
        problems += _check_string(row, key, key)
    return problems


def clean_record(row: dict[str, Any], fmt: Format) -> dict[str, Any]:
    """The row with only the fields of its format (extra keys dropped); strings kept verbatim.

    Whitespace is not touched here: it can matter (code, poems). Only the dedup/split key
    (`normalize_record`) collapses it.
    """
    if fmt == "chat":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    return {key: row[key] for key in FIELDS[fmt]}


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
    """Canonical JSON of the normalised record: equal keys = duplicates (order of keys ignored)."""
    return json.dumps(normalize_record(record), sort_keys=True, ensure_ascii=False,
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
