"""Canary rollouts over a real MLflow registry, a real gateway on the tiny model and the real
request log: the split, the comparison, automatic promotion and rollback under load, refusals.

Versions reach QA the way `approve` leaves them with `deploy.auto_promote: false` (stage qa,
`system_tests: pass`); their system tests themselves are covered by tests/test_deploy.py.
"""

# The serving fixtures are imported here (tests/conftest.py does not share them with the top
# level), so the test parameters of the same names shadow the imports on purpose.
# ruff: noqa: F811

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from evertune import deploy
from evertune.auth import Principal
from evertune.canary import CanaryMonitor, compare
from evertune.errors import LifecycleError, PermissionDenied
from evertune.lifecycle import Stage
from evertune.monitoring.request_log import RequestLog
from evertune.registry import Registry
from evertune.serving import Gateway
from evertune.serving.gateway import canary_bucket
from evertune.workspace import Workspace
from tests.api.conftest import bearer, make_app
from tests.e2e.test_cli import evertune
from tests.serving.fixtures import (
    adapters,  # noqa: F401 (fixtures)
    app_for,
    lively_model,  # noqa: F401
    mlflow_template,  # noqa: F401
    new_gateway,
    register,
    run_server,
    serving_workspace,
    to_prod,
)

ANA = Principal("ana", "approver")
HI = [{"role": "user", "content": "The package has not arrived yet"}]


def canary_ws(
    root: Path, model: Path, template: Path, merge: bool | str = True, **canary: Any
) -> Workspace:
    """A serving workspace whose deploy.canary settings are `canary` (small windows)."""
    ws = serving_workspace(root, model, template, merge_adapters=merge)
    cfg = {
        "window_seconds": 600.0,
        "min_requests": 5,
        "max_p95_latency_s": 60.0,
        "check_seconds": 0.3,
        **canary,
    }
    import yaml

    path = ws.root / "evertune.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["deploy"]["canary"] = cfg
    raw["deploy"]["auto_promote"] = False
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Workspace.open(ws.root)


def to_qa(reg: Registry, version: int) -> None:
    """pending → approved → qa with passed system tests: where `approve` leaves a version
    when deploy.auto_promote is false."""
    for stage in ("approved", "qa"):
        reg.transition(version, stage, actor="test", reason="canary test")
    reg.client.set_model_version_tag(reg.name, str(version), deploy.TESTS_TAG, "pass")


def two_versions(ws: Workspace, adapters: list[Path]) -> tuple[int, int]:
    """v1 in prod, v2 in qa ready for a canary."""
    reg = Registry(ws)
    v1 = register(ws, adapters[0], "ftjob-c1")
    v2 = register(ws, adapters[1], "ftjob-c2")
    to_prod(reg, v1)
    to_qa(reg, v2)
    return v1, v2


class Traffic:
    """A client thread sending requests back to back as users `users` in turn (plain and
    streamed, alternating); records (sent at, user, version that answered)."""

    def __init__(self, url: str, users: list[str]) -> None:
        self.url, self.users = url, users
        self.results: list[tuple[float, str, str]] = []
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
        body = {"model": "assistant", "messages": HI, "max_tokens": 2, "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                user = self.users[i % len(self.users)]
                i += 1
                headers = {"x-evertune-user": user}
                sent = time.monotonic()
                try:
                    if i % 2:
                        resp = client.post("/v1/chat/completions", json=body, headers=headers)
                        if resp.status_code != 200:
                            raise RuntimeError(f"{resp.status_code} {resp.text}")
                        version = resp.json()["model"]
                    else:
                        with client.stream(
                            "POST",
                            "/v1/chat/completions",
                            json={**body, "stream": True},
                            headers=headers,
                        ) as resp:
                            lines = [ln for ln in resp.iter_lines() if ln]
                        if resp.status_code != 200 or lines[-1] != "data: [DONE]":
                            raise RuntimeError(f"{resp.status_code} {lines[-2:]}")
                        if any('"error"' in ln for ln in lines):
                            raise RuntimeError(lines)
                        version = f"assistant@{resp.headers['x-evertune-version']}"
                    self.results.append((sent, user, version))
                except Exception as exc:  # every failure is a test failure; keep going
                    self.failures.append(repr(exc))

    def after(self, t: float) -> set[str]:
        return {v for sent, _, v in self.results if sent > t}


def wait_until(what: str, check: Any, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic()


def settle(traffic: list[Traffic], n: int = 6) -> None:
    target = sum(len(t.results) for t in traffic) + n
    wait_until(f"{n} more requests", lambda: sum(len(t.results) for t in traffic) >= target)


def actions(ws: Workspace, version: int) -> list[tuple[str, str | None, str | None, str]]:
    """(action, from, to, actor) of a version's audit rows, oldest first."""
    rows = Registry(ws).audit_log(version, limit=None)
    return [(r.action, r.from_stage, r.to_stage, r.actor) for r in reversed(rows)]


# -- the split -------------------------------------------------------------------------------
def test_split_is_stable_and_near_the_percent() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    for percent in (1, 10, 50):
        share = sum(canary_bucket(7, u) < percent * 100 for u in users) / len(users)
        p = percent / 100  # a uniform hash: within 4 binomial standard deviations
        assert abs(share - p) < 4 * (p * (1 - p) / len(users)) ** 0.5, (percent, share)
    # Sticky: the same caller lands on the same side every time, in any process (sha256).
    assert [canary_bucket(7, u) for u in users[:50]] == [canary_bucket(7, u) for u in users[:50]]
    # Another canary draws other users (salted by the version), not always the same 10%.
    first = {u for u in users if canary_bucket(7, u) < 1000}
    second = {u for u in users if canary_bucket(8, u) < 1000}
    assert len(first & second) < len(first) * 0.2


def test_gateway_splits_callers_of_name_sticky_and_labels_answers(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    ws = canary_ws(tmp_path / "ws", lively_model, mlflow_template)
    v1, v2 = two_versions(ws, adapters)
    deploy.promote(ws, v2, ANA, "first real traffic", canary=30)
    gateway = new_gateway(ws, ("prod",))
    gateway.start()
    try:
        assert gateway.canary() == (f"v{v2}", 30)  # loaded at start, before any request
        with TestClient(app_for(gateway)) as client:

            def ask(user: str, model: str = "assistant") -> tuple[str, str, str]:
                r = client.post(
                    "/v1/chat/completions",
                    headers={"x-evertune-user": user},
                    json={"model": model, "messages": HI, "max_tokens": 1},
                )
                assert r.status_code == 200, r.text
                return (
                    r.json()["model"],
                    r.headers["x-evertune-version"],
                    r.headers["x-evertune-stage"],
                )

            users = [f"u{i}" for i in range(40)]
            first = {u: ask(u) for u in users}
            assert {u: ask(u) for u in users} == first  # sticky per user
            expected = {u: canary_bucket(v2, f"user:{u}") < 3000 for u in users}
            for u, (model, label, stage) in first.items():
                want = v2 if expected[u] else v1
                assert (model, label) == (f"assistant@v{want}", f"v{want}")
                assert stage == ("canary" if expected[u] else "prod")
            assert 4 <= sum(expected.values()) <= 24  # ~30% of 40
            # Pinned names are never split.
            canary_user = next(u for u in users if expected[u])
            assert ask(canary_user, f"assistant@v{v1}")[0] == f"assistant@v{v1}"
            assert ask(canary_user, "assistant@prod")[0] == f"assistant@v{v1}"
            # Without the header, the serving key's name or the address decides (open serving:
            # the test client's address), still one side for every request.
            plain = {
                client.post(
                    "/v1/chat/completions",
                    json={"model": "assistant", "messages": HI, "max_tokens": 1},
                ).json()["model"]
                for _ in range(4)
            }
            assert len(plain) == 1
        gateway.request_log.flush()
        cmp = compare(ws, Registry(ws).canary(), v1)  # type: ignore[arg-type]
        assert cmp.canary.requests == 2 * sum(expected.values())
        assert cmp.prod.requests >= 2 * (40 - sum(expected.values()))
        assert cmp.canary.error_rate == 0 and cmp.canary.p95_s is not None
    finally:
        gateway.stop()


# -- the comparison --------------------------------------------------------------------------
def test_comparison_flags_an_erring_canary_and_monitor_rolls_it_back(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    ws = canary_ws(
        tmp_path / "ws", lively_model, mlflow_template, min_requests=20, max_error_rate=0.05
    )
    v1, v2 = two_versions(ws, adapters)
    state = Registry(ws).start_canary(v2, 20, "ana", "try")
    # What the gateway logs: 60 PROD answers (1 error), 30 canary answers (6 errors).
    log = RequestLog(ws)
    now = time.time()
    for i in range(90):
        canary = i % 3 == 0
        failed = (canary and i % 15 == 0) or i == 1
        log.record(
            {
                "id": f"chatcmpl-{i}",
                "created_at": now,
                "model": "assistant",
                "version": f"v{v2}" if canary else f"v{v1}",
                "stage": "canary" if canary else "prod",
                "endpoint": "chat",
                "status": "error" if failed else "ok",
                "prompt": HI,
                "completion": None,
                "duration_s": 0.2 if canary else 0.1,
            }
        )
    log.flush()
    log.close()
    cmp = compare(ws, state, v1)
    assert (cmp.canary.requests, cmp.canary.errors, cmp.prod.requests, cmp.prod.errors) == (
        30,
        6,
        60,
        1,
    )
    assert cmp.error_p_value is not None and cmp.error_p_value < 0.01
    assert cmp.latency_p_value is not None and cmp.latency_p_value < 0.01
    joined = " | ".join(cmp.breaches)
    assert "error rate 20.0% above deploy.canary.max_error_rate 5.0%" in joined
    assert "significantly above prod's" in joined and "Fisher" in joined
    assert "Mann-Whitney" in joined  # the median is 2× prod's

    decision = CanaryMonitor(ws).check()
    assert decision.outcome == "rollback"
    reg = Registry(ws)
    assert reg.canary() is None and reg.get_version(v2).stage is Stage.REJECTED
    assert reg.alias_version("prod").version == v1  # type: ignore[union-attr]
    rows = reg.audit_log(v2, limit=None)
    rolled = next(r for r in rows if r.action == "canary_rollback")
    assert rolled.actor == "canary-monitor" and rolled.data["outcome"] == "automatic"
    assert rolled.data["comparison"]["canary"]["errors"] == 6
    assert ("transition", "qa", "rejected", "canary-monitor") in actions(ws, v2)


# -- the lifecycle, refusals, the API ----------------------------------------------------------
def test_refusals_say_why_and_how(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    ws = canary_ws(tmp_path / "ws", lively_model, mlflow_template)
    reg = Registry(ws)
    v1 = register(ws, adapters[0], "ftjob-r1")
    v2 = register(ws, adapters[1], "ftjob-r2")
    with pytest.raises(LifecycleError, match="version 2 is pending; only a version in qa"):
        deploy.promote(ws, v2, ANA, canary=10)
    to_qa(reg, v1)
    with pytest.raises(LifecycleError, match="nothing is in prod for the canary of v1"):
        deploy.promote(ws, v1, ANA, canary=10)
    to_prod(reg, v1)
    reg.transition(v2, "approved", actor="test", reason="t")
    reg.transition(v2, "qa", actor="test", reason="t")
    with pytest.raises(LifecycleError, match=r"system tests have not passed .*--retry"):
        deploy.promote(ws, v2, ANA, canary=10)
    reg.client.set_model_version_tag(reg.name, str(v2), deploy.TESTS_TAG, "pass")
    for bad in (0, 100, -5):
        with pytest.raises(LifecycleError, match=f"from 1 to 99, got {bad}"):
            deploy.promote(ws, v2, ANA, canary=bad)
    with pytest.raises(PermissionDenied, match="cannot promote"):
        deploy.promote(ws, v2, Principal("vic", "viewer"), canary=10)
    # The CLI: the same checks, the message and a failing exit status; then the start.
    refused = evertune(
        "-w", str(ws.root), "promote", "2", "--canary", "150", cwd=ws.root, check=False
    )
    assert refused.returncode != 0
    assert "from 1 to 99, got 150" in refused.stdout + refused.stderr
    started = evertune(
        "-w", str(ws.root), "promote", "v2", "--canary", "10", "-m", "try it", cwd=ws.root
    )
    assert "v2 is a canary: 10% of callers get it" in " ".join(started.stdout.split())
    assert reg.canary().percent == 10  # type: ignore[union-attr]
    with pytest.raises(LifecycleError, match=r"already running: v2 at 10%.*`evertune rollback`"):
        deploy.promote(ws, v2, ANA, canary=20)


def test_manual_rollback_ends_it_and_promote_finishes_it(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    ws = canary_ws(tmp_path / "ws", lively_model, mlflow_template)
    v1, v2 = two_versions(ws, adapters)
    token = ws.create_token("ana", "approver")
    viewer = ws.create_token("vic", "viewer")
    with TestClient(make_app(ws)) as api:
        r = api.post(
            f"/api/models/v{v2}/promote",
            headers=bearer(token),
            json={"canary": 10, "comment": "real traffic"},
        )
        assert r.status_code == 200, r.text
        bad = api.post(f"/api/models/v{v2}/promote", headers=bearer(token), json={"canary": 5})
        assert bad.status_code == 409 and "already running" in bad.json()["error"]["message"]
        now = api.get("/api/deployments", headers=bearer(viewer)).json()
        assert now["canary"]["version"] == v2 and now["canary"]["percent"] == 10
        assert now["canary"]["comparison"]["canary"]["requests"] == 0
        assert now["prod"]["version"] == v1

        back = api.post(
            "/api/deployments/rollback", headers=bearer(token), json={"comment": "not today"}
        )
        assert back.status_code == 200 and "canary of v2 ended" in back.json()["message"]
        reg = Registry(ws)
        assert reg.canary() is None and reg.get_version(v2).stage is Stage.QA
        assert reg.alias_version("prod").version == v1  # type: ignore[union-attr]

        deploy.promote(ws, v2, ANA, "again", canary=25)
        done = deploy.promote(ws, None, ANA, "looks good")  # no --canary: at once
        assert done.stage == "prod" and "25% canary ended" in done.message
        assert reg.canary() is None
        assert reg.alias_version("prod").version == v2  # type: ignore[union-attr]
        assert reg.previous_prod().version == v1  # type: ignore[union-attr]
        history = api.get("/api/deployments", headers=bearer(viewer)).json()
        assert history["canary"] is None
    steps = [a[0] for a in actions(ws, v2)]
    assert steps[-5:] == [
        "canary_start",
        "canary_rollback",
        "canary_start",
        "transition",
        "canary_promote",
    ]
    assert [(h.action, h.version) for h in deploy.history(ws)][:3] == [
        ("canary_promote", v2),
        ("transition", v2),
        ("transition", v1),
    ]


# -- automatic decisions under load ------------------------------------------------------------
def _under_load(
    ws: Workspace, gateway: Gateway, v2: int, expect: str
) -> tuple[list[Traffic], float, float]:
    """Three client threads through canary start and the monitor's decision; returns the
    traffic, when the canary was first routed to, and when it was gone."""
    monitor = CanaryMonitor(ws)
    with run_server(app_for(gateway)) as url:
        traffic = [Traffic(url, [f"t{k}-u{i}" for i in range(12)]) for k in range(3)]
        for t in traffic:
            t.__enter__()
        try:
            settle(traffic)
            deploy.promote(ws, v2, ANA, "canary under load", canary=50)
            routed = wait_until(
                "the gateway to route to the canary", lambda: gateway.canary() is not None, 20
            )
            monitor.start()
            gone = wait_until(
                f"the automatic {expect}",
                lambda: gateway.canary() is None and Registry(ws).canary() is None,
                120,
            )
            settle(traffic, 12)
        finally:
            monitor.stop()
            for t in traffic:
                t.__exit__()
    assert monitor.last is not None and monitor.last.outcome == expect
    return traffic, routed, gone


# `prod`: the canary is served as an adapter and gets its merged copy when it becomes PROD,
# a handle replaced under the split's feet.
@pytest.mark.parametrize("merge", [True, "prod"], ids=["merged", "prod-merged"])
def test_automatic_promotion_under_load_drops_nothing(
    merge: bool | str,
    tmp_path: Path,
    lively_model: Path,
    adapters: list[Path],
    mlflow_template: Path,
) -> None:
    ws = canary_ws(
        tmp_path / "ws", lively_model, mlflow_template, merge, window_seconds=3.0, min_requests=6
    )
    v1, v2 = two_versions(ws, adapters)
    gateway = new_gateway(ws, ("prod",))
    gateway.start()
    try:
        traffic, routed, gone = _under_load(ws, gateway, v2, "promote")
        assert all(t.failures == [] for t in traffic), [t.failures for t in traffic]
        during = {v for t in traffic for s, _, v in t.results if routed < s < gone - 0.5}
        assert during == {f"assistant@v{v1}", f"assistant@v{v2}"}  # both sides answered
        assert set().union(*(t.after(gone) for t in traffic)) == {f"assistant@v{v2}"}
        assert gateway.stage_versions()["prod"] == f"v{v2}"
    finally:
        gateway.stop()
    reg = Registry(ws)
    assert reg.get_version(v2).stage is Stage.PROD and reg.get_version(v1).stage is Stage.RETIRED
    assert reg.previous_prod().version == v1  # type: ignore[union-attr]  # rollback returns here
    steps = actions(ws, v2)
    assert [s[0] for s in steps][-3:] == ["canary_start", "transition", "canary_promote"]
    assert steps[-2] == ("transition", "qa", "prod", "canary-monitor")
    promoted = reg.audit_log(v2, limit=1)[0]
    assert "promoted automatically" in promoted.reason
    assert promoted.data["comparison"]["canary"]["requests"] >= 6
    assert ("transition", "prod", "retired", "canary-monitor") in actions(ws, v1)


def test_automatic_rollback_under_load_drops_nothing(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    # Any answer takes longer than 0 s: the canary breaches its p95 SLO once it has answered
    # min_requests times.
    ws = canary_ws(
        tmp_path / "ws", lively_model, mlflow_template, max_p95_latency_s=0.0, min_requests=6
    )
    v1, v2 = two_versions(ws, adapters)
    gateway = new_gateway(ws, ("prod",))
    gateway.start()
    try:
        traffic, routed, gone = _under_load(ws, gateway, v2, "rollback")
        assert all(t.failures == [] for t in traffic), [t.failures for t in traffic]
        assert set().union(*(t.after(gone) for t in traffic)) == {f"assistant@v{v1}"}
        seen = Counter(v for t in traffic for _, _, v in t.results)
        assert seen[f"assistant@v{v2}"] >= 6
        assert gateway.stage_versions()["prod"] == f"v{v1}"
    finally:
        gateway.stop()
    reg = Registry(ws)
    assert reg.get_version(v2).stage is Stage.REJECTED
    assert reg.alias_version("prod").version == v1  # type: ignore[union-attr]
    steps = actions(ws, v2)
    assert [s[0] for s in steps][-3:] == ["canary_start", "canary_rollback", "transition"]
    assert steps[-1] == ("transition", "qa", "rejected", "canary-monitor")
    rolled = reg.audit_log(v2, limit=2)[1]
    assert "p95 latency" in rolled.reason and "max_p95_latency_s 0 s" in rolled.reason
    assert rolled.data["comparison"]["canary"]["p95_s"] > 0
