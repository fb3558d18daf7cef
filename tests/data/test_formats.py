"""Record formats: detection and per-row checks.  Run: pytest tests/data/test_formats.py"""

from __future__ import annotations

import pytest

from evertune.data.formats import (
    FORMATS,
    KIND,
    clean_record,
    detect_format,
    normalize_record,
    read_txt_records,
    record_key,
    validate_row,
)

GOOD = {
    "input_output": {"input": "2+2?", "output": "4"},
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "chat": {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]},
    "preference": {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
    "rated": {"prompt": "2+2=", "completion": "5", "label": False},
    "text": {"text": "Some document."},
}


def codes(row, fmt):
    return [(p.field, p.code) for p in validate_row(row, fmt)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_good_rows_detect_and_validate(fmt):
    assert detect_format(GOOD[fmt]) == fmt
    assert validate_row(GOOD[fmt], fmt) == []
    assert KIND[fmt] in ("sft", "dpo", "pretrain", "kto")


def test_detection_precedence_and_unknown():
    # A preference row also has "prompt": it must not be read as prompt/completion.
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c", "completion": "d"}) \
        == "preference"
    assert detect_format({"prompt": "a"}) is None
    assert detect_format({"question": "a", "answer": "b"}) is None
    assert detect_format(["input", "output"]) is None  # type: ignore[arg-type]


def test_extra_keys_are_allowed_and_dropped():
    row = {"input": "a", "output": "b", "id": 7, "meta": {"x": 1}}
    assert validate_row(row, "input_output") == []
    assert clean_record(row, "input_output") == {"input": "a", "output": "b"}
    chat = {"messages": [{"role": "user", "content": "a", "name": "bob"},
                         {"role": "assistant", "content": "b"}], "id": 1}
    assert clean_record(chat, "chat") == {"messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]}


def test_flat_format_problems_are_all_reported():
    assert codes({"input": "  \n", "output": 4}, "input_output") == [
        ("input", "empty"), ("output", "wrong_type")]
    assert codes({"prompt": "x"}, "preference") == [
        ("chosen", "missing_field"), ("rejected", "missing_field")]
    assert codes({"text": None}, "text") == [("text", "wrong_type")]
    assert codes([1, 2], "text") == [("", "not_object")]
    reason = validate_row({"input": "a", "output": [1]}, "input_output")[0].reason
    assert reason == "'output' must be a string, got array"


def test_chat_problems():
    assert codes({"messages": "hi"}, "chat") == [("messages", "wrong_type")]
    assert codes({"messages": []}, "chat") == [("messages", "empty")]
    assert codes({"messages": [{"role": "bot", "content": "x"}, "oops"]}, "chat") == [
        ("messages[0].role", "unknown_role"), ("messages[1]", "wrong_type")]
    assert codes({"messages": [{"content": "x"}, {"role": "assistant", "content": ""}]}, "chat") \
        == [("messages[0].role", "missing_field"), ("messages[1].content", "empty")]
    # No assistant reply last: nothing to learn.
    assert codes({"messages": [{"role": "user", "content": "x"}]}, "chat") == [
        ("messages[0].role", "bad_chat")]
    assert codes({"messages": [{"role": "assistant", "content": "x"}]}, "chat") == [
        ("messages", "bad_chat")]
    late_system = {"messages": [{"role": "user", "content": "x"},
                                {"role": "system", "content": "y"},
                                {"role": "assistant", "content": "z"}]}
    assert codes(late_system, "chat") == [("messages[1].role", "bad_chat")]


def test_normalisation_is_whitespace_only_and_nested():
    a = {"messages": [{"role": "user", "content": " Hi\n there "},
                      {"role": "assistant", "content": "ok"}]}
    b = {"messages": [{"content": "Hi there", "role": "user"},
                      {"role": "assistant", "content": "ok\t"}]}
    assert record_key(a) == record_key(b)
    assert normalize_record({"text": "a\n\n b"}) == {"text": "a b"}
    assert record_key({"text": "a b"}) != record_key({"text": "A b"})


def test_txt_paragraphs_with_first_line_numbers():
    text = "first para\nline two\n\n\n  \nsecond\n\nthird\n"
    assert read_txt_records(text) == [(1, "first para\nline two"), (6, "second"), (8, "third")]
