"""The Grafana dashboard and the Prometheus alert rules of deploy/monitoring, held against real
tools and a real app; and the pipeline/job gauges of /metrics.

    .venv/bin/python -m pytest -q tests/monitoring/test_dashboards.py

promtool (Debian's prometheus package; scripts/install installs it) checks the rules and runs
their unit tests (deploy/monitoring/alerts.test.yaml). Every series and label that a PromQL
expression of the dashboard or the rules uses is looked up in /metrics of a real `evertune up`
app (control plane and serving, its lifespan started) after it answered chat completions, took
feedback, ran drift checks and recorded a running run and a failed job. The PromQL is parsed by
promql-parser (Python bindings of the Rust parser GreptimeDB maintains), not by regexes: the
expressions nest functions, aggregations and vector matching.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import promql_parser as pp
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from evertune import db, steps
from evertune.monitoring.metrics import JOB_STATUSES, RUN_STATUSES
from evertune.registry import Registry
from evertune.workspace import Workspace
from tests.api.helpers import TICKETS, register, untrained_adapter, use_mlflow_template, write_jsonl
from tests.conftest import make_workspace
from tests.serving.fixtures import FAST_SERVE, to_prod

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yaml"
# Labels Prometheus adds to every scraped series (the target's); alert texts may name them.
TARGET_LABELS = {"instance", "job"}
# Drift on every check, quickly: the embedding model and the test are the real ones.
DRIFT = {
    "window": 10,
    "min_prompts": 5,
    "reference_prompts": 10,
    "every_seconds": 0.3,
    "threshold": 0.01,
    "start_round": False,
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: run `bash scripts/install` (it installs Debian's "
            "prometheus package) or `apt-get install -y prometheus`"
        )
    return found


# -- PromQL --------------------------------------------------------------------------------------


@dataclass
class Query:
    """What one PromQL expression reads: its selectors and the labels it groups or matches by."""

    where: str  # "dashboard panel 'Requests / s' A", "rule EvertuneHighErrorRate"
    expr: str
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)  # (name, matcher labels)
    grouping: set[str] = field(default_factory=set)  # by / without / on / ignoring / group_x


def grafana_to_promql(expr: str) -> str:
    """The expression as Grafana sends it: `$__rate_interval` is a duration, `$version` (the
    multi-value variable, `.*` for All) a regex."""
    out = expr.replace("$__rate_interval", "5m").replace("${version}", ".*")
    out = out.replace("$version", ".*")
    assert "$" not in out, f"a Grafana variable this test does not fill in: {expr}"
    return out


def parse_query(where: str, expr: str) -> Query:
    """The selectors and grouping labels of `expr` (PromQL), walking promql-parser's AST."""
    query = Query(where, expr)

    def visit(node: Any) -> None:
        if isinstance(node, pp.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name or next(m.value for m in matchers if m.name == "__name__")
            query.selectors.append((name, {m.name for m in matchers if m.name != "__name__"}))
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            query.grouping |= set(node.modifier.labels)
        elif isinstance(node, pp.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                query.grouping |= set(node.modifier.matching.labels)
            query.grouping |= set(node.modifier.group_labels or [])

    pp.walk(pp.parse(expr), pre_visit=visit)
    assert query.selectors, f"{where}: no series in {expr}"
    return query


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every panel target's expression and the `label_values(METRIC, LABEL)` variables."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append(
                parse_query(
                    f"dashboard panel {panel['title']!r} {target['refId']}",
                    grafana_to_promql(target["expr"]),
                )
            )
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert m, f"variable {var['name']}: expected label_values(METRIC, LABEL)"
        query = parse_query(f"dashboard variable {var['name']}", m.group(1))
        query.grouping.add(m.group(2))
        queries.append(query)
    return queries


def rule_queries() -> list[tuple[dict[str, Any], Query]]:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return [(r, parse_query(f"rule {r.get('alert') or r.get('record')}", r["expr"])) for r in rules]


# -- /metrics ------------------------------------------------------------------------------------


def series_labels(text: str) -> dict[str, set[str]]:
    """Sample name → the label names it carries, from Prometheus text. Sample names, not family
    names: a histogram's family `x` is queried as `x_bucket` / `x_sum` / `x_count` and a
    counter's `x` as `x_total`, exactly the names the samples have."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, set()).update(s.labels)
    return found


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels` (None if there is none)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def unexported(queries: list[Query], exported: dict[str, set[str]]) -> list[str]:
    """What `queries` read that `exported` (series_labels of /metrics) lacks: series, the
    labels of their matchers, the labels they group or match by."""
    problems: list[str] = []
    for q in queries:
        carried: set[str] = set()
        absent = [f"{q.where}: no series {name}" for name, _ in q.selectors if name not in exported]
        if absent:  # its labels cannot be told then: one problem, not a cascade
            problems += absent
            continue
        for name, matched in q.selectors:
            lacking = matched - exported[name]
            if lacking:
                problems.append(f"{q.where}: {name} has no label {sorted(lacking)}")
            carried |= exported[name]
        if not q.grouping <= carried:
            problems.append(f"{q.where}: no label {sorted(q.grouping - carried)} in {q.expr}")
    return problems


def used_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard) + [q for _, q in rule_queries()]
    return {name for q in queries for name, _ in q.selectors}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> str:
    """/metrics of a started `evertune up` app (control and serving) that served version v1 in
    PROD, took a rating, checked drift, and holds a running run and a failed job."""
    from evertune.server import create_app
    from evertune.training.jobs import create_job, fail_job

    root = tmp_path_factory.mktemp("dashboards")
    ws = use_mlflow_template(
        make_workspace(root / "ws", tiny_model, serve=FAST_SERVE, monitor={"drift": DRIFT})
    )
    dataset = steps.preprocess(ws, [write_jsonl(root / "tickets.jsonl", TICKETS)]).versions[0]
    version = register(ws, untrained_adapter(tiny_model), dataset.id, "ftjob-dashboards")
    to_prod(Registry(ws), version.version)

    app = create_app(ws)
    wanted = used_names()
    with TestClient(app) as client:

        def chat(model: str, text: str) -> Any:
            return client.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": text}],
                    "max_tokens": 3,
                    "temperature": 0,
                },
            )

        answers = [chat("assistant", TICKETS[i]["input"]) for i in range(DRIFT["min_prompts"])]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert chat("no-such-model", "hello").status_code == 404  # evertune_request_errors
        rated = client.post("/v1/feedback", json={"id": answers[0].json()["id"], "rating": -1})
        assert rated.status_code == 200, rated.text
        # A request after the rating: the drift monitor re-checks (and counts the rating) only
        # when something new was served.
        assert chat("assistant", TICKETS[7]["input"]).status_code == 200
        job = create_job(ws, dataset)
        fail_job(ws, job.id, "out_of_memory", "CUDA out of memory (a test's failed job)")
        now = time.time()
        with ws.engine.begin() as conn:  # a run whose process is gone: no workflow drives it
            conn.execute(
                insert(db.pipeline_runs).values(
                    id="run-dashboards",
                    model=ws.config.model.name,
                    trigger={"key": "test"},
                    status="running",
                    created_at=now - 120,
                    started_at=now - 60,
                )
            )
        # The drift monitor checks on its own thread; wait until one scrape holds everything.
        deadline = time.monotonic() + 180
        while True:
            text = client.get("/metrics").text
            if wanted <= set(series_labels(text)) or time.monotonic() > deadline:
                return text
            time.sleep(0.3)


# -- the tests -----------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def test_the_alerts_fire_on_bad_series_and_not_on_healthy_ones() -> None:
    """alerts.test.yaml: each alert fires on its bad case only, after its `for:`."""
    done = subprocess.run(
        [promtool(), "test", "rules", str(MONITORING / "alerts.test.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    assert tested == {r["alert"] for r, _ in rule_queries()}  # every alert has a unit test


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    for rule, query in rule_queries():
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and len(notes["description"]) > 80, rule["alert"]
        # Each label the texts name is one the alert's series carry.
        named = set(re.findall(r"\$labels\.(\w+)", notes["summary"] + notes["description"]))
        assert named <= query.grouping | TARGET_LABELS, (rule["alert"], named)


def test_the_dashboard_is_a_valid_grafana_model() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["version"]["datasource"]["uid"] == "${datasource}"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: dict[tuple[int, int], str] = {}
    for p in panels:
        grid = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, p["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):  # no two panels on one cell
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, (p["title"], occupied.get((x, y)))
                occupied[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"], p["title"]


def test_every_series_and_label_queried_is_on_metrics(scraped: str) -> None:
    """What the dashboard and the rules query exists, with the labels they use, in /metrics
    of a real app; so neither shows "No data" nor stays silent over a renamed series."""
    exported = series_labels(scraped)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard) + [q for _, q in rule_queries()]
    problems = unexported(queries, exported)
    assert not problems, "\n".join(problems)
    # The check is not vacuous: the usual slips are caught.
    # A counter is read through its _total, a histogram through _bucket / _sum / _count.
    slips = {
        "sum(rate(evertune_requests[5m]))": "no series evertune_requests",
        "sum by (le) (rate(evertune_batch_size[5m]))": "no series evertune_batch_size",
        "sum by (verison) (evertune_requests_in_flight)": "no label ['verison']",
        'max(evertune_jobs{state="failed"})': "has no label ['state']",
        "sum by (le) (rate(evertune_time_to_first_token_seconds_count[5m]))": "no label ['le']",
    }
    for expr, problem in slips.items():
        found = unexported([parse_query("slip", expr)], exported)
        assert len(found) == 1 and problem in found[0], (expr, found)
    # The panels cover what the serving, drift, pipeline and job series say.
    names = {name for q in queries for name, _ in q.selectors}
    for family in (
        "evertune_requests_total",
        "evertune_time_to_first_token_seconds_bucket",
        "evertune_time_per_output_token_seconds_bucket",
        "evertune_prompt_tokens_total",
        "evertune_completion_tokens_total",
        "evertune_requests_in_flight",
        "evertune_batch_size_bucket",
        "evertune_stage_version",
        "evertune_output_empty_ratio",
        "evertune_output_refusal_ratio",
        "evertune_output_rated_down_ratio",
        "evertune_drift_p_value",
        "evertune_drift_detected",
        "evertune_pipeline_runs",
        "evertune_pipeline_run_oldest_running_seconds",
        "evertune_jobs",
        "evertune_job_failures_last_hour",
    ):
        assert family in names, f"no panel or rule shows {family}"
    # And the app's figures are the ones this test made.
    assert (
        sample_value(scraped, "evertune_pipeline_run_running_seconds", run="run-dashboards")
        is not None
    )
    assert (sample_value(scraped, "evertune_jobs", status="failed") or 0) >= 1


def test_the_status_lists_match_the_pipeline_and_the_jobs() -> None:
    from evertune.pipeline import RunStatus
    from evertune.training.jobs import JobStatus

    assert get_args(RunStatus) == RUN_STATUSES
    assert get_args(JobStatus) == JOB_STATUSES


@pytest.fixture
def control_ws(tmp_path: Path, tiny_model: Path) -> Workspace:
    return use_mlflow_template(make_workspace(tmp_path / "ws", tiny_model))


def test_pipeline_and_job_gauges_count_the_state_db(
    control_ws: Workspace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows of real runs and jobs → the gauges of the control app's /metrics (built, its
    lifespan not started: scraping needs no pipeline runtime); a serving-only app has none;
    an unreadable table costs those series one scrape, not /metrics."""
    from evertune.server import create_app
    from evertune.training.jobs import create_job, fail_job, transition

    ws = control_ws
    dataset = steps.preprocess(ws, [write_jsonl(tmp_path / "t.jsonl", TICKETS)]).versions[0]
    recent, old, waiting = (create_job(ws, dataset) for _ in range(3))
    fail_job(ws, recent.id, "out_of_memory", "CUDA out of memory")
    now = time.time()
    transition(
        ws,
        old.id,
        "failed",
        finished_at=now - 7200,
        error={"code": "bad_dataset", "message": "two hours ago"},
    )
    assert waiting.status == "queued"
    with ws.engine.begin() as conn:
        for run_id, status, started in (
            ("run-old", "running", now - 7200),
            ("run-new", "running", now - 60),
            ("run-waiting", "queued", None),
            ("run-done", "succeeded", now - 9000),
        ):
            conn.execute(
                insert(db.pipeline_runs).values(
                    id=run_id,
                    model="assistant",
                    trigger={"key": run_id},
                    status=status,
                    created_at=now - 9999,
                    started_at=started,
                )
            )

    client = TestClient(create_app(ws, control=True, serving=False))
    text = client.get("/metrics").text
    assert sample_value(text, "evertune_state_db_up") == 1
    runs = {s: sample_value(text, "evertune_pipeline_runs", status=s) for s in RUN_STATUSES}
    assert runs == {"queued": 1, "running": 2, "succeeded": 1, "failed": 0, "skipped": 0}
    old_age = sample_value(
        text, "evertune_pipeline_run_running_seconds", run="run-old", model="assistant"
    )
    assert old_age is not None and 7200 <= old_age < 7260
    new_age = sample_value(text, "evertune_pipeline_run_running_seconds", run="run-new")
    assert new_age is not None and 60 <= new_age < 120
    assert sample_value(text, "evertune_pipeline_run_running_seconds", run="run-done") is None
    assert sample_value(text, "evertune_pipeline_run_oldest_running_seconds") == old_age
    jobs = {s: sample_value(text, "evertune_jobs", status=s) for s in JOB_STATUSES}
    assert jobs == {
        "validating_files": 0,
        "queued": 1,
        "running": 0,
        "paused": 0,
        "succeeded": 0,
        "failed": 2,
        "cancelled": 0,
    }
    assert sample_value(text, "evertune_job_failures_last_hour") == 1  # not the 2-hour-old one
    last = sample_value(text, "evertune_job_last_failure_timestamp_seconds")
    assert last is not None and now - 60 < last <= time.time()

    # Only the process with the control plane reads the pipeline tables.
    serving_only = TestClient(create_app(ws, control=False, serving=True)).get("/metrics").text
    assert "evertune_pipeline_runs" not in serving_only
    assert "# TYPE evertune_requests_total counter" in serving_only

    # A table that cannot be read (a half-applied migration, say): /metrics still answers.
    with ws.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE jobs RENAME TO jobs_away")
    try:
        with caplog.at_level(logging.WARNING, logger="evertune.monitoring"):
            broken = client.get("/metrics")
            again = client.get("/metrics")
    finally:
        with ws.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE jobs_away RENAME TO jobs")
    assert broken.status_code == 200 and again.status_code == 200
    assert sample_value(broken.text, "evertune_state_db_up") == 0
    assert sample_value(broken.text, "evertune_pipeline_runs", status="running") is None
    assert "# TYPE evertune_requests_total counter" in broken.text
    warnings = [r.getMessage() for r in caplog.records if "state_db_up 0" in r.getMessage()]
    assert len(warnings) == 1 and "no such table: jobs" in warnings[0]  # once, not per scrape
    recovered = client.get("/metrics").text
    assert sample_value(recovered, "evertune_state_db_up") == 1
    assert sample_value(recovered, "evertune_jobs", status="failed") == 2
