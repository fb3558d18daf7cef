"""The four steps of one tuning round, as plain functions.

    from evertune import steps
    added = steps.preprocess(ws, [Path("tickets.jsonl")])
    job = steps.finetune(ws, steps.training_data(ws))
    report = steps.evaluate(ws, job)
    version = steps.register(ws, job, report)

The CLI (`evertune data add`, `evertune tune`) and the durable pipeline call these same
functions, so a round started by hand and one started by a bucket drop behave identically.
Each step is safe to call again with the same inputs: datasets are content-addressed, jobs
are keyed by run id, and registration is keyed by job id.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertune.errors import JobError

if TYPE_CHECKING:
    from evertune.data.store import AddResult, DatasetVersion, Origin
    from evertune.evaluation import EvalReport, ModelRef
    from evertune.registry import ModelVersion
    from evertune.training.jobs import Job
    from evertune.workspace import Workspace

Progress = Callable[..., Any]


def base_tokenizer(ws: Workspace) -> Any:
    """The base model's tokenizer (converts the packaged default on first use)."""
    from evertune.models import load_tokenizer, resolve_base_model

    return load_tokenizer(resolve_base_model(ws.config.model.base, ws.models_dir))


def preprocess(ws: Workspace, files: list[Path], origin: Origin = "upload") -> AddResult:
    """DataPreprocessing: validate, dedup, split and store the files as dataset version(s)."""
    from evertune.data.store import add_files

    return add_files(ws, files, tokenizer=base_tokenizer(ws), origin=origin)


def training_data(
    ws: Workspace, ref: str | None = None, log: Callable[[str], Any] | None = None
) -> DatasetVersion:
    """The dataset a new round trains on: `ref`, or per `data.mode` (cumulative | latest).

    A cumulative round first folds in the bucket's feedback (`fold_feedback`), so corrections
    and well-rated answers served since the last round are trained on; `log` hears about it.
    """
    from evertune.data.store import training_dataset

    if ref is None and ws.config.data.mode == "cumulative" and ws.config.data.include_feedback:
        fold_feedback(ws, log or (lambda _: None))
    return training_dataset(ws, kind="sft", ref=ref)


def unchanged_reason(ws: Workspace, dataset: DatasetVersion) -> str | None:
    """Why training on `dataset` now would repeat the latest registered version, or None.

    The latest version (highest number, whatever its stage) was trained on this very dataset
    version (content-addressed: same records), with the same method and base model: a round
    would spend the training time to register a copy of it. A drop that adds no new record
    (the same file again, or only rows already stored) is that case.
    """
    from evertune.registry import Registry

    versions = Registry(ws).list_versions()
    if not versions:
        return None
    latest = versions[0]
    facts = latest.facts or {}
    method = str(facts.get("method") or "supervised")  # versions before facts: supervised
    base = facts.get("base_model") or latest.base_model
    if latest.dataset != dataset.id or method != ws.config.train.method:
        return None
    if float(facts.get("replay") or 0.0) != ws.config.data.replay:
        return None  # replay changed: the same data trains a different mix
    if base and str(base) != ws.config.model.base:
        return None  # a new base model: the same data makes a different model
    return (
        f"training set {dataset.id} is the one v{latest.version} was trained on "
        f"({method}, no new records), so this run did not train again; drop new records to "
        f"train, or start a run on purpose (`evertune tune`, POST /api/runs)"
    )


def fold_feedback(ws: Workspace, log: Callable[[str], Any]) -> AddResult | None:
    """Store all of the bucket's feedback/ records as one dataset version (content-addressed:
    unchanged feedback is the version already stored). None when there is no feedback, or
    none that may be trained on (every answer was rated down): that never fails a round."""
    import tempfile

    from evertune.errors import DataError
    from evertune.monitoring.feedback import FEEDBACK_PREFIX, collect_feedback

    with tempfile.TemporaryDirectory(prefix=".feedback-", dir=ws.state_dir) as tmp:
        path = Path(tmp) / "feedback.jsonl"
        objects = collect_feedback(ws, path)
        if not objects:
            return None
        try:
            added = preprocess(ws, [path], origin="feedback")
        except DataError as exc:
            log(f"{objects} feedback object(s) under {FEEDBACK_PREFIX}, none to train on: "
                f"{str(exc).replace(str(path), 'feedback')}")
            return None
    stored = ", ".join(f"{v.id} ({v.counts.get('total', 0)} records)" for v in added.versions)
    log(f"feedback: {objects} object(s) under {FEEDBACK_PREFIX} stored as {stored}; "
        f"{added.rejected} row(s) not trained on (rated down or invalid)")
    return added


def finetune(
    ws: Workspace,
    dataset: DatasetVersion,
    parent: str | None = None,
    run_id: str | None = None,
    on_progress: Progress | None = None,
) -> Job:
    """FineTuning: start the job (or find the one this run already started) and wait for it.

    A job whose process died is resumed from its checkpoint (see `run_finetune`).
    """
    from evertune.training.jobs import run_finetune

    return run_finetune(ws, dataset, parent=parent, on_progress=on_progress, run_id=run_id)


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
