"""The LLM judge (eval.judge): pytest tests/evaluation/test_judge.py

Evertune's own OpenAI-compatible gateway over the tiny model is the judge, on a loopback
uvicorn server: its verdicts are noise, so those tests check the plumbing and robustness
(every score a number in 0..1 or NaN with the raw text kept, both orders asked, clear errors,
the gate using the scores). A scripted judge on the same loopback plumbing checks the
arithmetic a real judge's verdicts go through (normalising, position swap, retries).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from evertune.config import JudgeArgs
from evertune.errors import JudgeError
from evertune.evaluation import judge as judge_module
from evertune.evaluation.judge import JudgeOutcome, judge_split, parse_score, parse_winner
from evertune.workspace import Workspace
from tests.api.helpers import TICKETS, write_jsonl
from tests.conftest import make_workspace
from tests.evaluation.test_evaluate import make_adapter
from tests.serving import fixtures as serving
from tests.serving.fixtures import app_for, free_port, new_gateway, run_server, serving_workspace

# The serving tests' fixtures, used here as tests/serving/conftest.py uses them: a tiny model
# whose answers depend on the prompt, and a migrated MLflow DB for the gateway's registry.
lively_model = serving.lively_model
mlflow_template = serving.mlflow_template

KEY_ENV = "EVERTUNE_TEST_JUDGE_KEY"
PROMPTS = ["Route ticket 1: my card was charged twice.", "Route ticket 2: I cannot log in.",
           "Route ticket 3: the package has not arrived."]
EXPECTED = ["billing", "account", "shipping"]
ANSWERS = {
    "candidate": ["billing", "the account team", "shipping, I think"],
    "reference": ["returns", "account", "no idea"],
    "base": ["billing billing", "technical", "shipping"],
}


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "score"), [
    ('{"score": 7}', 7.0),
    ('Here is my verdict:\n```json\n{"reason": "close", "score": "8"}\n```', 8.0),
    ('{"note": "first object has no score"} then {"Score": 2.5}', 2.5),
    ("Score: 6/10", 6.0),
    ("9", 9.0),
    ('<think>a score of 2 seems harsh</think>{"score": 5}', 5.0),
])
def test_parse_score_reads_json_and_plain_forms(text: str, score: float) -> None:
    assert parse_score(text) == (score, None)


@pytest.mark.parametrize(("text", "problem"), [
    ("I liked this answer a lot.", "no score found"),
    ("", "no score found"),
    ('{"score": 11}', "outside 1-10"),
    ('{"score": 0}', "outside 1-10"),
    ('{"score": null}', '"score" is null'),
    ('{"score": "high"}', '"score" is "high"'),
    ('{"score": true}', '"score" is true'),
    ("\x00\ufffd{{{{ ]]] score:", "no score found"),
])
def test_parse_score_reports_why_it_found_none(text: str, problem: str) -> None:
    score, why = parse_score(text)
    assert score is None and why is not None and problem in why


@pytest.mark.parametrize(("text", "winner"), [
    ('{"winner": "A"}', "A"),
    ('After some thought: {"winner": "b"}.', "B"),
    ('{"winner": "Tie"}', "tie"),
    ("Winner: B", "B"),
    ("The winner is answer A because it is shorter.", "A"),
    ("[[A]]", "A"),
    ("[[C]]", "tie"),
    ("**B**", "B"),
    ("tie", "tie"),
])
def test_parse_winner_reads_json_and_plain_forms(text: str, winner: str) -> None:
    assert parse_winner(text) == (winner, None)


@pytest.mark.parametrize("text", [
    "the winner is a close call",  # "a" in prose is no verdict
    '{"winner": "both"}',
    "A or B, hard to say",
    "zzzz ]]}{ qq",
    "",
])
def test_parse_winner_garbage_is_no_verdict(text: str) -> None:
    winner, why = parse_winner(text)
    assert winner is None and why


# -- Evertune's own serving endpoint as the judge ---------------------------------------------


@pytest.fixture(scope="module")
def judge_server(
    tmp_path_factory: pytest.TempPathFactory, lively_model: Path, mlflow_template: Path
) -> Iterator[tuple[str, str]]:
    """(base URL, serving key) of a gateway over the lively tiny model; nothing promoted, so
    `assistant` is the base model. A serving key exists, so requests without it get 401."""
    ws = serving_workspace(tmp_path_factory.mktemp("judge") / "ws", lively_model, mlflow_template)
    key = ws.create_token("judge", "serving")
    gateway = new_gateway(ws)
    gateway.start()
    try:
        with run_server(app_for(gateway)) as url:
            yield f"{url}/v1", key
    finally:
        gateway.stop()


@pytest.fixture
def judge(judge_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> JudgeArgs:
    url, key = judge_server
    monkeypatch.setenv(KEY_ENV, key)
    # 8 tokens: the tiny model's verdict is noise however long; short keeps the test fast.
    return JudgeArgs(base_url=url, model="assistant", api_key_env=KEY_ENV, max_tokens=8,
                     concurrency=2, timeout_s=60)


def assert_well_formed(outcome: JudgeOutcome, roles: list[str], reference_role: str) -> None:
    """Every score in 0..1 or NaN, and a NaN always has the judge's raw text and the reason."""
    n = len(outcome.raw)
    assert set(outcome.scores) == set(roles)
    for role in roles:
        metrics = {"judge_score"} | ({"judge_preference"}
                                     if role in ("candidate", reference_role) else set())
        assert set(outcome.scores[role]) == metrics
        for values in outcome.scores[role].values():
            assert len(values) == n
            assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in values)
    for i, record in enumerate(outcome.raw):
        json.dumps(record, allow_nan=False)  # goes into report.json as it is
        for role in roles:
            entry = record["score"][role]
            assert isinstance(entry["raw"], str)  # the judge answered every call
            if math.isnan(outcome.scores[role]["judge_score"][i]):
                assert entry["problem"]
            else:
                assert outcome.scores[role]["judge_score"][i] == entry["value"]
        cand = outcome.scores["candidate"]["judge_preference"][i]
        ref = outcome.scores[reference_role]["judge_preference"][i]
        assert (math.isnan(cand) and math.isnan(ref)) or cand + ref == 1.0
        if math.isnan(cand):
            assert record["preference"]["problem"]


def test_serving_endpoint_as_judge(judge: JudgeArgs) -> None:
    seen: list[tuple[int, int]] = []
    outcome = judge_split(judge, PROMPTS, EXPECTED, ANSWERS, "reference",
                          progress=lambda done, total: seen.append((done, total)))
    assert_well_formed(outcome, list(ANSWERS), "reference")
    # 3 roles scored + 2 orders per example; base's answer 3 equals no other, so none shared.
    total = 3 * 3 + 3 * 2
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    for record in outcome.raw:
        first, second = record["preference"]["orders"]
        # Both orders were really asked: the positions are swapped, each has the judge's text.
        assert (first["A"], first["B"]) == ("candidate", "reference")
        assert (second["A"], second["B"]) == ("reference", "candidate")
        assert isinstance(first["raw"], str) and isinstance(second["raw"], str)


def test_a_judge_that_is_down_fails_quickly_with_the_fix() -> None:
    down = JudgeArgs(base_url=f"http://127.0.0.1:{free_port()}/v1", model="judge-model")
    started = time.monotonic()
    with pytest.raises(JudgeError) as err:
        judge_split(down, PROMPTS, EXPECTED, ANSWERS, "reference")
    assert time.monotonic() - started < 15  # the retries' waits (2.5 s) and no more
    message = str(err.value)
    assert down.base_url in message and "'judge-model'" in message
    assert "cannot connect" in message and "after 3 attempts" in message
    assert "eval.judge.base_url" in message and "evertune runs retry RUN" in message


def test_a_missing_key_variable_is_named(
    judge: JudgeArgs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"environment variable {KEY_ENV} is not set"):
        judge_split(judge, PROMPTS, EXPECTED, ANSWERS, "reference")
    # A key pasted where its variable's name belongs is refused and never echoed.
    pasted = judge.model_copy(update={"api_key_env": "evt_s3cr3t-key"})
    with pytest.raises(JudgeError, match="not the key itself") as err:
        judge_split(pasted, PROMPTS, EXPECTED, ANSWERS, "reference")
    assert "s3cr3t" not in str(err.value)


def test_a_refused_key_and_an_unknown_model_are_clear_errors(
    judge: JudgeArgs, judge_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    one = {role: answers[:1] for role, answers in ANSWERS.items()}
    monkeypatch.setenv(KEY_ENV, "evt_not-a-key")
    with pytest.raises(JudgeError, match=rf"refused the API key \(HTTP 401.*{KEY_ENV}"):
        judge_split(judge, PROMPTS[:1], EXPECTED[:1], one, "reference")
    monkeypatch.setenv(KEY_ENV, judge_server[1])
    unknown = judge.model_copy(update={"model": "no-such-model"})
    with pytest.raises(JudgeError, match="404 Not Found.*check eval.judge.model"):
        judge_split(unknown, PROMPTS[:1], EXPECTED[:1], one, "reference")


# -- a scripted judge: the arithmetic -------------------------------------------------------


class ScriptedJudge:
    """An OpenAI-compatible chat endpoint whose verdicts follow the answers' words.

    Scores: an answer with "good" gets {"score": 10}, "bad" gets "Score: 1", anything else
    prose without a score. Pairs: the answer with "good" wins; otherwise the judge always
    says A (pure position bias). The first `fail_first` requests get 503; a prompt with
    "too long" gets 400, "forbidden" 401, and "slow" is answered after 2 s.
    """

    def __init__(self, fail_first: int = 0) -> None:
        self.prompts: list[str] = []
        self.fail_first = fail_first

    def app(self) -> Any:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            prompt = body["messages"][-1]["content"]
            self.prompts.append(prompt)
            if len(self.prompts) <= self.fail_first:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
            if "slow" in prompt:
                await asyncio.sleep(2)
            if "forbidden" in prompt:
                return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
            if "too long" in prompt:
                return JSONResponse({"error": {"message": "context length exceeded"}},
                                    status_code=400)
            return JSONResponse({"choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant",
                                                          "content": self.verdict(prompt)}}]})

        return app

    @staticmethod
    def verdict(prompt: str) -> str:
        if "[Answer A]" in prompt:
            a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", prompt, re.S)
            assert a is not None
            if "good" in a.group(1):
                return '{"winner": "A"}'
            b = prompt.split("[Answer B]\n", 1)[1]
            return 'Winner: B' if "good" in b.split("\n\n", 1)[0] else "[[A]]"
        answer = prompt.split("[Answer to judge]\n", 1)[1]
        if "good" in answer.split("\n\n", 1)[0]:
            return '{"score": 10}'
        if "bad" in answer.split("\n\n", 1)[0]:
            return "Score: 1"
        return "What a lovely answer."


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedJudge, JudgeArgs]]:
    script = ScriptedJudge()
    with run_server(script.app()) as url:
        yield script, JudgeArgs(base_url=f"{url}/v1", model="scripted", concurrency=3)


def test_scores_and_position_swapped_preferences(
    scripted: tuple[ScriptedJudge, JudgeArgs],
) -> None:
    script, judge = scripted
    outputs: dict[str, list[str | None]] = {
        "candidate": ["good answer", "meh one", "same", "bad answer", None],
        "base": ["bad answer", "meh two", "same", "good answer", "good answer"],
    }
    outcome = judge_split(judge, ["q"] * 5, ["e"] * 5, outputs, "base")
    cand, base = outcome.scores["candidate"], outcome.scores["base"]

    # 1-10 normalised to 0..1; prose without a score is NaN with its text and the reason.
    assert cand["judge_score"][0] == 1.0 and base["judge_score"][0] == 0.0
    assert math.isnan(cand["judge_score"][1])
    entry = outcome.raw[1]["score"]["candidate"]
    assert entry["raw"] == "What a lovely answer." and "no score found" in entry["problem"]

    # Preferred in both orders: 1 / 0; a judge that always says "A" disagrees with itself
    # once the positions swap: 0.5 for both.
    assert (cand["judge_preference"][0], base["judge_preference"][0]) == (1.0, 0.0)
    assert (cand["judge_preference"][3], base["judge_preference"][3]) == (0.0, 1.0)
    assert cand["judge_preference"][1] == base["judge_preference"][1] == 0.5
    orders = outcome.raw[1]["preference"]["orders"]
    assert [o["winner"] for o in orders] == ["A", "A"]
    assert [(o["A"], o["B"]) for o in orders] == [("candidate", "base"), ("base", "candidate")]

    # Identical answers are a tie without asking; a missing answer is NaN without asking.
    assert cand["judge_preference"][2] == 0.5
    assert "not asked" in outcome.raw[2]["preference"]["note"]
    assert math.isnan(cand["judge_score"][4]) and math.isnan(cand["judge_preference"][4])
    assert outcome.raw[4]["score"]["candidate"]["problem"] == "no answer to judge"
    assert outcome.scores["base"]["judge_score"][4] == 1.0

    # Each distinct prompt asked once: 5 distinct answers scored, and 4 distinct orderings
    # (examples 0 and 3 are the same pair, swapped).
    assert len(script.prompts) == len(set(script.prompts)) == 5 + 4


def test_transient_failures_are_retried(
    scripted: tuple[ScriptedJudge, JudgeArgs], monkeypatch: pytest.MonkeyPatch
) -> None:
    script, judge = scripted
    monkeypatch.setattr(judge_module, "RETRY_DELAYS_S", (0.01, 0.01))  # the policy, not its waits
    script.fail_first = 2
    outcome = judge_split(judge.model_copy(update={"concurrency": 1}), ["q"], ["e"],
                          {"candidate": ["good"], "base": ["bad"]}, "base")
    assert outcome.scores["candidate"]["judge_score"] == [1.0]
    assert outcome.scores["candidate"]["judge_preference"] == [1.0]
    assert len(script.prompts) == 2 + 4  # two 503s, then 2 scores + 2 orders


def test_a_refused_request_is_missing_but_all_refused_is_an_error(
    scripted: tuple[ScriptedJudge, JudgeArgs],
) -> None:
    _, judge = scripted
    outcome = judge_split(judge, ["q", "too long"], ["e", "e"],
                          {"candidate": ["good", "good"], "base": ["bad", "bad"]}, "base")
    assert outcome.scores["candidate"]["judge_score"][0] == 1.0
    assert math.isnan(outcome.scores["candidate"]["judge_score"][1])
    refused = outcome.raw[1]["score"]["candidate"]
    assert refused["raw"] is None and refused["problem"].startswith("HTTP 400")
    with pytest.raises(JudgeError, match="refused all 4 requests.*context length exceeded"):
        judge_split(judge, ["too long"], ["e"], {"candidate": ["good"], "base": ["bad"]}, "base")


def test_a_fatal_answer_does_not_wait_for_calls_in_flight(
    scripted: tuple[ScriptedJudge, JudgeArgs],
) -> None:
    _, judge = scripted
    started = time.monotonic()
    with pytest.raises(JudgeError, match="refused the API key"):
        # Identical answers: one score call per example, both in flight at once.
        judge_split(judge.model_copy(update={"concurrency": 2}), ["slow", "forbidden"],
                    ["e", "e"], {"candidate": ["x", "y"], "base": ["x", "y"]}, "base")
    assert time.monotonic() - started < 1.5  # not the 2 s the slow call takes


def test_long_texts_are_cut_before_sending(scripted: tuple[ScriptedJudge, JudgeArgs]) -> None:
    script, judge = scripted
    judge_split(judge, ["q" * 50_000], ["e"], {"candidate": ["good"], "base": ["good"]}, "base")
    (prompt,) = script.prompts  # identical answers: one score call, no pair
    assert len(prompt) < 6_000 and "more characters cut]" in prompt


# -- end to end: evaluate_candidate with eval.judge and a gate rule on judge_score --------------


@pytest.mark.slow  # loads and generates with two tiny models, then judges on a third
def test_evaluate_candidate_with_a_judge_and_a_judge_rule(
    judge: JudgeArgs, tiny_model: Path, tmp_path: Path
) -> None:
    from evertune.data.store import add_files
    from evertune.evaluation import ModelRef, evaluate_candidate, load_report

    make_workspace(
        tmp_path / "ws", tiny_model,
        eval={"max_examples": 4, "max_new_tokens": 6, "batch_size": 4,
              "metrics": ["rouge"], "general": False, "regression_suite": False,
              "judge": judge.model_dump()},
        gate={"bootstrap_samples": 200, "rules": [
            {"metric": "judge_score", "non_inferiority_margin": 0.2},
            {"metric": "judge_preference"},
        ]},
    )
    ws = Workspace.open(tmp_path / "ws", overrides=[
        "data.split.train=0.5", "data.split.validation=0.0", "data.split.test=0.5",
    ])
    dataset = add_files(ws, [write_jsonl(tmp_path / "drop.jsonl", TICKETS[:16])]).versions[0]
    adapter = make_adapter(tiny_model, tmp_path / "cand", random_init=True)
    labels: list[str] = []
    report = evaluate_candidate(ws, ModelRef("cand", adapter=adapter), dataset,
                                progress=lambda label, done, total: labels.append(label))

    test = report.splits["test"]
    assert test.n_examples == 4 and "judge_score" in report.metrics
    assert [r.metric for r in test.gate.rules] == ["judge_score", "judge_preference"]
    assert "judge (test)" in labels
    for row in test.rows:
        assert row.judge is not None and set(row.judge["score"]) == {"candidate", "base"}  # type: ignore[arg-type]
        for role in ("candidate", "base"):
            value = row.outputs[role].scores["judge_score"]
            assert value is None or 0.0 <= value <= 1.0
            assert isinstance(row.judge["score"][role]["raw"], str)  # type: ignore[index]
        assert row.outputs["candidate"].scores["judge_preference"] is not None or \
            row.judge["preference"]["problem"]  # type: ignore[index]
    # Strict JSON on disk (NaN became null) and read back identically.
    path = ws.evals_dir / report.id / "report.json"
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert load_report(path) == report
