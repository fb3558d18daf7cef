"""One file: file-level errors raise, row problems are collected with line numbers.

    pytest tests/data/test_validate.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evertune.data.validate import validate_file
from evertune.errors import DataError
from evertune.models import load_tokenizer


def write(path: Path, *lines: object) -> Path:
    """A JSONL file: dicts/lists are dumped, strings written as they are (to inject bad JSON)."""
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines), "utf-8")
    return path


def problems(result):
    return [(r.line, r.field, r.code) for r in result.rejects]


def test_input_output_with_bad_rows(tmp_path):
    f = write(tmp_path / "drop.jsonl",
              {"input": "a", "output": "b", "id": 1},       # 1 ok (extra key ignored)
              '{"input": "a", "output": ',                  # 2 malformed JSON
              {"input": "c"},                               # 3 missing output
              "",                                           # 4 blank: skipped, not a reject
              {"input": " ", "output": 5},                  # 5 empty + wrong type
              ["input", "output"],                          # 6 not an object
              {"input": "d", "output": "e"})                # 7 ok
    r = validate_file(f)
    assert r.format == "input_output" and r.kind == "sft"
    assert r.records == [{"input": "a", "output": "b"}, {"input": "d", "output": "e"}]
    assert r.lines == [1, 7]
    assert problems(r) == [(2, "", "invalid_json"), (3, "output", "missing_field"),
                           (5, "input", "empty"), (5, "output", "wrong_type"),
                           (6, "", "not_object")]
    assert r.rows == 6 and r.rejected_rows == 4
    bad_json = r.rejects[0]
    assert bad_json.row == '{"input": "a", "output": ' and "not valid JSON" in bad_json.reason
    assert r.rejects[1].row == {"input": "c"} and r.rejects[1].reason == "missing field 'output'"
    assert r.rejects[3].reason == "'output' must be a string, got number"


def test_chat_preference_and_text_rows(tmp_path):
    chat = write(tmp_path / "chat.jsonl",
                 {"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "yo"}]},
                 {"messages": [{"role": "robot", "content": "hi"},
                               {"role": "assistant", "content": "yo"}]},
                 {"messages": [{"role": "user", "content": "hi"}]})
    r = validate_file(chat)
    assert r.format == "chat"
    assert problems(r) == [(2, "messages[0].role", "unknown_role"),
                           (3, "messages[0].role", "bad_chat")]
    pref = write(tmp_path / "pref.jsonl", {"prompt": "p", "chosen": "a", "rejected": "b"},
                 {"prompt": "p", "chosen": "a", "rejected": ""})
    r = validate_file(pref)
    assert (r.format, r.kind, problems(r)) == ("preference", "dpo", [(2, "rejected", "empty")])
    text = write(tmp_path / "text.jsonl", {"text": "doc one"}, {"text": 3})
    r = validate_file(text)
    assert (r.format, r.kind, problems(r)) == ("text", "pretrain", [(2, "text", "wrong_type")])


def test_txt_file_is_paragraphs(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("Para one\ncontinues.\n\nPara two.\n\n\n\nPara three.\n", "utf-8")
    r = validate_file(f)
    assert r.format == "text"
    assert r.records == [{"text": "Para one\ncontinues."}, {"text": "Para two."},
                         {"text": "Para three."}]
    assert r.lines == [1, 4, 8]


def test_format_comes_from_first_valid_row_and_others_are_rejected(tmp_path):
    f = write(tmp_path / "mixed.jsonl",
              {"input": "", "output": "x"},                 # invalid: does not decide the format
              {"prompt": "p", "completion": "c"},           # first valid row: prompt_completion
              {"input": "i", "output": "o"},                # another format: rejected
              {"prompt": "p2"})                             # missing completion
    r = validate_file(f)
    assert r.format == "prompt_completion"
    assert problems(r) == [(1, "", "wrong_format"), (3, "", "wrong_format"),
                           (4, "completion", "missing_field")]
    assert "row is input_output but the file is prompt_completion" in r.rejects[1].reason


def test_oversize_row_is_rejected_with_its_line(tmp_path):
    f = write(tmp_path / "big.jsonl", {"text": "ok"}, {"text": "x" * 3000}, {"text": "fine"})
    r = validate_file(f, max_row_kb=1)
    assert problems(r) == [(2, "", "row_too_large")]
    assert len(r.rejects[0].row) < 300  # only a preview is kept
    assert r.records == [{"text": "ok"}, {"text": "fine"}]


def test_bom_and_crlf_are_fine(tmp_path):
    f = tmp_path / "win.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert validate_file(f).records == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"not UTF-8: byte 0xe9 at offset 28 \(line 2\)"),
        (b'[{"text": "a"},\n {"text": "b"}]', "is a JSON array, not JSON Lines.*jq -c"),
        (b'{\n  "text": "a"\n}\n', "one multi-line JSON object, not JSON Lines"),
        (b"just some prose\nin a jsonl file\n", "is not JSON Lines: no line is a JSON value"),
        (b'{"question": "a", "answer": "b"}\n',
         r"no row of a known format.*\['answer', 'question'\]"),
        (b'{"input": "", "output": "b"}\n{"input": "a"}\n',
         r"(?s)no valid row \(input_output format\).*line 1: input: 'input' is empty"
         r".*line 2: output: missing field 'output'"),
    ],
)
def test_file_level_errors_name_the_file(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        validate_file(f)
    assert str(f) in str(err.value)


def test_size_limit_and_missing_file(tmp_path):
    f = write(tmp_path / "d.jsonl", *[{"text": "x" * 100}] * 20)
    with pytest.raises(DataError, match=r"over data.max_file_mb=0.001; split it"):
        validate_file(f, max_file_mb=0.001)
    with pytest.raises(DataError, match="does not exist"):
        validate_file(tmp_path / "nope.jsonl")


def test_overlong_rows_rejected_or_truncated(tmp_path, tiny_model):
    tok = load_tokenizer(tiny_model)
    long_answer = "the quick brown fox jumps " * 40
    f = write(tmp_path / "d.jsonl", {"input": "hi", "output": "short"},
              {"input": "hi", "output": long_answer},
              {"input": "hi " * 200, "output": "x"})
    r = validate_file(f, tokenizer=tok, max_seq_len=64)
    assert problems(r) == [(2, "", "too_long"), (3, "", "too_long")]
    assert "over data.max_seq_len=64" in r.rejects[0].reason
    assert r.truncated == 0 and len(r.token_lengths) == 1

    r = validate_file(f, tokenizer=tok, max_seq_len=64, overlong="truncate")
    # The answer is cut at training time; a prompt that alone is too long cannot be saved.
    assert problems(r) == [(3, "", "too_long")] and "prompt alone" in r.rejects[0].reason
    assert r.truncated == 1
    assert r.records[1] == {"input": "hi", "output": long_answer}  # stored whole
    assert r.token_lengths[1] == 64

    # Without a tokenizer the length check is skipped.
    assert validate_file(f).rejects == []


def test_answers_users_rated_down_are_rejected_not_trained_on(tmp_path):
    from evertune.monitoring.feedback import build_record

    served = {"endpoint": "chat", "prompt": [{"role": "user", "content": "Where is my parcel?"}],
              "completion": "No idea.", "version": "v3", "model": "assistant@prod"}
    f = write(tmp_path / "feedback.jsonl",
              build_record(served, response_id="chatcmpl-1", rating=1, correction=None),
              build_record(served, response_id="chatcmpl-2", rating=-1, correction=None),
              build_record(served, response_id="chatcmpl-3", rating=-1, correction="shipping"))
    r = validate_file(f)
    assert problems(r) == [(2, "feedback.label", "negative_feedback")]
    assert "correction" in r.rejects[0].reason
    assert [rec["messages"][-1]["content"] for rec in r.records] == ["No idea.", "shipping"]

    # A feedback object holding only a rated-down answer is no training data at all.
    only = write(tmp_path / "down.jsonl",
                 build_record(served, response_id="chatcmpl-4", rating=-1, correction=None))
    with pytest.raises(DataError, match="line 1: feedback.label: a user rated"):
        validate_file(only)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("x.jsonl", b'[{"text": "a"},\n {"text": "b"}]'),
        ("x.json", b'[{"text": "a"},\n {"text": "b"}]'),
        ("x.jsonl", b'{\n  "text": "a"\n}\n'),
        ("x.jsonl", b'{"text": "caf\xe9"}\n'),
    ],
)
def test_suggested_fix_never_overwrites_the_input(tmp_path, name, content):
    """Following the hint (`cmd x.jsonl > x.jsonl`) must not empty the user's file: the
    suggested command writes to a new file, and running it leaves the input as it was."""
    import re
    import shutil
    import subprocess

    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError) as err:
        validate_file(f)
    commands = [c for c in re.findall(r"`([^`]*)`", str(err.value)) if ">" in c]
    assert commands, f"no conversion command in: {err.value}"
    for command in commands:
        target = command.rsplit(">", 1)[1].strip()
        assert target and target != name, f"{command!r} overwrites its input {name}"
        tool = command.split()[0]
        if shutil.which(tool):  # run it for real where the tool is installed
            subprocess.run(command, shell=True, cwd=tmp_path, check=True)
            assert f.read_bytes() == content
            assert (tmp_path / target).stat().st_size > 0
