"""The request log's writer: redaction before anything is written, `serve.log_prompts: false`,
and the bounded record of every served response that feedback is checked against."""

from __future__ import annotations

from pathlib import Path

from evertune.monitoring.request_log import (
    RequestLog,
    get_served,
    list_requests,
    response_digest,
)
from evertune.workspace import Workspace
from tests.conftest import make_workspace

CARD = "4111 1111 1111 1111"
SECRET_PROMPT = [
    {
        "role": "user",
        "content": f"pay with {CARD}, my password=hunter2 and sk-proj-AAAA0000BBBB1111",
    }
]
REDACTED_PROMPT = [
    {"role": "user", "content": "pay with [card], my password=[secret] and [secret]"}
]


def stored_bytes(ws: Workspace) -> bytes:
    """Everything SQLite holds on disk for the state DB (the file and its write-ahead log)."""
    db = ws.state_dir / "state.db"
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


def entry(i: int, **kw: object) -> dict[str, object]:
    return {"id": f"chatcmpl-{i:04d}", "model": "assistant", "version": "v1", "stage": "prod",
            "endpoint": "chat", "status": "ok", "prompt": SECRET_PROMPT,
            "completion": "use the card 5555-5555-5555-4444", "created_at": 1000.0 + i,
            **kw}  # fmt: skip


def test_secrets_are_redacted_before_they_are_written(tmp_path: Path, tiny_model: Path) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model)
    log = RequestLog(ws)
    log.record(entry(1))
    log.served(entry(1))
    log.flush()
    [row] = list_requests(ws)
    assert row.prompt == REDACTED_PROMPT and row.completion == "use the card [card]"
    served = get_served(ws, "chatcmpl-0001")
    assert served is not None and served.prompt == REDACTED_PROMPT
    assert served.digest == response_digest(REDACTED_PROMPT, "use the card [card]")
    log.close()
    ws.engine.dispose()
    raw = stored_bytes(ws)
    for secret in (b"hunter2", b"4111 1111", b"5555-5555", b"sk-proj-"):
        assert secret not in raw


def test_log_prompts_false_stores_no_text(tmp_path: Path, tiny_model: Path) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model, serve={"log_prompts": False})
    log = RequestLog(ws)
    assert log.log_prompts is False  # from the workspace config
    log.record(entry(1, prompt=[{"role": "user", "content": "Where is my parcel 88?"}]))
    log.served(entry(1, prompt=[{"role": "user", "content": "Where is my parcel 88?"}]))
    log.flush()
    [row] = list_requests(ws)
    assert row.prompt is None and row.completion is None and row.id == "chatcmpl-0001"
    served = get_served(ws, "chatcmpl-0001")
    assert served is not None and served.prompt is None and served.completion is None
    # Only a digest: feedback can check a client's copy of the text against it.
    messages = [{"role": "user", "content": "Where is my parcel 88?"}]
    assert served.digest == response_digest(messages, "use the card [card]")
    log.close()
    ws.engine.dispose()
    assert b"parcel 88" not in stored_bytes(ws)


def test_every_response_is_recorded_unsampled_and_only_the_newest_kept(
    tmp_path: Path, tiny_model: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model)
    log = RequestLog(ws, sample=0.0, responses_kept=3)
    assert not log.sampled()
    for i in range(5):
        log.served(entry(i))
    log.served(entry(4))  # a repeated id is skipped, not a failed batch
    log.flush()
    assert list_requests(ws) == []  # the request log sample took none of them
    kept = [i for i in range(5) if get_served(ws, f"chatcmpl-{i:04d}") is not None]
    assert kept == [2, 3, 4]
    log.close()


def test_each_response_names_who_received_it(tmp_path: Path, tiny_model: Path) -> None:
    ws = make_workspace(tmp_path / "ws", tiny_model)
    log = RequestLog(ws)
    log.record(entry(1, receiver="alice-app"))
    log.served(entry(1, receiver="alice-app"))
    log.flush()
    [row] = list_requests(ws)
    assert row.receiver == "alice-app" and row.to_dict()["receiver"] == "alice-app"
    served = get_served(ws, "chatcmpl-0001")
    assert served is not None and served.receiver == "alice-app"
    log.close()
