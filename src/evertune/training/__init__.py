"""Training: fine-tuning jobs (OpenAI shape, durable in the state DB) and their recipes.

    from evertune.training import run_finetune
    job = run_finetune(ws, dataset, on_progress=print)     # create + start + wait
    job.status, job.result["path"]                          # "succeeded", the adapter folder

Modules: `jobs` (record, lifecycle, start / wait / cancel / resume), `sft` (the supervised
recipe), `backends` (where the child process runs), `run` (the child's entry point).
Importing this package does not import torch; the recipe does, in the child.
"""

from evertune.training.jobs import (
    TERMINAL,
    TRANSITIONS,
    Job,
    JobCheckpoint,
    JobEvent,
    JobStatus,
    cancel_job,
    create_job,
    get_job,
    hyperparameters_from,
    job_dir,
    list_checkpoints,
    list_events,
    list_jobs,
    list_metrics,
    resume_job,
    run_finetune,
    start_job,
    wait_job,
)

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "Job",
    "JobCheckpoint",
    "JobEvent",
    "JobStatus",
    "cancel_job",
    "create_job",
    "get_job",
    "hyperparameters_from",
    "job_dir",
    "list_checkpoints",
    "list_events",
    "list_jobs",
    "list_metrics",
    "resume_job",
    "run_finetune",
    "start_job",
    "wait_job",
]
