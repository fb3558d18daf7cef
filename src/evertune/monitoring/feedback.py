"""Feedback capture: a rating or a correction of a served answer becomes training data.

    POST /v1/feedback {"id": "chatcmpl-…", "rating": -1, "correction": "The right answer"}
    # → bucket object feedback/2026-11-22/chatcmpl-….jsonl, one JSON line:
    #   {"messages": [{"role": "user", …}, {"role": "assistant", "content": "The right answer"}],
    #    "feedback": {"label": "corrected", "rating": -1, "version": "v3", …}}

The record is in a format `evertune.data` accepts (`chat` for chat completions,
`prompt_completion` for completions), so the next round can train on it: a correction
replaces the answer; a rating alone keeps the served answer and labels it (`positive`,
`negative`, `neutral`) under the `feedback` key, which the data layer reads only to reject
answers rated down (below). One object per response id: rating the same answer again the same day
replaces the earlier record.

Feedback feeds the next round: with `data.mode: cumulative` and `data.include_feedback: true`
(the defaults) every round folds all feedback objects into its training data
(`collect_feedback` → `evertune.steps.training_data`), and the data layer rejects the
answers users rated down (`negative_feedback`) instead of training on them. Whether feedback
also starts a round by itself is the trigger's decision (`trigger.feedback_starts_runs`).

The prompt comes from the request the gateway remembers (recent responses in memory, older
ones from the request log) or from the body (`messages` or `prompt`, plus `completion`),
always redacted like the request log.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evertune.workspace import Workspace

FEEDBACK_PREFIX = "feedback/"
_ROLE_MAP = {"developer": "system"}  # OpenAI's newer name for the system role


def label_for(rating: float | None, corrected: bool) -> str:
    """`corrected` when a correction was given, else positive / negative / neutral by sign."""
    if corrected:
        return "corrected"
    if rating is None or rating == 0:
        return "neutral"
    return "positive" if rating > 0 else "negative"


def build_record(
    source: dict[str, Any],
    *,
    response_id: str,
    rating: float | None,
    correction: str | None,
    comment: str | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """The accepted-format record for feedback on one served answer.

    `source`: {"endpoint": "chat" | "completions", "prompt": messages | str | [str, …],
    "completion": str | [str, …], "version": "v3", "model": "assistant@prod"} — what was asked
    and answered; `index` picks the choice of a request that had several prompts.
    """
    completion = source.get("completion")
    if isinstance(completion, list):
        completion = completion[index] if index < len(completion) else None
    answer = correction if correction is not None else completion
    if not isinstance(answer, str):
        raise ValueError("the served answer is unknown: send `completion` or a `correction`")
    meta: dict[str, Any] = {
        "id": "fb-" + uuid.uuid4().hex[:16],
        "response_id": response_id,
        "label": label_for(rating, correction is not None),
        "rating": rating,
        "version": source.get("version"),
        "model": source.get("model"),
        "created_at": time.time(),
    }
    if correction is not None and isinstance(completion, str):
        meta["original"] = completion  # what the model said, for review and preference pairs
    if comment:
        meta["comment"] = comment
    prompt = source.get("prompt")
    if source.get("endpoint") == "chat":
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("the chat messages of this response are unknown: send `messages`")
        messages = [
            {"role": _ROLE_MAP.get(m.get("role", ""), m.get("role")), "content": m.get("content")}
            for m in prompt
        ]
        return {"messages": [*messages, {"role": "assistant", "content": answer}], "feedback": meta}
    if isinstance(prompt, list):
        prompt = prompt[index] if index < len(prompt) else None
    if not isinstance(prompt, str):
        raise ValueError("the prompt of this response is unknown: send `prompt`")
    return {"prompt": prompt, "completion": answer, "feedback": meta}


def feedback_key(response_id: str, when: float | None = None) -> str:
    """`feedback/<UTC date>/<response id>.jsonl`."""
    day = dt.datetime.fromtimestamp(when or time.time(), tz=dt.UTC).date().isoformat()
    return f"{FEEDBACK_PREFIX}{day}/{response_id}.jsonl"


def write_feedback(ws: Workspace, record: dict[str, Any], response_id: str) -> str:
    """Write `record` as one JSON line to the workspace bucket; return the object key.

    Through `evertune.bucket.Bucket`, so the key is validated and a local write is atomic
    (the bucket watcher never sees half an object)."""
    from evertune.bucket import Bucket

    key = feedback_key(response_id)
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    Bucket.for_workspace(ws).write_bytes(key, data)
    return key


def collect_feedback(ws: Workspace, dest: Path) -> int:
    """Concatenate every feedback object of the workspace bucket into one JSON Lines file.

    Objects are read in key order, so the same feedback always makes the same file (and so the
    same content-addressed dataset version). Returns how many objects were read; with none,
    `dest` is not written.
    """
    from evertune.bucket import Bucket

    bucket = Bucket.for_workspace(ws)
    objects = [o for o in bucket.list(FEEDBACK_PREFIX) if o.key.endswith(".jsonl")]
    if not objects:
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        for obj in objects:
            data = bucket.read_bytes(obj.key)
            out.write(data if data.endswith(b"\n") else data + b"\n")
    return len(objects)
