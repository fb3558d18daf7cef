"""Rated answers (KTO) and the bad input each format must refuse, with file, line and fix.

    .venv/bin/python -m pytest tests/data/test_rated.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evertune.data.formats import (
    clean_record,
    detect_format,
    rated_label,
    record_key,
    validate_row,
)
from evertune.data.store import add_files
from evertune.data.templating import Example, to_example, token_length
from evertune.data.validate import validate_file
from evertune.errors import DataError
from evertune.models import load_tokenizer
from evertune.workspace import Workspace
from tests.data.test_validate import problems, write

CHAT = [{"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": "It ships tomorrow."}]


def test_rated_rows_are_detected_only_with_a_boolean_label() -> None:
    assert detect_format({"prompt": "2+2=", "completion": "4", "label": True}) == "rated"
    assert detect_format({"messages": CHAT, "label": False}) == "rated"
    assert detect_format({"input": "2+2?", "output": "5", "label": False}) == "rated"
    # A classification export's label is a string: an ignored extra key, the row stays SFT.
    assert detect_format({"input": "I was charged twice", "output": "billing",
                          "label": "billing"}) == "input_output"
    assert detect_format({"prompt": "a", "completion": "b", "label": 1}) == "prompt_completion"
    assert detect_format({"messages": CHAT, "label": None}) == "chat"
    # Preference and text rows are never rated.
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c", "label": True}) \
        == "preference"
    assert detect_format({"text": "doc", "label": True}) == "text"


def test_rated_label_and_example() -> None:
    row = {"prompt": "2+2=", "completion": "5", "label": False, "id": 7}
    assert validate_row(row, "rated") == []
    record = clean_record(row, "rated")
    assert record == {"prompt": "2+2=", "completion": "5", "label": False}
    assert rated_label(record) is False
    assert rated_label(clean_record({"messages": CHAT, "label": True}, "rated")) is True
    with pytest.raises(ValueError, match="not a rated record"):
        rated_label({"prompt": "2+2=", "completion": "4"})
    with pytest.raises(ValueError, match="not a rated record"):
        rated_label({"prompt": "2+2=", "completion": "4", "label": "yes"})
    # The same answer labelled the other way is another record, not a duplicate.
    assert record_key(record) != record_key({**record, "label": True})


def test_rated_row_problems() -> None:
    def codes(row: dict) -> list[tuple[str, str]]:
        return [(p.field, p.code) for p in validate_row(row, "rated")]

    assert codes({"prompt": "a", "completion": "", "label": True}) == [("completion", "empty")]
    assert codes({"prompt": "a", "completion": "b"}) == [("label", "missing_field")]
    [problem] = validate_row({"prompt": "a", "completion": "b", "label": "yes"}, "rated")
    assert (problem.field, problem.code) == ("label", "wrong_type")
    assert "true or false" in problem.reason and '"yes"' in problem.reason
    assert codes({"messages": [{"role": "user", "content": "x"}], "label": True}) == [
        ("messages[0].role", "bad_chat")]


def test_rated_records_make_examples(tiny_model: Path) -> None:
    tok = load_tokenizer(tiny_model)
    ex = to_example({"prompt": "2+2=", "completion": "5", "label": False}, tok)
    assert ex == Example(prompt="2+2=", completion="5")
    chat = to_example({"messages": CHAT, "label": True}, tok)
    assert chat.completion == "It ships tomorrow." and "Where is my parcel?" in chat.prompt
    prompt_len, total = token_length({"messages": CHAT, "label": True}, tok)
    assert 0 < prompt_len < total


def test_a_rated_file_is_a_kto_version_with_label_counts(workspace: Workspace,
                                                         tmp_path: Path) -> None:
    f = write(tmp_path / "ratings.jsonl",
              *({"prompt": f"Ticket {i}: refund?", "completion": "billing", "label": i % 3 != 0}
                for i in range(12)),
              {"prompt": "Ticket x", "completion": "billing", "label": "good"},  # 13: bad label
              {"prompt": "Ticket y", "completion": "billing"},                   # 14: no label
              {"prompt": "Ticket z", "chosen": "billing", "rejected": "shipping"})  # 15: a pair
    result = add_files(workspace, [f])
    [version] = result.versions
    assert version.kind == "kto" and version.counts["total"] == 12
    assert version.report["labels"] == {"desirable": 8, "undesirable": 4}
    rejects = [json.loads(line) for line in result.rejected_path.read_text().splitlines()]
    assert [(r["file"], r["line"], r["field"], r["code"]) for r in rejects] == [
        ("ratings.jsonl", 13, "label", "wrong_type"),
        ("ratings.jsonl", 14, "label", "missing_field"),
        ("ratings.jsonl", 15, "", "wrong_format"),
    ]
    assert "the file is rated" in rejects[2]["reason"]


def test_a_preference_pair_with_the_same_answer_twice_is_rejected(tmp_path: Path) -> None:
    f = write(tmp_path / "pairs.jsonl",
              {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
              {"prompt": "Say hi", "chosen": "Hello  there", "rejected": " Hello there\n"},
              {"prompt": "Say bye", "chosen": "Bye!", "rejected": "Go away."})
    r = validate_file(f)
    assert problems(r) == [(2, "rejected", "same_answers")]
    assert r.rejects[0].file == "pairs.jsonl"
    assert "put the worse answer in 'rejected' or drop the row" in r.rejects[0].reason
    assert [rec["chosen"] for rec in r.records] == ["Hi!", "Bye!"]  # the others are kept

    only = write(tmp_path / "same.jsonl", {"prompt": "p", "chosen": "a", "rejected": "a"})
    with pytest.raises(DataError, match=r"(?s)same\.jsonl has no valid row.*line 1: rejected: "
                                        r"'chosen' and 'rejected' are the same answer"):
        validate_file(only)


def test_an_empty_text_document_is_rejected_with_its_line(tmp_path: Path) -> None:
    f = write(tmp_path / "docs.jsonl", {"text": "A document."}, {"text": "  \n "},
              {"text": "Another one."})
    r = validate_file(f)
    assert problems(r) == [(2, "text", "empty")] and r.rejects[0].file == "docs.jsonl"
    assert len(r.records) == 2
    with pytest.raises(DataError, match=r"(?s)blank\.jsonl has no valid row.*line 1: text: "
                                        r"'text' is empty; write the text or drop the row"):
        validate_file(write(tmp_path / "blank.jsonl", {"text": " "}))


def test_a_txt_file_that_is_not_utf8_is_refused_with_the_byte_offset(
    workspace: Workspace, tmp_path: Path
) -> None:
    f = tmp_path / "book.txt"
    f.write_bytes(b"First paragraph.\n\nCaf" + b"\xe9 au lait.\n")
    with pytest.raises(DataError, match=r"(?s)book\.txt is not UTF-8: byte 0xe9 at offset 21 "
                                        r"\(line 3\).*iconv -f latin1 -t utf-8 book\.txt > "
                                        r"book\.utf8\.txt"):
        add_files(workspace, [f])
    assert not workspace.datasets_dir.is_dir() or not any(workspace.datasets_dir.iterdir())


def test_a_file_mixing_formats_keeps_its_first_format_and_rejects_the_rest(
    tmp_path: Path,
) -> None:
    f = write(tmp_path / "mixed.jsonl",
              {"prompt": "a", "completion": "b", "label": True},      # rated: the file's format
              {"prompt": "c", "completion": "d"},                     # 2 no label
              {"prompt": "e", "chosen": "f", "rejected": "g"},        # 3 preference
              {"text": "h"},                                          # 4 text
              {"messages": CHAT, "label": False})                     # 5 rated chat: kept
    r = validate_file(f)
    assert r.format == "rated" and len(r.records) == 2
    assert problems(r) == [(2, "label", "missing_field"), (3, "", "wrong_format"),
                           (4, "", "wrong_format")]
    assert "row is preference but the file is rated" in r.rejects[1].reason
    assert "put each format in its own file" in r.rejects[1].reason

    sft = write(tmp_path / "sft.jsonl", {"input": "a", "output": "b"},
                {"prompt": "c", "completion": "d", "label": False})
    r = validate_file(sft)
    assert r.format == "input_output" and problems(r) == [(2, "", "wrong_format")]
