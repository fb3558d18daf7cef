"""Pipeline pages: runs with their live step DAG, fine-tuning jobs with loss curves, and
dataset versions with their rejected rows and token lengths.

    GET /runs               the newest runs, refreshed while any is unfinished
    GET /runs/{id}          DAG of the four steps (live), each step's outputs, log lines, error;
                            a chain's stage jobs (train.stages) under FineTuning
    POST /runs/{id}/retry   csrf: run a failed run again from its failed step → pipeline.retry_run
    GET /jobs               the newest fine-tuning jobs
    GET /jobs/{id}          loss and learning-rate curves, hyperparameters, events, checkpoints
    GET /datasets           dataset versions, newest first
    GET /datasets/{id}      counts, rejected rows by reason (with line numbers), token lengths

Each page reads the same records as the API and CLI (`evertune.pipeline`,
`evertune.training.jobs`, `evertune.data.store`): nothing here computes state of its own, it
only shapes it for a template. Unknown ids raise their module's NotFoundError, whose message
lists what exists, and `ConsoleRoute` shows it on the 404 page.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from evertune.auth import Principal
from evertune.steps import run_of_job
from evertune.web.charts import Series, bar_chart, line_chart
from evertune.web.render import back, page
from evertune.web.session import check_form

if TYPE_CHECKING:
    from evertune.data.store import DatasetVersion
    from evertune.pipeline import Run, StepRecord
    from evertune.web.deps import Console

RUNS_SHOWN = 100  # /runs lists this many, newest first
JOBS_SHOWN = 100
LOG_LINES_SHOWN = 30  # per step on the run page; `evertune runs show` has them all
EVENTS_SHOWN = 200  # newest job events on the job page; `evertune jobs events` has them all
MAX_CHART_POINTS = 600  # per series: more adds SVG bytes, not detail a 640 px chart can show
# Rejected rows read per dataset page: enough to group and show examples, bounded so a
# drop with a million bad rows cannot make the page slow (the report has the full counts).
MAX_REJECT_ROWS = 1000
MAX_REJECT_BYTES = 4 << 20
EXAMPLES_PER_REASON = 5
LINES_PER_REASON = 40  # line numbers listed per reason before "…"
ROW_PREVIEW_CHARS = 300


def add_routes(router: APIRouter, c: Console) -> None:
    """Add the runs, jobs and datasets pages to the console `router`."""
    ws = c.ws

    @router.get("/runs")
    def runs_page(
        request: Request, me: Principal = Depends(c.signed_in)  # noqa: B008
    ) -> HTMLResponse:
        from evertune import pipeline

        runs = pipeline.list_runs(ws, limit=RUNS_SHOWN)
        return page(request, me, "runs.html", title="Runs", runs=runs,
                    live=any(not r.finished for r in runs), limit=RUNS_SHOWN)

    @router.get("/runs/{run_id}")
    def run_page(
        request: Request, run_id: str, me: Principal = Depends(c.signed_in)  # noqa: B008
    ) -> HTMLResponse:
        from evertune import pipeline

        run = pipeline.get_run(ws, run_id)
        failed = run.status == "failed"
        retried = pipeline.find_run(ws, pipeline.retry_id(run.id)) if failed else None
        return page(request, me, "run.html", title=f"Run {run.id}", run=run,
                    steps=[_step_view(s) for s in run.steps], trigger=_trigger_items(run),
                    live=not run.finished, retried=retried,
                    can_retry=run.status == "failed" and retried is None and me.can("runs"))

    @router.post("/runs/{run_id}/retry")
    def retry_run(
        request: Request, run_id: str, csrf: str = Form(""),  # noqa: B008
        me: Principal = Depends(c.signed_in),  # noqa: B008
    ) -> RedirectResponse:
        from evertune import pipeline

        check_form(request, csrf, me, "runs")
        try:
            new_id = pipeline.retry_run(ws, run_id, actor=me.name)
        except pipeline.PipelineError as exc:  # not failed: say why on the run's page
            return back(request, "error", str(exc), to=f"/runs/{pipeline.get_run(ws, run_id).id}")
        return back(request, "ok", f"run {new_id} retries {run_id}: the steps that succeeded "
                    "are reused, the failed one runs again", to=f"/runs/{new_id}")

    @router.post("/jobs/{job_id}/{action}")
    def job_action(
        request: Request, job_id: str, action: str, csrf: str = Form(""),  # noqa: B008
        me: Principal = Depends(c.signed_in),  # noqa: B008
    ) -> RedirectResponse:
        """Pause a running job, or resume a paused one (its pipeline run still waits on it)."""
        from evertune.errors import JobError
        from evertune.training import jobs

        check_form(request, csrf, me, "jobs")
        job = jobs.get_job(ws, job_id)  # stored ids only: a made-up id is a 404
        try:
            if action == "pause":
                jobs.pause_job(ws, job.id)
                return back(request, "ok", f"job {job.id} pauses after its current step and "
                            "saves a checkpoint", to=f"/jobs/{job.id}")
            if action == "resume" and job.status == "paused":
                jobs.resume_job(ws, job.id)
                return back(request, "ok", f"job {job.id} resumed from its newest checkpoint",
                            to=f"/jobs/{job.id}")
        except JobError as exc:
            return back(request, "error", str(exc), to=f"/jobs/{job.id}")
        return back(request, "error", f"job {job.id} is {job.status}: it can be paused while "
                    "running and resumed while paused", to=f"/jobs/{job.id}")

    @router.get("/jobs")
    def jobs_page(
        request: Request, me: Principal = Depends(c.signed_in)  # noqa: B008
    ) -> HTMLResponse:
        from evertune.training import jobs

        listed = jobs.list_jobs(ws, limit=JOBS_SHOWN)
        return page(request, me, "jobs.html", title="Fine-tuning jobs", jobs=listed,
                    live=any(not j.finished for j in listed), limit=JOBS_SHOWN, now=time.time())

    @router.get("/jobs/{job_id}")
    def job_page(
        request: Request, job_id: str, me: Principal = Depends(c.signed_in)  # noqa: B008
    ) -> HTMLResponse:
        from evertune.training import jobs

        job = jobs.get_job(ws, job_id)
        metrics = jobs.list_metrics(ws, job.id)
        events = jobs.list_events(ws, job.id)
        # Preference methods: how often the policy prefers the chosen answer, and by how much.
        rewards = [Series(label, _series(metrics, key)) for key, label in (
            ("reward_accuracy", "reward accuracy"), ("val_reward_accuracy", "validation accuracy"),
            ("reward_margin", "reward margin"), ("reward_desirable", "reward (desirable)"),
            ("reward_undesirable", "reward (undesirable)"), ("kl", "KL estimate z0"))]
        rewards = [r for r in rewards if r.points]
        return page(
            request, me, "job.html", title=f"Job {job.id}", job=job,
            run_id=run_of_job(job.run_id),
            can_pause=job.status == "running" and me.can("jobs"),
            can_resume=job.status == "paused" and me.can("jobs"),
            reward_chart=line_chart(rewards, title="rewards", x_label="step",
                                    y_label="reward") if rewards else None,
            progress=jobs.progress_of(metrics, job),
            loss_chart=line_chart(
                [Series("train loss", _series(metrics, "train_loss")),
                 Series("validation loss", _series(metrics, "val_loss"), dashed=True)],
                title="loss", x_label="step", y_label="loss"),
            lr_chart=line_chart([Series("learning rate", _series(metrics, "lr"))],
                                title="learning rate", x_label="step", y_label="lr", y_min=0),
            events=list(reversed(events[-EVENTS_SHOWN:])),
            events_hidden=max(0, len(events) - EVENTS_SHOWN),
            checkpoints=jobs.list_checkpoints(ws, job.id),
            hyperparameters={k: short(v) for k, v in job.hyperparameters.items()},
            live=not job.finished, now=time.time(), short=short,
        )

    @router.get("/datasets")
    def datasets_page(
        request: Request, me: Principal = Depends(c.signed_in)  # noqa: B008
    ) -> HTMLResponse:
        from evertune.data.store import list_datasets

        return page(request, me, "datasets.html", title="Datasets", datasets=list_datasets(ws))

    @router.get("/datasets/{dataset_id}")
    def dataset_page(
        request: Request, dataset_id: str, me: Principal = Depends(c.signed_in)  # noqa: B008
    ) -> HTMLResponse:
        from evertune.data.store import get_dataset

        v = get_dataset(ws, dataset_id)  # matches stored ids only: the URL never becomes a path
        report = v.report
        stats = report.get("token_lengths") or None
        return page(
            request, me, "dataset.html", title=f"Dataset {v.id}", v=v, report=report,
            stats=stats, histogram=_histogram(stats), rejects=read_rejects(v),
            other_rejects=sorted(p.name for p in v.path.glob("rejected-*.jsonl")),
        )


# -- runs ----------------------------------------------------------------------------------------


@dataclass
class OutputItem:
    """One step output as shown: a label, links (dataset, job, version) or plain text."""

    key: str
    text: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class StageView:
    """One stage of a chain (train.stages) as shown: its method, dataset and job."""

    number: int
    method: str
    dataset: str | None
    job: str | None
    status: str  # pending | a job status


@dataclass
class StepView:
    """A step of a run shaped for the page: its record, outputs and the last log lines."""

    step: StepRecord
    outputs: list[OutputItem]
    logs: list[dict[str, Any]]
    logs_hidden: int
    stages: list[StageView] = field(default_factory=list)  # a chain's stages (FineTuning, …)


def _step_view(step: StepRecord) -> StepView:
    logs = step.logs[-LOG_LINES_SHOWN:]
    return StepView(step=step,
                    outputs=[_output_item(k, v) for k, v in step.outputs.items() if k != "stages"],
                    logs=logs, logs_hidden=len(step.logs) - len(logs),
                    stages=_stage_views(step.outputs.get("stages")))


def _stage_views(value: Any) -> list[StageView]:
    """The `stages` output of a step ([{stage, method, dataset, job, status}]) as views;
    anything malformed is left out rather than failing the page."""
    if not isinstance(value, list):
        return []
    views = []
    for n, item in enumerate(value, 1):
        if not isinstance(item, dict):
            continue
        stage = item.get("stage")
        job = item.get("job")
        views.append(StageView(
            number=stage if isinstance(stage, int) else n,
            method=str(item.get("method") or "?"),
            dataset=str(item["dataset"]) if item.get("dataset") else None,
            job=str(job) if isinstance(job, str) and job.startswith("ftjob-") else None,
            status=str(item.get("status") or "planned"),
        ))
    return views


# Output keys that name other console pages (see the steps in evertune.pipeline).
_LINKS = {"versions": "/datasets/", "training_dataset": "/datasets/", "job": "/jobs/",
          "version": "/models/"}


def _output_item(key: str, value: Any) -> OutputItem:
    """A step output as links where it names a dataset, job or version, else as short text."""
    from evertune.web.render import when

    prefix = _LINKS.get(key)
    if prefix is not None and value not in (None, "", []):
        ids = value if isinstance(value, list) else [value]
        links = [(f"v{i}" if key == "version" else str(i), f"{prefix}{i}") for i in ids]
        return OutputItem(key, links=links)
    if key.endswith("_at") and isinstance(value, (int, float)):
        return OutputItem(key, text=when(value))
    return OutputItem(key, text=short(value))


def short(value: Any) -> str:
    """A value as compact text: `loss 2.31 · rougeL 0.412` for a dict, 4 significant digits."""
    if isinstance(value, dict):
        return " · ".join(f"{k} {short(v)}" for k, v in value.items()) or "—"
    if isinstance(value, list):
        return ", ".join(short(x) for x in value) or "—"
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _trigger_items(run: Run) -> list[OutputItem]:
    """What started the run: bucket and key with the object version, or the API caller."""
    from evertune.web.render import when

    labels = {"source": "source", "bucket": "bucket", "key": "object key",
              "version": "object version", "file": "uploaded file", "dataset": "dataset",
              "actor": "started by", "overrides": "overrides"}
    items = []
    for key, label in labels.items():
        value = run.trigger.get(key)
        if value in (None, "", []):
            continue
        if key == "dataset":
            items.append(OutputItem(label, links=[(str(value), f"/datasets/{value}")]))
        else:
            items.append(OutputItem(label, text=short(value)))
    # Keys a newer trigger may carry, shown rather than hidden.
    for k, v in run.trigger.items():
        if k not in labels and k != "run_id":
            # Not _output_item: a trigger's `version` is the object version, not a model's.
            items.append(OutputItem(
                k, text=when(v) if k.endswith("_at") and isinstance(v, (int, float)) else short(v)
            ))
    return items


# -- jobs ----------------------------------------------------------------------------------------


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float | None]]:
    """(step, value) for the metric rows that have `key`, thinned to MAX_CHART_POINTS."""
    points: list[tuple[float, float | None]] = [(float(r["step"]), float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    if len(points) <= MAX_CHART_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_CHART_POINTS)
    thinned = points[::stride]
    if thinned[-1] != points[-1]:  # always keep the latest value
        thinned.append(points[-1])
    return thinned


# -- datasets ------------------------------------------------------------------------------------


@dataclass
class RejectGroup:
    """Rejected rows with one reason code: the report's count, line numbers, a few examples."""

    code: str
    count: int  # problems with this code in the whole version (from report.json)
    lines: dict[str, list[int]] = field(default_factory=dict)  # file name → lines (rows read)
    more_lines: int = 0  # lines read but not listed (past LINES_PER_REASON)
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Rejects:
    """The version's rejected rows grouped by reason, read from rejected.jsonl up to a bound."""

    total_rows: int  # rejected rows (a row with several problems counts once)
    groups: list[RejectGroup]
    path: Path | None
    read: int  # problems read from the file
    complete: bool  # False when the bound stopped the reading early


def read_rejects(v: DatasetVersion) -> Rejects:
    """Group the first MAX_REJECT_ROWS problems of `v`'s rejected.jsonl by reason code.

    Counts per reason come from the report (complete); line numbers and examples from the
    rows read, so a huge file costs no more than about MAX_REJECT_BYTES of reading.
    """
    report = v.report
    path = v.path / "rejected.jsonl"
    counted = report.get("rejects_by_reason") or {}
    groups = {code: RejectGroup(code, int(n)) for code, n in counted.items()}
    seen: dict[str, int] = {}
    read, size, complete = 0, 0, True
    if path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            for raw in f:
                if read >= MAX_REJECT_ROWS or size >= MAX_REJECT_BYTES:
                    complete = False
                    break
                size += len(raw)
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    continue  # a torn last line (disk full): the rest is still worth showing
                read += 1
                code = str(rec.get("code") or "unknown")
                seen[code] = seen.get(code, 0) + 1
                group = groups.setdefault(code, RejectGroup(code, 0))
                file, line = str(rec.get("file") or "?"), rec.get("line")
                if sum(map(len, group.lines.values())) < LINES_PER_REASON and isinstance(line, int):
                    group.lines.setdefault(file, []).append(line)
                else:
                    group.more_lines += 1
                if len(group.examples) < EXAMPLES_PER_REASON:
                    group.examples.append({
                        "file": file, "line": line, "field": rec.get("field") or "",
                        "reason": rec.get("reason", ""), "row": _preview(rec.get("row")),
                    })
    for code, n in seen.items():
        # A code the report does not count (written by an older Evertune): what was read.
        groups[code].count = max(groups[code].count, n)
    ordered = sorted(groups.values(), key=lambda g: (-g.count, g.code))
    return Rejects(total_rows=int(report.get("rejected") or 0), groups=ordered,
                   path=path if path.is_file() else None, read=read, complete=complete)


def _preview(row: Any) -> str:
    """A rejected row as one line of text, cut to ROW_PREVIEW_CHARS."""
    text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
    return text if len(text) <= ROW_PREVIEW_CHARS else text[:ROW_PREVIEW_CHARS] + "…"


def _histogram(stats: dict[str, Any] | None) -> Any:
    """The token-length histogram of a report as a bar chart (None without one)."""
    hist = (stats or {}).get("histogram") or {}
    edges, counts = hist.get("bins") or [], hist.get("counts") or []
    if not counts or len(edges) < len(counts) + 1:
        return None
    # Bins are integer ranges [edge, next edge): label them by their first and last length.
    bars = [(f"{lo}–{hi - 1}" if hi - 1 > lo else str(lo), float(n))
            for lo, hi, n in zip(edges, edges[1:], counts, strict=False)]
    return bar_chart(bars, title="token lengths", x_label="tokens per example", y_label="examples")
