"""Feedback capture: a rating or a correction of a served answer becomes training data.

    POST /v1/feedback {"id": "chatcmpl-…", "rating": -1, "correction": "The right answer"}
    # → bucket object feedback/2026-11-22/chatcmpl-….my-app.jsonl, one JSON line:
    #   {"messages": [{"role": "user", …}, {"role": "assistant", "content": "The right answer"}],
    #    "feedback": {"label": "corrected", "rating": -1, "version": "v3", "verified": true,
    #                 "sender": "my-app", …}}

The record is in a format `evertune.data` accepts (`chat` for chat completions,
`prompt_completion` for completions), so the next round can train on it: a correction
replaces the answer; a rating alone keeps the served answer and labels it (`positive`,
`negative`, `neutral`) under the `feedback` key, which the data layer reads to keep answers
rated down out of supervised data and a KTO round reads as the answer's label (below). One
object per response id and sender (`feedback/<UTC day>/<response id>.<sender>.jsonl`): the
same sender rating the same answer again the same day replaces its own earlier record (the
user changed their mind), while feedback from anyone else is a separate object and never
overwrites it.

Feedback is a path into the training data, so it is only trusted for responses this server
produced: the gateway looks the id up (its memory of recent responses, the state DB's
`served_responses`, the request log) and the record holds THAT prompt and answer
(`verified: true`), whatever prompt or answer the client sent. Feedback on a response it
cannot find is still stored, with the client's text and `verified: false`, for review; it is
trained on only where the workspace opts in (`data.trust_unverified_feedback: true`). Every
record names its `sender`: the serving key's name, or "anonymous" while serving is open.

A response id is bound to the caller who received it (`receiver`, recorded with the response):
feedback is `verified` only when its sender is that same serving key, or, while serving is open
(no serving key exists), when both are "anonymous". Feedback from another key on someone
else's response (a leaked or guessed id) is stored unverified, with a `reason`, and so is
feedback on a response whose receiver was not recorded; the gateway tells the sender why.

Feedback feeds the next round: with `data.mode: cumulative` and `data.include_feedback: true`
(the defaults) every round folds the trainable feedback objects into its training data
(`collect_feedback` → `evertune.steps.training_data`), and the data layer rejects the
answers users rated down (`negative_feedback`) and unverified records nobody vouched for
(`unverified_feedback`) instead of training on them. A KTO round (`train.method: kto`, or
`kto` in `train.stages`) folds the same objects as rated answers instead
(`collect_feedback(..., rated=True)`, `rated_rows`): liked and corrected answers are
`label: true`, the answer a correction replaced and answers rated down `label: false`,
neutral ratings are skipped; so the loop learns from ratings alone. Whether feedback also
starts a round by itself is the trigger's decision (`trigger.feedback_starts_runs`).

All text is redacted like the request log before it is written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evertune.workspace import Workspace

log = logging.getLogger(__name__)

FEEDBACK_PREFIX = "feedback/"
ANONYMOUS = "anonymous"  # the sender while no serving key exists
TRUSTED_BY_CONFIG = "data.trust_unverified_feedback"  # `feedback.trusted` of vouched-for records
_ROLE_MAP = {"developer": "system"}  # OpenAI's newer name for the system role
# Response ids name bucket objects: letters, digits, `_` and `-` only (no `/`, no `..`).
RESPONSE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# How an unverified record is treated, for the reasons the sender is told.
UNTRAINED = (
    "it is stored for review and not trained on unless data.trust_unverified_feedback is true"
)
_SAFE_SENDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def check_response_id(response_id: str) -> str:
    """`response_id` if it may name a feedback object; ValueError naming the rule otherwise."""
    if not RESPONSE_ID.fullmatch(response_id):
        raise ValueError(
            f"response id {response_id[:80]!r} is not valid: use the `id` of a response "
            "(chatcmpl-… or cmpl-…): letters, digits, '_' and '-', at most 128 characters"
        )
    return response_id


def sender_slug(sender: str) -> str:
    """`sender` as part of an object key: as is when it is letters, digits, `_` and `-` (at most
    64), else a sanitised prefix plus a hash of the whole name, so two different key names
    never share an object (no dots, no slashes: the key stays one `<id>.<sender>.jsonl`)."""
    if _SAFE_SENDER.fullmatch(sender):
        return sender
    stem = _UNSAFE_CHARS.sub("_", sender).strip("_-")[:40] or "key"
    return f"{stem}-h{hashlib.sha256(sender.encode('utf-8')).hexdigest()[:12]}"


def receiver_problem(
    response_id: str, sender: str, receiver: str | None, serving_open: bool
) -> str | None:
    """Why feedback from `sender` on a response that `receiver` got is not trusted, or None.

    Trusted only from the caller who received the response: the same serving key, or, while
    serving is open (`serving_open`: no serving key exists), "anonymous" on an anonymous
    response. The reason is returned to the sender, so it never names the receiver."""
    untrained = UNTRAINED
    if receiver is None:
        return (
            f"who received response {response_id!r} was not recorded (it was served before "
            f"this server recorded recipients), so feedback on it cannot be checked: {untrained}"
        )
    if receiver != sender:
        return (
            f"response {response_id!r} was served to another caller, not to {sender!r}: "
            f"feedback is only trusted from the serving key that received the response; "
            f"{untrained}"
        )
    if sender == ANONYMOUS and not serving_open:
        # A serving key named "anonymous" cannot be told apart from open serving's callers.
        return (
            f"response {response_id!r} went to an anonymous caller (or to a serving key named "
            f"{ANONYMOUS!r}; rename that key) and serving now needs keys, so this feedback "
            f"cannot be tied to who received it: {untrained}"
        )
    return None


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
    verified: bool = True,
    sender: str = ANONYMOUS,
    receiver: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """The accepted-format record for feedback on one served answer.

    `source`: {"endpoint": "chat" | "completions", "prompt": messages | str | [str, …],
    "completion": str | [str, …], "version": "v3", "model": "assistant@prod"} — what was asked
    and answered; `index` picks the choice of a request that had several prompts.
    `verified`: whether `source` is what this server served (the caller checked it); only
    verified records are trained on by default. `sender`: who sent the feedback;
    `receiver`: who received the response, where known; `reason`: why it is not verified.
    """
    completion = source.get("completion")
    if isinstance(completion, list):
        if not 0 <= index < len(completion):
            raise ValueError(
                f"'index' {index} is out of range: the response has {len(completion)} choice(s)"
            )
        completion = completion[index]
    elif index != 0:
        raise ValueError(f"'index' {index} is out of range: the response has 1 choice (index 0)")
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
        "verified": verified,
        "sender": sender,
    }
    if receiver is not None:
        meta["receiver"] = receiver  # for review; never sent back to the sender
    if reason is not None and not verified:
        meta["reason"] = reason
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


def feedback_key(response_id: str, when: float | None = None, sender: str = ANONYMOUS) -> str:
    """`feedback/<UTC date>/<response id>.<sender>.jsonl` (ValueError for an id that cannot
    name one). The sender is part of the key so one caller's feedback never replaces
    another's; the same sender's repeat on the same day replaces its own, and on a later day
    supersedes it (`collect_feedback` keeps the newest)."""
    check_response_id(response_id)
    day = dt.datetime.fromtimestamp(when or time.time(), tz=dt.UTC).date().isoformat()
    return f"{FEEDBACK_PREFIX}{day}/{response_id}.{sender_slug(sender)}.jsonl"


def response_of_key(key: str) -> str:
    """The response id a feedback object key (`feedback_key`) names."""
    return key.rsplit("/", 1)[-1].split(".", 1)[0]


def write_feedback(ws: Workspace, record: dict[str, Any], response_id: str) -> str:
    """Write `record` as one JSON line to the workspace bucket; return the object key.

    The key names the record's `feedback.sender` (`feedback_key`). Through
    `evertune.bucket.Bucket`, so the key is validated and a local write is atomic (the bucket
    watcher never sees half an object)."""
    from evertune.bucket import Bucket

    meta = record.get("feedback")
    sender = meta.get("sender") if isinstance(meta, dict) else None
    key = feedback_key(response_id, sender=sender if isinstance(sender, str) else ANONYMOUS)
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    Bucket.for_workspace(ws).write_bytes(key, data)
    return key


def trainable(line: bytes, trust_unverified: bool) -> bool:
    """Whether one feedback object line may go to training: verified by the server that
    stored it, or any record where the workspace trusts unverified feedback."""
    if trust_unverified:
        return True
    try:
        record = json.loads(line)
    except ValueError:
        return False
    meta = record.get("feedback") if isinstance(record, dict) else None
    return isinstance(meta, dict) and meta.get("verified") is True


def _vouch(line: bytes) -> bytes:
    """`line` with `feedback.trusted` set, so the data layer accepts it though unverified."""
    try:
        record = json.loads(line)
    except ValueError:
        return line  # not JSON: the data layer reports it
    meta = record.get("feedback") if isinstance(record, dict) else None
    if not isinstance(meta, dict) or meta.get("verified") is not False:
        return line
    meta["trusted"] = TRUSTED_BY_CONFIG
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def rated_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The rated rows (KTO: the answer plus `label: true|false`) one feedback record makes.

        rated_rows(build_record(served, response_id="chatcmpl-1", rating=-1, correction=None))
        # → [{"messages": [..., served answer], "feedback": {...}, "label": False}]

    positive → the served answer, true; negative → the served answer, false; corrected → the
    correction, true, and the answer it replaced (`feedback.original`, where recorded), false;
    neutral (or no rating) → none. Each row keeps the record's `feedback` metadata (sender,
    response id), so a trained row can be traced to who rated it.
    """
    meta = record.get("feedback")
    if not isinstance(meta, dict):
        return []
    label = meta.get("label")
    if label in ("positive", "negative"):
        return [{**record, "label": label == "positive"}]
    if label != "corrected":
        return []
    rows = [{**record, "label": True}]
    original = meta.get("original")
    answer = _answer(record)
    if isinstance(original, str) and original.strip() and answer is not None and (
        " ".join(original.split()) != " ".join(answer.split())
    ):
        replaced = _with_answer(record, original)
        replaced["feedback"] = {**meta, "answer": "original"}  # the served answer, not the fix
        rows.append({**replaced, "label": False})
    return rows


def _answer(record: dict[str, Any]) -> str | None:
    if isinstance(record.get("messages"), list) and record["messages"]:
        last = record["messages"][-1]
        return last.get("content") if isinstance(last, dict) else None
    value = record.get("completion")
    return value if isinstance(value, str) else None


def _with_answer(record: dict[str, Any], answer: str) -> dict[str, Any]:
    """`record` with its answer (the last assistant message, or `completion`) replaced."""
    if isinstance(record.get("messages"), list):
        messages = [dict(m) if isinstance(m, dict) else m for m in record["messages"]]
        messages[-1] = {**messages[-1], "content": answer}
        return {**record, "messages": messages}
    return {**record, "completion": answer}


def _as_rated(line: bytes) -> bytes:
    """One feedback line as its rated rows (JSON Lines, each ending in a newline; b"" for none)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line + b"\n"  # not JSON: the data layer reports it
    if not isinstance(record, dict):
        return line + b"\n"
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n"
                    for r in rated_rows(record))


def collect_feedback(
    ws: Workspace, dest: Path, trust_unverified: bool | None = None, rated: bool = False
) -> int:
    """Concatenate the trainable feedback objects of the workspace bucket into one JSON Lines
    file.

    Trainable: verified records (feedback on responses this server produced); unverified
    ones too, marked `trusted`, when `trust_unverified` (default:
    `data.trust_unverified_feedback`). `rated`: write each record as rated rows for KTO
    (`rated_rows`) instead of as it is. Objects are read in key order, so the same feedback
    always makes the same file (and so the same content-addressed dataset version). Returns
    how many objects went into `dest`; with none, `dest` is not written.
    """
    from evertune.bucket import Bucket

    if trust_unverified is None:
        trust_unverified = ws.config.data.trust_unverified_feedback
    bucket = Bucket.for_workspace(ws)
    objects = [o for o in bucket.list(FEEDBACK_PREFIX) if o.key.endswith(".jsonl")]
    # One record per response and sender: a sender who rates the same answer again on a later
    # day changed their mind, so only the newest day's object counts (keys sort by day).
    newest = {o.key.rsplit("/", 1)[-1]: o for o in sorted(objects, key=lambda o: o.key)}
    objects = sorted(newest.values(), key=lambda o: o.key)
    chunks: list[bytes] = []
    skipped = 0
    for obj in objects:
        lines = [ln for ln in bucket.read_bytes(obj.key).splitlines() if ln.strip()]
        kept = [ln for ln in lines if trainable(ln, trust_unverified)]
        if len(kept) < len(lines):
            skipped += 1
        if trust_unverified:
            kept = [_vouch(ln) for ln in kept]
        chunk = (b"".join(_as_rated(ln) for ln in kept) if rated
                 else b"".join(ln + b"\n" for ln in kept))
        if chunk:
            chunks.append(chunk)
    if skipped:
        log.info(
            "%d feedback object(s) are about responses this server did not produce (or cannot "
            "find) and are not trained on; set data.trust_unverified_feedback: true to train "
            "on them",
            skipped,
        )
    if not chunks:
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"".join(chunks))
    return len(chunks)
