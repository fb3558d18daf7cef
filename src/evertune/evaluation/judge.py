"""An LLM judge as an evaluation metric (`eval.judge`): any OpenAI-compatible endpoint scores
each model's answer, and prefers the candidate's or the reference's answer, example by example.

    # evertune.yaml: a judge, and a gate rule on its score like on any metric
    eval:
      judge: {base_url: https://api.openai.com/v1, model: gpt-4o-mini, api_key_env: OPENAI_API_KEY}
    gate:
      rules:
        - {metric: judge_score, non_inferiority_margin: 0.05}
        - {metric: judge_preference, non_inferiority_margin: 0.1}

    from evertune.evaluation.judge import judge_split
    outcome = judge_split(cfg.eval.judge, inputs, expected,
                          {"candidate": cand_answers, "base": base_answers}, reference_role="base")
    outcome.scores["candidate"]["judge_score"]       # one float in 0..1 per example, NaN: missing
    outcome.raw[0]                                   # the judge's raw answers for example 0

Metrics (`JUDGE_METRICS`), per example:
- `judge_score`, every role: the judge rates the answer 1-10 against `eval.judge.rubric` and
  the expected answer; normalised to 0..1.
- `judge_preference`, the candidate and the reference role: the judge picks the better of the
  two answers twice, with their positions swapped (judges favour one position). The candidate
  gets 1 if preferred both times, 0 if the other answer was preferred both times, 0.5 on a tie
  or when the two orders disagree; the reference role gets 1 minus that.

Robustness: an answer the judge gives that cannot be read (no JSON, no score, a score out of
range) is a missing score (NaN) with the raw text and the reason in `raw`, never an error.
Connection errors, timeouts, 429 and 5xx are retried (`RETRY_DELAYS_S`); a judge still down
after that, one that refuses the API key (401/403) or does not know the model or URL (404),
or one that refuses every request, raises `JudgeError`: the evaluation step fails with the
fix in the message and the run can be retried.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from evertune.config import JudgeArgs
from evertune.errors import JudgeError

JUDGE_METRICS = ("judge_score", "judge_preference")
SCORE_MIN, SCORE_MAX = 1, 10
MAX_TEXT_CHARS = 4000
"""Longest instruction, expected answer or answer sent to the judge (characters); longer ones
are cut with a note, so one runaway generation cannot overflow the judge's context."""
MAX_RAW_CHARS = 2000
"""Longest judge answer kept in the report per call (characters)."""
RETRY_DELAYS_S = (0.5, 2.0)
"""Waits before the 2nd and 3rd attempt of a call after a connection error, timeout, 429 or
5xx; short, because a judge that is down should fail the step quickly (the run can be retried)."""
MAX_RETRY_AFTER_S = 30.0
"""A server's Retry-After is honoured up to this many seconds."""

Winner = Literal["A", "B", "tie"]

SYSTEM_PROMPT = (
    "You are a strict, impartial judge of answers to instructions. "
    "Reply with exactly one JSON object and nothing else."
)
SCORE_PROMPT = """Rubric: {rubric}

[Instruction]
{instruction}

[Reference answer]
{expected}

[Answer to judge]
{answer}

Rate the answer to judge against the rubric and the reference answer, from {lo} (worst) to \
{hi} (best). Reply with only this JSON object: {{"score": <integer {lo}-{hi}>}}"""
PAIR_PROMPT = """Rubric: {rubric}

[Instruction]
{instruction}

[Reference answer]
{expected}

[Answer A]
{a}

[Answer B]
{b}

Which answer is better by the rubric, A or B? Do not let the order of the answers or their \
length sway you. Reply with only one of these JSON objects: {{"winner": "A"}}, \
{{"winner": "B"}}, {{"winner": "tie"}}"""


@dataclass
class JudgeOutcome:
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """role -> metric -> one score per example (NaN = missing)."""
    raw: list[dict[str, Any]] = field(default_factory=list)
    """One record per example: the judge's raw answers and parse problems."""


@dataclass
class _Answer:
    """What one call brought back: the judge's text, or why there is none."""

    text: str | None = None
    problem: str | None = None
    refused: bool = False
    """The endpoint answered but refused the request (4xx other than 401/403/404/429) or did
    not answer like an OpenAI chat completion: a problem of this call, unless every call has it."""


# -- parsing the judge's text ---------------------------------------------------------------

_THINKING = re.compile(r"<think>.*?</think>", re.S | re.I)
# "Score: 7", "score = 7/10", "'score': 7", "rating of 8"; the number right after the keyword.
_SCORE_TEXT = re.compile(
    r"""\b(?:score|rating)\b["']?\s*(?:[:=]|is|of)?\s*["']?(-?\d+(?:\.\d+)?)""", re.I
)
_BARE_SCORE = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\.?")
# "Winner: A", "the winner is answer B", "winner": "tie"; A/B only in capitals, so that prose
# ("the winner is a close call") is not read as a verdict.
_WINNER_TEXT = re.compile(
    r"""(?i:\bwinner\b)["']?\s*(?:[:=]|is)?\s*["']?(?:(?i:answer)\s+)?(A|B|(?i:tie))\b"""
)
_MT_BENCH = re.compile(r"\[\[(A|B|C|tie)\]\]", re.I)  # MT-Bench's verdict format; C is a tie
_BARE_WINNER = re.compile(r"(?:(?i:answer)\s+)?(A|B|(?i:tie))")
_TIES = {"tie", "draw", "equal", "c"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON object in `text`, in order (inside prose or a ``` fence too)."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            yield obj
        start = text.find("{", end)


def _key(obj: dict[str, Any], name: str) -> tuple[bool, Any]:
    for k, v in obj.items():
        if isinstance(k, str) and k.strip().lower() == name:
            return True, v
    return False, None


def parse_score(text: str) -> tuple[float | None, str | None]:
    """The judge's score (SCORE_MIN..SCORE_MAX) in `text`, or None and why not.

    Reads the first JSON object with a "score" key; failing that, "Score: 7" in prose or a
    bare number. A score outside the range is a problem, not clipped: the judge misread the
    scale, and a clipped value would look like a real judgement.
    """
    text = _THINKING.sub("", text)
    found: Any = None
    in_json = False
    for obj in _json_objects(text):
        in_json, found = _key(obj, "score")
        if in_json:
            break
    if not in_json:
        match = _SCORE_TEXT.search(text) or _BARE_SCORE.fullmatch(text.strip().strip("*`\"'"))
        if match is None:
            return None, (f'no score found: expected a JSON object {{"score": <{SCORE_MIN}-'
                          f'{SCORE_MAX}>}} or "Score: N"')
        found = match.group(1)
    if isinstance(found, str):
        try:
            found = float(found.strip())
        except ValueError:
            return None, f'"score" is {json.dumps(found)}, not a number'
    if isinstance(found, bool) or not isinstance(found, int | float) or not math.isfinite(found):
        return None, f'"score" is {json.dumps(found)}, not a number'
    if not SCORE_MIN <= found <= SCORE_MAX:
        return None, f"score {found:g} is outside {SCORE_MIN}-{SCORE_MAX}"
    return float(found), None


def _winner_of(value: str) -> Winner | None:
    v = value.strip().strip("\"'*`[]().").strip()
    v = re.sub(r"^answer\s+", "", v, flags=re.I)
    if v in ("A", "a"):
        return "A"
    if v in ("B", "b"):
        return "B"
    return "tie" if v.lower() in _TIES else None


def parse_winner(text: str) -> tuple[Winner | None, str | None]:
    """The judge's verdict ("A", "B" or "tie") in `text`, or None and why not.

    Reads the first JSON object with a "winner" key; failing that, "Winner: A" in prose,
    MT-Bench's "[[A]]", or an answer that is only "A", "B" or "tie".
    """
    text = _THINKING.sub("", text)
    for obj in _json_objects(text):
        has, value = _key(obj, "winner")
        if has:
            winner = _winner_of(value) if isinstance(value, str) else None
            if winner is None:
                return None, f'"winner" is {json.dumps(value)}, not "A", "B" or "tie"'
            return winner, None
    match = (_WINNER_TEXT.search(text) or _MT_BENCH.search(text)
             or _BARE_WINNER.fullmatch(text.strip().strip("*`\"'.").strip()))
    if match is not None:
        winner = _winner_of(match.group(1))
        if winner is not None:
            return winner, None
    return None, 'no verdict found: expected a JSON object {"winner": "A" | "B" | "tie"}'


# -- calling the judge ----------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[… {len(text) - limit} more characters cut]"


def _where(judge: JudgeArgs) -> str:
    return f"the LLM judge (eval.judge) model {judge.model!r} at {judge.base_url}"


def _retry_hint() -> str:
    return ("once fixed, retry the run with `evertune runs retry RUN` (or rerun `evertune eval`); "
            "or remove eval.judge (and the gate rules on judge_score / judge_preference) to "
            "evaluate without a judge")


def api_key(judge: JudgeArgs) -> str | None:
    """The judge's API key from the environment variable `judge.api_key_env` (None without one).

    Raises:
        JudgeError: api_key_env is set but that variable is missing or empty here.
    """
    name = judge.api_key_env
    if name is None:
        return None
    if not _ENV_NAME.fullmatch(name):
        # Never echo it: this is most likely the key itself, pasted in the wrong place.
        raise JudgeError(
            "eval.judge.api_key_env must be the name of an environment variable (letters, "
            "digits and _), not the key itself; put the key in a variable, e.g. "
            "JUDGE_API_KEY, and set eval.judge.api_key_env: JUDGE_API_KEY"
        )
    key = os.environ.get(name, "").strip()
    if not key:
        raise JudgeError(
            f"eval.judge.api_key_env is {name!r}, but the environment variable {name} is not "
            f"set (or is empty) in the process running the evaluation; export {name}=<the API "
            f"key of {judge.base_url}> where Evertune runs (the server or worker too), or remove "
            f"eval.judge.api_key_env for an endpoint without keys; {_retry_hint()}"
        )
    return key


def check_judge(judge: JudgeArgs | None) -> None:
    """Fail now, before minutes of generation, on what can be checked without a call."""
    if judge is not None:
        api_key(judge)


def _chat_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def _snippet(response: httpx.Response) -> str:
    """The error message of an OpenAI-style error body, else the start of the body."""
    try:
        body = response.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else None
        if isinstance(message, str):
            return _clip(message, 300)
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    return _clip(response.text.strip(), 300) or "(empty body)"


def _content(response: httpx.Response) -> _Answer:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):
        content = None
    if not isinstance(content, str):
        return _Answer(problem="the endpoint's answer is not an OpenAI chat completion "
                               f"(no choices[0].message.content): {_clip(response.text, 300)}",
                       refused=True)
    return _Answer(text=content)


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(float(response.headers.get("retry-after", 0)), MAX_RETRY_AFTER_S)
    except ValueError:  # an HTTP date: not worth parsing for a few seconds' wait
        return 0.0


def _ask(client: httpx.Client, judge: JudgeArgs, prompt: str, stop: threading.Event) -> _Answer:
    """One judge call with retries; raises JudgeError for a judge that cannot be used."""
    where = _where(judge)
    body = {
        "model": judge.model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": prompt}],
        "temperature": 0,  # the same pair gets the same verdict when the run is retried
        "max_tokens": judge.max_tokens,
    }
    problem = ""
    attempts = len(RETRY_DELAYS_S) + 1
    for attempt in range(attempts):
        if stop.is_set():  # another call already failed the step: don't keep retrying
            return _Answer(problem="not asked: the judge failed on another call")
        wait = RETRY_DELAYS_S[attempt] if attempt < len(RETRY_DELAYS_S) else 0.0
        try:
            response = client.post(_chat_url(judge.base_url), json=body)
        except httpx.TimeoutException:
            problem = f"no answer within eval.judge.timeout_s ({judge.timeout_s:g} s)"
        except httpx.TransportError as exc:
            problem = f"cannot connect ({type(exc).__name__}: {str(exc) or 'no detail'})"
        else:
            code = response.status_code
            if code == 429 or code >= 500:
                problem = f"HTTP {code}: {_snippet(response)}"
                wait = max(wait, _retry_after(response))
            elif code in (401, 403):
                how = (f"check the key in the environment variable {judge.api_key_env}"
                       if judge.api_key_env else
                       "it wants an API key: set eval.judge.api_key_env to the name of an "
                       "environment variable holding it")
                raise JudgeError(f"{where} refused the API key (HTTP {code}: "
                                 f"{_snippet(response)}); {how}; {_retry_hint()}")
            elif code == 404:
                raise JudgeError(
                    f"{where} answered 404 Not Found ({_snippet(response)}); check "
                    f"eval.judge.model (a model that endpoint serves) and eval.judge.base_url "
                    f"(the API root, usually ending in /v1; Evertune posts to "
                    f"{_chat_url(judge.base_url)}); {_retry_hint()}"
                )
            elif code >= 300:
                return _Answer(problem=f"HTTP {code}: {_snippet(response)}", refused=True)
            else:
                return _content(response)
        if attempt + 1 < attempts:
            stop.wait(wait)
    raise JudgeError(
        f"{where} is not usable: {problem} (after {attempts} attempts); check "
        f"eval.judge.base_url and that the endpoint is up and reachable from this machine "
        f"(and eval.judge.timeout_s / eval.judge.concurrency for a slow or rate-limited one); "
        f"{_retry_hint()}"
    )


def _ask_all(
    judge: JudgeArgs, prompts: list[str], progress: Callable[[int, int], None] | None
) -> dict[str, _Answer]:
    """Each distinct prompt asked once, `judge.concurrency` at a time."""
    key = api_key(judge)
    total = len(prompts)
    if progress is not None:
        progress(0, total)
    if not prompts:
        return {}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=judge.concurrency)
    answers: dict[str, _Answer] = {}
    stop = threading.Event()
    # Threads, not asyncio: evaluation may itself run inside an event loop (the API server),
    # and the calls spend their time waiting on the network, not holding the GIL.
    pool = ThreadPoolExecutor(judge.concurrency, thread_name_prefix="evertune-judge")
    finished = False
    try:
        with httpx.Client(timeout=judge.timeout_s, headers=headers, limits=limits) as client:
            futures = {pool.submit(_ask, client, judge, p, stop): p for p in prompts}
            for future in as_completed(futures):
                answers[futures[future]] = future.result()
                if progress is not None:
                    progress(len(answers), total)
        finished = True
    finally:
        if not finished:
            # A failed call (or Ctrl-C) fails the step now: queued calls are dropped, calls
            # waiting to retry give up, and calls in flight end on the closed client rather
            # than being waited for (up to timeout_s each).
            stop.set()
        pool.shutdown(wait=finished, cancel_futures=True)
    refused = [a for a in answers.values() if a.refused]
    if len(refused) == len(answers):
        # One refused request is that example's problem (say, too long for the judge's
        # context); all of them refused is the configuration's, and NaN everywhere would
        # read as a gate failure of the candidate.
        raise JudgeError(
            f"{_where(judge)} refused all {total} requests, e.g. {refused[0].problem}; check "
            f"eval.judge.model, eval.judge.max_tokens ({judge.max_tokens}) and that "
            f"eval.judge.base_url is an OpenAI-compatible API root (usually ending in /v1); "
            f"{_retry_hint()}"
        )
    return answers


# -- the split ------------------------------------------------------------------------------


def _score_prompt(judge: JudgeArgs, instruction: str, expected: str, answer: str) -> str:
    return SCORE_PROMPT.format(
        rubric=judge.rubric, instruction=_clip(instruction, MAX_TEXT_CHARS),
        expected=_clip(expected, MAX_TEXT_CHARS), answer=_clip(answer, MAX_TEXT_CHARS),
        lo=SCORE_MIN, hi=SCORE_MAX,
    )


def _pair_prompt(judge: JudgeArgs, instruction: str, expected: str, a: str, b: str) -> str:
    return PAIR_PROMPT.format(
        rubric=judge.rubric, instruction=_clip(instruction, MAX_TEXT_CHARS),
        expected=_clip(expected, MAX_TEXT_CHARS), a=_clip(a, MAX_TEXT_CHARS),
        b=_clip(b, MAX_TEXT_CHARS),
    )


def _raw_of(answer: _Answer) -> dict[str, Any]:
    if answer.text is None:
        return {"raw": None, "problem": answer.problem}
    return {"raw": _clip(answer.text, MAX_RAW_CHARS)}


def _score_record(answer: _Answer) -> tuple[float, dict[str, Any]]:
    record = _raw_of(answer)
    if answer.text is None:
        return math.nan, record
    score, problem = parse_score(answer.text)
    if score is None:
        record["problem"] = problem
        return math.nan, record
    value = (score - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)
    record.update(score=score, value=value)
    return value, record


def _candidate_wins(winner: Winner, candidate_is: Literal["A", "B"]) -> float:
    return 0.5 if winner == "tie" else float(winner == candidate_is)


def _preference(
    first: _Answer, second: _Answer, reference_role: str
) -> tuple[float, dict[str, Any]]:
    """The candidate's preference from the two orders (candidate as A, then as B)."""
    orders: list[dict[str, Any]] = []
    wins: list[float] = []
    for answer, (a, b) in ((first, ("candidate", reference_role)),
                           (second, (reference_role, "candidate"))):
        entry: dict[str, Any] = {"A": a, "B": b, **_raw_of(answer)}
        if answer.text is not None:
            winner, problem = parse_winner(answer.text)
            if winner is None:
                entry["problem"] = problem
            else:
                entry["winner"] = winner
                wins.append(_candidate_wins(winner, "A" if a == "candidate" else "B"))
        orders.append(entry)
    record: dict[str, Any] = {"reference_role": reference_role, "orders": orders}
    if len(wins) < 2:
        # One order alone is exactly the position bias the swap is there to cancel.
        record["problem"] = "not both orders have a verdict"
        return math.nan, record
    value = wins[0] if wins[0] == wins[1] else 0.5  # a tie, or the orders disagree
    record["candidate"] = value
    return value, record


def judge_split(
    judge: JudgeArgs,
    prompts: Sequence[str],
    expected: Sequence[str],
    outputs: Mapping[str, Sequence[str | None]],
    reference_role: str,
    progress: Callable[[int, int], None] | None = None,
) -> JudgeOutcome:
    """Judge every role's answers to the generated examples of one split.

    Args:
        judge: the `eval.judge` settings.
        prompts: the user inputs, one per example.
        expected: the expected answers, aligned with `prompts`.
        outputs: role ("candidate", "reference", "base") -> its answers, aligned; None where a
            model has no answer (no call is made; the score is NaN).
        reference_role: the role the gate compares the candidate with ("reference", else
            "base"): judge_preference is candidate vs this role.
        progress: called as progress(done, total) in judge calls while they complete.

    Returns:
        scores (role -> metric -> one float per example, NaN = missing) and one JSON-able raw
        record per example (the judge's answers, what was read from them, and any problem).

    Raises:
        JudgeError: the API key variable is missing, or the judge is down, refuses the key,
            does not know the model or URL, or refuses every request.
    """
    n = len(prompts)
    assert len(expected) == n and all(len(v) == n for v in outputs.values()), \
        "prompts, expected and every role's outputs must be aligned"
    assert "candidate" in outputs and reference_role in outputs and reference_role != "candidate", \
        f"outputs need the candidate and the reference role {reference_role!r}"

    # Each distinct prompt is asked once: roles often answer identically (a reference that is
    # the base model, an adapter that changed little), and with temperature 0 a second call
    # would cost money for the same verdict.
    score_asks: dict[str, list[tuple[int, str]]] = {}
    pair_asks: list[tuple[str, str] | None] = []
    for i in range(n):
        for role, role_answers in outputs.items():
            answer = role_answers[i]
            if answer is not None:
                text = _score_prompt(judge, prompts[i], expected[i], answer)
                score_asks.setdefault(text, []).append((i, role))
        cand, ref = outputs["candidate"][i], outputs[reference_role][i]
        if cand is None or ref is None or cand == ref:
            pair_asks.append(None)
        else:
            pair_asks.append((_pair_prompt(judge, prompts[i], expected[i], cand, ref),
                              _pair_prompt(judge, prompts[i], expected[i], ref, cand)))
    asks = list(score_asks) + [p for pair in pair_asks if pair for p in pair]
    answers = _ask_all(judge, list(dict.fromkeys(asks)), progress)

    scores: dict[str, dict[str, list[float]]] = {role: {"judge_score": [math.nan] * n}
                                                 for role in outputs}
    for role in ("candidate", reference_role):
        scores[role]["judge_preference"] = [math.nan] * n
    raw: list[dict[str, Any]] = [{"score": {}, "preference": None} for _ in range(n)]
    for text, where in score_asks.items():
        value, record = _score_record(answers[text])
        for i, role in where:
            scores[role]["judge_score"][i] = value
            raw[i]["score"][role] = record
    for i in range(n):
        for role, role_answers in outputs.items():
            if role_answers[i] is None:
                raw[i]["score"][role] = {"raw": None, "problem": "no answer to judge"}
        pair = pair_asks[i]
        cand, ref = outputs["candidate"][i], outputs[reference_role][i]
        if pair is not None:
            value, record = _preference(answers[pair[0]], answers[pair[1]], reference_role)
        elif cand is not None and cand == ref:
            value, record = 0.5, {"reference_role": reference_role, "candidate": 0.5,
                                  "note": "identical answers: a tie, not asked"}
        else:
            value, record = math.nan, {"reference_role": reference_role,
                                       "problem": "no answer to compare"}
        scores["candidate"]["judge_preference"][i] = value
        scores[reference_role]["judge_preference"][i] = 1.0 - value  # NaN stays NaN
        raw[i]["preference"] = record
    return JudgeOutcome(scores=scores, raw=raw)
