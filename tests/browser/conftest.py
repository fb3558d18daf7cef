"""Browser-test fixtures: a real `evertune up` with a realistic registry, Chromium, sign-in.

    .venv/bin/pytest tests/browser -q          # needs Debian's chromium (scripts/install adds it)

`console` (once per session) builds a workspace on the tiny model, puts v1 in PROD the way a
team would (register a trained LoRA, approve it: system tests, QA, PROD), starts the real
`evertune up` on a free loopback port, then drops a JSON Lines file under the bucket's
`raw-data/`: the server's own watcher starts a pipeline run that trains, evaluates and
registers v2, which waits for approval. Tests drive that server through Chromium (Playwright
with Debian's browser: no browser download) and check the outcome through the API.

Screenshots of every page a test visits go to tests/browser/screenshots/ (gitignored), named
`<test>__<page>[__phone].png`, for people to look at after a run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from evertune import auth, deploy
from evertune.bucket import Bucket
from evertune.workspace import Workspace
from tests.api.helpers import (
    ANSWER,
    FAST_TESTS,
    TEAMS,
    add_dataset,
    register,
    trained_adapter,
    use_mlflow_template,
)
from tests.conftest import make_workspace

CHROMIUM = os.environ.get("EVERTUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = Path(__file__).parent / "screenshots"
ROLES = ("admin", "approver", "viewer")

# The workspace's settings on top of tests.conftest.TINY_SETTINGS.
CONSOLE_SETTINGS: dict[str, dict[str, Any]] = {
    # v2 must answer with words, not the random model's newlines, or the system tests that
    # run on approval reject it: ~100 steps at a high LoRA rate teach the tiny model the team
    # names (as tests.api.helpers.trained_adapter does for v1). One thread: on shared cores
    # torch's pool spins against the other processes (see tests/api/helpers.py).
    "train": {"n_epochs": 20, "batch_size": 8, "learning_rate": 0.02, "warmup_steps": 2,
              "checkpoint_every": 80, "threads": 1},
    # No embedding model (seconds to load); loss and ROUGE still fill the metric tables.
    "eval": {"max_examples": 8, "max_new_tokens": 8, "batch_size": 8,
             "metrics": ["loss", "rouge", "exact_match"]},
    # v2 must pass the gate so that it waits for approval (tests/evaluation covers failing
    # and inconclusive verdicts). With 8 examples of the tiny model the intervals straddle
    # the margins, so an inconclusive check counts as a pass here.
    "gate": {"bootstrap_samples": 200, "on_inconclusive": "pass", "rules": [
        {"metric": "loss", "higher_is_better": False, "non_inferiority_margin": 0.5},
        {"metric": "rougeL", "higher_is_better": True, "non_inferiority_margin": 0.1},
    ]},
    "trigger": {"settle_seconds": 0, "poll_seconds": 0.2},
    "deploy": {**FAST_TESTS, "auto_promote": True},
}


def drop_rows() -> list[str]:
    """The JSON Lines the test drops into raw-data/: 40 new tickets in the TICKETS style, plus
    rows the DataPreprocessing step rejects or drops, so the dataset page has rejects to show."""
    # Answered the way trained_adapter (v1) answers: the tiny model's LoRA learns a sentence
    # reliably, while a bare label can leave it answering nothing (system tests reject that).
    rows = [json.dumps({"input": f"Ticket {i}: please route my {TEAMS[i % 5]} question",
                        "output": ANSWER.format(TEAMS[i % 5])}) for i in range(40, 80)]
    rows.append(json.dumps({"input": "Ticket 80: where is my parcel?"}))  # no output
    rows.append(json.dumps({"input": "", "output": "billing"}))  # empty input
    rows.append(rows[0])  # an exact duplicate
    return rows


@dataclass
class ConsoleServer:
    """A running `evertune up` and what tests need to talk to it."""

    url: str
    ws: Workspace
    tokens: dict[str, str]  # role → API token
    run: dict[str, Any]  # the pipeline run that registered v2, as GET /api/runs gives it
    log: Path
    proc: subprocess.Popen[bytes]

    def api(self, path: str, role: str = "admin") -> Any:
        """GET /api/<path> as `role`; the decoded JSON."""
        return _get_api(self.url, self.tokens[role], path)

    @property
    def run_id(self) -> str:
        return str(self.run["id"])

    def run_output(self, key: str) -> Any:
        """An output of the run's steps: "versions" (the drop's dataset versions), "job"…"""
        return next(s["outputs"][key] for s in self.run["steps"] if key in s["outputs"])

    def stage(self, version: int) -> str:
        return str(self.api(f"models/{version}")["stage"])

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _get_api(url: str, token: str, path: str) -> Any:
    r = httpx.get(f"{url}/api/{path.lstrip('/')}", timeout=30,
                  headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return r.json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(
    proc: subprocess.Popen[bytes], log: Path, what: str, check: Callable[[], Any], timeout: float
) -> Any:
    """Poll `check()` until it returns something truthy; fail with the server log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`evertune up` exited {proc.returncode} while waiting for "
                                 f"{what}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            value = check()
        except httpx.TransportError:
            value = None  # still starting
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}:\n"
                         f"{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="session", autouse=True)
def chromium() -> str:
    """Debian's Chromium, or skip every browser test with how to get it. Autouse, so the
    skip comes before the (expensive) server is built."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: install Debian's package with "
                    "`sudo apt-get install -y chromium` (scripts/install does this), or point "
                    "EVERTUNE_CHROMIUM at a Chromium binary")
    SCREENSHOTS.mkdir(exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):  # this run's pictures only
        old.unlink()
    return CHROMIUM


@pytest.fixture(scope="package")
def console(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ConsoleServer]:
    """`evertune up` on a workspace with v1 in PROD and v2 (from a real pipeline run) pending."""
    root = tmp_path_factory.mktemp("browser")
    ws = make_workspace(root / "ws", tiny_model, **CONSOLE_SETTINGS)
    use_mlflow_template(ws)
    tokens = {role: ws.create_token(role, role) for role in ROLES}
    admin = auth.authenticate(ws, tokens["admin"])

    # v1 in PROD: a trained adapter registered on the TICKETS dataset, approved (QA, system
    # tests, PROD) through the same function the console's Approve button calls.
    dataset = add_dataset(ws, root)
    v1 = register(ws, trained_adapter(tiny_model), dataset, "ftjob-seed")
    result = deploy.approve(ws, v1.version, admin, "first version: routes tickets to teams")
    assert result.stage == "prod", result.message

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "evertune-up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERTUNE_TEST_")}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evertune.cli", "-w", str(ws.root), "up", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ws.root,
        )
    try:
        _wait(proc, log, "/healthz", timeout=120,
              check=lambda: httpx.get(f"{url}/healthz", timeout=5).json()["status"] == "ok")
        # A data drop: the running server's watcher starts the pipeline run that makes v2.
        Bucket.for_workspace(ws).write_bytes("raw-data/tickets-more.jsonl",
                                             ("\n".join(drop_rows()) + "\n").encode())
        run = _wait(proc, log, "the pipeline run of the data drop", timeout=240,
                    check=lambda: next((r for r in _get_api(url, tokens["admin"], "runs")
                                        if r["status"] in ("succeeded", "failed", "cancelled")),
                                       None))
        assert run["status"] == "succeeded", f"run {run['id']} {run['status']}: {run['error']}"
        assert run["version"] == 2, run
        server = ConsoleServer(url, ws, tokens, run, log, proc)
        assert server.stage(2) == "pending", server.api("models/2")
        yield server
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful stop: DBOS and the watcher stop
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# Package scope, not session: Playwright's sync API keeps an asyncio loop running in the main
# thread while it is open, and later tests that call asyncio.run() (tests/serving) would fail.
@pytest.fixture(scope="package")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, console: ConsoleServer) -> Iterator[Any]:
    """A fresh browser context (no cookies) at laptop width; relative URLs go to the server."""
    context = browser.new_context(base_url=console.url, viewport=LAPTOP)
    context.set_default_timeout(15_000)
    pg = context.new_page()
    yield pg
    context.close()


def sign_in(page: Any, token: str) -> None:
    """Sign in through the /login form (from wherever the page is, e.g. a redirect)."""
    if "/login" not in page.url:
        page.goto("/login")
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("form[action='/login'] button[type=submit]")


class Shots:
    """Full-page screenshots named after the test: shots(page, "overview", phone=True)."""

    def __init__(self, test: str) -> None:
        self.test = test

    def path(self, name: str) -> Path:
        return SCREENSHOTS / f"{self.test}__{name}.png"

    def __call__(self, page: Any, name: str, *, phone: bool = False) -> None:
        page.screenshot(path=str(self.path(name)), full_page=True)
        if phone:
            page.set_viewport_size(PHONE)
            page.screenshot(path=str(self.path(f"{name}__phone")), full_page=True)
            page.set_viewport_size(LAPTOP)


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    return Shots(request.node.name.removeprefix("test_"))
