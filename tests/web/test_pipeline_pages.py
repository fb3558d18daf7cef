"""The console's pipeline pages (runs, jobs, datasets) on real pipeline records.

    .venv/bin/pytest tests/web/test_pipeline_pages.py -q

One workspace for the module (the tiny model): a drop with bad rows goes through the real
DBOS pipeline once, end to end (a real dataset version with rejected.jsonl, a real training
child process, evaluation, an MLflow version); a second run fails on a file that is not JSON
Lines, and a third is left running (paused by the pipeline's own test hook, then the runtime
is shut down under it), so the pages show every step state from the records the pipeline
itself wrote.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from evertune import pipeline
from evertune.training import jobs
from evertune.web import console_router
from evertune.workspace import Workspace
from tests.api.helpers import FAST_TESTS, TICKETS, use_mlflow_template
from tests.conftest import make_workspace

pytestmark = pytest.mark.slow  # one real pipeline run: training child, evaluation, MLflow

# Fast evaluation (no embedding model, a gate on loss only: the verdict does not matter here).
SETTINGS: dict[str, dict[str, Any]] = {
    "eval": {"max_examples": 8, "max_new_tokens": 8, "batch_size": 8,
             "metrics": ["loss", "rouge", "exact_match"]},
    "gate": {
        "bootstrap_samples": 200,
        "rules": [{"metric": "loss", "higher_is_better": False, "non_inferiority_margin": 10.0}],
    },
    "deploy": FAST_TESTS,
    # Two epochs of a few steps: a validation loss per epoch, so both curves are lines; one
    # thread, as the tiny model gains nothing from a second one on busy cores.
    "train": {"n_epochs": 2, "batch_size": 8, "checkpoint_every": 2, "keep_checkpoints": 2,
              "threads": 1},
}

# The drop: TICKETS plus rows a user gets wrong. Line numbers are 1-based in the file.
BAD_JSON_LINE, MISSING_OUTPUT_LINE = 4, 9


def drop_lines() -> list[str]:
    lines = [json.dumps(r) for r in TICKETS]
    lines.insert(BAD_JSON_LINE - 1, '{"input": "unterminated')
    lines.insert(6, "")  # blank lines are skipped, not rejected, and still count as lines
    lines.insert(MISSING_OUTPUT_LINE - 1, json.dumps({"input": "where is my parcel?"}))
    lines.append(json.dumps(TICKETS[0]))  # an exact duplicate, dropped and counted
    return lines


@dataclass
class Site:
    ws: Workspace
    client: TestClient  # signed in as a viewer
    app: FastAPI
    done: str  # a run that succeeded
    failed: str  # a run that failed in DataPreprocessing
    live: str  # a run still running (its DataPreprocessing step never finished)
    dataset: str  # the drop's dataset version
    job: str  # the done run's fine-tuning job
    version: int  # the done run's registered version


def _wait_for(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("pipeline-pages")
    ws = use_mlflow_template(make_workspace(root / "ws", tiny_model, **SETTINGS))
    drop = root / "tickets.jsonl"
    drop.write_text("\n".join(drop_lines()) + "\n", "utf-8")
    broken = root / "broken.jsonl"
    broken.write_text("this is not json\n", "utf-8")

    with pytest.MonkeyPatch.context() as mp:
        pipeline.launch(ws, warm=False)
        try:
            done = pipeline.start_run(
                ws, {"source": "api", "run_id": "run-web-done", "file": str(drop), "actor": "ana"}
            )
            run = pipeline.wait_run(ws, done, timeout=300)
            assert run.status == "succeeded", run.error
            failed = pipeline.start_run(ws, {"source": "api", "run_id": "run-web-failed",
                                             "file": str(broken)})
            assert pipeline.wait_run(ws, failed, timeout=60).status == "failed"
            # The pipeline's own pause hook holds the next run inside DataPreprocessing; the
            # shutdown below interrupts it there, leaving it running as a crash would.
            mp.setenv(pipeline.PAUSE_ENV, "DataPreprocessing")
            dataset = run.step("DataPreprocessing").outputs["training_dataset"]
            live = pipeline.start_run(
                ws, {"source": "api", "run_id": "run-web-live", "dataset": dataset}
            )
            _wait_for(
                lambda: pipeline.get_run(ws, live).step("DataPreprocessing").status == "running",
                "the paused run to start its first step",
            )
        finally:
            pipeline.shutdown()

    app = FastAPI()
    app.include_router(console_router(ws))
    app.state.workspace = ws
    with TestClient(app) as client:
        token = ws.create_token("ana", "viewer")
        signed_in = client.post("/login", data={"token": token}, follow_redirects=False)
        assert signed_in.status_code == 303
        yield Site(ws=ws, client=client, app=app, done=done, failed=failed, live=live,
                   dataset=dataset, job=run.job_id or "", version=run.version or 0)


# -- a few lines of HTML reading (the pages are server-rendered, so the HTML is the contract) ----


def start_tag(html: str, testid: str) -> str:
    """The opening tag of the element with this data-testid."""
    match = re.search(rf'<[a-z0-9]+\b[^>]*\bdata-testid="{re.escape(testid)}"[^>]*>', html)
    assert match, f"no element with data-testid={testid!r} in the page"
    return match.group(0)


def element(html: str, testid: str) -> str:
    """The element with this data-testid, from its opening to its matching closing tag."""
    opening = start_tag(html, testid)
    tag = re.match(r"<([a-z0-9]+)", opening).group(1)  # type: ignore[union-attr]
    start = html.index(opening)
    depth = 0
    for m in re.finditer(rf"<(/?){tag}\b[^>]*>", html[start:]):
        depth += -1 if m.group(1) else 1
        if depth == 0:
            return html[start : start + m.end()]
    raise AssertionError(f"element {testid!r} is not closed")


def classes(tag: str) -> set[str]:
    match = re.search(r'class="([^"]*)"', tag)
    return set(match.group(1).split()) if match else set()


def get(site: Site, url: str) -> str:
    r = site.client.get(url)
    assert r.status_code == 200, (url, r.status_code, r.text[-2000:])
    return r.text


# -- datasets ------------------------------------------------------------------------------------


def test_dataset_page_shows_counts_rejects_with_line_numbers_and_the_histogram(site: Site) -> None:
    html = get(site, f"/datasets/{site.dataset}")
    assert ">40 <small>records" in element(html, "count-total")  # TICKETS, the duplicate dropped
    assert ">2 <small>rows" in element(html, "count-rejected")
    assert ">1 <small>duplicates" in element(html, "count-duplicates")

    rejects = element(html, "rejects")
    bad_json = re.search(r'data-code="invalid_json">(.*?)</tbody>', rejects, re.S)
    missing = re.search(r'data-code="missing_field">(.*?)</tbody>', rejects, re.S)
    assert bad_json and missing, rejects
    assert f"tickets.jsonl: line {BAD_JSON_LINE}<" in bad_json.group(1)
    assert f'<td class="num">{BAD_JSON_LINE}</td>' in bad_json.group(1)
    assert "not valid JSON" in bad_json.group(1)
    assert "{&#34;input&#34;: &#34;unterminated" in bad_json.group(1)  # the row as it was
    assert f"tickets.jsonl: line {MISSING_OUTPUT_LINE}<" in missing.group(1)
    assert "missing field &#39;output&#39;" in missing.group(1)
    assert "where is my parcel?" in missing.group(1)
    assert "rejected.jsonl" in rejects  # where every rejected row is

    histogram = element(html, "token-histogram")
    counts = site.ws.datasets_dir.joinpath(site.dataset, "report.json")
    expected = json.loads(counts.read_text())["token_lengths"]["histogram"]["counts"]
    assert "<svg" in histogram and histogram.count('<rect class="bar') == len(expected)
    assert sum(expected) == 40


def test_rejected_rows_are_read_up_to_a_bound_and_counted_from_the_report(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evertune.web import pipeline as pages

    monkeypatch.setattr(pages, "MAX_REJECT_ROWS", 1)
    html = get(site, f"/datasets/{site.dataset}")
    rejects = element(html, "rejects")
    assert "Showing the first 1 problems" in rejects
    # Both reasons keep their full counts although only the first row was read.
    assert re.search(r'data-code="missing_field">\s*<tr><th colspan="4">missing_field · 1', rejects)
    assert f"line {BAD_JSON_LINE}<" in rejects and f"line {MISSING_OUTPUT_LINE}<" not in rejects


def test_datasets_list_links_every_version(site: Site) -> None:
    html = get(site, "/datasets")
    table = element(html, "datasets-table")
    assert f'href="/datasets/{site.dataset}"' in table
    row = re.search(rf"<tr>\s*<td><a href=\"/datasets/{site.dataset}\">.*?</tr>", table, re.S)
    assert row, table
    assert '<td class="num">40</td>' in row.group(0) and '<td class="num">2</td>' in row.group(0)


# -- jobs ----------------------------------------------------------------------------------------


def test_job_page_draws_the_jobs_loss_curves_and_lists_its_record(site: Site) -> None:
    html = get(site, f"/jobs/{site.job}")
    metrics = jobs.list_metrics(site.ws, site.job)
    train = [r for r in metrics if "train_loss" in r]
    val = [r for r in metrics if "val_loss" in r]
    assert len(train) >= 2 and len(val) == 2  # a validation loss per epoch

    chart = element(html, "loss-chart")
    lines = re.findall(r'<polyline class="line series-0" points="([^"]*)"', chart)
    assert [len(p.split()) for p in lines] == [len(train)]  # every train-loss row is a point
    val_lines = re.findall(r'<polyline class="line series-1 dashed" points="([^"]*)"', chart)
    assert [len(p.split()) for p in val_lines] == [len(val)]
    assert "train loss" in chart and "validation loss" in chart
    assert "<svg" in element(html, "lr-chart")

    job = jobs.get_job(site.ws, site.job)
    params = element(html, "hyperparameters")
    assert f"<dt>learning_rate</dt><dd>{job.hyperparameters['learning_rate']}</dd>" in params
    details = element(html, "job-details")
    assert f'href="/datasets/{job.training_file}"' in details
    assert f'href="/runs/{site.done}"' in details
    assert "New fine-tuned model created" in element(html, "events")
    checkpoints = jobs.list_checkpoints(site.ws, site.job)
    assert checkpoints and all(c.path in element(html, "checkpoints") for c in checkpoints)
    assert re.search(r'<section id="job-live"\s*>', html)  # finished: no live refresh


def test_jobs_list_links_jobs_datasets_and_runs(site: Site) -> None:
    table = element(get(site, "/jobs"), "jobs-table")
    assert f'href="/jobs/{site.job}"' in table
    assert f'href="/datasets/{site.dataset}"' in table and f'href="/runs/{site.done}"' in table


# -- runs ----------------------------------------------------------------------------------------


def test_finished_run_shows_each_step_with_its_state_and_links_and_is_not_live(site: Site) -> None:
    html = get(site, f"/runs/{site.done}")
    dag = start_tag(html, "run-dag")
    assert 'id="dag"' in dag and "data-live" not in dag
    for name in pipeline.STEPS:
        assert {"node", "s-succeeded"} <= classes(start_tag(html, f"step-{name}"))
    assert html.count('class="arrow"') == 3

    details = {name: element(html, f"detail-{name}") for name in pipeline.STEPS}
    assert f'href="/datasets/{site.dataset}"' in details["DataPreprocessing"]
    assert f'href="/jobs/{site.job}"' in details["FineTuning"]
    assert f'href="/models/{site.version}">v{site.version}<' in details["RegisterModel"]
    assert "succeeded" in details["ModelEvaluation"] and "verdict" in details["ModelEvaluation"]
    assert "row(s) rejected" in details["DataPreprocessing"]  # the step's own log line
    assert "ana" in html and "tickets.jsonl" in html  # trigger: who started it, which file


def test_failed_run_shows_where_and_why_it_failed(site: Site) -> None:
    html = get(site, f"/runs/{site.failed}")
    assert "data-live" not in start_tag(html, "run-dag")
    assert "s-failed" in classes(start_tag(html, "step-DataPreprocessing"))
    for name in pipeline.STEPS[1:]:
        assert "s-pending" in classes(start_tag(html, f"step-{name}"))
    assert "broken.jsonl is not JSON Lines" in element(html, "run-error")
    assert "broken.jsonl is not JSON Lines" in element(html, "detail-DataPreprocessing")


def test_unfinished_run_is_live_on_its_page_and_in_the_list(site: Site) -> None:
    html = get(site, f"/runs/{site.live}")
    dag = start_tag(html, "run-dag")
    assert 'id="dag"' in dag and "data-live" in dag
    assert "s-running" in classes(start_tag(html, "step-DataPreprocessing"))
    assert "test hook" in element(html, "detail-DataPreprocessing")  # its log lines so far

    runs = get(site, "/runs")
    assert re.search(r'<section id="runs" data-live>', runs)
    table = element(runs, "runs-table")
    order = re.findall(r'href="/runs/([^"]+)"', table)
    assert order == [site.live, site.failed, site.done]  # newest first


# -- access and errors ---------------------------------------------------------------------------


def test_signed_out_visitors_are_sent_to_sign_in(site: Site) -> None:
    with TestClient(site.app) as anonymous:
        for url in ("/runs", f"/runs/{site.done}", "/jobs", f"/jobs/{site.job}", "/datasets",
                    f"/datasets/{site.dataset}"):
            r = anonymous.get(url, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/runs/run-nope", "no pipeline run &#39;run-nope&#39;; recent runs: run-web-live"),
        ("/jobs/ftjob-nope", "no fine-tuning job &#39;ftjob-nope&#39;; recent jobs: ftjob-"),
        ("/datasets/ds-nope", "no dataset &#39;ds-nope&#39;; known datasets: ds-"),
    ],
)
def test_unknown_ids_get_the_404_page_listing_what_exists(
    site: Site, url: str, message: str
) -> None:
    r = site.client.get(url)
    assert r.status_code == 404
    assert message in element(r.text, "error")
