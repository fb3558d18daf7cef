"""The four steps of one tuning round, as plain functions.

    from evertune import steps
    added = steps.preprocess(ws, [Path("tickets.jsonl")])
    plan = steps.plan_round(ws, drop=added.versions)        # [Stage(method, dataset), …]
    job = steps.run_stages(ws, plan, wait=steps.follow_job)[-1]
    report = steps.evaluate(ws, job)
    version = steps.register(ws, job, report)

The CLI (`evertune data add`, `evertune tune`) and the durable pipeline call these same
functions, so a round started by hand and one started by a bucket drop behave identically.
Each step is safe to call again with the same inputs: datasets are content-addressed, jobs
are keyed by run id (a chain's stage jobs by `<run id>/<n>-<method>`), and registration is
keyed by job id.

Routing: a round's methods are `train.stages` when set (a chain: each stage continues from
the previous stage's weights), else `train.method`, where `auto` (the default) is the method
of the kind of data that started the round (text → pretrain, sft records → supervised,
preference pairs → dpo, rated answers → kto). Each stage trains on the data of its kind
(`plan_round`); a stage whose kind has no data fails the round before any training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertune.errors import DataError, JobError, NotFoundError

if TYPE_CHECKING:
    from evertune.data.store import AddResult, DatasetVersion, Origin
    from evertune.evaluation import EvalReport, ModelRef
    from evertune.registry import ModelVersion
    from evertune.training.jobs import Job
    from evertune.workspace import Workspace

Progress = Callable[..., Any]
Log = Callable[[str], Any]


@dataclass(frozen=True)
class Stage:
    """One stage of a round: the method it trains with and the dataset it trains on."""

    method: str
    dataset: DatasetVersion

    def to_json(self, number: int) -> dict[str, Any]:
        """The stage as a step output: `{stage, method, dataset}` (`stage` counts from 1)."""
        return {"stage": number, "method": self.method, "dataset": self.dataset.id}


def stage_run_id(run_id: str, number: int, method: str) -> str:
    """The idempotency key of a chain's stage job: `<run id>/<n>-<method>` (n from 1)."""
    return f"{run_id}/{number}-{method}"


def run_of_job(job_run_id: str | None) -> str | None:
    """The pipeline run a job belongs to (a stage job's key without its `/<n>-<method>`)."""
    return job_run_id.split("/", 1)[0] if job_run_id else None


def base_tokenizer(ws: Workspace) -> Any:
    """The base model's tokenizer (converts the packaged default on first use)."""
    from evertune.models import load_tokenizer, resolve_base_model

    return load_tokenizer(resolve_base_model(ws.config.model.base, ws.models_dir))


def preprocess(ws: Workspace, files: list[Path], origin: Origin = "upload") -> AddResult:
    """DataPreprocessing: validate, dedup, split and store the files as dataset version(s)."""
    from evertune.data.store import add_files

    return add_files(ws, files, tokenizer=base_tokenizer(ws), origin=origin)


def training_data(
    ws: Workspace,
    ref: str | None = None,
    log: Log | None = None,
    kind: str = "sft",
    mode: str | None = None,
) -> DatasetVersion:
    """The dataset a new round of `kind` trains on: `ref`, or per `mode` (default
    `data.mode`: cumulative | latest).

        steps.training_data(ws, kind="dpo")    # every preference pair stored so far

    A cumulative round of kind sft or kto first folds in the bucket's feedback
    (`fold_feedback`: corrections and well-rated answers for sft, every rating for kto), so
    what was served since the last round is trained on; `log` hears about it. NotFoundError
    when the kind has no data.
    """
    from evertune.data.store import training_dataset

    effective = mode or ws.config.data.mode
    if (ref is None and effective == "cumulative" and ws.config.data.include_feedback
            and kind in ("sft", "kto")):
        fold_feedback(ws, log or (lambda _: None), rated=kind == "kto")
    return training_dataset(ws, kind=kind, ref=ref, mode=effective)  # type: ignore[arg-type]


def round_methods(ws: Workspace, method: str | None = None) -> tuple[list[str], str]:
    """The methods a round runs in order (`auto` unresolved) and the setting they come from:
    `method` (an override such as `evertune tune --method`), else `train.stages`, else
    `train.method`."""
    if method:
        return [method], "--method"
    if ws.config.train.stages:
        return list(ws.config.train.stages), "train.stages"
    return [ws.config.train.method], "train.method"


def _missing_data(method: str, kind: str, source: str, chain: bool) -> str:
    from evertune.data.formats import KIND_DATA

    data = KIND_DATA.get(kind, f"{kind} records")
    feedback = (" (or rate served answers: POST /v1/feedback, folded in with data.mode: "
                "cumulative and data.include_feedback: true)" if kind == "kto" else "")
    if chain:
        return (f"stage {method} needs {data} and none are stored{feedback}; drop a file of "
                f"them or remove {method} from train.stages")
    setting = f"--method {method}" if source == "--method" else f"train.method={method}"
    return (f"{setting} trains on {kind} data, {data}, and none are stored{feedback}; drop a "
            f"file of them (or `evertune data add FILE`), or set train.method: auto to train "
            f"on the kind of data you drop")


def plan_round(
    ws: Workspace,
    *,
    method: str | None = None,
    drop: Sequence[DatasetVersion] = (),
    dataset_ref: str | None = None,
    log: Log | None = None,
) -> list[Stage]:
    """The stages of a round, each with the dataset it trains on, before anything trains.

        steps.plan_round(ws, drop=added.versions)     # the pipeline, for a bucket drop
        steps.plan_round(ws, method="dpo")            # `evertune tune --method dpo`

    Methods per `round_methods`; `auto` is the method of the round's data: the kind of
    `dataset_ref` (a named dataset), else of the `drop` (the versions the triggering file
    made), else of the newest upload. Each stage trains on: `dataset_ref` where it
    is of the stage's kind; with `data.mode: latest`, the drop's version of its kind; else
    the cumulative data of its kind (`training_data`, feedback folded in). DataError, before
    any job exists, naming every stage whose kind has no data and what to add.
    """
    from evertune.data.store import get_dataset, list_datasets
    from evertune.evaluation import check_eval_config
    from evertune.training.recipes import RECIPES, resolve_method

    check_eval_config(ws.config)  # the round ends in an evaluation: its config must be sound
    say = log or (lambda _: None)
    methods, source = round_methods(ws, method)
    fixed = get_dataset(ws, dataset_ref) if dataset_ref else None
    if fixed is not None:
        kind = fixed.kind
    elif drop:
        kind = drop[0].kind
    else:  # the newest upload (a fold of feedback is no one's choice of kind)
        stored = sorted((v for v in list_datasets(ws) if v.origin in ("upload", "feedback")),
                        key=lambda v: v.origin != "upload")
        kind = stored[0].kind if stored else "sft"
    resolved: list[str] = []
    for m in methods:
        try:
            resolved.append(resolve_method(m, kind))
        except KeyError:
            raise DataError(f"no training method reads {kind} data; set train.method "
                            f"(one of {', '.join(RECIPES)})") from None
        if resolved[-1] not in RECIPES:
            raise DataError(f"{source} {m!r} is not a training method; use one of: auto, "
                            f"{', '.join(RECIPES)}")
    chain = len(resolved) > 1
    by_kind = {v.kind: v for v in reversed(drop)}  # the drop's first version of each kind
    triggered = fixed is not None or bool(drop)
    stages: list[Stage] = []
    missing: list[str] = []
    for m in resolved:
        want = RECIPES[m].kind
        if fixed is not None and fixed.kind == want:
            stages.append(Stage(m, fixed))
            continue
        if fixed is not None and not chain:
            raise DataError(
                f"dataset {fixed.id} holds {fixed.kind} records, but {source}={m} trains on "
                f"{want} data; pick a dataset of kind {want}, or set train.method: auto"
            )
        if ws.config.data.mode == "latest" and want in by_kind:
            stages.append(Stage(m, by_kind[want]))  # this drop only
            continue
        # Cumulative: every record of the kind so far (in latest mode, for a kind the drop
        # does not carry, the latest drop would be some older round's: use them all).
        mode = "cumulative" if triggered else None
        try:
            stages.append(Stage(m, training_data(ws, log=say, kind=want, mode=mode)))
        except NotFoundError:
            missing.append(_missing_data(m, want, source, chain))
    if missing:
        raise DataError("; ".join(missing))
    if len(stages) == 1:
        s = stages[0]
        why = (f"{source}={methods[0]}" if methods[0] != "auto"
               else f"auto: the round's data is {kind}")
        say(f"method {s.method} ({why}) on {s.dataset.id}: {dict(s.dataset.counts)}")
    else:
        say("stages (train.stages): " + " → ".join(
            f"{n}. {s.method} on {s.dataset.id} ({s.dataset.counts.get('train', 0)} train)"
            for n, s in enumerate(stages, 1)))
    return stages


def version_stages(ws: Workspace, mv: ModelVersion) -> list[tuple[str, str | None]]:
    """(method, dataset) of each stage of the round that trained a registered version, in
    order: its job and the chain of parent jobs before it (stages of one round), else its
    `stages` fact, else its own method and dataset."""
    facts = mv.facts or {}
    if mv.job:
        from evertune.training.jobs import get_job

        chain: list[tuple[str, str | None]] = []
        job_id: str | None = mv.job
        try:
            while job_id and job_id.startswith("ftjob-") and len(chain) < 16:
                job = get_job(ws, job_id)
                chain.insert(0, (job.method, job.training_file))
                job_id = job.parent
            return chain
        except NotFoundError:
            pass
    listed = facts.get("stages")
    if isinstance(listed, list) and listed and all(isinstance(x, dict) for x in listed):
        return [(str(x.get("method")), x.get("dataset")) for x in listed]
    method = str(facts.get("method") or "supervised")  # versions before facts: supervised
    return [(method, mv.dataset)]


def unchanged_reason(
    ws: Workspace,
    dataset: DatasetVersion,
    method: str | None = None,
    stages: Sequence[Stage] | None = None,
) -> str | None:
    """Why training on `dataset` now would repeat the latest registered version, or None.

    The latest version (highest number, whatever its stage) was trained on this very dataset
    version (content-addressed: same records), with the same method (`method`, default
    `train.method` resolved by the dataset's kind; a chain: the same methods on the same
    datasets, `stages`) and base model: a round would spend the training time to register a
    copy of it. A drop that adds no new record (the same file again, or only rows already
    stored) is that case.
    """
    from evertune.registry import Registry
    from evertune.training.recipes import resolve_method

    versions = Registry(ws).list_versions()
    if not versions:
        return None
    latest = versions[0]
    facts = latest.facts or {}
    if stages:
        planned = [(s.method, s.dataset.id) for s in stages]
    else:
        try:
            wanted = method or resolve_method(ws.config.train.method, dataset.kind)
        except KeyError:
            return None
        planned = [(wanted, dataset.id)]
    if version_stages(ws, latest) != planned:
        return None
    base = facts.get("base_model") or latest.base_model
    if float(facts.get("replay") or 0.0) != ws.config.data.replay:
        return None  # replay changed: the same data trains a different mix
    if base and str(base) != ws.config.model.base:
        return None  # a new base model: the same data makes a different model
    if len(planned) > 1:
        sets = ", ".join(f"{d} ({m})" for m, d in planned)
        return (
            f"training sets {sets} are the ones v{latest.version} was trained on (no new "
            f"records), so this run did not train again; drop new records to train, or start "
            f"a run on purpose (`evertune tune`, POST /api/runs)"
        )
    return (
        f"training set {dataset.id} is the one v{latest.version} was trained on "
        f"({planned[0][0]}, no new records), so this run did not train again; drop new records "
        f"to train, or start a run on purpose (`evertune tune`, POST /api/runs)"
    )


def fold_feedback(ws: Workspace, log: Log, rated: bool = False) -> AddResult | None:
    """Store all of the bucket's feedback/ records as one dataset version (content-addressed:
    unchanged feedback is the version already stored). `rated`: as rated answers (kind kto:
    every rating, `monitoring.feedback.rated_rows`) rather than supervised records. None when
    there is no feedback, or none that may be trained on: that never fails a round."""
    import tempfile

    from evertune.monitoring.feedback import FEEDBACK_PREFIX, collect_feedback

    with tempfile.TemporaryDirectory(prefix=".feedback-", dir=ws.state_dir) as tmp:
        path = Path(tmp) / "feedback.jsonl"
        objects = collect_feedback(ws, path, rated=rated)
        if not objects:
            return None
        try:
            added = preprocess(ws, [path], origin="feedback")
        except DataError as exc:
            log(f"{objects} feedback object(s) under {FEEDBACK_PREFIX}, none to train on: "
                f"{str(exc).replace(str(path), 'feedback')}")
            return None
    stored = ", ".join(f"{v.id} ({v.counts.get('total', 0)} records)" for v in added.versions)
    if rated:
        labels: dict[str, int] = next(
            (v.report.get("labels") or {} for v in added.versions if v.kind == "kto"), {})
        log(f"feedback: {objects} object(s) under {FEEDBACK_PREFIX} stored as rated answers "
            f"{stored}: {labels.get('desirable', 0)} good, {labels.get('undesirable', 0)} bad; "
            f"{added.rejected} row(s) not trained on (invalid)")
    else:
        log(f"feedback: {objects} object(s) under {FEEDBACK_PREFIX} stored as {stored}; "
            f"{added.rejected} row(s) not trained on (rated down or invalid)")
    return added


def finetune(
    ws: Workspace,
    dataset: DatasetVersion,
    parent: str | None = None,
    run_id: str | None = None,
    on_progress: Progress | None = None,
    method: str | None = None,
) -> Job:
    """FineTuning of one stage: start the job (or find the one this run already started) and
    wait for it; returns it final (check `status`). A job whose process died is resumed from
    its checkpoint. A chain of stages: `run_stages`."""
    plan = [Stage(stage_method(ws, method, dataset), dataset)]
    return run_stages(ws, plan, parent=parent, run_id=run_id,
                      wait=lambda job: follow_job(ws, job, on_progress), check=False)[-1]


def stage_method(ws: Workspace, method: str | None, dataset: DatasetVersion) -> str:
    """`method` (default `train.method`) with `auto` resolved by the dataset's kind."""
    from evertune.training.recipes import resolve_method

    try:
        return resolve_method(method or ws.config.train.method, dataset.kind)
    except KeyError:
        return method or ws.config.train.method  # create_job says what is wrong


def follow_job(ws: Workspace, job: Job, on_progress: Progress | None = None) -> Job:
    """Wait for `job` to end (polling the state DB); returns it final, whatever its status."""
    from evertune.training.jobs import wait_job

    return job if job.finished else wait_job(ws, job.id, on_progress=on_progress)


def start_or_resume(ws: Workspace, job: Job) -> tuple[Job, str]:
    """Bring a job just created (or found by its run id) to running: start it when queued,
    resume it from its checkpoint when its process died, leave it when it runs or is final.
    Returns the job and what was done, for a log line."""
    from evertune.training import jobs

    job = jobs.check_alive(ws, job.id)
    if job.status == "validating_files":
        # Crashed inside create_job after its insert; the dataset has been checked since.
        job = jobs.transition(ws, job.id, "queued", message="Job queued after a restart")
    if job.status == "queued":
        job = jobs.start_job(ws, job.id)
        return job, f"job {job.id} ({job.method}) started on {job.training_file} (pid {job.pid})"
    if job.status == "failed" and (job.error or {}).get("code") == "process_died":
        ckpt = jobs.newest_checkpoint(jobs.job_dir(ws, job.id))
        job = jobs.resume_job(ws, job.id)
        where = f"checkpoint {ckpt.name}" if ckpt else "the start (no checkpoint yet)"
        return job, f"job {job.id}'s process had died; resumed from {where} (pid {job.pid})"
    if job.status == "running":
        return job, f"job {job.id} is still training (pid {job.pid}); waiting for it"
    if job.status == "succeeded":
        return job, f"job {job.id} ({job.method}) already succeeded; not trained again"
    return job, f"job {job.id} is {job.status}"


StageEvent = Callable[[int, Stage, "Job", str], Any]


def _reused_stage(
    ws: Workspace, runs: Sequence[str], number: int, stage: Stage, parent: str | None
) -> Job | None:
    """A succeeded job of the same stage in an earlier attempt of this run (a retried run's
    original), trained on the same dataset from the same parent: reused, not retrained."""
    from sqlalchemy import select

    from evertune import db
    from evertune.training.jobs import get_job

    keys = [stage_run_id(r, number, stage.method) for r in runs]
    if not keys:
        return None
    t = db.jobs
    with ws.engine.connect() as conn:
        ids = conn.execute(
            select(t.c.id).where(t.c.run_id.in_(keys), t.c.status == "succeeded")
            .order_by(t.c.created_at.desc())
        ).scalars().all()
    for job_id in ids:
        job = get_job(ws, job_id)
        if job.training_file == stage.dataset.id and job.parent == parent:
            return job
    return None


def run_stages(
    ws: Workspace,
    stages: Sequence[Stage],
    *,
    wait: Callable[[Job], Job],
    run_id: str | None = None,
    parent: str | None = None,
    on_stage: StageEvent | None = None,
    reuse_runs: Sequence[str] = (),
    check: bool = True,
    follow_last: bool = True,
) -> list[Job]:
    """Train `stages` in order, each continuing from the previous stage's job; the jobs.

        jobs = steps.run_stages(ws, steps.plan_round(ws), wait=lambda j: steps.follow_job(ws, j))

    One stage: its job is keyed by `run_id` itself. A chain: stage n's job is keyed
    `stage_run_id(run_id, n, method)` and its parent is stage n-1's job, so a re-run after a
    crash finds every stage job: succeeded ones are not trained again, a dead one resumes from
    its checkpoint. `reuse_runs`: earlier run ids (a retry's originals) whose succeeded stage
    jobs are reused. `wait(job)` blocks until the job is final (the pipeline polls, the CLI
    shows a progress bar); `on_stage(n, stage, job, message)` hears each start and end.
    `check`: raise JobError for a stage that did not succeed (else return up to it).
    `follow_last=False`: return the last stage's job once started, for the caller to follow.
    """
    from evertune.training.jobs import create_job

    chain = len(stages) > 1
    tell = on_stage or (lambda *_: None)
    done: list[Job] = []
    previous = parent
    for number, stage in enumerate(stages, 1):
        key = stage_run_id(run_id, number, stage.method) if (run_id and chain) else run_id
        job = _reused_stage(ws, reuse_runs, number, stage, previous) if chain else None
        if job is not None:
            message = (f"job {job.id} ({job.method}) succeeded in run {run_of_job(job.run_id)}; "
                       "reused, not trained again")
        else:
            job = create_job(ws, stage.dataset, parent=previous, run_id=key, method=stage.method)
            job, message = start_or_resume(ws, job)
        prefix = f"stage {number}/{len(stages)} {stage.method}: " if chain else ""
        tell(number, stage, job, prefix + message)
        if number == len(stages) and not follow_last:
            done.append(job)
            return done
        job = wait(job)
        done.append(job)
        if job.status != "succeeded":
            if not check:
                return done
            err = job.error or {}
            what = "was cancelled (`evertune jobs cancel` or the API)" if \
                job.status == "cancelled" else \
                f"{job.status}: {err.get('message') or 'no reason recorded'}"
            raise JobError(
                f"{prefix}job {job.id} {what} (events: `evertune jobs events {job.id}`)"
                + ("; the stages after it did not run" if number < len(stages) else "")
            )
        tell(number, stage, job, f"{prefix}job {job.id} succeeded: {job.trained_tokens} "
             "tokens trained")
        previous = job.id
    return done


def follow(ws: Workspace, job_id: str, on_progress: Progress | None = None) -> Job:
    """Wait for a running job; raise JobError unless it succeeded."""
    from evertune.training.jobs import wait_job

    job = wait_job(ws, job_id, on_progress=on_progress)
    if job.status != "succeeded":
        err = job.error or {}
        raise JobError(
            f"job {job.id} {job.status}: "
            f"{err.get('message', 'see `evertune jobs events ' + job.id + '`')}"
        )
    return job


def reference_model(ws: Workspace, exclude_version: str | None = None) -> ModelRef | None:
    """The PROD version as an evaluation reference, or None when nothing is in PROD."""
    from evertune.evaluation import ModelRef
    from evertune.registry import Registry

    registry = Registry(ws)
    prod = registry.alias_version("prod")
    if prod is None or str(prod.version) == str(exclude_version):
        return None
    return ModelRef(
        label=f"prod v{prod.version}",
        adapter=registry.version_artifact_path(prod.version),
        version=str(prod.version),
    )


def evaluate(ws: Workspace, job: Job, progress: Progress | None = None) -> EvalReport:
    """ModelEvaluation: candidate vs PROD (if any) vs base on the job's test split + gate."""
    from evertune.data.store import get_dataset
    from evertune.evaluation import ModelRef, evaluate_candidate

    if job.status != "succeeded" or not job.result:
        raise JobError(f"job {job.id} is {job.status}; only a succeeded job can be evaluated")
    candidate = ModelRef(label="candidate", adapter=Path(job.result["path"]), version=None)
    return evaluate_candidate(
        ws,
        candidate,
        get_dataset(ws, job.training_file),
        reference=reference_model(ws),
        include_base=ws.config.eval.compare_base,
        progress=progress,
    )


def evaluate_version(
    ws: Workspace, version: str, dataset_ref: str | None = None, progress: Progress | None = None
) -> EvalReport:
    """`evertune eval VERSION`: a registered version against PROD (if another) and base."""
    from evertune.data.store import get_dataset
    from evertune.evaluation import ModelRef, evaluate_candidate
    from evertune.registry import Registry

    registry = Registry(ws)
    mv = registry.get_version(version)
    candidate = ModelRef(
        label=f"v{mv.version}", adapter=registry.version_artifact_path(mv.version),
        version=str(mv.version),
    )
    return evaluate_candidate(
        ws,
        candidate,
        get_dataset(ws, dataset_ref or mv.dataset),
        reference=reference_model(ws, exclude_version=str(mv.version)),
        include_base=ws.config.eval.compare_base,
        progress=progress,
    )


def register(ws: Workspace, job: Job, report: EvalReport | None) -> ModelVersion:
    """RegisterModel: one MLflow version per job (pending approval, or rejected by the gate)."""
    from evertune.registry import Registry
    from evertune.training.jobs import list_metrics

    return Registry(ws).register_version(job, report, list_metrics(ws, job.id))
