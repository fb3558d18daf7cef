"""Validate one data file: file-level errors raise, row-level problems are collected.

    from evertune.data.validate import validate_file
    result = validate_file(Path("drop.jsonl"), tokenizer=tok, max_seq_len=512)
    result.records          # cleaned rows of the file's format, in file order
    result.rejects          # one Reject per problem: line (1-based), field, reason, the row

File-level errors (`DataError`, message names the file and the fix): missing file, over
`max_file_mb`, empty, not UTF-8 (with byte offset and line), not JSON Lines (no line parses,
or a JSON array / pretty-printed document), no row of a known format, no valid row.

The file's format is the format of its first valid row; rows of another format are rejected
(`wrong_format`), so one bad export cannot silently mix SFT and DPO data. Blank lines are
skipped. Feedback records of answers users rated down (`feedback.label: negative`, written by
serving's /v1/feedback) are rejected as `negative_feedback` from supervised data: they are
kept for review, never imitated (as rated rows, `label: false`, they are what KTO learns to
avoid, and are kept); so are feedback records about responses the server did not produce
(`feedback.verified: false`, `unverified_feedback`) unless the feedback fold vouched for them.
A preference pair whose chosen and rejected answers are the same is rejected (`same_answers`).
A `.txt` file is the text format, one record per blank-line-separated paragraph.

With a tokenizer, each record is measured as it will be trained (chat template + EOS);
longer than `max_seq_len` is rejected (`too_long`) or, with `overlong="truncate"`, kept and
counted in `truncated` — the record is stored whole and `tokenize_example(..., truncate=True)`
cuts it at training time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evertune.data.formats import (
    EXAMPLES,
    FORMATS,
    KIND,
    Format,
    Kind,
    RowProblem,
    clean_record,
    detect_format,
    read_txt_records,
    validate_row,
)
from evertune.data.templating import token_length
from evertune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROW_PREVIEW_CHARS = 200  # oversize rows are kept in rejected.jsonl only as a preview


@dataclass
class Reject:
    """One problem with one row; `row` is the parsed row, or the raw text if it did not parse."""

    file: str
    line: int
    field: str
    code: str
    reason: str
    row: Any

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "code": self.code,
                "reason": self.reason, "row": self.row}


@dataclass
class FileResult:
    """What `validate_file` found in one file."""

    path: Path
    sha256: str  # of the file bytes, recorded as the version's source
    format: Format
    records: list[dict[str, Any]]  # cleaned (only the format's fields), in file order
    lines: list[int]  # 1-based line of each record
    rejects: list[Reject]
    rows: int  # rows read: non-blank lines (JSONL) or paragraphs (.txt)
    truncated: int = 0  # records kept although longer than max_seq_len (overlong="truncate")
    # Trained length of each record (after templating, EOS, truncation); [] without a tokenizer.
    token_lengths: list[int] = field(default_factory=list)

    @property
    def kind(self) -> Kind:
        return KIND[self.format]

    @property
    def rejected_rows(self) -> int:
        return len({r.line for r in self.rejects})


def _rated_down(row: dict[str, Any]) -> bool:
    """A feedback record (evertune.monitoring.feedback) that keeps an answer a user rated down.

    Such records hold the served answer, not a better one: training on them would teach the
    model exactly what users disliked. A correction is labelled `corrected` and is kept."""
    meta = row.get("feedback")
    return isinstance(meta, dict) and meta.get("label") == "negative"


def _unverified(row: dict[str, Any]) -> bool:
    """A feedback record about a response the server could not show it produced (a made-up
    id, text the client sent), that nobody vouched for: kept for review, never trained on.
    The feedback fold marks them `trusted` where `data.trust_unverified_feedback` is true."""
    meta = row.get("feedback")
    return isinstance(meta, dict) and meta.get("verified") is False and not meta.get("trusted")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"(line {line}) cannot be decoded; re-save it as UTF-8 in a new file (e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > {_utf8_name(path)}`) and add that file"
        ) from None


def _utf8_name(path: Path) -> str:
    """Where a re-encoded copy of `path` goes (never `path` itself: `>` truncates first)."""
    return f"{path.stem}.utf8{path.suffix}"


def _converted_name(path: Path) -> str:
    """A file name for converted output that is never the input's own name."""
    if path.suffix.lower() != ".jsonl":
        return f"{path.stem}.jsonl"
    return f"{path.stem}.lines.jsonl"


def _preview(text: str) -> str:
    return text if len(text) <= ROW_PREVIEW_CHARS else text[:ROW_PREVIEW_CHARS] + "…"


def _read_rows(
    path: Path, text: str, max_row_bytes: float
) -> tuple[list[tuple[int, Any]], list[Reject]]:
    """(line, parsed row) pairs and the rows that are too large or not JSON."""
    name = path.name
    if path.suffix.lower() == ".txt":
        rows: list[tuple[int, Any]] = []
        rejects: list[Reject] = []
        for line, para in read_txt_records(text):
            if len(para.encode()) > max_row_bytes:
                rejects.append(Reject(name, line, "text", "row_too_large",
                                      f"paragraph is {len(para.encode()) / 1024:.0f} KB, over "
                                      f"data.max_row_kb={max_row_bytes / 1024:g}; split it",
                                      _preview(para)))
            else:
                rows.append((line, {"text": para}))
        return rows, rejects

    rows, rejects = [], []
    parsed_any = False
    # split("\n"), not splitlines(): U+2028 and friends may appear raw inside JSON strings.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        size = len(line.encode())
        if size > max_row_bytes:
            rejects.append(Reject(name, number, "", "row_too_large",
                                  f"row is {size / 1024:.0f} KB, over data.max_row_kb="
                                  f"{max_row_bytes / 1024:g}; shorten it or raise the limit",
                                  _preview(line)))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rejects.append(Reject(name, number, "", "invalid_json",
                                  f"not valid JSON: {exc.msg} at column {exc.colno}", line))
            continue
        parsed_any = True
        rows.append((number, row))

    first = text.lstrip()[:1]
    if not parsed_any or first == "[":
        # A JSON array or a pretty-printed document is a common mistake; name it exactly.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        # The suggested commands write to a NEW file: `jq … x.jsonl > x.jsonl` would truncate
        # the input before jq reads it, emptying the user's file.
        out = _converted_name(path)
        if isinstance(whole, list):
            raise DataError(f"{path} is a JSON array, not JSON Lines (one JSON object per "
                            f"line); convert it into a new file with "
                            f"`jq -c '.[]' {name} > {out}` and add {out}")
        if isinstance(whole, dict):
            raise DataError(f"{path} is one multi-line JSON object, not JSON Lines (one JSON "
                            f"object per line); put each record on its own line in a new file "
                            f"(`jq -c . {name} > {out}`) and add {out}")
        if not parsed_any and any(r.code == "invalid_json" for r in rejects):
            first_bad = rejects[0] if rejects else None
            detail = f" (line {first_bad.line}: {first_bad.reason})" if first_bad else ""
            raise DataError(
                f"{path} is not JSON Lines: no line is a JSON value{detail}; write one JSON "
                f"object per line, e.g. {EXAMPLES['input_output']}, or use a .txt file for "
                "plain text"
            )
    return rows, rejects


def _file_format(path: Path, rows: list[tuple[int, Any]], rejects: list[Reject]) -> Format:
    """The format of the first valid row; DataError when there is none."""
    if not rows:  # every row was too large
        shown = "\n".join(f"  line {r.line}: {r.reason}" for r in rejects[:10])
        raise DataError(f"{path} has no valid row; fix these and add it again:\n{shown}")
    first_fmt: Format | None = None
    for _, row in rows:
        fmt = detect_format(row) if isinstance(row, dict) else None
        if fmt is not None:
            first_fmt = first_fmt or fmt
            if not validate_row(row, fmt):
                return fmt
    if first_fmt is None:
        first_obj = next((row for _, row in rows if isinstance(row, dict)), None)
        seen = f"the first row has keys {sorted(first_obj)}" if first_obj is not None else \
            "no row is a JSON object"
        accepted = "\n".join(f"  {f}: {EXAMPLES[f]}" for f in FORMATS)
        raise DataError(f"{path} has no row of a known format ({seen}); "
                        f"use one of these shapes, one per line:\n{accepted}")
    # Every row is broken: show the first problems, read as the first format seen.
    problems = [(r.line, r.field, r.reason) for r in rejects]
    for line, row in rows:
        problems += [(line, p.field, p.reason) for p in validate_row(row, first_fmt)]
    shown = "\n".join(f"  line {ln}: {f or 'row'}: {why}" for ln, f, why in sorted(problems)[:10])
    raise DataError(f"{path} has no valid row ({first_fmt} format); fix these and add it again:\n"
                    + shown)


def validate_file(
    path: Path,
    *,
    max_file_mb: float = 512,
    max_row_kb: float = 256,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_seq_len: int = 512,
    overlong: Literal["reject", "truncate"] = "reject",
) -> FileResult:
    """Read and check `path`; raise DataError for file-level problems, collect row problems."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file; check the path")
    size = path.stat().st_size
    if size > max_file_mb * 1024 * 1024:
        raise DataError(
            f"{path} is {size / 2**20:.1f} MB, over data.max_file_mb={max_file_mb:g}; split it "
            "into smaller files or raise the limit (--set data.max_file_mb=...)"
        )
    data = path.read_bytes()
    if not data.strip():
        raise DataError(
            f"{path} is empty; add at least one record, e.g. {EXAMPLES['input_output']}"
        )
    text = _decode(path, data)
    rows, rejects = _read_rows(path, text, max_row_kb * 1024)
    fmt = _file_format(path, rows, rejects)

    name = path.name
    result = FileResult(path=path, sha256=hashlib.sha256(data).hexdigest(), format=fmt,
                        records=[], lines=[], rejects=rejects, rows=len(rows) + len(rejects))
    for line, row in rows:
        other = detect_format(row) if isinstance(row, dict) else None
        if fmt == "rated" and other is not None and KIND[other] == "sft":
            other = fmt  # a rated file's row without a usable label: say what the label lacks
        if other is not None and other != fmt:
            rejects.append(Reject(name, line, "", "wrong_format",
                                  f"row is {other} but the file is {fmt} (detected from its first "
                                  "valid row); put each format in its own file", row))
            continue
        problems: list[RowProblem] = validate_row(row, fmt)
        if problems:
            rejects += [Reject(name, line, p.field, p.code, p.reason, row) for p in problems]
            continue
        if fmt != "rated" and _rated_down(row):
            rejects.append(Reject(name, line, "feedback.label", "negative_feedback",
                                  "a user rated this served answer down and gave no correction, "
                                  "so it is not trained on; post a `correction` to /v1/feedback "
                                  "to make it a training example", row))
            continue
        if _unverified(row):
            rejects.append(Reject(name, line, "feedback.verified", "unverified_feedback",
                                  "feedback about a response this server did not produce (or "
                                  "could not find) is not trained on; set "
                                  "data.trust_unverified_feedback: true to train on it", row))
            continue
        record = clean_record(row, fmt)
        if tokenizer is not None:
            try:
                prompt_len, total = token_length(record, tokenizer)
            except DataError as exc:
                raise DataError(f"{path}: {exc}") from None
            if total > max_seq_len:
                if overlong == "reject":
                    rejects.append(Reject(name, line, "", "too_long",
                                          f"{total} tokens after templating, over data.max_seq_len="
                                          f"{max_seq_len}; shorten it, raise max_seq_len or set "
                                          "data.overlong=truncate", row))
                    continue
                if prompt_len >= max_seq_len:
                    rejects.append(Reject(name, line, "", "too_long",
                                          f"the prompt alone is {prompt_len} tokens, over "
                                          f"data.max_seq_len={max_seq_len}, so truncating the "
                                          "answer cannot make it fit; shorten the prompt", row))
                    continue
                result.truncated += 1
                total = max_seq_len
            result.token_lengths.append(total)
        result.records.append(record)
        result.lines.append(line)

    rejects.sort(key=lambda r: r.line)
    if not result.records:
        shown = "\n".join(f"  line {r.line}: {r.field or 'row'}: {r.reason}" for r in rejects[:10])
        raise DataError(f"{path} has no valid row; fix these and add it again:\n{shown}")
    return result
