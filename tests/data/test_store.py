"""Dataset versions on disk: identity, rejects, union, golden set.

    pytest tests/data/test_store.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evertune.data.split import SPLITS
from evertune.data.store import (
    add_files,
    get_dataset,
    list_datasets,
    load_golden,
    training_dataset,
)
from evertune.errors import DataError, NotFoundError
from evertune.models import load_tokenizer


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    "utf-8")
    return path


def io_rows(n: int, start: int = 0) -> list[dict]:
    return [{"input": f"question {i}", "output": f"answer {i}"} for i in range(start, start + n)]


def all_records(version) -> list[dict]:
    return [r for s in SPLITS for r in version.records(s)]


def test_add_stores_a_version_with_report_and_rejects(workspace, tmp_path):
    rows = [*io_rows(20), {"input": "question 3", "output": " answer  3 "},  # duplicate
            '{"input": broken', {"input": "x"}, {"input": "", "output": 7}]
    result = add_files(workspace, [write(tmp_path / "drop.jsonl", rows)])

    [ds] = result.versions
    assert ds.id.startswith("ds-") and len(ds.id) == 19 and ds.id[3:] == ds.sha256[:16]
    assert ds.kind == "sft" and ds.path == workspace.datasets_dir / ds.id
    assert sorted(p.name for p in ds.path.iterdir()) == [
        "rejected.jsonl", "report.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    assert ds.counts["total"] == 20 == sum(ds.counts[s] for s in SPLITS)
    assert ds.counts["train"] > ds.counts["test"]
    assert sorted(all_records(ds), key=str) == sorted(io_rows(20), key=str)

    report = json.loads((ds.path / "report.json").read_text())
    assert report["duplicates_dropped"] == 1 and report["rejected"] == 3
    assert report["rejects_by_reason"] == {"invalid_json": 1, "missing_field": 1, "empty": 1,
                                           "wrong_type": 1}
    assert report["formats"] == ["input_output"] and report["origin"] == "upload"
    assert report["sources"][0]["file"] == "drop.jsonl"
    assert len(report["sources"][0]["sha256"]) == 64
    assert report["token_lengths"] is None  # no tokenizer given

    assert result.rejected == 3 and result.rejected_path == ds.path / "rejected.jsonl"
    lines = [json.loads(x) for x in result.rejected_path.read_text().splitlines()]
    assert [(x["file"], x["line"], x["field"], x["code"]) for x in lines] == [
        ("drop.jsonl", 22, "", "invalid_json"), ("drop.jsonl", 23, "output", "missing_field"),
        ("drop.jsonl", 24, "input", "empty"), ("drop.jsonl", 24, "output", "wrong_type")]
    assert lines[1] == {"file": "drop.jsonl", "line": 23, "field": "output",
                        "code": "missing_field", "reason": "missing field 'output'",
                        "row": {"input": "x"}}
    assert lines[0]["row"] == '{"input": broken'
    assert result.report["files"][0] | {"sha256": None} == {
        "file": "drop.jsonl", "sha256": None, "format": "input_output", "kind": "sft",
        "rows": 24, "accepted": 21, "rejected": 3, "truncated": 0}


def test_same_content_is_the_same_version(workspace, tmp_path):
    rows = io_rows(10)
    first = add_files(workspace, [write(tmp_path / "a.jsonl", rows)]).versions[0]
    # Other order, other whitespace, extra keys, split over two files: same content.
    shuffled = [{"output": f" {r['output']}  ", "input": r["input"].replace(" ", "\t"), "id": i}
                for i, r in enumerate(reversed(rows))]
    again = add_files(workspace, [write(tmp_path / "b.jsonl", shuffled[:4]),
                                  write(tmp_path / "c.jsonl", shuffled[4:])]).versions[0]
    assert again.id == first.id and again.created_at == first.created_at
    assert [v.id for v in list_datasets(workspace)] == [first.id]

    other = add_files(workspace, [write(tmp_path / "d.jsonl", io_rows(11))]).versions[0]
    assert other.id != first.id
    assert [v.id for v in list_datasets(workspace)] == [other.id, first.id]  # newest first


def test_readd_with_other_bad_rows_keeps_the_version_untouched(workspace, tmp_path):
    first = add_files(workspace, [write(tmp_path / "a.jsonl", [*io_rows(5), {"input": "x"}])])
    before = (first.versions[0].path / "rejected.jsonl").read_text()
    again = add_files(workspace, [write(tmp_path / "a.jsonl", [*io_rows(5), "nope"])])
    assert again.versions[0].id == first.versions[0].id
    assert (first.versions[0].path / "rejected.jsonl").read_text() == before
    assert again.rejected_path is not None and again.rejected_path.name.startswith("rejected-")
    assert json.loads(again.rejected_path.read_text())["code"] == "invalid_json"


def test_one_version_per_kind(workspace, tmp_path):
    sft = write(tmp_path / "sft.jsonl", io_rows(5))
    dpo = write(tmp_path / "dpo.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"}
                                         for i in range(5)])
    txt = tmp_path / "book.txt"
    txt.write_text("One.\n\nTwo.\n", "utf-8")
    result = add_files(workspace, [sft, dpo, txt])
    assert [v.kind for v in result.versions] == ["sft", "dpo", "pretrain"]
    assert result.versions[2].counts["total"] == 2


def test_a_broken_file_stores_nothing_and_all_errors_are_listed(workspace, tmp_path):
    good = write(tmp_path / "good.jsonl", io_rows(5))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"(?s)2 files cannot be used.*empty.jsonl is empty"
                                        r".*latin.jsonl is not UTF-8"):
        add_files(workspace, [good, empty, latin])
    assert list_datasets(workspace) == []


def test_token_stats_with_a_tokenizer(workspace, tmp_path, tiny_model):
    tok = load_tokenizer(tiny_model)
    rows = [*io_rows(30), {"input": "hi", "output": "word " * 400}]
    result = add_files(workspace, [write(tmp_path / "a.jsonl", rows)], tokenizer=tok)
    report = result.versions[0].report
    stats = report["token_lengths"]
    assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["max"] <= 128
    assert sum(stats["histogram"]["counts"]) == 30
    assert len(stats["histogram"]["bins"]) == len(stats["histogram"]["counts"]) + 1
    assert report["rejects_by_reason"] == {"too_long": 1} and report["max_seq_len"] == 128


def test_cumulative_union_and_latest(workspace, tmp_path):
    a = add_files(workspace, [write(tmp_path / "a.jsonl", io_rows(30))]).versions[0]
    assert training_dataset(workspace).id == a.id  # one drop is its own union
    b = add_files(workspace, [write(tmp_path / "b.jsonl", io_rows(30, start=20))]).versions[0]

    union = training_dataset(workspace, kind="sft")
    assert union.origin == "union" and union.report["union_of"] == [a.id, b.id]
    assert union.counts["total"] == 50 and union.report["duplicates_dropped"] == 10
    # Every record sits in the split it had in its drop.
    for v in (a, b):
        for s in SPLITS:
            assert all(r in union.records(s) for r in v.records(s))
    assert training_dataset(workspace).id == union.id  # content-addressed: built once
    assert len(list_datasets(workspace)) == 3

    workspace.config.data.mode = "latest"
    assert training_dataset(workspace).id == b.id  # unions never count as the latest drop
    assert training_dataset(workspace, ref=a.id[:8]).id == a.id
    with pytest.raises(NotFoundError, match="no dpo dataset yet"):
        training_dataset(workspace, kind="dpo")


def test_get_dataset_by_prefix(workspace, tmp_path):
    ds = add_files(workspace, [write(tmp_path / "a.jsonl", io_rows(3))]).versions[0]
    assert get_dataset(workspace, ds.id).id == ds.id
    assert get_dataset(workspace, ds.id[:6]).id == ds.id
    assert get_dataset(workspace, ds.id[3:9]).id == ds.id  # "ds-" is optional
    with pytest.raises(NotFoundError, match=f"no dataset 'ds-zzz'; known datasets: {ds.id}"):
        get_dataset(workspace, "ds-zzz")


def test_half_written_versions_are_invisible(workspace, tmp_path):
    (workspace.datasets_dir / ".tmp-ds-0123456789abcdef-x").mkdir(parents=True)
    (workspace.datasets_dir / "ds-0123456789abcdef").mkdir()  # no report.json
    assert list_datasets(workspace) == []
    with pytest.raises(NotFoundError):
        training_dataset(workspace)


def test_golden_set_is_loaded_and_never_trained_on(workspace, tmp_path):
    assert load_golden(workspace) is None
    golden = write(workspace.root / "golden.jsonl", io_rows(3))
    workspace.config.data.golden_set = "golden.jsonl"
    assert load_golden(workspace) == io_rows(3)

    result = add_files(workspace, [write(tmp_path / "a.jsonl", io_rows(10))])
    ds = result.versions[0]
    assert ds.counts["total"] == 7 and ds.report["in_golden_set"] == 3
    assert not any(r in all_records(ds) for r in io_rows(3))

    write(golden, [*io_rows(3), {"input": "x"}])
    with pytest.raises(DataError, match=r"(?s)golden set .* has 1 bad row.*line 4: output"):
        load_golden(workspace)
