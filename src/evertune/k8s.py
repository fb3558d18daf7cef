"""Kubernetes manifests for Evertune at scale, rendered in Python from one values file.

    evertune k8s render --values my-values.yaml --out build/k8s   # writes build/k8s/*.yaml
    kubectl apply -f build/k8s/        # not recursive: examples/ (RayJob, adapter rules) stay out
    evertune k8s bootstrap             # run by the migrate Job after `evertune db upgrade`

A values file holds only what differs from the defaults (`Values()`, the same values commented
in deploy/k8s/values.yaml); unknown keys and bad values are a `ValuesError` naming the file and
every key at fault. What is rendered (docs/kubernetes.md maps it onto an EKS stack):

    control plane  Deployment `evertune up --no-serving` (2 replicas), Service, PDB; ConfigMap
                   with evertune.yaml, Secret, ServiceAccount, a ReadWriteMany workspace PVC
    migrations     Job: `evertune db upgrade`, then `evertune k8s bootstrap` (registers the
                   Secret's admin token and serving key in the state DB)
    serving        Deployment `evertune serve --stage prod` (transformers on CPU, or vLLM on GPU
                   nodes), Service, PDB, HPA on a Prometheus-adapter metric from /metrics
    training       KubeRay RayCluster (head + CPU workers, optional GPU workers); a RayJob example
    stores         Postgres StatefulSet + Service (+ PVC) and an MLflow tracking server, each
                   switchable off for an external one
    monitoring     ServiceMonitor scraping /metrics of the control plane and serving

No Helm: rendering is plain dict building + PyYAML, so it runs wherever Evertune does, and
tests/k8s validates every object against the Kubernetes and CRD schemas.
"""

from __future__ import annotations

import hashlib
import secrets as _secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evertune.auth import MAX_TOKEN_CHARS, TOKEN_ENV, hash_token
from evertune.config import CONFIG_FILE, parse_config
from evertune.errors import ConfigError, EvertuneError
from evertune.models import MODEL_CACHE_ENV
from evertune.workspace import HOME_ENV, STATE_DIR, write_private

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

    from evertune.workspace import Workspace

UID = 10001  # the image's non-root user and group (Dockerfile)
WORKSPACE_DIR = "/workspace"  # $EVERTUNE_HOME in the image: evertune.yaml + .evertune/
CACHE_DIR = "/cache"  # converted base models, Hugging Face and torch caches, $HOME
SERVING_KEY_ENV = "EVERTUNE_SERVING_KEY"  # read by `evertune k8s bootstrap` only
HEALTH_PATH = "/healthz"  # evertune.server: served by `up` and `serve` alike
METRICS_PATH = "/metrics"  # evertune.monitoring.metrics_router: idem
MLFLOW_HEALTH_PATH = "/health"  # MLflow's; exempt from its Host-header check
HTTP = "http"  # the name of every HTTP container port; Services and probes refer to it
ADMIN_TOKEN_NAME = "k8s-admin"
SERVING_KEY_NAME = "k8s-serving"
MIN_SECRET_CHARS = 32  # a token put in the Secret by hand must be at least this long

# values.secrets field → the environment variable (and Secret key) that carries it. The names
# are what the code reads: Evertune's own constants, libpq (PGPASSWORD, for the psycopg driver
# of storage.state_db and MLflow's backend store), botocore (s3fs, MLflow's S3 artifact store)
# and huggingface_hub.
SECRET_ENV: dict[str, str] = {
    "adminToken": TOKEN_ENV,
    "servingKey": SERVING_KEY_ENV,
    "postgresPassword": "PGPASSWORD",
    "awsAccessKeyId": "AWS_ACCESS_KEY_ID",
    "awsSecretAccessKey": "AWS_SECRET_ACCESS_KEY",
    "hfToken": "HF_TOKEN",
}
# Generated when empty (and kept across renders into the same folder); the others are optional
# (empty: IRSA / EKS Pod Identity for S3, no Hugging Face token).
GENERATED_SECRETS = ("adminToken", "servingKey", "postgresPassword")

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = str | int | float  # "500m", "2Gi", 2
Resources = dict[Literal["requests", "limits"], dict[str, _QUANTITY]]
Manifest = dict[str, Any]


def _res(cpu: str, memory: str, cpu_limit: str, memory_limit: str) -> Resources:
    return {"requests": {"cpu": cpu, "memory": memory},
            "limits": {"cpu": cpu_limit, "memory": memory_limit}}


def _prod_only() -> list[Literal["prod", "qa"]]:
    return ["prod"]


class ValuesError(ConfigError):
    """A values file for `evertune k8s render` is invalid; lists every problem with its key."""


# -- values -----------------------------------------------------------------------------------
class _V(BaseModel):
    # Unknown keys are errors: a misspelt `replica:` must not deploy with the default.
    model_config = ConfigDict(extra="forbid")


class Image(_V):
    repository: str = Field("ghcr.io/your-org/evertune", min_length=1)
    tag: str = Field("0.1.0", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


class NamespaceValues(_V):
    name: str = Field("evertune", pattern=_DNS_LABEL, max_length=63)
    create: bool = True
    podSecurity: Literal["restricted", "baseline", "privileged"] = "restricted"
    """Pod Security Standard enforced on the namespace (every pod rendered here meets
    restricted; lower it only for a sidecar some operator injects without a securityContext)."""


class ServiceAccountValues(_V):
    annotations: dict[str, str] = Field(default_factory=dict)
    """e.g. eks.amazonaws.com/role-arn: S3 through IRSA instead of keys in the Secret."""


class SecretValues(_V):
    existingSecret: str = ""
    """A Secret you manage (External Secrets, sealed-secrets) with the keys of SECRET_ENV;
    then none is rendered and the fields below must stay empty."""
    adminToken: str = ""
    servingKey: str = ""
    postgresPassword: str = ""
    awsAccessKeyId: str = ""
    awsSecretAccessKey: str = ""
    hfToken: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> SecretValues:
        given = [k for k in SECRET_ENV if getattr(self, k)]
        if self.existingSecret and given:
            raise ValueError(
                f"existingSecret is set, so {', '.join(given)} would be ignored: put them in "
                f"that Secret (keys {', '.join(SECRET_ENV[k] for k in given)}) or drop "
                "existingSecret"
            )
        for key in ("adminToken", "servingKey"):
            value = getattr(self, key)
            if value and not MIN_SECRET_CHARS <= len(value) <= MAX_TOKEN_CHARS:
                raise ValueError(
                    f"{key} must be {MIN_SECRET_CHARS}-{MAX_TOKEN_CHARS} characters (leave it "
                    "empty to have one generated)"
                )
        return self


class StorageValues(_V):
    bucket: str = Field("s3://evertune-landing", pattern=r"^[a-z][a-z0-9+.-]*://\S+$")
    """storage.bucket: an object store every pod reaches (a folder in a pod is not shared)."""
    awsRegion: str = "us-east-1"
    s3EndpointUrl: str = ""
    """AWS_ENDPOINT_URL for an S3-compatible store (MinIO, Ceph); empty: AWS S3."""


class WorkspaceValues(_V):
    """The shared `.evertune/` folder: dataset versions, job folders (checkpoints, adapters),
    evaluation reports. Control-plane replicas and Ray workers all read and write it."""

    persistent: bool = True
    """false: an emptyDir per pod (one control replica, no Ray; for a trial only)."""
    storageClassName: str | None = "efs-sc"
    """A ReadWriteMany class: EFS CSI on EKS (the reference stack), NFS, CephFS, Filestore."""
    accessMode: Literal["ReadWriteMany", "ReadWriteOnce"] = "ReadWriteMany"
    size: str = "50Gi"


class PodPlacement(_V):
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class PostgresValues(PodPlacement):
    enabled: bool = True
    """false: an external server (RDS, Cloud SQL) at `host`."""
    image: str = "postgres:17.6-bookworm"
    host: str = Field("", pattern=r"^[A-Za-z0-9.-]*$")
    """External server's host name (enabled: false); the password goes in the Secret."""
    port: int = Field(5432, ge=1, le=65535)
    user: str = Field("evertune", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    database: str = Field("evertune", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Evertune's tables and DBOS's (storage.state_db)."""
    mlflowDatabase: str = Field("mlflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """MLflow's tables: created on first start in-cluster; create it yourself on an external one."""
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = (
        None
    )
    """libpq sslmode; default: disable in-cluster, require for an external server."""
    storageClassName: str | None = None
    storageSize: str = "20Gi"
    resources: Resources = Field(default_factory=lambda: _res("500m", "1Gi", "2", "4Gi"))


class MlflowValues(PodPlacement):
    enabled: bool = True
    """false: an external tracking server at `trackingUri`."""
    trackingUri: str = ""
    """registry.tracking_uri of an external server (enabled: false)."""
    replicas: int = Field(1, ge=0)
    port: int = Field(5000, ge=1, le=65535)
    workers: int = Field(2, ge=1)
    artifactsDestination: str = Field("s3://evertune-mlflow/artifacts", pattern=r"^\S+://\S+$")
    """Where the in-cluster server stores artifacts (it proxies uploads and downloads)."""
    artifactLocation: str = Field("mlflow-artifacts:/evertune", min_length=1)
    """registry.artifact_location: proxied through the server, so clients need no S3 rights.
    Never the default local folder: serving pods download versions from the registry."""
    allowedHosts: list[str] = Field(default_factory=list)
    """Extra Host headers MLflow accepts (an ingress name); the Service's names always are."""
    resources: Resources = Field(default_factory=lambda: _res("250m", "1Gi", "1", "2Gi"))


class ControlValues(PodPlacement):
    replicas: int = Field(2, ge=0)
    resources: Resources = Field(default_factory=lambda: _res("2", "8Gi", "4", "16Gi"))
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    cacheSize: str = "20Gi"
    """emptyDir for converted base models (evaluation loads them in the control plane)."""


class AutoscalingValues(_V):
    enabled: bool = True
    minReplicas: int = Field(2, ge=1)
    maxReplicas: int = Field(8, ge=1)
    metric: str = Field("evertune_requests_in_flight", pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
    """A per-pod metric the Prometheus adapter serves from /metrics (examples/ has its rule)."""
    targetAverageValue: str = Field("4", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    """Requests generating at once per pod; ~ half of serve.max_batch_size (8)."""
    scaleDownStabilizationSeconds: int = Field(300, ge=0, le=3600)
    """Slow to scale down: a new pod loads the model before it serves."""

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingValues:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(
                f"minReplicas ({self.minReplicas}) is larger than maxReplicas ({self.maxReplicas})"
            )
        return self


def _gpu_nodes() -> dict[str, str]:
    return {"karpenter.sh/nodepool": "gpu"}  # the reference EKS stack's GPU NodePool


def _gpu_tolerations() -> list[dict[str, Any]]:
    # GPU nodes are tainted so that only pods asking for a GPU land there.
    return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


class VllmValues(PodPlacement):
    enabled: bool = False
    """true: serving pods run `serve.engine: vllm` on GPU nodes, from the GPU image."""
    nodeSelector: dict[str, str] = Field(default_factory=_gpu_nodes)
    tolerations: list[dict[str, Any]] = Field(default_factory=_gpu_tolerations)
    image: Image | None = None
    """The Dockerfile built with the vLLM build args; default: `image` with tag suffix -gpu."""
    gpus: int = Field(1, ge=1, le=16)
    shmSize: str = "8Gi"
    """/dev/shm for vLLM's workers (the container runtime's default is 64 MiB)."""
    resources: Resources = Field(default_factory=lambda: _res("4", "32Gi", "8", "64Gi"))


class ServeValues(PodPlacement):
    enabled: bool = True
    replicas: int = Field(2, ge=0)
    """Fixed replica count when autoscaling is off."""
    stages: list[Literal["prod", "qa"]] = Field(default_factory=_prod_only, min_length=1)
    resources: Resources = Field(default_factory=lambda: _res("2", "4Gi", "4", "8Gi"))
    cacheSize: str = "20Gi"
    autoscaling: AutoscalingValues = Field(default_factory=AutoscalingValues)
    vllm: VllmValues = Field(default_factory=VllmValues)


class RayGroup(PodPlacement):
    enabled: bool = True
    replicas: int = Field(1, ge=0)
    minReplicas: int = Field(0, ge=0)
    maxReplicas: int = Field(4, ge=0)
    gpus: int = Field(0, ge=0, le=16)
    resources: Resources = Field(default_factory=lambda: _res("4", "16Gi", "4", "16Gi"))

    @model_validator(mode="after")
    def _bounds(self) -> RayGroup:
        if not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(
                f"need minReplicas <= replicas <= maxReplicas, got {self.minReplicas} <= "
                f"{self.replicas} <= {self.maxReplicas}"
            )
        return self


def _gpu_group() -> RayGroup:
    return RayGroup(
        enabled=False, replicas=0, minReplicas=0, maxReplicas=2, gpus=1,
        nodeSelector=_gpu_nodes(), tolerations=_gpu_tolerations(),
        resources=_res("8", "64Gi", "8", "64Gi"),
    )  # fmt: skip


class RayJobExample(_V):
    jobId: str = Field("ftjob-example", pattern=r"^[A-Za-z0-9_.-]+$")
    """The job folder (.evertune/jobs/JOB_ID) the example RayJob trains."""
    entrypointNumCpus: float = Field(4, gt=0)
    entrypointNumGpus: float = Field(0, ge=0)


class RayValues(_V):
    enabled: bool = True
    """The KubeRay RayCluster (needs the KubeRay operator); sets train.backend: ray."""
    version: str = Field("2.60.0", pattern=r"^\d+\.\d+\.\d+$")
    """= the Dockerfile's RAY_VERSION: head, workers and the control plane's client match."""
    autoscaling: bool = True
    head: Resources = Field(default_factory=lambda: _res("1", "4Gi", "2", "8Gi"))
    cpuWorkers: RayGroup = Field(default_factory=RayGroup)
    gpuWorkers: RayGroup = Field(default_factory=_gpu_group)
    shmSize: str = "4Gi"
    jobExample: RayJobExample = Field(default_factory=RayJobExample)

    @model_validator(mode="after")
    def _sized(self) -> RayValues:
        # KubeRay derives each node's Ray resources (CPUs, object store memory) from limits.
        for where, res in (("head", self.head), ("cpuWorkers", self.cpuWorkers.resources),
                           ("gpuWorkers", self.gpuWorkers.resources)):
            missing = [k for k in ("cpu", "memory") if k not in res.get("limits", {})]
            if missing:
                raise ValueError(f"{where}: limits need {' and '.join(missing)} (KubeRay sizes "
                                 "the Ray node from them)")
        return self


class ServiceMonitorValues(_V):
    enabled: bool = True
    """Needs the prometheus-operator CRDs (kube-prometheus-stack)."""
    labels: dict[str, str] = Field(default_factory=lambda: {"release": "kube-prometheus-stack"})
    """Labels your Prometheus selects ServiceMonitors by."""
    interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$")


class MigrateValues(_V):
    backoffLimit: int = Field(6, ge=0)
    ttlSecondsAfterFinished: int = Field(86400, ge=0)


class Values(_V):
    """Everything `evertune k8s render` reads; defaults = deploy/k8s/values.yaml."""

    release: str = Field("evertune", pattern=_DNS_LABEL, max_length=30)
    """Prefix of every object's name and its app.kubernetes.io/instance label."""
    namespace: NamespaceValues = Field(default_factory=NamespaceValues)
    image: Image = Field(default_factory=Image)
    imagePullSecrets: list[str] = Field(default_factory=list)
    serviceAccount: ServiceAccountValues = Field(default_factory=ServiceAccountValues)
    secrets: SecretValues = Field(default_factory=SecretValues)
    storage: StorageValues = Field(default_factory=StorageValues)
    workspace: WorkspaceValues = Field(default_factory=WorkspaceValues)
    postgres: PostgresValues = Field(default_factory=PostgresValues)
    mlflow: MlflowValues = Field(default_factory=MlflowValues)
    migrate: MigrateValues = Field(default_factory=MigrateValues)
    control: ControlValues = Field(default_factory=ControlValues)
    serve: ServeValues = Field(default_factory=ServeValues)
    ray: RayValues = Field(default_factory=RayValues)
    serviceMonitor: ServiceMonitorValues = Field(default_factory=ServiceMonitorValues)
    config: dict[str, Any] = Field(default_factory=dict)
    """More evertune.yaml keys (model.base, train.n_epochs, server.port, …), validated like
    evertune.yaml; the keys in CHART_OWNED come from the values above instead."""

    @model_validator(mode="after")
    def _consistent(self) -> Values:
        problems = []
        if not self.postgres.enabled and not self.postgres.host:
            problems.append("postgres.enabled is false, so postgres.host (the external server) "
                            "is required")
        if not self.mlflow.enabled and not self.mlflow.trackingUri:
            problems.append("mlflow.enabled is false, so mlflow.trackingUri (the external "
                            "tracking server, e.g. https://mlflow.example.com) is required")
        shared = self.control.replicas > 1 or self.ray.enabled
        if shared and not (self.workspace.persistent
                           and self.workspace.accessMode == "ReadWriteMany"):
            problems.append(
                "control.replicas > 1 or ray.enabled: the workspace (dataset versions, job "
                "folders) is shared by several pods, so it needs workspace.persistent: true "
                "with accessMode: ReadWriteMany"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


# Keys of evertune.yaml the chart sets from the values above (where to set them instead).
CHART_OWNED: dict[str, str] = {
    "storage.bucket": "storage.bucket",
    "storage.state_db": "postgres.* (the password: secrets.postgresPassword)",
    "registry.tracking_uri": "mlflow.enabled / mlflow.trackingUri",
    "registry.artifact_location": "mlflow.artifactLocation",
    "train.backend": "ray.enabled",
    "server.host": "nothing: pods listen on all interfaces",
}


# -- loading ----------------------------------------------------------------------------------
def load_values(path: Path) -> Values:
    """Read and validate a values file (only overrides of `Values()`); ValuesError lists every
    problem, each with its key."""
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ValuesError([f"{path} does not exist"], source) from None
    except yaml.YAMLError as exc:
        raise ValuesError([f"not valid YAML: {exc}"], source) from None
    return parse_values(raw, source)


def parse_values(raw: Any, source: str = "values") -> Values:
    """Validate a values mapping (and the evertune.yaml it makes); see `load_values`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValuesError(
            [f"top level must be a mapping of sections, got {type(raw).__name__}"], source
        )
    try:
        values = Values.model_validate(_over_defaults(Values(), raw))
    except ValidationError as exc:
        raise ValuesError([_format_error(e) for e in exc.errors()], source) from None
    evertune_config(values, source)  # its problems too, named config.…
    return values


def _over_defaults(default: BaseModel, raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` merged over the defaults as Helm merges values: a section (sub-model) or a
    resources map given in part keeps the defaults of the keys it leaves out, so
    `ray: {gpuWorkers: {enabled: true}}` keeps the GPU node selector and tolerations. Other
    values, free-form maps (nodeSelector, labels) and lists included, replace the default."""
    out = dict(raw)
    for key, value in raw.items():
        field = type(default).model_fields.get(key)
        current = getattr(default, key, None)
        if field is None or not isinstance(value, dict):
            continue  # unknown keys are left for validation to name
        if isinstance(current, BaseModel):
            out[key] = _over_defaults(current, value)
        elif field.annotation == Resources and isinstance(current, dict):
            merged: dict[str, Any] = {part: dict(amounts) for part, amounts in current.items()}
            for part, given in value.items():
                merged[part] = ({**merged.get(part, {}), **given} if isinstance(given, dict)
                                else given)
            out[key] = merged
    return {**_dump(default), **out}


def _dump(model: BaseModel) -> dict[str, Any]:
    # Field values as they are; sub-models stay the default instances (pydantic keeps them).
    return {name: getattr(model, name) for name in type(model).model_fields}


def _format_error(err: ErrorDetails) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key{hint} (deploy/k8s/values.yaml lists them all)"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    # A check across sections (model validator of Values) names its keys in the message.
    return f"{where}: {msg}{shown}" if where else msg


def _allowed_keys(loc: list[str]) -> list[str]:
    """The field names of the model at `loc` inside Values (empty when it is not a model)."""
    model: type[BaseModel] | None = Values
    for part in loc:
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return []
        ann = field.annotation
        # `Image | None` and the like: take the model out of the union.
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type)
                      and issubclass(a, BaseModel)), None)
    return sorted(model.model_fields) if model is not None else []


# -- evertune.yaml ------------------------------------------------------------------------------
def _svc_host(v: Values, component: str) -> str:
    """A Service's DNS name, valid from any namespace (Ray pods, a RayJob elsewhere)."""
    return f"{v.release}-{component}.{v.namespace.name}.svc"


def state_db_url(v: Values) -> str:
    """storage.state_db: psycopg (v3, installed with DBOS); no password, libpq reads
    $PGPASSWORD, so the URL can sit in a ConfigMap."""
    return _postgres_url(v, v.postgres.database)


def mlflow_backend_url(v: Values) -> str:
    return _postgres_url(v, v.postgres.mlflowDatabase)


def _postgres_url(v: Values, database: str) -> str:
    pg = v.postgres
    host = _svc_host(v, "postgres") if pg.enabled else pg.host
    sslmode = pg.sslmode or ("disable" if pg.enabled else "require")
    return f"postgresql+psycopg://{pg.user}@{host}:{pg.port}/{database}?sslmode={sslmode}"


def tracking_uri(v: Values) -> str:
    if v.mlflow.enabled:
        return f"http://{_svc_host(v, 'mlflow')}:{v.mlflow.port}"
    return v.mlflow.trackingUri


def ray_address(v: Values) -> str:
    """Ray Client address of the RayCluster's head Service (KubeRay names it NAME-head-svc);
    `ray.init()` reads it from $RAY_ADDRESS. Job submission is at http://…-head-svc:8265."""
    return f"ray://{v.release}-ray-head-svc.{v.namespace.name}.svc:10001"


def evertune_config(v: Values, source: str = "values") -> dict[str, Any]:
    """The evertune.yaml every pod reads: `config` plus the keys the chart owns, validated
    with evertune.config (so a key Evertune does not know fails here, not in the cluster)."""
    owned: dict[str, dict[str, Any]] = {
        "storage": {"bucket": v.storage.bucket, "state_db": state_db_url(v)},
        "registry": {"tracking_uri": tracking_uri(v),
                     "artifact_location": v.mlflow.artifactLocation},
        "train": {"backend": "ray" if v.ray.enabled else "local"},
        "server": {"host": "0.0.0.0"},
    }
    problems = []
    for key, instead in CHART_OWNED.items():
        section, _, name = key.partition(".")
        user = v.config.get(section)
        if isinstance(user, dict) and name in user:
            problems.append(f"config.{key}: set by the chart; set {instead} instead")
    merged = _merge(v.config, owned)
    try:
        parse_config(merged, source=source)
    except ConfigError as exc:
        problems += [f"config.{p}" for p in exc.problems]
    if problems:
        raise ValuesError(problems, source)
    return merged


def server_port(v: Values) -> int:
    """server.port of the rendered evertune.yaml (config.server.port, default 8000)."""
    return int(parse_config(evertune_config(v)).server.port)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# -- secrets ----------------------------------------------------------------------------------
def resolve_secrets(v: Values, previous: Mapping[str, str] | None = None) -> tuple[
    dict[str, str], list[str]
]:
    """The Secret's data (env name → value) and the values fields that were generated.

    Empty adminToken / servingKey / postgresPassword are taken from `previous` (the Secret of
    an earlier render into the same folder) or generated: rendering again must not change the
    Postgres password the database was initialised with."""
    previous = previous or {}
    data: dict[str, str] = {}
    generated: list[str] = []
    for field, env in SECRET_ENV.items():
        value = getattr(v.secrets, field)
        if not value and field in GENERATED_SECRETS:
            value = previous.get(env, "")
            if not value:
                prefix = "evt_" if field != "postgresPassword" else ""  # like minted tokens
                value = prefix + _secrets.token_urlsafe(32)
                generated.append(field)
        if value:
            data[env] = value
    return data, generated


def _previous_secret(out: Path, name: str) -> dict[str, str]:
    path = out / FILES["config"]
    if not path.is_file():
        return {}
    try:
        docs = list(yaml.safe_load_all(path.read_text("utf-8")))
    except yaml.YAMLError:
        return {}
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "Secret" and (
            doc.get("metadata", {}).get("name") == name
        ):
            return {str(k): str(val) for k, val in (doc.get("stringData") or {}).items()}
    return {}


# -- object builders --------------------------------------------------------------------------
FILES = {
    "namespace": "00-namespace.yaml",
    "config": "10-config.yaml",
    "workspace": "15-workspace.yaml",
    "postgres": "20-postgres.yaml",
    "mlflow": "30-mlflow.yaml",
    "migrate": "40-migrate.yaml",
    "control": "50-control.yaml",
    "serve": "60-serve.yaml",
    "ray": "70-ray.yaml",
    "monitoring": "80-monitoring.yaml",
    "rayjob": "examples/rayjob-train.yaml",
    "adapter": "examples/prometheus-adapter-values.yaml",
}


def _name(v: Values, component: str) -> str:
    return f"{v.release}-{component}"


def _labels(v: Values, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "evertune",
        "app.kubernetes.io/instance": v.release,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "evertune",
        "app.kubernetes.io/managed-by": "evertune-k8s-render",
        # A label value: at most 63 characters, ending alphanumeric (a tag may be longer).
        "app.kubernetes.io/version": v.image.tag[:63].rstrip("-_.") or "unknown",
    }


def _selector(v: Values, component: str) -> dict[str, str]:
    # Only labels that never change: a Deployment's selector is immutable.
    return {"app.kubernetes.io/instance": v.release, "app.kubernetes.io/component": component}


def _meta(v: Values, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": v.namespace.name, "labels": _labels(v, component)}


def _pod_security(uid: int = UID) -> dict[str, Any]:
    return {
        "runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
        # Volumes are chowned to fsGroup only when their root does not match yet (fast on big
        # EFS / PVC trees after the first mount).
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip


def _container_security(read_only: bool = True) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _secret_name(v: Values) -> str:
    return v.secrets.existingSecret or _name(v, "secrets")


def _secret_env(v: Values, field: str, *, optional: bool = False) -> dict[str, Any]:
    env = SECRET_ENV[field]
    ref: dict[str, Any] = {"name": _secret_name(v), "key": env}
    if optional:
        ref["optional"] = True  # absent key: no variable (S3 through IRSA, no HF token)
    return {"name": env, "valueFrom": {"secretKeyRef": ref}}


def store_env(v: Values) -> list[dict[str, Any]]:
    """What a client of the stores needs: libpq's password, S3 region / endpoint / keys, and a
    writable $HOME and cache (the root filesystem is read-only)."""
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "AWS_DEFAULT_REGION", "value": v.storage.awsRegion},
    ]
    if v.storage.s3EndpointUrl:
        env.append({"name": "AWS_ENDPOINT_URL", "value": v.storage.s3EndpointUrl})
    env.append(_secret_env(v, "postgresPassword"))
    env.append(_secret_env(v, "awsAccessKeyId", optional=True))
    env.append(_secret_env(v, "awsSecretAccessKey", optional=True))
    return env


def evertune_env(v: Values, component: str) -> list[dict[str, Any]]:
    """Environment of a container running Evertune code, least privilege per component:
    only the control plane and the migrate Job get the admin token."""
    env: list[dict[str, Any]] = [
        {"name": HOME_ENV, "value": WORKSPACE_DIR},
        {"name": MODEL_CACHE_ENV, "value": f"{CACHE_DIR}/evertune/models"},
        *store_env(v),
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        _secret_env(v, "hfToken", optional=True),
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
    ]
    if component in ("control", "migrate"):
        # The CLI in the pod (`kubectl exec … evertune approve`) acts as this admin.
        env.append(_secret_env(v, "adminToken"))
    if component == "migrate":
        env.append(_secret_env(v, "servingKey"))
    if component == "control" and v.ray.enabled:
        env.append({"name": "RAY_ADDRESS", "value": ray_address(v)})
    if component == "serve" and v.serve.vllm.enabled:
        env.append({"name": "VLLM_NO_USAGE_STATS", "value": "1"})  # no calls home from a pod
    return env


def _workspace_volumes(
    v: Values, *, shared: bool, cache_size: str = "20Gi", shm: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts of an Evertune container: evertune.yaml from the ConfigMap, the
    `.evertune/` state folder (the shared PVC, or an emptyDir where nothing needs sharing),
    and emptyDirs for /tmp and /cache, the only writable paths besides."""
    state: dict[str, Any] = (
        {"name": "state", "persistentVolumeClaim": {"claimName": _name(v, "workspace")}}
        if shared and v.workspace.persistent
        else {"name": "state", "emptyDir": {}}
    )
    volumes = [
        {"name": "config", "configMap": {"name": _name(v, "config"),
                                         "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}]}},
        state,
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {"sizeLimit": cache_size}},
    ]
    mounts = [
        {"name": "config", "mountPath": f"{WORKSPACE_DIR}/{CONFIG_FILE}", "subPath": CONFIG_FILE,
         "readOnly": True},
        {"name": "state", "mountPath": f"{WORKSPACE_DIR}/{STATE_DIR}"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
    ]
    if shm:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _http_probes(path_ready: str, path_live: str, *, startup_s: int) -> dict[str, Any]:
    """startup: the port opens only once the lifespan has loaded the model (uvicorn starts the
    app before it listens), so allow `startup_s`; readiness on /healthz; liveness on /metrics,
    the cheapest page, which answers as long as the event loop does."""
    period = 10
    return {
        "startupProbe": {"httpGet": {"path": path_ready, "port": HTTP}, "periodSeconds": period,
                         "timeoutSeconds": 5, "failureThreshold": -(-startup_s // period)},
        "readinessProbe": {"httpGet": {"path": path_ready, "port": HTTP}, "periodSeconds": period,
                           "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": path_live, "port": HTTP}, "periodSeconds": 20,
                          "timeoutSeconds": 5, "failureThreshold": 6},
    }


def _pod_spec(
    v: Values, containers: list[dict[str, Any]], volumes: list[dict[str, Any]], *,
    placement: PodPlacement | None = None, uid: int = UID, service_account: bool = True,
    api_access: bool = False, **extra: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": _pod_security(uid),
        "containers": containers,
        "volumes": volumes,
    }
    if service_account:
        spec["serviceAccountName"] = v.release
    if not api_access:
        # Evertune never calls the Kubernetes API: no token in the pod.
        spec["automountServiceAccountToken"] = False
    if v.imagePullSecrets:
        spec["imagePullSecrets"] = [{"name": s} for s in v.imagePullSecrets]
    if placement is not None:
        if placement.nodeSelector:
            spec["nodeSelector"] = dict(placement.nodeSelector)
        if placement.tolerations:
            spec["tolerations"] = list(placement.tolerations)
    spec.update(extra)
    return spec


def _spread(v: Values, component: str) -> list[dict[str, Any]]:
    """Prefer replicas on different nodes and zones; never block scheduling for it."""
    return [
        {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": _selector(v, component)}}
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]


def _checksum(*parts: Any) -> str:
    text = yaml.safe_dump(list(parts), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _http_service(v: Values, component: str, port: int, service_type: str = "ClusterIP",
                  metrics: bool = True) -> Manifest:
    labels = _labels(v, component)
    if metrics:
        labels["evertune.dev/metrics"] = "true"  # what the ServiceMonitor selects
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": _name(v, component), "namespace": v.namespace.name,
                     "labels": labels},
        "spec": {"type": service_type, "selector": _selector(v, component),
                 "ports": [{"name": HTTP, "port": port, "targetPort": HTTP,
                            "protocol": "TCP"}]},
    }  # fmt: skip


def _pdb(v: Values, component: str) -> Manifest:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _meta(v, _name(v, component), component),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": _selector(v, component)}},
    }  # fmt: skip


def namespace_objects(v: Values) -> list[Manifest]:
    if not v.namespace.create:
        return []
    return [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": v.namespace.name, "labels": {
                 **_labels(v, "namespace"),
                 "pod-security.kubernetes.io/enforce": v.namespace.podSecurity,
                 "pod-security.kubernetes.io/warn": "restricted"}}}]


def config_objects(v: Values, secret_data: Mapping[str, str]) -> list[Manifest]:
    """ServiceAccount, ConfigMap with evertune.yaml, and the Secret (unless existingSecret)."""
    sa: Manifest = {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": _meta(v, v.release, "evertune"),
        "automountServiceAccountToken": False,
    }
    if v.serviceAccount.annotations:
        sa["metadata"]["annotations"] = dict(v.serviceAccount.annotations)
    text = (
        "# Rendered by `evertune k8s render`: change the values file and render again.\n"
        + yaml.safe_dump(evertune_config(v), sort_keys=False)
    )
    cm: Manifest = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _meta(v, _name(v, "config"), "config"),
        "data": {CONFIG_FILE: text},
    }
    objects = [sa, cm]
    if not v.secrets.existingSecret:
        objects.append({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(v, _secret_name(v), "secrets"),
            "stringData": dict(secret_data),
        })
    return objects


def workspace_objects(v: Values) -> list[Manifest]:
    if not v.workspace.persistent:
        return []
    spec: dict[str, Any] = {
        "accessModes": [v.workspace.accessMode],
        "resources": {"requests": {"storage": v.workspace.size}},
    }
    if v.workspace.storageClassName is not None:
        spec["storageClassName"] = v.workspace.storageClassName
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": _meta(v, _name(v, "workspace"), "workspace"), "spec": spec}]


POSTGRES_UID = 999  # the postgres user of the official image


def postgres_objects(v: Values) -> list[Manifest]:
    """StatefulSet (PVC from volumeClaimTemplates), headless Service, init script that creates
    MLflow's database. Runs as the image's postgres user, not root."""
    if not v.postgres.enabled:
        return []
    pg = v.postgres
    name = _name(v, "postgres")
    init = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _meta(v, f"{name}-init", "postgres"),
        "data": {"10-mlflow-database.sql": f'CREATE DATABASE "{pg.mlflowDatabase}";\n'},
    }  # fmt: skip
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(v, name, "postgres"),
        "spec": {"clusterIP": "None", "selector": _selector(v, "postgres"),
                 "ports": [{"name": "postgres", "port": pg.port, "targetPort": "postgres"}]},
    }  # fmt: skip
    ready = ["pg_isready", "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user, "-d",
             pg.database]
    container = {
        "name": "postgres", "image": pg.image, "imagePullPolicy": "IfNotPresent",
        "args": ["-p", str(pg.port)],
        "ports": [{"name": "postgres", "containerPort": pg.port}],
        "env": [
            {"name": "POSTGRES_USER", "value": pg.user},
            {"name": "POSTGRES_DB", "value": pg.database},
            {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {
                "name": _secret_name(v), "key": SECRET_ENV["postgresPassword"]}}},
            # A subfolder: the volume's root holds lost+found, which initdb refuses.
            {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
        ],
        "resources": pg.resources,
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "data", "mountPath": "/var/lib/postgresql/data"},
            {"name": "run", "mountPath": "/var/run/postgresql"},  # its socket and lock file
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "init", "mountPath": "/docker-entrypoint-initdb.d", "readOnly": True},
        ],
        "readinessProbe": {"exec": {"command": ready}, "periodSeconds": 10, "timeoutSeconds": 5},
        "livenessProbe": {"exec": {"command": ready}, "periodSeconds": 20, "timeoutSeconds": 5,
                          "failureThreshold": 6, "initialDelaySeconds": 30},
    }  # fmt: skip
    claim: dict[str, Any] = {
        "metadata": {"name": "data", "labels": _labels(v, "postgres")},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": pg.storageSize}}},
    }
    if pg.storageClassName is not None:
        claim["spec"]["storageClassName"] = pg.storageClassName
    pod = _pod_spec(
        v, [container],
        [{"name": "run", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}},
         {"name": "init", "configMap": {"name": f"{name}-init"}}],
        placement=pg, uid=POSTGRES_UID, service_account=False,
    )  # fmt: skip
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _meta(v, name, "postgres"),
        "spec": {
            "serviceName": name, "replicas": 1,
            "selector": {"matchLabels": _selector(v, "postgres")},
            "template": {"metadata": {"labels": _labels(v, "postgres")}, "spec": pod},
            "volumeClaimTemplates": [claim],
        },
    }  # fmt: skip
    return [init, service, statefulset]


def mlflow_objects(v: Values) -> list[Manifest]:
    """The MLflow tracking server, from the Evertune image (it has MLflow, psycopg and boto3):
    Postgres backend, artifacts proxied to S3."""
    if not v.mlflow.enabled:
        return []
    m = v.mlflow
    svc = _name(v, "mlflow")
    ns = v.namespace.name
    # MLflow refuses Host headers other than localhost and private IPs (DNS-rebinding guard):
    # allow the Service's names, with and without the port.
    hosts = [svc, f"{svc}:*", f"{svc}.{ns}", f"{svc}.{ns}:*", f"{svc}.{ns}.svc*",
             "localhost", "localhost:*", *m.allowedHosts]
    args = [
        "server", "--host", "0.0.0.0", "--port", str(m.port), "--workers", str(m.workers),
        "--backend-store-uri", mlflow_backend_url(v),
        "--artifacts-destination", m.artifactsDestination,
        "--serve-artifacts",
        "--allowed-hosts", ",".join(hosts),
    ]  # fmt: skip
    env = store_env(v)
    container = {
        "name": "mlflow", "image": v.image.ref, "imagePullPolicy": v.image.pullPolicy,
        "command": ["/usr/bin/tini", "--", "mlflow"], "args": args,
        "ports": [{"name": HTTP, "containerPort": m.port, "protocol": "TCP"}],
        "env": env,
        "resources": m.resources,
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "cache", "mountPath": CACHE_DIR}],
        "readinessProbe": {"httpGet": {"path": MLFLOW_HEALTH_PATH, "port": HTTP},
                           "periodSeconds": 10, "timeoutSeconds": 5},
        "livenessProbe": {"httpGet": {"path": MLFLOW_HEALTH_PATH, "port": HTTP},
                          "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 6},
        "startupProbe": {"httpGet": {"path": MLFLOW_HEALTH_PATH, "port": HTTP},
                         "periodSeconds": 10, "failureThreshold": 30},
    }  # fmt: skip
    pod = _pod_spec(v, [container], [{"name": "tmp", "emptyDir": {}},
                                     {"name": "cache", "emptyDir": {}}], placement=m)
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(v, svc, "mlflow"),
        "spec": {"replicas": m.replicas, "selector": {"matchLabels": _selector(v, "mlflow")},
                 "template": {"metadata": {"labels": _labels(v, "mlflow")}, "spec": pod}},
    }  # fmt: skip
    return [deployment, _http_service(v, "mlflow", m.port, metrics=False)]


def _config_annotation(v: Values) -> dict[str, str]:
    # Pods roll when evertune.yaml changes (a subPath mount never sees ConfigMap updates).
    return {"evertune.dev/config-checksum": _checksum(evertune_config(v))}


def migrate_objects(v: Values) -> list[Manifest]:
    """A Job: `evertune db upgrade` (init container), then `evertune k8s bootstrap`. Its name
    carries a hash of image and config: a Job's template is immutable, so a new release gets
    a new Job (and runs the migrations again) while re-applying the same one changes nothing."""
    volumes, mounts = _workspace_volumes(v, shared=False)
    env = evertune_env(v, "migrate")

    def step(name: str, args: list[str]) -> dict[str, Any]:
        return {
            "name": name, "image": v.image.ref, "imagePullPolicy": v.image.pullPolicy,
            "args": args, "env": env, "volumeMounts": mounts,
            "resources": {"requests": {"cpu": "250m", "memory": "1Gi"},
                          "limits": {"cpu": "1", "memory": "2Gi"}},
            "securityContext": _container_security(),
        }  # fmt: skip

    pod = _pod_spec(
        v, [step("bootstrap", ["k8s", "bootstrap"])], volumes,
        initContainers=[step("db-upgrade", ["db", "upgrade"])], restartPolicy="Never",
    )  # fmt: skip
    digest = _checksum(v.image.ref, evertune_config(v))[:8]
    return [{
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(v, f"{_name(v, 'db-migrate')}-{digest}", "migrate"),
        "spec": {
            "backoffLimit": v.migrate.backoffLimit,
            "ttlSecondsAfterFinished": v.migrate.ttlSecondsAfterFinished,
            "template": {"metadata": {"labels": _labels(v, "migrate")}, "spec": pod},
        },
    }]  # fmt: skip


def control_objects(v: Values) -> list[Manifest]:
    """`evertune up --no-serving`: control API, console, pipeline (DBOS), bucket watcher."""
    port = server_port(v)
    volumes, mounts = _workspace_volumes(v, shared=True, cache_size=v.control.cacheSize)
    container = {
        "name": "control", "image": v.image.ref, "imagePullPolicy": v.image.pullPolicy,
        "args": ["up", "--no-serving"],
        "ports": [{"name": HTTP, "containerPort": port, "protocol": "TCP"}],
        "env": evertune_env(v, "control"),
        "resources": v.control.resources,
        "securityContext": _container_security(),
        "volumeMounts": mounts,
        **_http_probes(HEALTH_PATH, METRICS_PATH, startup_s=600),
    }  # fmt: skip
    pod = _pod_spec(v, [container], volumes, placement=v.control,
                    topologySpreadConstraints=_spread(v, "control"),
                    # `up` finishes the step in flight and releases its DB lock on SIGTERM.
                    terminationGracePeriodSeconds=60)
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(v, _name(v, "control"), "control"),
        "spec": {
            "replicas": v.control.replicas,
            "selector": {"matchLabels": _selector(v, "control")},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": _labels(v, "control"),
                                      "annotations": _config_annotation(v)},
                         "spec": pod},
        },
    }  # fmt: skip
    objects: list[Manifest] = [
        deployment, _http_service(v, "control", port, v.control.serviceType)
    ]
    if v.control.replicas > 1:
        objects.append(_pdb(v, "control"))
    return objects


def gpu_image(v: Values) -> Image:
    """The GPU build (vLLM serving, Ray GPU workers): serve.vllm.image or `image` + -gpu."""
    return v.serve.vllm.image or v.image.model_copy(update={"tag": f"{v.image.tag}-gpu"})


def serve_objects(v: Values) -> list[Manifest]:
    """`evertune serve --stage prod`: Deployment, Service, PDB and an HPA on a per-pod metric
    of /metrics; with serve.vllm.enabled the pods run vLLM on GPU nodes."""
    if not v.serve.enabled:
        return []
    s = v.serve
    port = server_port(v)
    args = ["serve"]
    for stage in s.stages:
        args += ["--stage", stage]
    vllm = s.vllm.enabled
    if vllm:
        # Only serving runs vLLM; the control plane (evaluation, QA system tests) keeps the
        # CPU engine, so the shared evertune.yaml keeps serve.engine and this pod overrides it.
        args += ["--set", "serve.engine=vllm"]
    volumes, mounts = _workspace_volumes(
        v, shared=False, cache_size=s.cacheSize, shm=s.vllm.shmSize if vllm else None
    )
    resources = s.vllm.resources if vllm else s.resources
    if vllm:
        gpus = {"nvidia.com/gpu": s.vllm.gpus}
        resources = {"requests": {**resources.get("requests", {}), **gpus},
                     "limits": {**resources.get("limits", {}), **gpus}}
    image = gpu_image(v) if vllm else v.image
    container = {
        "name": "serve", "image": image.ref, "imagePullPolicy": image.pullPolicy,
        "args": args,
        "ports": [{"name": HTTP, "containerPort": port, "protocol": "TCP"}],
        "env": evertune_env(v, "serve"),
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": mounts,
        # vLLM's first start compiles CUDA graphs: VllmEngine waits up to 900 s for it.
        **_http_probes(HEALTH_PATH, METRICS_PATH, startup_s=1200 if vllm else 600),
    }  # fmt: skip
    pod = _pod_spec(v, [container], volumes, placement=s.vllm if vllm else s,
                    topologySpreadConstraints=_spread(v, "serve"),
                    terminationGracePeriodSeconds=60)  # in-flight streams finish
    spec: dict[str, Any] = {
        "selector": {"matchLabels": _selector(v, "serve")},
        # Never below capacity during a rollout: a new pod loads the model before it serves.
        "strategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {"metadata": {"labels": _labels(v, "serve"),
                                  "annotations": _config_annotation(v)},
                     "spec": pod},
    }  # fmt: skip
    if not s.autoscaling.enabled:
        # With an HPA the replica count is its to set: `kubectl apply` must not reset it.
        spec = {"replicas": s.replicas, **spec}
    objects: list[Manifest] = [
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": _meta(v, _name(v, "serve"), "serve"), "spec": spec},
        _http_service(v, "serve", port),
    ]  # fmt: skip
    if s.autoscaling.enabled:
        a = s.autoscaling
        objects.append({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(v, _name(v, "serve"), "serve"),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                   "name": _name(v, "serve")},
                "minReplicas": a.minReplicas, "maxReplicas": a.maxReplicas,
                "metrics": [{"type": "Pods", "pods": {
                    "metric": {"name": a.metric},
                    "target": {"type": "AverageValue", "averageValue": a.targetAverageValue},
                }}],
                "behavior": {"scaleDown": {
                    "stabilizationWindowSeconds": a.scaleDownStabilizationSeconds,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                }},
            },
        })  # fmt: skip
    if (s.autoscaling.minReplicas if s.autoscaling.enabled else s.replicas) > 1:
        objects.append(_pdb(v, "serve"))
    return objects


def _ray_pod(v: Values, container_name: str, image: Image, resources: Resources, *,
             placement: PodPlacement | None, head: bool) -> dict[str, Any]:
    """A Ray pod template: the Evertune image (same Ray and Python as the control plane's
    client), the shared workspace at the same path as in the control plane (job.json names
    it), KubeRay sets the command (`ray start …`)."""
    volumes, mounts = _workspace_volumes(v, shared=True, shm=v.ray.shmSize)
    container: dict[str, Any] = {
        "name": container_name, "image": image.ref, "imagePullPolicy": image.pullPolicy,
        "env": evertune_env(v, "ray"),
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": mounts,
        # On SIGTERM, let Ray hand its tasks off before the pod goes.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/bash", "-c", "ray stop"]}}},
    }  # fmt: skip
    if head:
        container["ports"] = [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            {"name": "metrics", "containerPort": 8080},
        ]
    # The head keeps the service account KubeRay gives it when autoscaling (its autoscaler
    # sidecar needs RBAC and a token to scale the worker groups); workers get ours.
    autoscaler = head and v.ray.autoscaling
    return {
        "metadata": {"labels": _labels(v, "ray")},
        "spec": _pod_spec(v, [container], volumes, placement=placement,
                          service_account=not autoscaler, api_access=autoscaler),
    }


def _ray_group(v: Values, group: RayGroup, name: str) -> dict[str, Any]:
    image = gpu_image(v) if group.gpus else v.image
    resources = group.resources
    if group.gpus:
        gpus = {"nvidia.com/gpu": group.gpus}
        resources = {"requests": {**resources.get("requests", {}), **gpus},
                     "limits": {**resources.get("limits", {}), **gpus}}
    return {
        "groupName": name,
        "replicas": group.replicas, "minReplicas": group.minReplicas,
        "maxReplicas": group.maxReplicas,
        "rayStartParams": {},
        "template": _ray_pod(v, "ray-worker", image, resources, placement=group, head=False),
    }  # fmt: skip


def ray_objects(v: Values) -> list[Manifest]:
    """The KubeRay RayCluster training runs on (train.backend: ray)."""
    if not v.ray.enabled:
        return []
    r = v.ray
    groups = [_ray_group(v, r.cpuWorkers, "cpu")] if r.cpuWorkers.enabled else []
    if r.gpuWorkers.enabled:
        groups.append(_ray_group(v, r.gpuWorkers, "gpu"))
    spec: dict[str, Any] = {
        "rayVersion": r.version,
        "enableInTreeAutoscaling": r.autoscaling,
        "headGroupSpec": {
            # num-cpus 0: no training on the head, it only coordinates.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _ray_pod(v, "ray-head", v.image, r.head, placement=None, head=True),
        },
        "workerGroupSpecs": groups,
    }
    if r.autoscaling:
        spec["autoscalerOptions"] = {
            "upscalingMode": "Default", "idleTimeoutSeconds": 300,
            "resources": {"requests": {"cpu": "250m", "memory": "512Mi"},
                          "limits": {"cpu": "500m", "memory": "1Gi"}},
            # Writable root: KubeRay mounts only Ray's log folder into the sidecar.
            "securityContext": _container_security(read_only=False),
        }  # fmt: skip
    return [{"apiVersion": "ray.io/v1", "kind": "RayCluster",
             "metadata": _meta(v, _name(v, "ray"), "ray"), "spec": spec}]


def rayjob_example(v: Values) -> list[Manifest]:
    """A RayJob that runs the training driver of one job folder on the RayCluster
    (clusterSelector): the command the ray backend otherwise spawns in the control plane,
    here submitted by KubeRay (the job must be `running` in the state DB, as `start_job` or
    `evertune jobs resume` leave it). Not applied by `kubectl apply -f DIR`."""
    if not v.ray.enabled:
        return []
    ex = v.ray.jobExample
    folder = f"{WORKSPACE_DIR}/{STATE_DIR}/jobs/{ex.jobId}"
    submitter = {
        "name": "ray-job-submitter", "image": v.image.ref, "imagePullPolicy": v.image.pullPolicy,
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                      "limits": {"cpu": "500m", "memory": "512Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }  # fmt: skip
    spec: dict[str, Any] = {
        "entrypoint": f"python -m evertune.training.run {folder}",
        "clusterSelector": {"ray.io/cluster": _name(v, "ray")},
        "submissionMode": "K8sJobMode",
        "entrypointNumCpus": ex.entrypointNumCpus,
        "runtimeEnvYAML": "env_vars:\n  TOKENIZERS_PARALLELISM: \"false\"\n",
        "submitterPodTemplate": {
            "metadata": {"labels": _labels(v, "ray-job")},
            "spec": _pod_spec(v, [submitter], [{"name": "tmp", "emptyDir": {}}],
                              restartPolicy="Never"),
        },
    }
    if ex.entrypointNumGpus:
        spec["entrypointNumGpus"] = ex.entrypointNumGpus
    return [{"apiVersion": "ray.io/v1", "kind": "RayJob",
             "metadata": _meta(v, f"{_name(v, 'train')}-{ex.jobId.lower()}"[:63].rstrip("-."),
                               "ray-job"),
             "spec": spec}]


def monitoring_objects(v: Values) -> list[Manifest]:
    """A ServiceMonitor for the Services labelled evertune.dev/metrics (control, serve)."""
    if not v.serviceMonitor.enabled:
        return []
    m = v.serviceMonitor
    return [{
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": {"name": v.release, "namespace": v.namespace.name,
                     "labels": {**_labels(v, "monitoring"), **m.labels}},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/instance": v.release,
                                         "evertune.dev/metrics": "true"}},
            "namespaceSelector": {"matchNames": [v.namespace.name]},
            "endpoints": [{"port": HTTP, "path": METRICS_PATH, "interval": m.interval,
                           "scheme": "http"}],
        },
    }]  # fmt: skip


def adapter_rules(v: Values) -> dict[str, Any]:
    """Values for the prometheus-community/prometheus-adapter chart serving the HPA's metric:
    the per-pod sum over the series' version/stage labels."""
    metric = v.serve.autoscaling.metric
    return {"rules": {"custom": [{
        "seriesQuery": f'{metric}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"},
                                    "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{metric}$", "as": metric},
        "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
    }]}}  # fmt: skip


# -- render -----------------------------------------------------------------------------------
Rendered = dict[str, list[dict[str, Any]]]
"""File name (relative to the output folder) → its YAML documents."""


def render(v: Values, secret_data: Mapping[str, str] | None = None) -> Rendered:
    """Every manifest for `v`; `secret_data` defaults to `resolve_secrets(v)` (generated)."""
    if secret_data is None:
        secret_data, _ = resolve_secrets(v)
    files: Rendered = {
        FILES["namespace"]: namespace_objects(v),
        FILES["config"]: config_objects(v, secret_data),
        FILES["workspace"]: workspace_objects(v),
        FILES["postgres"]: postgres_objects(v),
        FILES["mlflow"]: mlflow_objects(v),
        FILES["migrate"]: migrate_objects(v),
        FILES["control"]: control_objects(v),
        FILES["serve"]: serve_objects(v),
        FILES["ray"]: ray_objects(v),
        FILES["monitoring"]: monitoring_objects(v),
        FILES["rayjob"]: rayjob_example(v),
    }
    if v.serve.enabled and v.serve.autoscaling.enabled:
        files[FILES["adapter"]] = [adapter_rules(v)]
    return {name: docs for name, docs in files.items() if docs}


def k8s_objects(rendered: Rendered) -> list[Manifest]:
    """The Kubernetes objects among the rendered documents (not the adapter's chart values)."""
    return [d for docs in rendered.values() for d in docs if "apiVersion" in d]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (evertune.yaml in the ConfigMap) as literal blocks, for reading."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    literal = "\n" in data and not any(line.endswith(" ") for line in data.split("\n"))
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if literal else None)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         width=100)


@dataclass
class RenderResult:
    out: Path
    files: list[Path]
    generated: list[str]
    """values.secrets fields generated in this render (kept in OUT/10-config.yaml)."""


def render_to(values_path: Path, out: Path) -> RenderResult:
    """Load `values_path`, render, and write one YAML file per component under `out`.

    An earlier render's Secret in `out` provides the secrets left empty in the values, so
    rendering again keeps the same tokens and Postgres password."""
    v = load_values(values_path)
    previous = {} if v.secrets.existingSecret else _previous_secret(out, _secret_name(v))
    data, generated = resolve_secrets(v, previous)
    rendered = render(v, data)
    # No date in it: rendering the same values twice gives the same files (clean GitOps diffs).
    header = (f"# Rendered by `evertune k8s render --values {values_path.name}`; do not edit: "
              "change the values and render again.\n")
    written = []
    for name, docs in rendered.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = header + dump(docs)
        if name == FILES["config"] and not v.secrets.existingSecret:
            write_private(path, text)  # it holds the Secret: owner-only, like .evertune/token
        else:
            path.write_text(text, "utf-8")
        written.append(path)
    # A file an earlier render wrote for a component now switched off would be applied still.
    for stale in set(FILES.values()) - set(rendered):
        (out / stale).unlink(missing_ok=True)
    return RenderResult(out=out, files=written, generated=generated)


# -- bootstrap (in the cluster) ---------------------------------------------------------------
class BootstrapError(EvertuneError):
    """A token in the Secret cannot be registered (missing, too short, or revoked)."""


def bootstrap_tokens(ws: Workspace, environ: Mapping[str, str]) -> list[str]:
    """Register $EVERTUNE_TOKEN as an admin token and $EVERTUNE_SERVING_KEY as a serving key
    (only their sha256, as `evertune tokens create` stores them); idempotent. Returns one line
    per token saying what happened, never the secret."""
    from sqlalchemy import insert, select

    from evertune import db

    lines = []
    for env, name, role in ((TOKEN_ENV, ADMIN_TOKEN_NAME, "admin"),
                            (SERVING_KEY_ENV, SERVING_KEY_NAME, "serving")):
        secret = (environ.get(env) or "").strip()
        if not MIN_SECRET_CHARS <= len(secret) <= MAX_TOKEN_CHARS or not secret.isascii():
            raise BootstrapError(
                f"${env} must hold a token of {MIN_SECRET_CHARS}-{MAX_TOKEN_CHARS} ASCII "
                f"characters (it has {len(secret)}); set it in the Secret (key {env})"
            )
        digest = hash_token(secret)
        with ws.engine.begin() as conn:
            row = conn.execute(
                select(db.tokens.c.name, db.tokens.c.role, db.tokens.c.revoked)
                .where(db.tokens.c.sha256 == digest)
            ).first()
            if row is None:
                conn.execute(insert(db.tokens).values(
                    name=name, role=role, sha256=digest, created_at=time.time(), revoked=False,
                ))
                lines.append(f"registered ${env} as {role} token {name!r}")
                continue
        if row.revoked:
            raise BootstrapError(
                f"${env} is token {row.name!r}, which was revoked: put a new token in the "
                f"Secret (key {env}) and run the Job again"
            )
        if row.role != role:
            raise BootstrapError(
                f"${env} is already token {row.name!r} with role {row.role}, not {role}: use "
                "another value"
            )
        lines.append(f"${env} already registered ({role} token {row.name!r})")
    return lines
