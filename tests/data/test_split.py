"""Dedup and hash split: a record's split never depends on its neighbours.

    pytest tests/data/test_split.py
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from evertune.config import SplitArgs
from evertune.data.split import SPLITS, dedup, split_of, split_records

RATIOS = SplitArgs()  # 0.8 / 0.1 / 0.1


def records(n: int, start: int = 0) -> list[dict]:
    return [{"input": f"question {i}", "output": f"answer {i}"} for i in range(start, start + n)]


def assignment(recs: list[dict]) -> dict[str, str]:
    return {r["input"]: s for s, rs in split_records(recs, RATIOS).items() for r in rs}


def test_dedup_after_whitespace_normalisation():
    recs = [{"input": "a  b", "output": "c"}, {"input": " a b\n", "output": "c "},
            {"input": "a b", "output": "C"}, {"input": "a b", "output": "c"}]
    unique, dropped = dedup(recs)
    assert dropped == 2
    assert unique == [recs[0], recs[2]]  # first occurrence kept, original text untouched


def test_dedup_normalises_every_string_of_chat_and_preference():
    chat = [{"messages": [{"role": "user", "content": "hi  there"},
                          {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi there"},
                          {"role": "assistant", "content": " yo\n"}]}]
    pref = [{"prompt": "p", "chosen": "a  b", "rejected": "c"},
            {"prompt": " p", "chosen": "a b", "rejected": "c\t"}]
    assert dedup(chat)[1] == 1 and dedup(pref)[1] == 1
    assert split_of(chat[0], RATIOS) == split_of(chat[1], RATIOS)


def test_split_is_deterministic_and_follows_ratios():
    recs = records(2000)
    first = split_records(recs, RATIOS)
    # Input order does not matter (only the order inside each split follows the input).
    assert assignment(recs) == assignment(list(reversed(recs)))
    sizes = {s: len(first[s]) for s in SPLITS}
    assert sum(sizes.values()) == 2000
    assert 1500 < sizes["train"] < 1700 and 140 < sizes["validation"] < 260 \
        and 140 < sizes["test"] < 260
    everything_train = SplitArgs(train=1.0, validation=0.0, test=0.0)
    assert {split_of(r, everything_train) for r in recs} == {"train"}


@settings(max_examples=50, deadline=None)
@given(
    base=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=30, unique=True),
    extra=st.lists(st.text(min_size=1, max_size=20), max_size=30, unique=True),
)
def test_a_record_keeps_its_split_when_others_come_and_go(base, extra):
    def recs(texts):
        return [{"text": t} for t in texts]

    def where(texts):
        return {r["text"]: s for s, rs in split_records(recs(texts), RATIOS).items() for r in rs}

    alone = where(base)
    grown = where(base + extra)
    shrunk = where(base[: len(base) // 2])
    for t, s in alone.items():
        assert grown[t] == s
    for t, s in shrunk.items():
        assert alone[t] == s
