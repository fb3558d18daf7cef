"""A bounded schemathesis run of the whole control API: no 5xx, responses as documented.

    .venv/bin/python -m pytest tests/api/test_fuzz.py -q          # ~1-2 min on 2 cores
    EVERTUNE_FUZZ_COUNT=1 .venv/bin/python -m pytest tests/api/test_fuzz.py -q -s
        # count instead of failing: prints requests sent, 5xx and schema contradictions

The app is the real one (`server.create_app(ws, control=True)`, its lifespan started, so the
pipeline runtime is up) over a throwaway tiny-model workspace with one registered version and
one dataset: the fuzzer POSTs approve, rollback, token revocation and uploads, so it must never
see a workspace anyone cares about. Every operation of `/openapi.json` gets EXAMPLES generated
cases, valid and invalid (schemathesis' positive and negative modes), with a fixed Hypothesis
seed, sent with an admin token. The serving gateway's routes (/v1/models, /v1/chat/completions,
/v1/completions, /v1/feedback) are left out: they take serving keys rather than the admin token,
need a loaded model, and tests/serving covers them. Each response must not be a 5xx and must
conform to the document: its status code, its content type and, where documented, its body
schema.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from evertune.workspace import Workspace
from tests.api.helpers import (
    FAST_TESTS,
    add_dataset,
    register,
    untrained_adapter,
    use_mlflow_template,
)
from tests.conftest import make_workspace

EXAMPLES = 8  # generated cases per operation and mode: ~600 requests in all
COUNT_ONLY = os.environ.get("EVERTUNE_FUZZ_COUNT") == "1"
# The serving gateway's routes: they take serving keys, not the admin token, and need a loaded
# model; tests/serving covers them.
SERVING = r"^/v1/(chat/completions|completions|feedback|models)(/.*)?$"
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance,
          content_type_conformance, response_schema_conformance]


@dataclass
class Tally:
    """What the run sent and found, per operation (printed with EVERTUNE_FUZZ_COUNT=1)."""

    requests: int = 0
    server_errors: Counter[str] = field(default_factory=Counter)
    contradictions: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    seconds: Counter[str] = field(default_factory=Counter)


TALLY = Tally()


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Any]:
    """The real app over a throwaway workspace; its admin token in `app.state.fuzz_token`."""
    from schemathesis.python import asgi

    from evertune.server import create_app

    root = tmp_path_factory.mktemp("fuzz")
    # max_queued_runs 1: a fuzzed POST /api/runs trains at most one tiny run at a time.
    ws = use_mlflow_template(make_workspace(root / "ws", tiny_model, deploy=FAST_TESTS,
                                            api={"max_queued_runs": 1}))
    ds = add_dataset(ws, root)
    register(ws, untrained_adapter(tiny_model), ds, "ftjob-fuzz")
    app = create_app(ws, control=True)
    app.state.fuzz_token = ws.create_token("fuzzer", "admin")
    yield app
    # schemathesis keeps the lifespan (pipeline runtime, watcher) until the process exits;
    # stop it now so later tests in this process start from a clean runtime.
    asgi.shutdown_lifespans()
    if COUNT_ONLY:
        print(f"\nfuzz: {TALLY.requests} requests, {sum(TALLY.server_errors.values())} 5xx, "
              f"{sum(TALLY.contradictions.values())} schema contradictions")
        for name, n in sorted(TALLY.server_errors.items()):
            print(f"  5xx {n:4d}  {name}  e.g. {TALLY.examples.get('5xx ' + name, '')[:300]}")
        for name, n in sorted(TALLY.contradictions.items()):
            print(f"  doc {n:4d}  {name}  e.g. {TALLY.examples.get('doc ' + name, '')[:300]}")
        for name, t in TALLY.seconds.most_common(8):
            print(f"  {t:6.1f} s  {name}")


@pytest.fixture(scope="module")
def api_schema(fuzz_app: Any) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    # with_security_parameters off: every case carries the admin token (test below) rather
    # than a generated Authorization header, so the fuzz reaches the handlers behind auth.
    schema.config.generation.update(modes=["positive", "negative"], max_examples=EXAMPLES,
                                    deterministic=True, database="none",
                                    with_security_parameters=False)
    return schema


# Filters go on the lazy schema: it replaces the fixture's own filters with these.
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=SERVING)


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32 renames each operation's subtest through `node._nodeid`, which pytest
    # 9.2 replaced by `node._id`; give it the attribute to read (pytest ignores what it sets).
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck), print_blob=False)
def test_no_server_error_and_responses_match_the_document(case: Any, fuzz_app: Any) -> None:
    started = time.perf_counter()
    response = case.call(headers={"Authorization": f"Bearer {fuzz_app.state.fuzz_token}"})
    TALLY.seconds[f"{case.method} {case.path}"] += time.perf_counter() - started
    TALLY.requests += 1
    name = f"{case.method} {case.path}"
    if response.status_code >= 500:
        TALLY.server_errors[name] += 1
        TALLY.examples.setdefault("5xx " + name, _describe(case, response))
    try:
        case.validate_response(response, checks=CHECKS)
    except (AssertionError, FailureGroup):  # FailureGroup: several checks failed at once
        if response.status_code < 500:
            TALLY.contradictions[name] += 1
            TALLY.examples.setdefault("doc " + name, _describe(case, response))
        if not COUNT_ONLY:
            raise


def _describe(case: Any, response: Any) -> str:
    body = case.body if not isinstance(case.body, bytes) else case.body[:80]
    try:
        sent = json.dumps(body, default=repr)[:120]
    except ValueError:
        sent = repr(body)[:120]
    return (f"{response.status_code} path={case.path_parameters} query={case.query} "
            f"body={sent} -> {response.text[:150]!r}")


def test_the_fuzzed_workspace_is_a_throwaway(fuzz_app: Any) -> None:
    """The fixture's workspace lives under pytest's tmp dir, never the repo or a user's."""
    ws: Workspace = fuzz_app.state.workspace
    assert "pytest-of-" in str(ws.root) or "fuzz" in ws.root.parent.name
