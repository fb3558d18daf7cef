"""Hot swap: promote and rollback under continuous traffic, with zero failed requests."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from evertune.registry import Registry
from evertune.serving import Gateway
from tests.serving.fixtures import (
    SlowModel,
    app_for,
    new_gateway,
    register,
    run_server,
    serving_workspace,
    to_prod,
)

HI = [{"role": "user", "content": "The package has not arrived yet"}]


class Traffic:
    """A client thread sending requests back to back (plain and streamed, alternating)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[float, str]] = []  # (sent at, version that answered)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        body = {"model": "assistant", "messages": HI, "max_tokens": 4, "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                sent = time.monotonic()
                try:
                    if i % 2:
                        resp = client.post("/v1/chat/completions", json=body)
                        if resp.status_code != 200:
                            raise RuntimeError(f"{resp.status_code} {resp.text}")
                        version = resp.json()["model"]
                    else:
                        with client.stream(
                            "POST", "/v1/chat/completions", json={**body, "stream": True}
                        ) as resp:
                            lines = [ln for ln in resp.iter_lines() if ln]
                        if resp.status_code != 200 or lines[-1] != "data: [DONE]":
                            raise RuntimeError(f"{resp.status_code} {lines[-2:]}")
                        if any('"error"' in ln for ln in lines):
                            raise RuntimeError(lines)
                        version = resp.headers["x-evertune-version"]
                        version = f"assistant@{version}"
                    self.results.append((sent, version))
                except Exception as exc:  # every failure is a test failure; keep going
                    self.failures.append(repr(exc))

    def after(self, t: float) -> set[str]:
        return {v for sent, v in self.results if sent > t}


def wait_for(gateway: Gateway, version: str, timeout: float = 20) -> float:
    """Wait until prod serves `version`; return when that was seen."""
    deadline = time.monotonic() + timeout
    while gateway.stage_versions()["prod"] != version:
        assert time.monotonic() < deadline, f"prod never flipped to {version}"
        time.sleep(0.01)
    return time.monotonic()


def settle(traffic: Traffic, n: int = 4) -> None:
    """Let `n` more requests complete."""
    target = len(traffic.results) + n
    deadline = time.monotonic() + 30
    while len(traffic.results) < target and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapters"])
def test_promote_and_rollback_under_traffic(
    merge: bool,
    tmp_path: Path,
    lively_model: Path,
    adapters: list[Path],
    mlflow_template: Path,
) -> None:
    ws = serving_workspace(tmp_path / "ws", lively_model, mlflow_template, merge_adapters=merge)
    reg = Registry(ws)
    v1 = register(ws, adapters[0], "ftjob-h1")
    v2 = register(ws, adapters[1], "ftjob-h2")
    to_prod(reg, v1)
    gateway = new_gateway(ws)
    gateway.start()
    try:
        with run_server(app_for(gateway)) as url, Traffic(url) as traffic:
            settle(traffic)
            # A long request in flight across the swap must finish on the version it started
            # on. v1 decodes 50 ms slower per step so it surely is still running at the flip.
            group = gateway.engine._models[f"v{v1}"].group  # type: ignore[attr-defined]
            group.module = SlowModel(group.module, 0.05, adapter=f"v{v1}")
            long: dict[str, Any] = {}
            streaming = threading.Event()

            def long_request() -> None:
                body = {
                    "model": "assistant",
                    "messages": HI,
                    "max_tokens": 64,
                    "temperature": 0,
                    "stream": True,
                }
                with (
                    httpx.Client(base_url=url, timeout=60) as c,
                    c.stream("POST", "/v1/chat/completions", json=body) as resp,
                ):
                    lines = []
                    for line in resp.iter_lines():
                        streaming.set()
                        if line:
                            lines.append(line)
                long["lines"], long["ended"] = lines, time.monotonic()

            t = threading.Thread(target=long_request)
            t.start()
            assert streaming.wait(30)

            to_prod(reg, v2)  # promote: v1 → retired, v2 → prod
            flipped = first_flip = wait_for(gateway, f"v{v2}")
            settle(traffic)
            assert traffic.after(flipped) == {f"assistant@v{v2}"}

            reg.transition(v1, "prod", actor="test", reason="rollback")  # retired → prod
            flipped = wait_for(gateway, f"v{v1}")
            settle(traffic)
            assert traffic.after(flipped) == {f"assistant@v{v1}"}

            t.join(timeout=60)
            events = [json.loads(ln[6:]) for ln in long["lines"][:-1]]
            assert long["lines"][-1] == "data: [DONE]"
            assert {e["model"] for e in events} == {f"assistant@v{v1}"}
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            assert long["ended"] > first_flip  # it was in flight when prod moved to v2
        assert traffic.failures == []
        seen = {v for _, v in traffic.results}
        assert seen == {f"assistant@v{v1}", f"assistant@v{v2}"}
        # v2 is idle now and kept loaded (KEEP_IDLE_VERSIONS) for a quick way back.
        assert gateway.engine.loaded() >= {"base", f"v{v1}"}
    finally:
        gateway.stop()
