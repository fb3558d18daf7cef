"""The model registry: every trained adapter becomes a numbered, tagged MLflow model version.

    from evertune.registry import Registry
    reg = Registry(ws)
    mv = reg.register_version(job, report, metrics_history)   # idempotent per job id
    reg.transition(mv.version, "approved", actor="ana", reason="looks good")
    reg.transition(mv.version, "qa", actor="deploy", reason="rollout")   # alias qa → this version
    reg.alias_version("prod")              # ModelVersion serving production, or None
    reg.version_artifact_path(mv.version)  # local folder of the adapter, e.g. for serving

Built on MLflow (tracking + Model Registry; SQLite in `.evertune/` by default, a tracking
server at scale). One MLflow experiment and one registered model per workspace model name
(`model.name` in evertune.yaml). For each registered job:

- an MLflow run named after the job id: params (hyperparameters, flattened), the training
  metric history with steps (train_loss, lr, tokens_per_s, val_loss, …), the evaluation means
  per model (`eval.candidate.rougeL`, …), and artifacts `adapter/` (the job's result folder),
  `eval/report.json`, `config.json`;
- a model version whose source is the run's `adapter/` artifact, with tags `approval_status`
  (PendingManualApproval | Approved | Rejected), `stage` (lifecycle.Stage), `gate`
  (pass | fail | inconclusive | skipped), `gate_reasons`, `eval_report`, `dataset`, `job`,
  `base_model`, `parent_version`, `pipeline_run`, `metrics` (JSON of the candidate's means,
  final losses).

The aliases `qa` and `prod` are the stage pointers serving follows; only `transition` moves
them, so they always agree with the `stage` tags. Every registration and transition is also a
row in the state DB's `audit` table (who, when, from, to, why): `Registry.audit_log()`.

MLflow takes 2–3 s to import, so it is imported inside methods: `import evertune.registry`
stays cheap for the CLI's light commands.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from sqlalchemy import insert, select

from evertune import db
from evertune.db import audit
from evertune.errors import (
    EvertuneError,
    LifecycleError,
    NotFoundError,
    RegistryError,
    StorageError,
    as_storage_error,
)
from evertune.lifecycle import (
    ApprovalStatus,
    Stage,
    approval_status,
    check_transition,
    initial_stage,
    parse_stage,
    stage_from_status,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion

    from evertune.workspace import Workspace

STAGE_ALIASES = ("qa", "prod")
"""Aliases that mirror a lifecycle stage; `transition` owns them, `set_alias` refuses them."""

CANARY_ALIAS = "canary"  # the version on trial (deploy.start_canary); still in stage qa
CANARY_PERCENT_TAG = "canary.percent"  # registered-model tags: the share of callers it gets,
CANARY_STARTED_TAG = "canary.started_at"  # since when (unix s: the comparison's window start)
CANARY_ACTOR_TAG = "canary.actor"  # and who started it
ADAPTER_ARTIFACT = "adapter"  # run artifact folder holding the job's result (the version source)
CACHE_DIR = "registry-cache"  # under ws.state_dir: downloaded sources of remote artifact stores
_LOGGED_TAG = "evertune.logged"  # run tag set once every param/metric/artifact is logged
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_BATCH = 1000  # MLflow's limit on entities per log_batch call (params/tags: 100)
_HISTORY_META = {"step", "created_at", "timestamp", "id", "job_id", "values"}



@dataclass(frozen=True)
class ModelVersion:
    """One registered version as Evertune sees it (parsed from the MLflow version's tags)."""

    version: int
    name: str
    stage: Stage
    approval_status: str  # PendingManualApproval | Approved | Rejected
    gate: str  # pass | fail | skipped (registered without an evaluation)
    dataset: str | None
    job: str | None
    base_model: str | None
    parent_version: int | None
    pipeline_run: str | None
    metrics: dict[str, float]
    created_at: float  # unix seconds
    run_id: str | None
    source: str  # artifact URI of the adapter folder
    description: str
    gate_reasons: list[str] = field(default_factory=list)
    eval_report: str | None = None  # evaluation report id (.evertune/evals/<id>/)
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # all raw MLflow tags
    # The version's own facts (evertune.facts): base model + fingerprint, LoRA settings,
    # template hash, max_seq_len, method. Empty for versions registered before they existed.
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """How serving and the CLI name it: `v3`."""
        return f"v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the control API and `--json` output)."""
        return {
            "version": self.version,
            "name": self.name,
            "stage": self.stage.value,
            "approval_status": self.approval_status,
            "gate": self.gate,
            "gate_reasons": list(self.gate_reasons),
            "eval_report": self.eval_report,
            "dataset": self.dataset,
            "job": self.job,
            "base_model": self.base_model,
            "parent_version": self.parent_version,
            "pipeline_run": self.pipeline_run,
            "metrics": dict(self.metrics),
            "created_at": self.created_at,
            "run_id": self.run_id,
            "source": self.source,
            "description": self.description,
            "aliases": list(self.aliases),
            "facts": dict(self.facts),
        }


@dataclass(frozen=True)
class CanaryState:
    """A running canary: version `version` gets `percent`% of callers since `started_at`."""

    version: int
    percent: int
    started_at: float
    actor: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AuditRecord:
    """One row of the audit trail."""

    id: int
    created_at: float
    model: str
    version: int
    action: str
    from_stage: str | None
    to_stage: str | None
    actor: str
    reason: str
    data: dict[str, Any]


class Registry:
    """Model versions of one workspace model, over MLflow.

        reg = Registry(ws)
        reg.list_versions()              # newest first
        reg.get_version(3)               # or "3", "v3"; NotFoundError lists the existing ones
        reg.resolve("prod")              # a version number, "vN" or an alias → ModelVersion

    Creating a Registry is cheap; the MLflow client (and its SQLite schema, ~3 s on a new
    workspace) is set up on first use.
    """

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.name = ws.config.model.name

    # -- MLflow plumbing ---------------------------------------------------------------
    @cached_property
    def client(self) -> MlflowClient:
        """The MLflow client (tracking and registry on the workspace's tracking URI)."""
        import logging
        import os

        # Self-hosted and often offline: MLflow sends no usage telemetry unless the user
        # asked for it explicitly.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        # MLflow logs "Creating initial MLflow database tables…" at INFO on a new SQLite store;
        # that is noise in CLI output, not news.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        uri = self.ws.tracking_uri
        check_tracking_server(uri)
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    @cached_property
    def experiment_id(self) -> str:
        """The experiment named after the model, created (or restored) on first use."""
        from mlflow.exceptions import MlflowException

        with _mlflow_errors(f"open the MLflow experiment {self.name!r}", self.ws):
            exp = self.client.get_experiment_by_name(self.name)
            if exp is None:
                try:
                    return self.client.create_experiment(
                        self.name, artifact_location=self.ws.artifact_location
                    )
                except MlflowException as exc:
                    # Another process created it between our lookup and create.
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = self.client.get_experiment_by_name(self.name)
                    assert exp is not None, "experiment vanished right after it was created"
            if exp.lifecycle_stage == "deleted":
                # Someone deleted it in the MLflow UI; its name stays taken until restored.
                self.client.restore_experiment(exp.experiment_id)
            return str(exp.experiment_id)

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.name, description=f"Evertune model {self.name!r}: fine-tuned adapters."
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _search(self, filter_extra: str = "") -> list[MlflowModelVersion]:
        """All versions of this model matching `filter_extra` (an `and …` clause), paged."""
        query = f"name = {_quote(self.name)}" + (f" and {filter_extra}" if filter_extra else "")
        found: list[MlflowModelVersion] = []
        token: str | None = None
        while True:
            page = self.client.search_model_versions(query, page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                return found

    def _aliases(self) -> dict[int, list[str]]:
        """version → its aliases (search results leave aliases out, so read them once here)."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        out: dict[int, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            out.setdefault(int(version), []).append(alias)
        return out

    # -- reading -----------------------------------------------------------------------
    def list_versions(self) -> list[ModelVersion]:
        """Every version of the model, newest first (empty before the first registration)."""
        with _mlflow_errors(f"list versions of {self.name!r}", self.ws):
            raw = self._search()
            aliases = self._aliases()
        versions = [_parse_version(mv, aliases.get(int(mv.version), [])) for mv in raw]
        return sorted(versions, key=lambda v: v.version, reverse=True)

    def get_version(self, v: int | str) -> ModelVersion:
        """Version `v` (3, "3" or "v3"); NotFoundError names the versions that do exist."""
        from mlflow.exceptions import MlflowException

        number = _version_number(v)
        try:
            mv = self.client.get_model_version(self.name, str(number))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(
                    f"MLflow could not read version {number}: {exc.message}"
                ) from exc
            raise NotFoundError(self._missing_message(f"version {number}")) from None
        return _parse_version(mv, list(mv.aliases or []))

    def alias_version(self, alias: str) -> ModelVersion | None:
        """The version an alias (`qa`, `prod`, …) points at, or None when it points nowhere."""
        from mlflow.exceptions import MlflowException

        alias = alias.lstrip("@")
        try:
            mv = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as exc:
            # MLflow answers INVALID_PARAMETER_VALUE for an unset alias and
            # RESOURCE_DOES_NOT_EXIST before the registered model exists.
            if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise RegistryError(f"MLflow could not read alias {alias!r}: {exc.message}") from exc
        return _parse_version(mv, list(mv.aliases or []))

    def resolve(self, ref: int | str) -> ModelVersion:
        """A version from 3, "3", "v3", or an alias ("prod", "@qa"); NotFoundError otherwise."""
        if isinstance(ref, int) or re.fullmatch(r"[vV]?\d+", str(ref).strip()):
            return self.get_version(ref)
        mv = self.alias_version(str(ref))
        if mv is None:
            raise NotFoundError(self._missing_message(f"alias {str(ref).lstrip('@')!r}"))
        return mv

    def find_by_job(self, job_id: str) -> ModelVersion | None:
        """The version registered from a fine-tuning job, if any."""
        with _mlflow_errors(f"search versions of job {job_id}", self.ws):
            raw = self._search(f"tags.job = {_quote(job_id)}")
        if not raw:
            return None
        # Oldest first: should a race ever have registered a job twice, the first one wins.
        first = min(raw, key=lambda mv: int(mv.version))
        return self.get_version(int(first.version))

    def version_artifact_path(self, v: int | str) -> Path:
        """A local folder holding version `v`'s adapter (`v` may also be an alias).

        With the default local artifact store this is the artifact folder itself: treat it as
        read-only. With a remote store (s3://, a tracking server) the artifacts are downloaded
        once into `.evertune/registry-cache/<version>/` and reused afterwards.
        """
        mv = self.resolve(v)
        local = _local_path(mv.source)
        if local is not None:
            if not local.is_dir():
                raise RegistryError(
                    f"version {mv.version}'s artifacts are missing: {local} does not exist "
                    f"(was .evertune/mlartifacts moved or pruned?)"
                )
            return local
        return self._download(mv)

    def _download(self, mv: ModelVersion) -> Path:
        """Fetch a version's source into the cache; a finished download is never refetched."""
        import mlflow.artifacts

        cache = self.ws.state_dir / CACHE_DIR / self.name
        target = cache / str(mv.version)
        if target.is_dir():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        # Download beside the target and rename at the end, so a half-finished download
        # (killed process, network error) never looks like a complete adapter.
        tmp = Path(tempfile.mkdtemp(prefix=f".{mv.version}-", dir=cache))
        try:
            with _mlflow_errors(f"download version {mv.version} from {mv.source}", self.ws):
                got = mlflow.artifacts.download_artifacts(
                    artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=self.ws.tracking_uri
                )
            try:
                os.replace(got, target)
            except OSError:
                if not target.is_dir():  # lost a race to another process: use its copy
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def previous_prod(self) -> ModelVersion | None:
        """The version most recently retired from prod (what `rollback` returns to), if any."""
        for rec in self.audit_log(limit=None):
            if rec.from_stage == Stage.PROD and rec.to_stage == Stage.RETIRED:
                mv = self.get_version(rec.version)
                if mv.stage is Stage.RETIRED:
                    return mv
        return None

    def audit_log(
        self, version: int | str | None = None, limit: int | None = 100
    ) -> list[AuditRecord]:
        """Registrations and transitions of this model (or of one version), newest first."""
        query = select(audit).where(audit.c.model == self.name).order_by(audit.c.id.desc())
        if version is not None:
            query = query.where(audit.c.version == _version_number(version))
        if limit is not None:
            query = query.limit(limit)
        with self.ws.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            AuditRecord(
                id=r["id"],
                created_at=r["created_at"],
                model=r["model"],
                version=r["version"],
                action=r["action"],
                from_stage=r["from_stage"],
                to_stage=r["to_stage"],
                actor=r["actor"],
                reason=r["reason"],
                data=r["data"] or {},
            )
            for r in rows
        ]

    # -- writing -----------------------------------------------------------------------
    def register_version(
        self,
        job: Any,
        report: Any | None,
        metrics_history: Sequence[Mapping[str, Any]] = (),
        *,
        description: str | None = None,
        actor: str = "pipeline",
    ) -> ModelVersion:
        """Log a finished job to MLflow and register its adapter as a new model version.

        `job` is a training Job (or anything with `id`, `model`, `training_file`,
        `hyperparameters`, `result["path"]`, and optionally `parent`, `run_id`, `config`);
        `report` an EvalReport (object or its `model_dump()` dict) or None when no evaluation
        ran; `metrics_history` the job's metric rows (`{"step": 3, "values": {...}}` or flat
        `{"step": 3, "train_loss": ...}`).

        Idempotent per job id: when the job is already registered its version is returned
        unchanged, so a pipeline step retried after a crash never registers twice. A failed
        gate registers the version as `rejected` (approval_status Rejected).
        """
        job_id = str(_get(job, "id") or "")
        if not job_id:
            raise RegistryError("cannot register a job without an id")
        existing = self.find_by_job(job_id)
        if existing is not None:
            return existing

        adapter = _job_result_path(job)
        verdict, reasons = _gate(report)
        stage = initial_stage(verdict)
        dataset = _get(job, "training_file") or _get(job, "dataset")
        dataset = str(_get(dataset, "id") or dataset) if dataset is not None else None
        base_model = _get(job, "model")
        # A stage chain's job continues from the previous stage's job ("ftjob-…"): the parent
        # version is the one the chain's first stage started from, and the pipeline run is the
        # run of the chain (stage jobs are keyed "<run id>/<n>-<method>").
        parent = self._parent_number(self._chain_root_parent(_get(job, "parent")))
        pipeline_run = _get(job, "run_id")
        pipeline_run = str(pipeline_run).split("/", 1)[0] if pipeline_run else None
        means = _eval_means(report)
        summary = _summary_metrics(means, metrics_history)

        facts: dict[str, str | None] = {
            "job": job_id,
            "dataset": dataset,
            "base_model": str(base_model) if base_model is not None else None,
            "parent_version": str(parent) if parent is not None else None,
            "pipeline_run": str(pipeline_run) if pipeline_run else None,
        }
        lineage = {k: v for k, v in facts.items() if v}
        tags = {
            **lineage,
            "stage": stage.value,
            "approval_status": approval_status(stage).value,
            "gate": verdict or "skipped",
            "gate_reasons": json.dumps(reasons),
            "metrics": json.dumps(summary, sort_keys=True),
        }
        facts_tag = _facts_tag(adapter)
        if facts_tag:
            tags["facts"] = facts_tag
        report_id = _get(report, "id")
        if report_id:
            tags["eval_report"] = str(report_id)  # .evertune/evals/<id>/report.json
        text = description or _describe(job_id, lineage, verdict, reasons, summary)

        with _mlflow_errors(f"register job {job_id} as a version of {self.name!r}"):
            self._ensure_registered_model()
            run_id, artifact_uri = self._logged_run(
                job, lineage, adapter, report, _eval_metric_items(report, means), metrics_history
            )
            mv = self.client.create_model_version(
                self.name,
                source=f"{artifact_uri}/{ADAPTER_ARTIFACT}",
                run_id=run_id,
                tags=tags,
                description=text,
            )
        version = int(mv.version)
        self._audit(
            version,
            "register",
            None,
            stage,
            actor,
            "; ".join(reasons) if verdict == "fail"
            else "registered; gate inconclusive, needs review: " + "; ".join(reasons)
            if verdict == "inconclusive" else "registered",
            {"job": job_id, "gate": verdict or "skipped"},
        )
        return self.get_version(version)

    def transition(
        self,
        v: int | str,
        target: Stage | str,
        actor: str,
        reason: str,
        force: bool = False,
        *,
        role: str | None = None,
    ) -> ModelVersion:
        """Move version `v` to `target`, keeping the `qa`/`prod` aliases consistent.

        Checks the lifecycle (LifecycleError lists the allowed moves), then updates the
        version's `stage` and `approval_status` tags and the aliases:
        - → qa: alias `qa` points at it (refused while another version is still in qa);
        - → prod: alias `prod` points at it, and the version that was in prod is retired;
        - → rejected / retired: a `qa` or `prod` alias pointing at it is removed.
        Alias `qa` keeps pointing at a version promoted to prod (QA serves what it tested).
        `force=True` with `role="admin"` approves a rejected version (an override of the gate).
        Each move, including the implied retirement, is written to the audit log. Repeating a
        move (target = current stage) re-applies its aliases and returns: a retried pipeline
        step converges instead of failing.
        """
        if not actor:
            raise RegistryError("a transition needs an actor (who is moving the version)")
        mv = self.get_version(v)
        target = parse_stage(target, "target stage")
        # Moving to the stage a version is already in re-applies the aliases instead of
        # failing: a durable pipeline re-runs an interrupted step, which may have set the tag
        # but not the alias (or not the audit row) before the crash.
        repeat = mv.stage is target
        if not repeat:
            check_transition(mv.stage, target, version=mv.version, force=force, role=role)
        if force and not repeat and mv.stage is Stage.REJECTED and not reason.strip():
            raise LifecycleError(
                f"approving rejected version {mv.version} by override needs a reason (why the "
                f"gate or the tests were wrong)"
            )
        data: dict[str, Any] = {"forced": True, "role": role} if force else {}
        with _mlflow_errors(f"move version {mv.version} to {target}", self.ws):
            self._apply_stage(mv, target, actor, data)
        if not repeat:
            self._audit(mv.version, "transition", mv.stage, target, actor, reason, data)
        else:
            last = self.audit_log(mv.version, limit=1)
            if not last or last[0].to_stage != target.value:
                # The first attempt crashed before its audit row; the stage it left is lost.
                data["repeated"] = True
                self._audit(mv.version, "transition", None, target, actor, reason, data)
        if target is Stage.PROD:  # every way into prod (promote, auto-promote, rollback) is here
            from evertune.evaluation.regression_suite import on_prod

            on_prod(self.ws, mv)  # its test examples now guard every later candidate
        return self.get_version(mv.version)

    def _apply_stage(
        self, mv: ModelVersion, target: Stage, actor: str, data: dict[str, Any]
    ) -> None:
        """Set the stage tags and move the stage aliases (idempotent: safe to run again)."""
        if target is Stage.QA:
            busy = [
                int(o.version)
                for o in self._search(f"tags.stage = {_quote(Stage.QA.value)}")
                if int(o.version) != mv.version
            ]
            if busy:
                raise LifecycleError(
                    f"version {busy[0]} is still in qa; promote it to prod or reject it "
                    f"before deploying version {mv.version} to qa"
                )
        self._set_stage(mv.version, target)
        if target is Stage.QA:
            self.client.set_registered_model_alias(self.name, "qa", str(mv.version))
        elif target is Stage.PROD:
            # Flip the pointer first (that is what serving follows), then retire whatever
            # else still says prod: this also repairs a half-done earlier promotion.
            self.client.set_registered_model_alias(self.name, "prod", str(mv.version))
            old = [
                int(o.version)
                for o in self._search(f"tags.stage = {_quote(Stage.PROD.value)}")
                if int(o.version) != mv.version
            ]
            for other in old:
                self._set_stage(other, Stage.RETIRED)
                self._audit(
                    other,
                    "transition",
                    Stage.PROD,
                    Stage.RETIRED,
                    actor,
                    f"replaced by version {mv.version}",
                    {"replaced_by": mv.version},
                )
            if old:
                data["replaced"] = old
        if target is not Stage.QA and CANARY_ALIAS in mv.aliases and self.canary() is not None:
            # A canary is a QA version on trial: leaving QA (promoted, rejected, sent back to
            # approved) ends the trial whichever path moved it, so serving never routes a
            # share of traffic to a version no longer in QA.
            self._drop_canary()
            data["canary_ended"] = True
        if target not in (Stage.QA, Stage.PROD):
            for alias in mv.aliases:
                drop = alias in STAGE_ALIASES and target is Stage.REJECTED
                drop = drop or (alias == "prod" and target is Stage.RETIRED)
                if drop:
                    self.client.delete_registered_model_alias(self.name, alias)
                    data.setdefault("aliases_removed", []).append(alias)

    def set_alias(
        self, alias: str, v: int | str, *, actor: str = "evertune", reason: str = ""
    ) -> ModelVersion:
        """Point a custom alias (e.g. `canary`) at version `v`; `transition` moves qa/prod."""
        alias = alias.lstrip("@")
        if alias in STAGE_ALIASES:
            raise RegistryError(
                f"alias {alias!r} follows the lifecycle; move a version there with "
                f"transition(version, {alias!r}, actor, reason) instead of set_alias"
            )
        if alias == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise RegistryError(f"alias {alias!r} is reserved by MLflow; pick another name")
        mv = self.get_version(v)
        with _mlflow_errors(f"set alias {alias!r} to version {mv.version}", self.ws):
            self.client.set_registered_model_alias(self.name, alias, str(mv.version))
        self._audit(mv.version, "alias", mv.stage, mv.stage, actor, reason, {"alias": alias})
        return self.get_version(mv.version)

    def delete_alias(self, alias: str, *, actor: str = "evertune", reason: str = "") -> None:
        """Remove a custom alias (no-op when unset). Stage aliases go via `transition`."""
        alias = alias.lstrip("@")
        if alias in STAGE_ALIASES:
            raise RegistryError(
                f"alias {alias!r} follows the lifecycle; use transition() to move it"
            )
        mv = self.alias_version(alias)
        if mv is None:
            return
        with _mlflow_errors(f"delete alias {alias!r}", self.ws):
            self.client.delete_registered_model_alias(self.name, alias)
        self._audit(
            mv.version,
            "alias",
            mv.stage,
            mv.stage,
            actor,
            reason,
            {"alias": alias, "deleted": True},
        )

    # -- the canary ------------------------------------------------------------------------
    def canary(self) -> CanaryState | None:
        """The running canary (alias `canary` plus its percent tags), or None.

        One MLflow call (the registered model carries both), so the gateway's follower can
        read it every `serve.follow_seconds`. An alias `canary` set by hand (`set_alias`)
        without the rollout's tags is not a canary rollout and is ignored."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # nothing registered yet
                return None
            raise RegistryError(f"MLflow could not read the canary: {exc.message}") from exc
        version = (model.aliases or {}).get(CANARY_ALIAS)
        tags = dict(model.tags or {})
        percent = tags.get(CANARY_PERCENT_TAG, "")
        if version is None or not percent.isdigit():
            return None
        try:
            started = float(tags.get(CANARY_STARTED_TAG) or 0.0)
        except ValueError:
            started = 0.0
        return CanaryState(version=int(version), percent=int(percent), started_at=started,
                           actor=tags.get(CANARY_ACTOR_TAG, ""))

    def start_canary(self, v: int | str, percent: int, actor: str, reason: str) -> CanaryState:
        """Point alias `canary` at version `v` and record its percent and start time (tags on
        the registered model), audited as `canary_start`. deploy.start_canary checks first."""
        mv = self.get_version(v)
        started = time.time()
        with _mlflow_errors(f"start the canary of version {mv.version}", self.ws):
            # Tags first, alias last: a reader that sees the alias also sees its percent.
            self.client.set_registered_model_tag(self.name, CANARY_PERCENT_TAG, str(percent))
            self.client.set_registered_model_tag(self.name, CANARY_STARTED_TAG, repr(started))
            self.client.set_registered_model_tag(self.name, CANARY_ACTOR_TAG, actor)
            self.client.set_registered_model_alias(self.name, CANARY_ALIAS, str(mv.version))
        self._audit(mv.version, "canary_start", mv.stage, mv.stage, actor, reason,
                    {"percent": percent, "started_at": started})
        return CanaryState(version=mv.version, percent=percent, started_at=started, actor=actor)

    def end_canary(
        self, actor: str, reason: str, action: str = "canary_end",
        data: dict[str, Any] | None = None, state: CanaryState | None = None,
    ) -> CanaryState | None:
        """Remove alias `canary` and its tags (no-op without one); audited as `action`.

        `state`: the canary as read before a transition that already dropped it (a version
        leaving QA), so the row still names its version and percent."""
        state = state or self.canary()
        with _mlflow_errors("end the canary", self.ws):
            self._drop_canary()
        if state is not None:
            mv = self.get_version(state.version)
            self._audit(mv.version, action, mv.stage, mv.stage, actor, reason,
                        {"percent": state.percent, "started_at": state.started_at,
                         **(data or {})})
        return state

    def _drop_canary(self) -> None:
        # Alias first: serving stops routing to it before its percent disappears.
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):  # already gone
            self.client.delete_registered_model_alias(self.name, CANARY_ALIAS)
        for tag in (CANARY_PERCENT_TAG, CANARY_STARTED_TAG, CANARY_ACTOR_TAG):
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model_tag(self.name, tag)

    # -- helpers -----------------------------------------------------------------------
    def _set_stage(self, version: int, stage: Stage) -> None:
        self.client.set_model_version_tag(self.name, str(version), "stage", stage.value)
        self.client.set_model_version_tag(
            self.name, str(version), "approval_status", approval_status(stage).value
        )

    def _chain_root_parent(self, parent: Any) -> Any:
        """`parent`, or where a job parent ("ftjob-…", a previous stage) leads: the parent of
        the chain's first job (a version, or None)."""
        from evertune.training.jobs import get_job

        seen: set[str] = set()
        while isinstance(parent, str) and parent.startswith("ftjob-") and parent not in seen:
            seen.add(parent)
            try:
                parent = get_job(self.ws, parent).parent
            except NotFoundError:
                return None
        return parent

    def _parent_number(self, parent: Any) -> int | None:
        """The parent version number of a job (`3`, `"v3"`, or an alias resolved now)."""
        if parent is None or parent == "":
            return None
        if isinstance(parent, int) or re.fullmatch(r"[vV]?\d+", str(parent).strip()):
            return _version_number(parent)
        return self.resolve(str(parent)).version

    def _logged_run(
        self,
        job: Any,
        lineage: dict[str, str],
        adapter: Path,
        report: Any | None,
        eval_metrics: dict[str, float],
        history: Sequence[Mapping[str, Any]],
    ) -> tuple[str, str]:
        """The job's MLflow run, fully logged: reused if a retry finds it, else created now."""
        from mlflow.entities import Metric, Param, RunTag, ViewType

        job_id = lineage["job"]
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.job = {_quote(job_id)}",
            run_view_type=ViewType.ACTIVE_ONLY,
        )
        for run in runs:
            if run.data.tags.get(_LOGGED_TAG) == "true":
                return run.info.run_id, run.info.artifact_uri
            # A run a crash left half-logged: metrics logged again would show twice, so drop it.
            self.client.delete_run(run.info.run_id)

        run = self.client.create_run(self.experiment_id, run_name=job_id, tags=dict(lineage))
        run_id = run.info.run_id
        now_ms = int(time.time() * 1000)

        params = dict(_flatten(_plain(_get(job, "hyperparameters") or {})))
        for key in ("base_model", "dataset", "parent_version"):
            if key in lineage:
                params.setdefault(key, lineage[key])
        method = _get(job, "method")
        if isinstance(method, str):
            params.setdefault("method", method)
        elif method is not None and _get(method, "type"):
            params.setdefault("method", str(_get(method, "type")))
        param_items = [Param(_metric_key(k), _param_value(v)) for k, v in sorted(params.items())]

        metrics = list(_history_metrics(history, now_ms))
        for key, value in eval_metrics.items():
            metrics.append(Metric(_metric_key(key), value, now_ms, 0))

        for chunk in _chunks(param_items, 100):
            self.client.log_batch(run_id, params=chunk)
        for chunk in _chunks(metrics, _BATCH):
            self.client.log_batch(run_id, metrics=chunk)

        self.client.log_artifacts(run_id, str(adapter), ADAPTER_ARTIFACT)
        with tempfile.TemporaryDirectory(prefix="evertune-run-") as tmp:
            extra = Path(tmp)
            if report is not None:
                (extra / "eval").mkdir()
                (extra / "eval" / "report.json").write_text(_report_json(report), "utf-8")
            config = _get(job, "config")
            if config:
                (extra / "config.json").write_text(json.dumps(_plain(config), indent=2), "utf-8")
            if any(extra.iterdir()):
                self.client.log_artifacts(run_id, str(extra))

        # Last: marks the run complete, so a retry reuses it instead of logging it again.
        self.client.log_batch(run_id, tags=[RunTag(_LOGGED_TAG, "true")])
        self.client.set_terminated(run_id, "FINISHED")
        return run_id, run.info.artifact_uri

    def record_event(
        self, mv: ModelVersion, action: str, actor: str, reason: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        """An audit row about a version that does not move it (a monitoring event such as
        drift): from and to are its stage, so stage history reads it as no move."""
        self._audit(mv.version, action, mv.stage, mv.stage, actor, reason, data)

    def _audit(
        self,
        version: int,
        action: str,
        from_stage: Stage | None,
        to_stage: Stage | None,
        actor: str,
        reason: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.ws.engine.begin() as conn:
            conn.execute(
                insert(audit).values(
                    created_at=time.time(),
                    model=self.name,
                    version=version,
                    action=action,
                    from_stage=from_stage.value if from_stage else None,
                    to_stage=to_stage.value if to_stage else None,
                    actor=actor,
                    reason=reason or "",
                    data=data or None,
                )
            )

    def _missing_message(self, what: str) -> str:
        try:
            numbers = sorted(int(mv.version) for mv in self._search())
        except Exception:  # the listing is a courtesy; never hide the real error behind it
            numbers = []
        if not numbers:
            return (
                f"{what} of model {self.name!r} does not exist: no versions are registered yet "
                f"(a pipeline run registers one after training and evaluation)"
            )
        shown = ", ".join(f"v{n}" for n in numbers[-20:])
        more = f" (showing the newest 20 of {len(numbers)})" if len(numbers) > 20 else ""
        return f"{what} of model {self.name!r} does not exist; existing versions: {shown}{more}"


# -- parsing MLflow versions -----------------------------------------------------------------
def _parse_version(mv: MlflowModelVersion, aliases: list[str]) -> ModelVersion:
    tags = dict(mv.tags or {})
    status = tags.get("approval_status") or ApprovalStatus.PENDING.value
    try:
        stage = Stage(tags["stage"])
    except (KeyError, ValueError):
        stage = stage_from_status(status)
    try:
        metrics = {k: float(v) for k, v in json.loads(tags.get("metrics") or "{}").items()}
    except (ValueError, TypeError, AttributeError):
        metrics = {}
    try:
        reasons = [str(r) for r in json.loads(tags.get("gate_reasons") or "[]")]
    except (ValueError, TypeError):
        reasons = []
    parent = tags.get("parent_version")
    return ModelVersion(
        version=int(mv.version),
        name=mv.name,
        stage=stage,
        approval_status=status,
        gate=tags.get("gate", "skipped"),
        dataset=tags.get("dataset"),
        job=tags.get("job"),
        base_model=tags.get("base_model"),
        parent_version=int(parent) if parent and parent.isdigit() else None,
        pipeline_run=tags.get("pipeline_run"),
        metrics=metrics,
        created_at=(mv.creation_timestamp or 0) / 1000,
        run_id=mv.run_id,
        source=mv.source or "",
        description=mv.description or "",
        gate_reasons=reasons,
        eval_report=tags.get("eval_report"),
        aliases=sorted(aliases),
        tags=tags,
        facts=_json_dict(tags.get("facts")),
    )


def _facts_tag(adapter: Path) -> str | None:
    """The adapter folder's facts as the `facts` tag (None for a folder without them)."""
    from evertune.facts import RESULT_META, read_facts, tag_value

    if not (adapter / RESULT_META).is_file():
        return None
    return tag_value(read_facts(adapter))


def _json_dict(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _version_number(v: int | str) -> int:
    if isinstance(v, bool):  # bool is an int; True is not version 1
        raise NotFoundError(f"{v!r} is not a model version; use a number such as 3 or v3")
    if isinstance(v, int):
        number = v
    else:
        m = re.fullmatch(r"[vV]?(\d+)", str(v).strip())
        if not m:
            raise NotFoundError(f"{v!r} is not a model version; use a number such as 3 or v3")
        number = int(m.group(1))
    if number < 1:
        raise NotFoundError(f"model versions start at 1, got {number}")
    return number


def _local_path(uri: str) -> Path | None:
    """The local folder of a `file:` URI or plain path; None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(unquote(parsed.path)))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


# -- reading jobs and reports (duck-typed: objects or their model_dump() dicts) --------------
def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _plain(value: Any) -> Any:
    """JSON-ready data from Pydantic models, dataclasses, namespaces, enums and paths."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "__dict__"):  # SimpleNamespace and plain objects
        return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


def _job_result_path(job: Any) -> Path:
    result = _get(job, "result")
    path = _get(result, "path")
    if not path:
        status = _get(job, "status")
        raise RegistryError(
            f"job {_get(job, 'id')} has no result (status {status or 'unknown'}); only a "
            f"succeeded job with an adapter can be registered"
        )
    folder = Path(path)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise RegistryError(
            f"job {_get(job, 'id')}'s result folder {folder} is missing or empty; "
            f"re-run or resume the job before registering it"
        )
    return folder


def _gate(report: Any | None) -> tuple[str | None, list[str]]:
    """(verdict, reasons) of an evaluation report; (None, []) when there is no report.

    The report's top-level `verdict`/`reasons` come first: in an EvalReport they cover every
    split (test and golden), while `report.gate` is the main split's gate only.
    """
    if report is None:
        return None, []
    verdict, reasons = _get(report, "verdict"), _get(report, "reasons")
    if verdict is None:
        gate = _get(report, "gate")
        verdict, reasons = _get(gate, "verdict"), _get(gate, "reasons")
    if verdict is not None:
        verdict = str(getattr(verdict, "value", verdict)).lower()
    return verdict, [str(r) for r in (reasons or [])]


def _mean_of(value: Any) -> float | None:
    """A number, or the `mean` of a {mean, ci_low, …} mapping; None for anything else."""
    if isinstance(value, Mapping):
        value = value.get("mean")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


Means = dict[str, dict[str, dict[str, float]]]
"""split → role → metric → mean; the main split first ("" for a report without splits)."""


def _eval_means(report: Any | None) -> Means:
    """Per-split, per-model means from an EvalReport or a dict/namespace shaped like one.

    EvalReport: `splits.<name>.means.<role>.<metric>` (main split "test", else the first).
    Looser shapes (a report without splits): `{role: {metric: mean | {"mean": …}}}` under
    means / model_means / summary / models / metrics, or a list of `{"label", "means"}`.
    """
    if report is None:
        return {}
    data = _plain(report)
    if not isinstance(data, Mapping):
        return {}
    splits = data.get("splits")
    if isinstance(splits, Mapping) and splits:
        main = "test" if "test" in splits else next(iter(splits))
        out: Means = {}
        for name in [main, *(n for n in splits if n != main)]:
            roles = _role_means(_get(splits[name], "means"))
            if roles:
                out[str(name)] = roles
        return out
    for key in ("means", "model_means", "summary", "models", "metrics"):
        roles = _role_means(data.get(key))
        if roles:
            return {"": roles}
    return {}


def _role_means(block: Any) -> dict[str, dict[str, float]]:
    if isinstance(block, Mapping):
        items: Iterable[tuple[Any, Any]] = block.items()
    elif isinstance(block, list):
        items = (
            (_get(b, "label") or _get(b, "name") or _get(b, "model"), b)
            for b in block
            if isinstance(b, Mapping)
        )
    else:
        return {}
    out: dict[str, dict[str, float]] = {}
    for label, values in items:
        if isinstance(values, Mapping):
            inner = values.get("means") or values.get("metrics")
            values = inner if isinstance(inner, Mapping) else values
        if label is None or not isinstance(values, Mapping):
            continue
        nums = {str(k): m for k, v in values.items() if (m := _mean_of(v)) is not None}
        if nums:
            out[str(label)] = nums
    return out


def _eval_metric_items(report: Any | None, means: Means) -> dict[str, float]:
    """MLflow metric keys for an evaluation: `eval.candidate.rougeL` for the main split,
    `eval.golden.candidate.rougeL` for the others, and the gate's CI bounds when the report
    offers them (`EvalReport.summary_metrics()`: `eval.test.gate.rougeL.ci_low`)."""
    out: dict[str, float] = {}
    for i, (split, roles) in enumerate(means.items()):
        prefix = "eval." if i == 0 or not split else f"eval.{split}."
        for role, values in roles.items():
            for metric, value in values.items():
                out[f"{prefix}{role}.{metric}"] = value
    summary = getattr(report, "summary_metrics", None)
    if callable(summary):
        for key, value in summary().items():
            number = _mean_of(value)
            if ".gate." in key and number is not None:
                out[f"eval.{key}"] = number
    return out


def _summary_metrics(means: Means, history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The `metrics` tag: the candidate's means (`rougeL` on the main split, `golden.rougeL`
    on the others) plus the last train and validation loss of the job."""
    out: dict[str, float] = {}
    for i, (split, roles) in enumerate(means.items()):
        if not roles:
            continue
        role = "candidate" if "candidate" in roles else next(iter(roles))
        prefix = "" if i == 0 or not split else f"{split}."
        out.update({f"{prefix}{k}": round(v, 6) for k, v in roles[role].items()})
    for key in ("train_loss", "val_loss"):
        for row in reversed(list(history)):
            value = _mean_of(_history_values(row).get(key))
            if value is not None:
                out.setdefault(key, round(value, 6))
                break
    return out


def _history_values(row: Mapping[str, Any]) -> dict[str, Any]:
    values = row.get("values")
    if isinstance(values, Mapping):
        return dict(values)
    return {k: v for k, v in row.items() if k not in _HISTORY_META}


def _history_metrics(history: Sequence[Mapping[str, Any]], now_ms: int) -> Iterator[Any]:
    from mlflow.entities import Metric

    for i, row in enumerate(history):
        step = row.get("step")
        step = int(step) if isinstance(step, int | float) else i
        when = row.get("created_at") or row.get("timestamp")
        ts = int(float(when) * 1000) if isinstance(when, int | float) else now_ms
        for key, value in _history_values(row).items():
            number = _mean_of(value)
            if number is not None:
                yield Metric(_metric_key(str(key)), number, ts, step)


def _report_json(report: Any) -> str:
    if hasattr(report, "model_dump_json"):
        return str(report.model_dump_json(indent=2))
    return json.dumps(_plain(report), indent=2)


def _describe(
    job_id: str,
    lineage: dict[str, str],
    verdict: str | None,
    reasons: list[str],
    summary: dict[str, float],
) -> str:
    parts = [f"Fine-tuned by job {job_id}"]
    if "dataset" in lineage:
        parts.append(f"on dataset {lineage['dataset']}")
    if "base_model" in lineage:
        parts.append(f"from base {lineage['base_model']}")
    if "parent_version" in lineage:
        parts.append(f"continuing v{lineage['parent_version']}")
    text = " ".join(parts) + "."
    if verdict is None:
        text += " Not evaluated (no quality gate ran)."
    else:
        text += f" Quality gate: {verdict}."
        if reasons:
            text += " " + " ".join(f"- {r}" for r in reasons)
    if summary:
        text += " Metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())) + "."
    return text


# -- small utilities -------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif prefix:
        yield prefix, value


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM_LEN]


def _metric_key(key: str) -> str:
    # MLflow keys allow letters, digits, _ - . space / ; anything else (":" in a label) → _.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)[:250]


def _quote(value: str) -> str:
    """A single-quoted literal for an MLflow filter string."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_SERVERS_UP: set[str] = set()  # tracking servers that answered /health in this process


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """For an `http(s)://` tracking URI: RegistryError at once when the MLflow server does not
    answer its /health, instead of MLflow's minutes of retries on the first call."""
    if not uri.startswith(("http://", "https://")) or uri in _SERVERS_UP:
        return
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as exc:
        raise RegistryError(
            f"the MLflow tracking server at {uri} (registry.tracking_uri) does not answer: "
            f"{exc}; start it (`mlflow server --backend-store-uri … --artifacts-destination …`) "
            "or fix the URL"
        ) from None
    _SERVERS_UP.add(uri)


@contextlib.contextmanager
def _mlflow_errors(what: str, ws: Workspace | None = None) -> Iterator[None]:
    """Turn MLflow's exceptions into RegistryError saying what we were doing, and a store that
    cannot be written (read-only file, full disk) into StorageError naming `ws`'s store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except EvertuneError:
        raise
    except Exception as exc:
        # MLflow wraps SQLite's "attempt to write a readonly database" in MlflowException, but
        # lets the engine's "unable to open database file" through raw.
        storage = as_storage_error(exc, _store_name(ws))
        if storage is not None:
            raise StorageError(f"could not {what}: {storage}") from exc
        if isinstance(exc, MlflowException):
            raise RegistryError(f"could not {what}: MLflow said: {exc.message}") from exc
        raise


def _store_name(ws: Workspace | None) -> str:
    """The MLflow store for a message: its SQLite file, else its URI without a password."""
    if ws is None:
        return "the MLflow store (registry.tracking_uri; by default .evertune/mlflow.db)"
    uri = ws.tracking_uri
    path = db.sqlite_path(uri)
    if path is not None:
        return f"the MLflow database {path}"
    if "://" in uri and "@" in uri.split("://", 1)[1]:
        from sqlalchemy import make_url

        with contextlib.suppress(Exception):
            uri = make_url(uri).render_as_string(hide_password=True)
    return f"the MLflow store {uri}"
