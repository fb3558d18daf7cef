"""A version's own facts: what it was trained on and how, read from the version, not the config.

    from evertune.facts import read_facts, version_base
    facts = read_facts(adapter_folder)            # the folder's evertune_job.json
    base = version_base(facts, ws.models_dir)     # the base folder it was trained on, checked

Training writes these facts into the result folder beside the weights (`evertune_job.json`),
the registry logs that folder as the version's artifact and copies the facts into the
version's `facts` tag. Serving, evaluation and system tests read them from the version, so
editing `model.base` or `train.lora.r` in evertune.yaml shapes new rounds only: v3 keeps
loading onto the base it was trained on. A base is identified by its spec *and* a fingerprint
of its files, so a folder whose weights were replaced under the same name is refused rather
than silently serving an adapter on the wrong weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertune.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RESULT_META = "evertune_job.json"
"""The facts file inside every training result (and so inside every version's artifact)."""


@dataclass(frozen=True)
class VersionFacts:
    """Everything needed to serve or evaluate a version exactly as it was trained."""

    base_model: str  # the model.base spec the job trained on
    base_path: str | None = None  # where that spec resolved to when it trained
    base_fingerprint: str | None = None  # sha256 over the base folder's files (None: older job)
    kind: str = "lora"  # lora | full
    method: str = "supervised"
    lora: dict[str, Any] = field(default_factory=dict)  # r, alpha, dropout, target_modules
    chat_template_sha256: str | None = None
    max_seq_len: int | None = None
    dtype: str = "auto"
    dataset: str | None = None
    replay: float = 0.0  # share of the training set that was general-set replay (data.replay)
    stages: list[dict[str, Any]] = field(default_factory=list)
    """The lineage: each training stage behind these weights, oldest first, as
    {method, dataset, job} (a chain [pretrain, supervised, dpo] lists three)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def lora_r(self) -> int | None:
        r = self.lora.get("r")
        return int(r) if isinstance(r, int | float) else None


# -- fingerprints -----------------------------------------------------------------------------
def fingerprint(folder: Path) -> str:
    """sha256 over the names, sizes and contents of every file in a model folder (weights,
    config, tokenizer and its chat template).

    Hashed in full rather than sampled: a partial hash would miss a fine-tune saved over the
    same folder. Each file's hash comes from `models.file_sha256`, which remembers it per
    process by (path, size, mtime), so a 0.5 GB base is read once per process, not per load.
    """
    from evertune.models import file_sha256

    folder = folder.resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder))
    digest = hashlib.sha256()
    for p in files:
        name = str(p.relative_to(folder))
        digest.update(f"{name}\0{p.stat().st_size}\0{file_sha256(p)}\0".encode())
    return digest.hexdigest()


def _hidden(path: Path, root: Path) -> bool:
    # Lock files, partial downloads and OS litter are not part of a model.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


# -- writing (training) -----------------------------------------------------------------------
def training_facts(
    *,
    base_model: str,
    base_path: Path,
    kind: str,
    method: str,
    lora: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    dtype: str,
    dataset: str | None,
    replay: float = 0.0,
    stages: list[dict[str, Any]] | None = None,
) -> VersionFacts:
    """The facts of a result a job is about to save (see `training.sft`)."""
    template = getattr(tokenizer, "chat_template", None)
    return VersionFacts(
        base_model=base_model,
        base_path=str(base_path),
        base_fingerprint=fingerprint(base_path),
        kind=kind,
        method=method,
        lora=lora if kind == "lora" else {},
        chat_template_sha256=(
            hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None
        ),
        max_seq_len=max_seq_len,
        dtype=dtype,
        dataset=dataset,
        replay=replay,
        stages=stages or [],
    )


def lora_settings(model: Any) -> dict[str, Any]:
    """The LoRA settings a PEFT model really has (a parent adapter's rank wins over config)."""
    cfg = getattr(model, "peft_config", {}).get("default")
    if cfg is None:
        return {}
    targets = cfg.target_modules
    return {
        "r": int(cfg.r),
        "alpha": int(cfg.lora_alpha),
        "dropout": float(cfg.lora_dropout),
        "target_modules": sorted(targets) if isinstance(targets, set | list) else targets,
    }


# -- reading (serving, evaluation, deploy, registry) ------------------------------------------
def read_facts(folder: Path) -> VersionFacts:
    """The facts stored in a result/version folder.

    Folders written before facts were recorded still carry `base_model` and
    `base_model_path` in the same file; their LoRA settings come from adapter_config.json.
    """
    meta_file = folder / RESULT_META
    if not meta_file.is_file():
        raise ModelError(
            f"{folder} has no {RESULT_META}, so the base model it was trained on is unknown; "
            "only folders written by an Evertune training job can be served or evaluated"
        )
    try:
        meta = json.loads(meta_file.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta_file} is unreadable ({exc}); re-register the version") from None
    facts = meta.get("facts")
    if isinstance(facts, dict) and facts.get("base_model"):
        known = {k: v for k, v in facts.items() if k in VersionFacts.__dataclass_fields__}
        return VersionFacts(**known)
    hp = meta.get("hyperparameters") or {}
    lora: dict[str, Any] = {}
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file():
        ac = json.loads(adapter_cfg.read_text("utf-8"))
        lora = {"r": ac.get("r"), "alpha": ac.get("lora_alpha"),
                "dropout": ac.get("lora_dropout"), "target_modules": ac.get("target_modules")}
    return VersionFacts(
        base_model=str(meta.get("base_model") or ""),
        base_path=meta.get("base_model_path"),
        kind=str(meta.get("kind") or "lora"),
        method=str(meta.get("method") or "supervised"),
        lora=lora,
        max_seq_len=hp.get("max_seq_len"),
        dataset=meta.get("dataset"),
    )


def version_base(facts: VersionFacts, models_dir: Path, *, what: str = "this version") -> Path:
    """The base folder `facts` was trained on, verified by fingerprint.

    Tries the spec as it resolves today, then the folder recorded at training time; refuses
    with a message when neither holds the same files, rather than loading the adapter onto
    other weights.
    """
    from evertune.models import resolve_base_model

    tried: list[str] = []
    candidates: dict[Path, None] = {}  # ordered, without repeats
    if facts.base_model:
        try:
            candidates[resolve_base_model(facts.base_model, models_dir).resolve()] = None
        except ModelError as exc:
            tried.append(str(exc))
    if facts.base_path and (Path(facts.base_path) / "config.json").is_file():
        candidates[Path(facts.base_path).resolve()] = None
    for path in candidates:
        if facts.base_fingerprint is None or fingerprint(path) == facts.base_fingerprint:
            return path
        tried.append(f"{path} holds other weights (fingerprint {fingerprint(path)[:12]})")
    raise ModelError(
        f"{what} was trained on base model {facts.base_model!r}"
        + (f" (fingerprint {facts.base_fingerprint[:12]})" if facts.base_fingerprint else "")
        + ", which is not available here"
        + (": " + "; ".join(tried) if tried else "")
        + ". Restore that base model (same files) to serve or evaluate it; the live "
        "model.base only shapes new rounds."
    )


def folder_base(folder: Path, models_dir: Path, fallback: str, *, what: str) -> Path:
    """The base of a result/version folder: from its facts when Evertune trained it, else
    (a folder from elsewhere, or registered before facts existed) the `fallback` spec."""
    from evertune.models import resolve_base_model

    if (folder / RESULT_META).is_file():
        return version_base(read_facts(folder), models_dir, what=what)
    return resolve_base_model(fallback, models_dir)


def tag_value(facts: VersionFacts) -> str:
    """The compact JSON stored in the version's `facts` registry tag (well under MLflow's
    tag size limit: the chat template is stored by hash)."""
    return json.dumps(facts.to_dict(), sort_keys=True, separators=(",", ":"))
