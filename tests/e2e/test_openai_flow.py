"""A team moving off a hosted fine-tuning API: the official `openai` client's usual sequence
(upload, create a job, poll until `succeeded`, call `job.fine_tuned_model`) against a real
`evertune up` on the tiny model, unchanged."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.api.helpers import TICKETS, write_jsonl
from tests.conftest import make_workspace

TERMINAL = ("succeeded", "failed", "cancelled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_poll_until_succeeded_then_call_the_fine_tuned_model(
    tmp_path: Path, tiny_model: Path
) -> None:
    # A gate rule nothing can meet: the version is registered as Rejected, and the job must
    # still be `succeeded` only once that version can be called, clearly marked as rejected.
    ws = make_workspace(
        tmp_path / "ws", tiny_model,
        train={"n_epochs": 1, "batch_size": 8, "threads": 1},
        eval={"max_examples": 4, "max_new_tokens": 4, "metrics": ["loss", "exact_match"]},
        gate={"bootstrap_samples": 100,
              "rules": [{"metric": "exact_match", "higher_is_better": True, "threshold": 2.0}]},
        trigger={"poll_seconds": 0.2, "settle_seconds": 0},
    )
    token = (ws.state_dir / "token").read_text().strip()
    port = _free_port()
    log = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERTUNE_TEST_")}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evertune.cli", "-w", str(ws.root), "up", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ws.root,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0,
                        timeout=120)
        data = write_jsonl(tmp_path / "tickets.jsonl", TICKETS)
        f = client.files.create(file=data.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=f.id, model="assistant")

        seen: list[tuple[str, str | None]] = []
        deadline = time.monotonic() + 600
        while job.status not in TERMINAL:  # the client's usual polling loop
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
            job = client.fine_tuning.jobs.retrieve(job.id)
            seen.append((job.status, job.fine_tuned_model))

        assert job.status == "succeeded", (job.error, log.read_text()[-3000:])
        # Never `succeeded` without a model to call, never a model before `succeeded`.
        assert all((status == "succeeded") == (model is not None) for status, model in seen)
        assert job.fine_tuned_model == "assistant@v1"
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any(m.startswith("Evaluating the fine-tuned model") for m in messages)
        assert any(m.startswith("Registering the fine-tuned model") for m in messages)
        # Rejected by the gate, and says so: callable for inspection, never deployed.
        marked = (job.model_extra or {})["evertune"]
        assert marked["gate"] == "fail" and marked["approval_status"] == "Rejected"
        assert any("rejected by the quality gate" in m for m in messages)

        answer = client.chat.completions.create(
            model=job.fine_tuned_model, max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": TICKETS[0]["input"]}],
        )
        assert answer.model == "assistant@v1" and answer.choices[0].message is not None

        (report_id,) = job.result_files
        report = json.loads(client.files.content(report_id).content)
        assert report["id"] == marked["eval_report"] and report["verdict"] == "fail"
        assert client.files.retrieve(report_id).purpose == "fine-tune-results"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
