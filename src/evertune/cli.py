"""The `evertune` command line.

    evertune init demo
    evertune -w demo data add tickets.jsonl
    evertune -w demo tune                    # fine-tune → evaluate → register, with progress
    evertune -w demo models list

Heavy libraries (torch, transformers, mlflow) are imported inside the commands that need
them, so `--help` and the light commands answer in well under a second.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from evertune.errors import EvertuneError

if TYPE_CHECKING:
    from evertune.workspace import Workspace

# Piped output (CI logs, `| grep`) has no terminal width; Rich would assume 80 columns and
# abbreviate ids, which people then copy. Use a wide default unless COLUMNS says otherwise.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
console = Console(soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="evertune",
    help="Continuous fine-tuning: datasets → fine-tuning jobs → evaluation gate → model registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Validate, split and version training data.", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Fine-tuning jobs: list, inspect, cancel, pause, resume.", no_args_is_help=True
)
models_app = typer.Typer(help="Registered model versions.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")

SetOpt = typer.Option(
    [], "--set", help="Override a config value: --set train.n_epochs=2 (repeatable).",
    metavar="KEY=VALUE",
)


class _State:
    workspace: Path | None = None


_state = _State()


@app.callback()
def _main(
    workspace: Path = typer.Option(
        None, "-w", "--workspace", envvar="EVERTUNE_HOME",
        help="Workspace folder (default: the nearest one above the current folder).",
    ),
) -> None:
    _state.workspace = workspace


def _open(sets: list[str] | None = None) -> Workspace:
    from evertune.workspace import Workspace

    return Workspace.open(_state.workspace, sets or [])


def _quiet_libraries() -> None:
    """Silence library progress bars and info logs; Evertune draws its own progress."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF converter draws its own tqdm bar
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


# -- init --------------------------------------------------------------------------------
@app.command()
def init(
    directory: Path = typer.Argument(Path("."), help="Folder to create the workspace in."),
    force: bool = typer.Option(
        False, "--force", help="Rewrite evertune.yaml with the defaults and mint a new admin token."
    ),
) -> None:
    """Create a workspace: evertune.yaml with commented defaults, state folder, bucket, admin token."""  # noqa: E501 (--help text; Rich would keep a line break)
    from evertune.workspace import Workspace

    ws, token = Workspace.init(directory, force=force)
    if token is None:
        console.print(
            f"[yellow]{ws.root} is already a workspace[/]; "
            "nothing changed (use --force to reset the config)."
        )
        return
    console.print(f"[green]Workspace created[/] at {ws.root}")
    console.print(f"  config        {ws.root / 'evertune.yaml'}")
    console.print(f"  bucket        {ws.bucket_url}  (drop data under raw-data/)")
    console.print(f"  state         {ws.state_dir}")
    console.print(f"  admin token   stored in {ws.state_dir / 'token'} (mode 0600) for this CLI")
    console.print(f"\nNext: [bold]evertune -w {directory} up[/] and drop a JSON Lines file under "
                  f"{ws.bucket_url}/raw-data/ "
                  f"(the console is at http://{ws.config.server.host}:{ws.config.server.port}/), "
                  f"or one round by hand: [bold]evertune -w {directory} data add FILE.jsonl[/] "
                  f"then [bold]tune[/]")


# -- data --------------------------------------------------------------------------------
@data_app.command("add")
def data_add(
    files: list[Path] = typer.Argument(
        ..., help="JSON Lines (.jsonl) or text (.txt) files.", show_default=False
    ),
    sets: list[str] = SetOpt,
) -> None:
    """Validate, dedup and split FILES into a content-addressed dataset version."""
    ws = _open(sets)
    _quiet_libraries()
    from evertune import steps

    with console.status("Validating (the first run also converts the packaged base model, ~30 s)…"):
        result = steps.preprocess(ws, files)
    _print_add_result(result)


def _print_add_result(result: Any) -> None:
    report = result.report
    files = Table(title="Files", title_justify="left")
    for col in ("file", "format", "rows", "accepted", "rejected", "truncated"):
        files.add_column(col, justify="left" if col in ("file", "format") else "right")
    for f in report.get("files", []):
        files.add_row(
            str(f.get("file")), str(f.get("format")), _fmt(f.get("rows")), _fmt(f.get("accepted")),
            _fmt(f.get("rejected")), _fmt(f.get("truncated")),
        )
    console.print(files)
    for v in result.versions:
        _print_dataset(v)
    reasons = report.get("rejects_by_reason") or {}
    if reasons:
        t = Table(title="Rejected rows by reason", title_justify="left")
        t.add_column("reason")
        t.add_column("rows", justify="right")
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            t.add_row(reason, str(n))
        console.print(t)
    if result.rejected:
        console.print(
            f"[yellow]{result.rejected} row(s) rejected[/]; "
            f"each with its line number and reason in {result.rejected_path}"
        )


def _print_dataset(v: Any) -> None:
    t = Table(title=f"Dataset {v.id} ({v.kind})", title_justify="left", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    c = v.counts
    t.add_row(
        "records",
        f"{c.get('total', '-')}  (train {c.get('train', 0)} / "
        f"validation {c.get('validation', 0)} / test {c.get('test', 0)})",
    )
    stats = v.report.get("token_lengths") or {}
    if stats:
        t.add_row(
            "tokens/example",
            "  ".join(
                f"{k} {_fmt(stats[k])}" for k in ("min", "mean", "p50", "p95", "max") if k in stats
            ),
        )
    labels = v.report.get("labels")
    if isinstance(labels, dict):  # rated answers (kto)
        t.add_row("labels", f"{labels.get('desirable', 0)} good (true) / "
                  f"{labels.get('undesirable', 0)} bad (false)")
    for key in ("duplicates_dropped", "in_golden_set", "in_regression_suite", "truncated"):
        if v.report.get(key):
            t.add_row(key.replace("_", " "), str(v.report[key]))
    if v.report.get("origin") == "union":
        t.add_row("union of", ", ".join(v.report.get("union_of", [])))
    t.add_row("created", _when(v.created_at))
    t.add_row("path", str(v.path))
    console.print(t)


@data_app.command("list")
def data_list() -> None:
    """List dataset versions, newest first."""
    from evertune.data.store import list_datasets

    ws = _open()
    t = Table()
    for col in ("id", "kind", "total", "train", "validation", "test", "created"):
        t.add_column(col)
    for v in list_datasets(ws):
        c = v.counts
        t.add_row(
            v.id, v.kind, *(str(c.get(k, 0)) for k in ("total", "train", "validation", "test")),
            _when(v.created_at),
        )
    console.print(t if t.row_count else "No datasets yet: [bold]evertune data add FILE.jsonl[/]")


@data_app.command("show")
def data_show(dataset: str = typer.Argument(..., help="Dataset id or a unique prefix.")) -> None:
    """Show a dataset version's report."""
    from evertune.data.store import get_dataset

    v = get_dataset(_open(), dataset)
    _print_dataset(v)
    reasons = v.report.get("rejects_by_reason") or {}
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        console.print(f"  rejected ({reason}): {n}")
    if reasons:
        console.print(f"  rows and line numbers: {v.path / 'rejected.jsonl'}")


@data_app.command("suite")
def data_suite(
    examples: int = typer.Option(3, "--examples", "-n", help="How many records to show."),
    sync: bool = typer.Option(
        False, "--sync", help="First add the test records of every version ever in PROD."
    ),
) -> None:
    """Show the regression suite: the test examples versions in PROD were evaluated on."""
    from evertune.evaluation.regression_suite import add_prod_history, suite_info

    ws = _open()
    if sync:
        console.print(f"{add_prod_history(ws)} new record(s) from versions ever in PROD")
    info = suite_info(ws, examples)
    state = "" if ws.config.eval.regression_suite else "  [yellow](eval.regression_suite: off)[/]"
    console.print(f"[bold]{info.total}[/] record(s) in {info.path}{state}")
    t = Table()
    for col in ("version", "eval report", "dataset", "records", "new", "note"):
        t.add_column(col)
    for s in info.sources:
        t.add_row(f"v{s['version']}", _fmt(s.get("eval_report")), _fmt(s.get("dataset")),
                  str(s.get("records", 0)), str(s.get("added", 0)), s.get("note") or "")
    if t.row_count:
        console.print(t)
    for record in info.examples:
        console.print(json.dumps(record, ensure_ascii=False), markup=False, highlight=False)


# -- tune / jobs ---------------------------------------------------------------------------
class _TrainProgress:
    """A Rich progress bar fed by the job's metric rows (step, loss, tokens/s, ETA)."""

    def __init__(self, label: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
        )
        self.task = self.progress.add_task(label, total=None, loss="-", tps="-")

    def __enter__(self) -> _TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, info: dict[str, Any]) -> None:
        loss, tps = info.get("loss"), info.get("tokens_per_s")
        self.progress.update(
            self.task, completed=info.get("step") or 0, total=info.get("total_steps"),
            loss=f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
            tps=f"{tps:.0f}" if isinstance(tps, (int, float)) else "-",
        )


class _EvalProgress:
    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]evaluating {task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _EvalProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, label: str, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(self.tasks[label], completed=done, total=total)


def _train_and_register(ws: Workspace, job_id: str, *, resume: bool = False) -> None:
    """Follow a job with a progress bar, then evaluate and register its result."""
    from evertune import steps
    from evertune.evaluation import print_report

    job = _train_only(ws, job_id)
    console.print(f"adapter at {job.result['path'] if job.result else '-'}")
    with _EvalProgress() as bar:
        report = steps.evaluate(ws, job, progress=bar)
    print_report(report, console)
    version = steps.register(ws, job, report)
    colour = ("yellow" if version.gate == "inconclusive" else
              "green" if version.approval_status == "PendingManualApproval" else "red")
    console.print(
        f"Registered [bold]{ws.config.model.name} v{version.version}[/] — approval status "
        f"[{colour}]{version.approval_status}[/] (gate {version.gate}). "
        f"Details: `evertune models show {version.version}`"
    )


@app.command()
def tune(
    dataset: str = typer.Option(
        None, "--dataset", "-d",
        help="Dataset id (default: per data.mode, all accepted data of the method's kind).",
    ),
    parent: str = typer.Option(
        None, "--parent", help="Continue from this registered version's adapter."
    ),
    method: str = typer.Option(
        None, "--method", "-m",
        help="supervised | pretrain | dpo | kto | auto (default: train.stages, else "
        "train.method; auto: the dataset's kind decides).",
    ),
    sets: list[str] = SetOpt,
) -> None:
    """Fine-tune the base model (LoRA by default), then evaluate and register the result.

    With train.stages set (e.g. pretrain, supervised, dpo) each stage is a job that continues
    from the previous one; the last is evaluated and registered."""
    ws = _open(sets)
    _quiet_libraries()
    from evertune import steps

    def say(line: str) -> None:
        console.print(line, highlight=False)

    plan = steps.plan_round(ws, method=method, dataset_ref=dataset, log=say)

    def started(number: int, stage: Any, job: Any, message: str) -> None:
        if job.status == "succeeded":
            return  # said by _train_only
        where = f"Stage {number}/{len(plan)}, job" if len(plan) > 1 else "Job"
        console.print(
            f"{where} [bold]{job.id}[/]: {job.method} on dataset {stage.dataset.id} "
            f"({stage.dataset.counts.get('train', 0)} training examples), base {job.model}"
        )

    def follow_stage(job: Any) -> Any:
        # Stages before the last; the last is followed, evaluated and registered below.
        _train_only(ws, job.id)
        return steps.follow_job(ws, job)

    jobs_done = steps.run_stages(ws, plan, parent=parent, wait=follow_stage, on_stage=started,
                                 follow_last=False)
    _train_and_register(ws, jobs_done[-1].id)


def _train_only(ws: Workspace, job_id: str) -> Any:
    """Follow a job with a progress bar until it succeeds (Ctrl-C cancels it; exit 130)."""
    from evertune import steps
    from evertune.training.jobs import cancel_job

    try:
        with _TrainProgress(f"training {job_id}") as bar:
            job = steps.follow(ws, job_id, on_progress=bar)
    except KeyboardInterrupt:
        cancel_job(ws, job_id)
        err_console.print(
            f"[yellow]Interrupted: job {job_id} is being cancelled.[/] "
            f"Resume it later with `evertune jobs resume {job_id}`."
        )
        raise typer.Exit(130) from None
    console.print(f"[green]Job {job.id} succeeded[/]: {job.trained_tokens} tokens trained")
    return job


@app.command("eval")
def eval_(
    version: str = typer.Argument(..., help="Registered version number."),
    dataset: str = typer.Option(
        None, "--dataset", "-d",
        help="Evaluate on this dataset's test split (default: the version's own).",
    ),
    sets: list[str] = SetOpt,
) -> None:
    """Evaluate a registered version against PROD (if any) and the base model; print the gate."""
    ws = _open(sets)
    _quiet_libraries()
    from evertune import steps
    from evertune.evaluation import print_report

    with _EvalProgress() as bar:
        report = steps.evaluate_version(ws, version, dataset, progress=bar)
    print_report(report, console)


def _jobs_table(jobs: list[Any]) -> Table:
    t = Table()
    for col in ("id", "status", "method", "dataset", "parent", "created", "finished", "tokens"):
        t.add_column(col)
    colours = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan",
               "paused": "magenta"}
    for j in jobs:
        c = colours.get(j.status, "white")
        t.add_row(
            j.id, f"[{c}]{j.status}[/]", j.method, j.training_file, j.parent or "-",
            _when(j.created_at), _when(j.finished_at), str(j.trained_tokens or 0),
        )
    return t


@jobs_app.command("list")
def jobs_list(limit: int = typer.Option(20, "--limit", "-n", min=1)) -> None:
    """List fine-tuning jobs, newest first."""
    from evertune.training.jobs import list_jobs

    jobs = list_jobs(_open(), limit=limit)
    console.print(_jobs_table(jobs) if jobs else "No jobs yet: [bold]evertune tune[/]")


@jobs_app.command("show")
def jobs_show(
    job_id: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json", help="Print the OpenAI-shaped job object."),
) -> None:
    """Show a job: status, hyperparameters, checkpoints, result, error."""
    from evertune.training.jobs import get_job, list_checkpoints

    ws = _open()
    job = get_job(ws, job_id)
    if as_json:
        console.print_json(job.model_dump_json())
        return
    console.print(_jobs_table([job]))
    console.print("[bold]hyperparameters[/] " + json.dumps(job.hyperparameters))
    if job.error:
        console.print(f"[red]error[/] {job.error.get('code')}: {job.error.get('message')}")
    if job.result:
        console.print(f"[bold]result[/] {job.result}")
    cps = list_checkpoints(ws, job_id)
    if cps:
        t = Table(title="checkpoints", title_justify="left")
        for col in ("step", "metrics", "path"):
            t.add_column(col)
        for cp in cps:
            cp = cp if isinstance(cp, dict) else cp.model_dump()
            t.add_row(
                str(cp.get("step_number", cp.get("step"))), json.dumps(cp.get("metrics")),
                str(cp.get("path")),
            )
        console.print(t)


@jobs_app.command("events")
def jobs_events(job_id: str = typer.Argument(...)) -> None:
    """Print a job's timestamped events."""
    from evertune.training.jobs import list_events

    colours = {"info": "white", "warn": "yellow", "error": "red"}
    for e in list_events(_open(), job_id):
        e = e if isinstance(e, dict) else e.model_dump()
        console.print(
            f"{_when(e['created_at'])} [{colours.get(e['level'], 'white')}]{e['level']:5}[/] "
            f"{e['message']}",
            highlight=False,
        )


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(...)) -> None:
    """Cancel a queued, running or paused job (honoured within one training step)."""
    from evertune.training.jobs import cancel_job

    job = cancel_job(_open(), job_id)
    console.print(f"Job {job.id}: {job.status}")


@jobs_app.command("pause")
def jobs_pause(job_id: str = typer.Argument(...)) -> None:
    """Pause a running job: it saves a checkpoint after the current step; `jobs resume` continues it."""  # noqa: E501 (--help text; Rich would keep a line break)
    from evertune.training.jobs import pause_job

    job = pause_job(_open(), job_id)
    console.print(
        f"Job {job.id}: pause requested; it saves a checkpoint and pauses after the current "
        f"step. Continue it with `evertune jobs resume {job.id}`"
    )


@jobs_app.command("resume")
def jobs_resume(job_id: str = typer.Argument(...), sets: list[str] = SetOpt) -> None:
    """Resume a paused, failed, cancelled or killed job from its last checkpoint, then evaluate and register."""  # noqa: E501 (--help text; Rich would keep a line break)
    ws = _open(sets)
    _quiet_libraries()
    from evertune.training.jobs import get_job, resume_job

    paused_run = None
    if (before := get_job(ws, job_id)).status == "paused" and before.run_id:
        from evertune import pipeline
        from evertune.steps import run_of_job

        run = pipeline.find_run(ws, str(run_of_job(before.run_id)))
        paused_run = run.id if run is not None and run.status in ("queued", "running") else None
    job = resume_job(ws, job_id)
    console.print(f"Job [bold]{job.id}[/] resumed")
    if paused_run:
        # Its pipeline run is still waiting on the job: it evaluates and registers it.
        console.print(
            f"Its pipeline run {paused_run} evaluates and registers it: "
            f"`evertune runs wait {paused_run}`"
        )
        return
    _train_and_register(ws, job.id, resume=True)


# -- models --------------------------------------------------------------------------------
@models_app.command("list")
def models_list(
    as_json: bool = typer.Option(False, "--json", help="Print the versions as a JSON list."),
) -> None:
    """List registered versions with status, gate and key metrics."""
    from evertune.registry import Registry

    ws = _open()
    versions = Registry(ws).list_versions()
    if as_json:
        print(json.dumps([v.to_dict() for v in versions], default=str))
        return
    if not versions:
        console.print(f"No versions of {ws.config.model.name} yet: [bold]evertune tune[/]")
        return
    t = Table(title=ws.config.model.name, title_justify="left")
    for col in ("version", "stage", "approval", "gate", "dataset", "job", "parent", "created"):
        t.add_column(col)
    for v in versions:
        t.add_row(
            str(v.version), str(getattr(v.stage, "value", v.stage)), v.approval_status,
            v.gate or "-", v.dataset or "-", v.job or "-", v.parent_version or "-",
            _when(v.created_at),
        )
    console.print(t)


@models_app.command("show")
def models_show(version: str = typer.Argument(..., help="Version number.")) -> None:
    """Show a version: status, metrics, lineage."""
    from evertune.registry import Registry

    ws = _open()
    v = Registry(ws).get_version(version)
    t = Table(title=f"{ws.config.model.name} v{v.version}", title_justify="left", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for key in (
        "stage", "approval_status", "gate", "dataset", "job", "base_model", "parent_version",
        "pipeline_run", "run_id", "source",
    ):
        val = getattr(v, key, None)
        t.add_row(key, str(getattr(val, "value", val)) if val is not None else "-")
    t.add_row("created", _when(v.created_at))
    # The version's own facts: what serving and evaluation load it with (not evertune.yaml).
    f = v.facts
    if f:
        fp = f.get("base_fingerprint")
        t.add_row("base fingerprint", fp[:16] if fp else "-")
        t.add_row("method", f"{f.get('method', '-')} ({f.get('kind', '-')})")
        lora = f.get("lora") or {}
        if lora:
            t.add_row("lora", f"r={lora.get('r')} alpha={lora.get('alpha')} "
                      f"targets={','.join(lora.get('target_modules') or [])}")
        t.add_row("max_seq_len", str(f.get("max_seq_len", "-")))
        stages = f.get("stages")
        if isinstance(stages, list) and stages:
            # A chain (train.stages): each stage's method, dataset and job, in order.
            t.add_row("stages", "\n".join(
                f"{n}. {x.get('method', '-')} on {x.get('dataset', '-')} ({x.get('job', '-')})"
                if isinstance(x, dict) else f"{n}. {x}" for n, x in enumerate(stages, 1)))
    console.print(t)
    if v.gate == "inconclusive":
        console.print("[yellow]gate inconclusive[/]: too few examples to tell; review it:")
        for reason in v.gate_reasons:
            console.print(f"  - {reason}", highlight=False, markup=False)
    _print_splits(ws, v.eval_report)
    if v.metrics:
        m = Table(title="metrics", title_justify="left")
        m.add_column("metric")
        m.add_column("value", justify="right")
        for k, val in sorted(v.metrics.items()):
            m.add_row(k, _fmt(val))
        console.print(m)
    if v.description:
        console.print(v.description)


def _print_splits(ws: Any, report_id: str | None) -> None:
    """The version's gate split by split (test, golden, regression, general), from its report:
    each gated metric's candidate and reference means and the check's outcome."""
    from evertune.errors import EvertuneError
    from evertune.evaluation.report import load_report

    if not report_id:
        return
    try:
        report = load_report(ws.evals_dir / report_id / "report.json")
    except (OSError, ValueError, EvertuneError):
        return  # the report is gone or from another version of Evertune: metrics still show
    t = Table(title=f"gate by split (candidate vs {report.reference_role})",
              title_justify="left")
    for col in ("split", "examples", "metric", "candidate", report.reference_role, "outcome"):
        t.add_column(col, justify="right" if col in ("examples", "candidate",
                                                      report.reference_role) else "left")
    colours = {"pass": "green", "fail": "red", "inconclusive": "yellow"}
    for split in report.splits.values():
        for i, rule in enumerate(split.gate.rules):
            t.add_row(split.name if i == 0 else "", str(split.n_examples) if i == 0 else "",
                      rule.metric, _fmt(rule.candidate_mean), _fmt(rule.reference_mean),
                      f"[{colours[rule.outcome]}]{rule.outcome}[/]")
    console.print(t)


# -- approvals and deployments ----------------------------------------------------------------
CommentOpt = typer.Option(
    ..., "--comment", "-m", help="Why (required; recorded in the audit trail)."
)


def _print_deploy(result: Any) -> None:
    for mv in result.moves:
        console.print(
            f"  v{mv.version}: {mv.from_stage} → {mv.to_stage}  ({mv.reason})", highlight=False
        )
    if result.system_tests is not None:
        tests = result.system_tests
        colour = "green" if tests.passed else "yellow" if tests.environment else "red"
        console.print(f"  system tests: [{colour}]{tests.summary()}[/]", highlight=False)
    console.print(result.message, highlight=False)


@app.command()
def approve(
    version: str = typer.Argument(..., help="Version number."),
    comment: str = typer.Option(
        None, "--comment", "-m",
        help="Why (required, except with --retry; recorded in the audit trail).",
    ),
    force: bool = typer.Option(
        False, "--force",
        help="Admin only: approve a version the gate or system tests rejected.",
    ),
    retry: bool = typer.Option(
        False, "--retry",
        help="Rerun the QA system tests of an approved version whose last attempt failed "
        "because of the environment (a busy machine, a load error).",
    ),
) -> None:
    """Approve a version: deploy it to QA, run system tests, then promote to PROD (deploy.auto_promote)."""  # noqa: E501 (--help text; Rich would keep a line break)
    if not retry and not (comment or "").strip():
        err_console.print(
            f"[red]error:[/] approving needs a comment saying why (it goes to the audit log): "
            f"evertune approve {version} -m 'better on billing tickets'", highlight=False,
        )
        raise typer.Exit(2)
    ws = _open()
    _quiet_libraries()
    from evertune import auth, deploy

    with console.status(f"Deploying v{version} to QA and running system tests…"):
        result = deploy.approve(ws, version, auth.local_principal(ws), comment or "",
                                force=force, retry=retry)
    _print_deploy(result)
    if result.retry:
        raise typer.Exit(1)  # not deployed: a script must not carry on as if it were


@app.command()
def reject(
    version: str = typer.Argument(..., help="Version number."), comment: str = CommentOpt
) -> None:
    """Reject a pending (or QA) version."""
    ws = _open()
    from evertune import auth, deploy

    _print_deploy(deploy.reject(ws, version, auth.local_principal(ws), comment))


@app.command()
def promote(
    version: str = typer.Argument(None, help="Version in QA (default: the one in QA)."),
    comment: str = typer.Option("", "--comment", "-m", help="Why (recorded in the audit trail)."),
    canary: int = typer.Option(
        None, "--canary",
        help="Give the version this percent (1-99) of the callers first; it is promoted or "
        "rolled back automatically (deploy.canary).",
    ),
) -> None:
    """Promote the QA version to PROD (when deploy.auto_promote is false), or start a canary."""
    ws = _open()
    _quiet_libraries()
    from evertune import auth, deploy

    _print_deploy(deploy.promote(ws, version, auth.local_principal(ws), comment, canary=canary))


@app.command()
def rollback(
    comment: str = typer.Option("", "--comment", "-m", help="Why (recorded in the audit trail)."),
    to: str = typer.Option(None, "--to", help="Version to return to (default: the previous PROD)."),
) -> None:
    """Point PROD back at the previous PROD version."""
    ws = _open()
    from evertune import auth, deploy

    _print_deploy(deploy.rollback(ws, auth.local_principal(ws), comment, to=to))


@app.command()
def audit(
    version: str = typer.Option(None, "--version", "-v", help="Only this version."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
) -> None:
    """The audit trail: every registration and stage transition (actor, time, from, to, why)."""
    from evertune.registry import Registry

    ws = _open()
    rows = Registry(ws).audit_log(
        version=int(version.lstrip("v")) if version else None, limit=limit
    )
    t = Table()
    for col in ("time", "version", "action", "from", "to", "actor", "reason"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            _when(r.created_at), f"v{r.version}", r.action, r.from_stage or "-", r.to_stage or "-",
            r.actor, r.reason,
        )
    console.print(t if t.row_count else "No audit records yet.")


db_app = typer.Typer(help="The state DB's schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _state_engine(sets: list[str] | None) -> tuple[Any, str]:
    """(engine without migrating, the URL with its password hidden) of the workspace's state DB."""
    from sqlalchemy import make_url

    from evertune import db

    ws = _open(sets)
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    url = ws.state_db_url
    return db.connect(url, migrate=False), make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def db_upgrade(sets: list[str] = SetOpt) -> None:
    """Migrate the state DB to the newest schema (safe to run from several hosts at once)."""
    from sqlalchemy.exc import OperationalError

    from evertune import migrations
    from evertune.db import server_error, storage_error

    engine, shown = _state_engine(sets)
    try:
        was = migrations.upgrade(engine)
    except OperationalError as exc:
        if engine.dialect.name == "sqlite":
            raise storage_error(f"the state DB {shown}", exc) from exc
        raise server_error(str(engine.url), exc) from exc
    now = migrations.current(engine)
    if was == now:
        console.print(f"state DB {shown} is at revision {now} (the newest); nothing to do",
                      highlight=False)
    else:
        console.print(f"state DB {shown}: migrated from {was or 'empty'} to {now}",
                      highlight=False)


@db_app.command("current")
def db_current(sets: list[str] = SetOpt) -> None:
    """Show the state DB's schema revision and the newest one this Evertune knows."""
    from evertune import migrations

    engine, shown = _state_engine(sets)
    now = migrations.current(engine)
    state = "up to date" if now == migrations.HEAD else "run `evertune db upgrade`"
    console.print(f"state DB {shown}: revision {now or 'none'}; newest {migrations.HEAD} "
                  f"({state})", highlight=False)


tokens_app = typer.Typer(help="API tokens (admin): create, list, revoke.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")


@tokens_app.command("create")
def tokens_create(
    name: str = typer.Argument(..., help="Who or what uses it, e.g. alice or ci."),
    role: str = typer.Option(
        ..., "--role", "-r", help="viewer | operator | approver | admin | serving"
    ),
) -> None:
    """Mint a token; it is shown once (only its hash is stored)."""
    from evertune import auth

    ws = _open()
    secret, info = auth.create_token(ws, name, role, auth.local_principal(ws))
    console.print(
        f"Token #{info.id} for {info.name} ({info.role}) — store it now, it is not shown again:"
    )
    print(secret)


@tokens_app.command("list")
def tokens_list() -> None:
    """List tokens (never the secrets)."""
    from evertune import auth

    ws = _open()
    t = Table()
    for col in ("id", "name", "role", "created", "revoked"):
        t.add_column(col)
    for info in auth.list_tokens(ws, auth.local_principal(ws)):
        t.add_row(
            str(info.id), info.name, info.role, _when(info.created_at),
            "yes" if info.revoked else "",
        )
    console.print(t)


@tokens_app.command("revoke")
def tokens_revoke(token: str = typer.Argument(..., help="Token id or name.")) -> None:
    """Revoke a token; requests with it get 401 from then on."""
    from evertune import auth

    ws = _open()
    info = auth.revoke_token(ws, int(token) if token.isdigit() else token, auth.local_principal(ws))
    console.print(f"Token #{info.id} ({info.name}, {info.role}) revoked.")


# -- pipeline runs and request logs -----------------------------------------------------------
runs_app = typer.Typer(
    help="Pipeline runs: one per new object in the bucket (or API job).", no_args_is_help=True
)
app.add_typer(runs_app, name="runs")
_STATE_COLOURS = {
    "succeeded": "green", "failed": "red", "running": "cyan", "queued": "yellow",
    "pending": "white", "skipped": "dim",
}


@runs_app.command("list")
def runs_list(
    limit: int = typer.Option(20, "--limit", "-n", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as a JSON list."),
) -> None:
    """List pipeline runs, newest first."""
    from evertune.pipeline import list_runs

    runs = list_runs(_open(), limit=limit)
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in runs]))
        return
    t = Table()
    for col in ("run", "status", "trigger", "step", "version", "created", "duration", "note"):
        t.add_column(col)
    for r in runs:
        trig = r.trigger.get("key") or r.trigger.get("file_id") or r.trigger.get("source", "-")
        cur = next((s.name for s in r.steps if s.status == "running"), "-")
        c = _STATE_COLOURS.get(r.status, "white")
        dur = f"{r.duration_s:.1f}s" if r.duration_s is not None else "-"
        t.add_row(
            r.id, f"[{c}]{r.status}[/]", str(trig), cur, f"v{r.version}" if r.version else "-",
            _when(r.created_at), dur, _run_note(r),
        )
    console.print(
        t if t.row_count
        else "No runs yet: drop a file under the bucket's raw-data/ while `evertune up` runs.",
        highlight=False,
    )


def _run_note(run: Any) -> str:
    """Why a run ended as it did (skip reason, error), or what it retries."""
    note = run.skip_reason or run.error or ""
    if run.retry_of:
        note = f"retry of {run.retry_of}" + (f"; {note}" if note else "")
    # One table row each; `runs show` and `runs list --json` have the whole text.
    return note if len(note) <= 160 else note[:159] + "…"


@runs_app.command("retry")
def runs_retry(
    run_id: str = typer.Argument(..., help="The failed run."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the retry to finish."),
    timeout: float = typer.Option(3600.0, "--timeout", min=1, help="Seconds --wait waits."),
) -> None:
    """Run a failed run again from its failed step; steps that succeeded (training) are reused."""
    from evertune import auth, pipeline

    ws = _open()
    new_id = pipeline.retry_run(ws, run_id, actor=auth.local_principal(ws).name)
    run = pipeline.get_run(ws, new_id)
    console.print(
        f"run {new_id} retries {run_id} (status {run.status}); the steps that succeeded are "
        f"reused, the rest run when `evertune up` picks it up: `evertune runs wait {new_id}`",
        highlight=False,
    )
    if wait:
        runs_wait(new_id, key=None, timeout=timeout)


@runs_app.command("show")
def runs_show(run_id: str = typer.Argument(...)) -> None:
    """Show a run as its DAG of steps, with states, timings, outputs and logs."""
    from rich.tree import Tree

    from evertune.pipeline import get_run

    r = get_run(_open(), run_id)
    c = _STATE_COLOURS.get(r.status, "white")
    tree = Tree(
        f"[bold]{r.id}[/] [{c}]{r.status}[/]  trigger {json.dumps(r.trigger)}", highlight=False
    )
    icons = {"succeeded": "✔", "failed": "✘", "running": "▶", "pending": "·", "skipped": "–"}
    node = tree
    for step in r.steps:
        sc = _STATE_COLOURS.get(step.status, "white")
        dur = f" {step.duration_s:.1f}s" if step.duration_s is not None else ""
        node = node.add(
            f"[{sc}]{icons.get(step.status, '?')} {step.name}[/] {step.status}{dur}"
            + (f"  attempts {step.attempts}" if step.attempts > 1 else "")
        )
        if step.outputs:
            node.add("outputs " + json.dumps(step.outputs), style="dim")
        for line in step.logs[-5:]:
            node.add(
                f"{_when(line.get('t') or line.get('created_at'))} {line.get('message', line)}",
                style="dim",
            )
        if step.error:
            node.add(f"[red]{step.error}[/]")
    console.print(tree)
    if r.retry_of:
        console.print(f"retry of run {r.retry_of}", highlight=False)
    if r.skip_reason:
        console.print(f"skipped: {r.skip_reason}", highlight=False)
    if r.error:
        console.print(f"[red]error:[/] {r.error}", highlight=False)
        if r.status == "failed":
            console.print(f"retry it from the failed step: evertune runs retry {r.id}",
                          highlight=False)


@runs_app.command("wait")
def runs_wait(
    run_id: str = typer.Argument(
        None, help="Run id (default: the newest run; if there is none yet, the next one to start)."
    ),
    key: str | None = typer.Option(
        None, "--key",
        help="Wait for the run of the object now at this bucket key (raw-data/x.jsonl), even "
        "before the watcher has started it.",
    ),
    timeout: float = typer.Option(
        3600.0, "--timeout", min=1,
        help="Seconds to wait before giving up (the run keeps going).",
    ),
) -> None:
    """Wait for a pipeline run to finish, showing its steps live; exit 1 if it failed."""
    from rich.live import Live

    from evertune.pipeline import find_run, get_run, list_runs, run_id_for_key

    ws = _open()
    deadline = time.monotonic() + timeout
    if run_id and key:
        err_console.print("[red]error:[/] give a run id or --key, not both")
        raise typer.Exit(2)
    if key:
        # The run id follows from bucket + key + the object's current version: this drop's
        # run, never an older run (of another key, or of this key's previous content).
        wanted = run_id_for_key(ws, key)
        with console.status(f"waiting for the watcher to start the run of {key} ({wanted})"):
            while (found := find_run(ws, wanted)) is None:
                if time.monotonic() > deadline:
                    err_console.print(
                        f"[red]error:[/] no run for {key} started within {timeout:g} s; is "
                        "`evertune up` running, and is the key under trigger.prefix (raw-data/)?",
                        highlight=False,
                    )
                    raise typer.Exit(1)
                time.sleep(0.5)
        run = found
    elif run_id:
        run = get_run(ws, run_id)  # an unknown id is an error at once, with recent run ids
    else:
        with console.status(
            "waiting for a pipeline run to start "
            "(drop a file under the bucket's raw-data/; is `evertune up` running?)"
        ):
            while (run := next(iter(list_runs(ws, limit=1)), None)) is None:
                if time.monotonic() > deadline:
                    err_console.print(
                        f"[red]error:[/] no pipeline run started within {timeout:g} s; "
                        "is `evertune up` running, and is the file under the bucket's raw-data/?"
                    )
                    raise typer.Exit(1)
                time.sleep(0.5)
    with Live(_run_table(ws, run), console=console, refresh_per_second=4, transient=False) as live:
        while not run.finished:
            if time.monotonic() > deadline:
                live.update(_run_table(ws, run))
                err_console.print(
                    f"[yellow]run {run.id} is still {run.status} after {timeout:g} s; "
                    f"it keeps going (`evertune runs show {run.id}`)[/]"
                )
                raise typer.Exit(1)
            time.sleep(0.5)
            run = find_run(ws, run.id) or run
            live.update(_run_table(ws, run))
    if not console.is_terminal:
        console.print()  # Live leaves its last frame without a line end in a log file or pipe
    if run.status == "skipped":
        console.print(f"run {run.id} skipped: {run.skip_reason}", highlight=False)
        return
    if run.status != "succeeded":
        err_console.print(f"[red]run {run.id} failed[/]: {run.error}", highlight=False)
        err_console.print(f"once the cause is fixed: evertune runs retry {run.id}",
                          highlight=False)
        raise typer.Exit(1)
    console.print(
        f"[green]run {run.id} succeeded[/]"
        + (
            f": registered {run.model} v{run.version} (`evertune models show {run.version}`)"
            if run.version else ""
        )
    )


def _run_table(ws: Workspace, run: Any) -> Table:
    """A run's steps as a table; the FineTuning row carries the job's step, loss and ETA."""
    from evertune.training import jobs

    c = _STATE_COLOURS.get(run.status, "white")
    t = Table(title=f"run {run.id} [{c}]{run.status}[/]", title_justify="left")
    for col in ("step", "status", "time", "detail"):
        t.add_column(col)
    for step in run.steps:
        sc = _STATE_COLOURS.get(step.status, "white")
        detail = step.error or (step.logs[-1].get("message", "") if step.logs else "")
        if step.name == "FineTuning" and step.status == "running" and run.job_id:
            job = jobs.get_job(ws, run.job_id)
            p = jobs.progress_of(jobs.list_metrics(ws, job.id), job)
            if p["total_steps"]:
                loss = f", loss {p['loss']:.3f}" if isinstance(p["loss"], (int, float)) else ""
                eta = f", ETA {p['eta']:.0f} s" if isinstance(p["eta"], (int, float)) else ""
                detail = f"job {job.id}: step {p['step']}/{p['total_steps']}{loss}{eta}"
        dur = f"{step.duration_s:.1f}s" if step.duration_s is not None else "-"
        t.add_row(step.name, f"[{sc}]{step.status}[/]", dur, str(detail)[:100])
    return t


@app.command()
def logs(
    limit: int = typer.Option(20, "--limit", "-n", min=1),
    version: str = typer.Option(
        None, "--version", "-v", help="Only requests answered by this version (v3)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The serving request log (sampled, redacted), newest first."""
    from evertune.monitoring import list_requests

    rows = list_requests(_open(), limit=limit, version=version)
    if as_json:
        for r in rows:
            print(json.dumps(r.to_dict()))
        return
    t = Table()
    for col in ("time", "model", "status", "tokens in/out", "ttft", "prompt", "completion"):
        t.add_column(col)
    for r in rows:
        ttft = f"{r.ttft_s * 1000:.0f} ms" if r.ttft_s is not None else "-"
        t.add_row(
            _when(r.created_at), f"{r.model} ({r.version})", r.status,
            f"{r.prompt_tokens}/{r.completion_tokens}", ttft, str(r.prompt)[:60],
            str(r.completion)[:60],
        )
    console.print(t if t.row_count else "No requests logged yet.")


# -- processes -----------------------------------------------------------------------------
@app.command()
def up(
    host: str = typer.Option(None, "--host", help="Bind address (default: server.host)."),
    port: int = typer.Option(None, "--port", "-p", help="Port (default: server.port)."),
    serving: bool = typer.Option(
        True, "--serving/--no-serving",
        help="Also serve the models (/v1). --no-serving: a control plane only, with serving in "
        "separate `evertune serve` processes.",
    ),
    sets: list[str] = SetOpt,
) -> None:
    """Run everything on one port: web console, control API, pipeline runtime, bucket watcher, serving."""  # noqa: E501 (--help text; Rich would keep a line break)
    ws = _open(sets)
    from evertune.locks import WorkspaceLock
    from evertune.replicas import shared_state
    from evertune.serving.keys import require_keys_off_loopback

    # Refused before anything starts or is printed (server.run checks again for other callers).
    require_keys_off_loopback(ws, host or ws.config.server.host)
    from evertune.server import preflight

    preflight(ws)  # the MLflow server answers, the bucket can be listed
    if shared_state(ws):
        # A Postgres state DB: this is one of any number of replicas (evertune.replicas); the
        # one holding the workspace lock runs the watcher and drift monitor.
        _up_replica(ws, host, port, serving)
        return
    # One `up` per workspace: two would both run the pipeline and the watcher. Taken before the
    # heavy imports so a second `up` is refused at once, naming the process that holds it.
    lock = WorkspaceLock(ws, "evertune up", on_lost=_stop_this_process).acquire()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it with the handler found at
    # start: make that one an exit through `finally`, so the lock is released (the default
    # action would end the process on the spot and leave the row to be taken over).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        if lock.taken_over is not None:
            console.print(
                f"[yellow]took over the workspace from {lock.taken_over.describe()}, "
                "which is no longer running[/]", highlight=False,
            )
        _quiet_libraries()
        from evertune import server

        h, p = host or ws.config.server.host, port or ws.config.server.port
        serves = f"serving http://{h}:{p}/v1" if serving else "no serving (--no-serving)"
        console.print(
            f"Evertune up: workspace {ws.root}, bucket {ws.bucket_url}\n"
            f"  console http://{h}:{p}/  "
            f"(sign in with a token: {ws.state_dir / 'token'} holds the admin's)\n"
            f"  API http://{h}:{p}/api · {serves} · Ctrl-C stops",
            highlight=False,
        )
        server.run(ws, host=h, port=p, serving=serving)
    finally:
        lock.release()


def _up_replica(ws: Any, host: str | None, port: int | None, serving: bool) -> None:
    """`evertune up` as one of several replicas on a shared (Postgres) state DB."""
    from sqlalchemy import make_url

    signal.signal(signal.SIGTERM, _exit_on_signal)
    _quiet_libraries()
    from evertune import server

    h, p = host or ws.config.server.host, port or ws.config.server.port
    state = make_url(ws.state_db_url).render_as_string(hide_password=True)
    serves = f"serving http://{h}:{p}/v1" if serving else "no serving (--no-serving)"
    console.print(
        f"Evertune up (a replica on state DB {state}): workspace {ws.root}, bucket "
        f"{ws.bucket_url}\n  console http://{h}:{p}/ · API http://{h}:{p}/api · {serves}\n"
        "  the leading replica runs the bucket watcher; any replica runs queued rounds and "
        "recovers those of a dead one · Ctrl-C stops",
        highlight=False,
    )
    server.run(ws, host=h, port=p, serving=serving, replicas=True, on_lost=_stop_this_process)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_this_process(reason: str) -> None:
    """The workspace lock was lost (see evertune.locks): shut down as on Ctrl-C."""
    err_console.print(f"[red]error:[/] {reason}", highlight=False)
    os.kill(os.getpid(), signal.SIGTERM)


@app.command()
def serve(
    stage: list[str] = typer.Option(
        ["prod"], "--stage", help="Stage(s) to serve: prod, qa (repeatable)."
    ),
    host: str = typer.Option(None, "--host", help="Bind address (default: server.host)."),
    port: int = typer.Option(None, "--port", "-p", help="Port (default: server.port)."),
    sets: list[str] = SetOpt,
) -> None:
    """Serving only (OpenAI-compatible /v1 + /metrics); follows the stage aliases as they move."""
    ws = _open(sets)
    bad = [s for s in stage if s not in ("prod", "qa")]
    if bad:
        raise typer.BadParameter(
            f"unknown stage(s) {', '.join(bad)}; use prod and/or qa", param_hint="--stage"
        )
    _quiet_libraries()
    from evertune import server
    from evertune.serving.keys import require_keys_off_loopback

    h, p = host or ws.config.server.host, port or ws.config.server.port
    require_keys_off_loopback(ws, h)  # before the banner: nothing starts on a refused address
    console.print(f"Evertune serve ({', '.join(stage)}): http://{h}:{p}/v1  (Ctrl-C stops)")
    server.run(ws, host=h, port=p, control=False, stages=tuple(stage))


def main() -> None:
    """Entry point: run the app; print Evertune errors as messages, not tracebacks.

    A database or file the workspace cannot write (read-only, disk full) surfaces from deep
    inside SQLAlchemy or MLflow; it is a problem of the machine, not a bug, so it too becomes a
    message naming the store and the fix instead of a traceback.
    """
    try:
        app()
    except EvertuneError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except Exception as exc:
        from evertune.errors import as_storage_error

        storage = as_storage_error(exc)
        if storage is None:
            raise
        err_console.print(f"[red]error:[/] {storage}", highlight=False)
        sys.exit(storage.exit_code)


# -- Kubernetes (deploy/k8s, docs/kubernetes.md; one block: evertune.k8s holds the logic) -----
# Registered before the __main__ guard so `python -m evertune.cli k8s …` sees it too.
k8s_app = typer.Typer(
    help="Kubernetes manifests: render them from a values file; bootstrap a cluster's tokens.",
    no_args_is_help=True,
)
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    values: Path = typer.Option(
        ..., "--values", "-f",
        help="Values file: only what differs from deploy/k8s/values.yaml.",
    ),
    out: Path = typer.Option(Path("build/k8s"), "--out", "-o", help="Folder to write to."),
) -> None:
    """Render the manifests: control plane, serving (+HPA), KubeRay, Postgres, MLflow, monitoring."""  # noqa: E501 (--help text; Rich would keep a line break)
    from evertune import k8s

    result = k8s.render_to(values, out)
    console.print(f"Wrote {len(result.files)} files to {result.out}:", highlight=False)
    for path in result.files:
        console.print(f"  {path}", highlight=False)
    if result.generated:
        console.print(
            f"[yellow]generated secrets.{', secrets.'.join(result.generated)}[/] into "
            f"{out / k8s.FILES['config']} (mode 0600; rendering again into {out} keeps them)",
            highlight=False,
        )
    console.print(f"Apply: kubectl apply -f {out}/  (examples/ is left out: it is not recursive)",
                  highlight=False)


@k8s_app.command("bootstrap")
def k8s_bootstrap() -> None:
    """Register $EVERTUNE_TOKEN (admin) and $EVERTUNE_SERVING_KEY (serving) in the state DB; idempotent."""  # noqa: E501 (--help text; Rich would keep a line break)
    from evertune import k8s

    for line in k8s.bootstrap_tokens(_open(), os.environ):
        console.print(line, highlight=False)


if __name__ == "__main__":
    main()
