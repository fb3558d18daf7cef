"""The in-process engine: transformers on CPU or one GPU, with dynamic batching.

    engine = TransformersEngine(base_path, merge_adapters=False, max_batch_size=8, batch_wait_ms=5)
    engine.start()                          # base weights loaded once
    engine.load("v3", adapter_folder)       # beside what is loaded; never replaces a key
    engine.load("v4:merged", other_folder, merge=True)   # this one as a merged copy
    engine.prepare(req)
    async for event in engine.stream("v3", req): ...

Batching: requests go to a queue; one batcher thread takes the oldest request, waits up to
`batch_wait_ms` (from that request's arrival) for more requests that can share its batch, up
to `max_batch_size`, and starts decoding them together (`serving.decode.RunningBatch`).
Requests arriving while a batch runs join it at the next step boundary (continuous
batching: their prompt is prefilled, then they decode with the others) while it has room;
rows leave as soon as they finish. So under load the batch stays full and a new request
waits about one decode step, not for the whole batch to end. A request that fails inside a batch
(a seed torch refuses, a prompt the model cannot run) fails alone: the rows batched with
it go on (see `serving.decode`).

Versions: each `load` is one of two forms (`merge_adapters` is the default form, `load(...,
merge=...)` overrides it per key; the gateway maps `serve.merge_adapters` true/false/prod
onto it):
- merged: a copy of the in-memory base weights with the version's LoRA adapter merged in.
  Same speed as the base model; one copy of the weights per loaded version; requests of
  different versions run in different batches.
- adapter (multi-LoRA): the base model is wrapped once in a PeftModel and every adapter
  version is a named adapter on it (PEFT `load_adapter` / `delete_adapter`); one batch mixes
  versions and the base (PEFT `adapter_names`), at the cost of the LoRA matmuls on every
  step. Memory per version is the adapter's size only, so one base serves many versions.
A full fine-tune's result (a model folder rather than an adapter) is loaded as its own model
in both forms.

Compatibility: before an adapter touches the model, `check_adapter` compares it with the
served base: the base recorded in the version's facts (fingerprint), else the base named in
its adapter_config.json when that is a local folder; its target modules, the shapes of its
LoRA weights and its rank against the base's layers. A misfit is refused (`AdapterMismatch`,
409, naming what does not match and the fix) and nothing is loaded; a load that fails later
is undone, so the versions already served and their requests never notice.

Hot swap safety: a key is immutable, a request holds its key from submission to its last
token, and `unload` waits for those holders; adapters are added or removed between decode
steps (the step lock), never while a forward pass runs, and never while a load reads the
module tree (a removal during a load is done by that load when it ends).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertune.generation import _eos_ids
from evertune.serving.decode import Failed, ModelGroup, RunningBatch, Slot
from evertune.serving.engine import (
    BASE_KEY,
    AdapterMismatch,
    EngineError,
    Event,
    Finished,
    GenRequest,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # tokens, for a model config without max_position_embeddings
MERGE_SCRATCH = "__evertune_merge__"  # adapter name used while merging a copy (never served)
RETRAIN = (
    "retrain it on this base (the next round does, from the live model.base), or serve it "
    "where its own base model is served"
)


@dataclass
class _Loaded:
    group: ModelGroup
    adapter: str | None  # the PEFT adapter name in the shared group (adapter form)
    path: Path | None
    merged: bool = False  # a merged copy of the base (or a full model): its own weights


@dataclass
class _Pending:
    group: ModelGroup
    slot: Slot


class TransformersEngine:
    """Transformers engine; see the module docstring. Thread-safe; `stream` is async."""

    name = "transformers"

    def __init__(
        self,
        base: Path,
        *,
        dtype: str = "auto",
        merge_adapters: bool = True,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        max_tokens_limit: int = 1024,
        threads: int = 0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.base = Path(base)
        self.dtype = dtype
        self.merge_adapters = merge_adapters
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_tokens_limit = max_tokens_limit
        # torch CPU threads for decoding; 0 = torch's default (all cores). On a CPU shared
        # with other busy processes, 1 is often several times faster: OpenMP threads spin
        # at every op's barrier waiting for a sibling the OS has descheduled.
        self.threads = threads
        self.on_batch = on_batch
        self.max_context = DEFAULT_CONTEXT
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._base_module: Any = None
        self._shared: ModelGroup | None = None  # the base model's group
        self._eos: set[int] = set()
        self._pad_id = 0
        self._models: dict[str, _Loaded] = {}
        self._users: collections.Counter[str] = collections.Counter()
        self._doomed: set[str] = set()  # unloaded keys waiting for their last request
        self._state = threading.Lock()  # guards _models, _users, _doomed
        self._step = threading.RLock()  # held around each forward pass
        self._load_lock = threading.Lock()  # one load at a time (memory, PEFT injection)
        self._trash: list[str] = []  # adapters removed, to delete from the PeftModel (_purge)
        self._layers: dict[str, tuple[int, int]] = {}  # the base's linear layers: (in, out)
        self._module_names: frozenset[str] = frozenset()
        self._fingerprint: str | None = None  # of the base folder, computed on first need
        # prepare() runs in the gateway's worker threads; a fast tokenizer used by two
        # threads at once can raise ("Already borrowed").
        self._tokenize_lock = threading.Lock()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise RuntimeError("TransformersEngine.start() has not run yet")
        return self._tokenizer

    def start(self) -> None:
        """Load the tokenizer and base weights, then start the batcher thread."""
        if self._thread is not None:
            return
        from evertune.models import load_model, load_tokenizer

        tok = load_tokenizer(self.base)
        model = load_model(self.base, self.dtype)
        self._tokenizer, self._base_module = tok, model
        self._eos = _eos_ids(model, tok)
        self._pad_id = (
            tok.pad_token_id if tok.pad_token_id is not None else next(iter(self._eos), 0)
        )
        self.max_context = int(
            getattr(model.config, "max_position_embeddings", 0) or DEFAULT_CONTEXT
        )
        self._shared = ModelGroup(model)
        self._models[BASE_KEY] = _Loaded(self._shared, None, None)
        # The base's layers before any adapter wraps them: what adapters are checked against.
        self._module_names = frozenset(name for name, _ in model.named_modules())
        self._layers = {
            name: (int(m.in_features), int(m.out_features))
            for name, m in model.named_modules()
            if isinstance(getattr(m, "in_features", None), int)
            and isinstance(getattr(m, "out_features", None), int)
        }
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="evertune-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the batcher after its current batch; queued requests fail with 503."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            item.slot.fail(EngineError("the server is shutting down", status=503))
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    # -- versions ----------------------------------------------------------------------------
    def loaded(self) -> set[str]:
        with self._state:
            return set(self._models) - self._doomed

    def adapters(self) -> set[str]:
        """The keys served as adapters on the shared base (the rest are merged or full copies)."""
        with self._state:
            return {k for k, m in self._models.items() if m.adapter and k not in self._doomed}

    def load(self, key: str, path: Path, *, merge: bool | None = None) -> None:
        """Serve the adapter (or full model) at `path` as `key`; see the module docstring.

        `merge`: True = a merged copy, False = an adapter on the shared base, None = the
        engine's `merge_adapters`. Raises `AdapterMismatch` (nothing loaded) for an adapter
        that does not fit the base."""
        path = Path(path)
        merge = self.merge_adapters if merge is None else merge
        with self._load_lock:
            with self._state:
                known = self._models.get(key)
                if known is not None:
                    if known.path != path:
                        raise EngineError(
                            f"{key} is already loaded from {known.path}; a key is never "
                            f"reloaded with other weights (load the new version under a new key)",
                            status=500,
                        )
                    self._doomed.discard(key)  # wanted again before its last user left
                    return
            self._purge_locked()  # an adapter removed under this name is deleted first
            started = time.perf_counter()
            try:
                loaded = self._load(key, path, merge)
            finally:
                self._purge_locked()
            with self._state:
                self._models[key] = loaded
            log.info(
                "loaded %s from %s (%s) in %.2fs",
                key,
                path,
                "adapter" if loaded.adapter else "merged" if loaded.merged else "model",
                time.perf_counter() - started,
            )
        self._purge()  # removals that arrived while this load held the lock

    def check_adapter(self, path: Path, *, merge: bool = False) -> None:
        """Raise `AdapterMismatch` unless the adapter at `path` fits the served base.

        Checks, without touching the model: the base recorded in the version's facts
        (fingerprint), else the base its adapter_config.json names when that is a local
        folder (fingerprint); that its target modules exist in the base; that every LoRA
        weight matches the shape of the base layer it adapts; that its rank is at least 1 and
        at most the layer's smaller side. `merge`: other PEFT types than LoRA can be merged,
        only LoRA adapters share a batch."""
        if self._base_module is None:
            raise RuntimeError("TransformersEngine.start() has not run yet")
        path = Path(path)
        where = f"the adapter at {path}"
        try:
            config = json.loads((path / "adapter_config.json").read_text("utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise AdapterMismatch(
                f"{where} has no readable adapter_config.json ({exc}); re-register the version "
                "from its training result"
            ) from None
        self._check_recorded_base(path, config, where)
        peft_type = str(config.get("peft_type") or "LORA").upper()
        if peft_type != "LORA":
            if merge:
                return  # PEFT merges it; the LoRA checks below do not apply
            raise AdapterMismatch(
                f"{where} is a {peft_type} adapter: only LoRA adapters share the base in one "
                "batch. Set serve.merge_adapters: true to serve it merged"
            )
        self._check_targets(config, where)
        self._check_weights(path, config, where)

    def _check_recorded_base(self, path: Path, config: dict[str, Any], where: str) -> None:
        from evertune.facts import RESULT_META, fingerprint, read_facts

        if (path / RESULT_META).is_file():
            facts = read_facts(path)
            if facts.base_fingerprint and facts.base_fingerprint != (
                served := self._base_fingerprint()
            ):
                raise AdapterMismatch(
                    f"{where} was trained on base model {facts.base_model!r} (fingerprint "
                    f"{facts.base_fingerprint[:12]}), but this engine serves {self.base} "
                    f"(fingerprint {served[:12]}): other weights. Serve it on its own base "
                    f"(restore {facts.base_model!r}; the gateway starts an engine for a "
                    f"version's recorded base), or {RETRAIN}"
                )
            return  # the facts vouch for the base; adapter_config's name is informative only
        named = config.get("base_model_name_or_path")
        if not isinstance(named, str) or not named:
            return
        folder = Path(named).expanduser()
        if not (folder / "config.json").is_file() or folder.resolve() == self.base.resolve():
            return  # a hub id or a folder of another machine: nothing local to compare with
        theirs, served = fingerprint(folder), self._base_fingerprint()
        if theirs != served:
            raise AdapterMismatch(
                f"{where} was made for base model {named} (adapter_config.json "
                f"base_model_name_or_path; fingerprint {theirs[:12]}), but this engine serves "
                f"{self.base} (fingerprint {served[:12]}): other weights. Set model.base to "
                f"{named} to serve it, or {RETRAIN}"
            )

    def _base_fingerprint(self) -> str:
        from evertune.facts import fingerprint

        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.base)  # file hashes are cached per process
        return self._fingerprint

    def _check_targets(self, config: dict[str, Any], where: str) -> None:
        targets = config.get("target_modules")
        if isinstance(targets, str) or targets is None:
            return  # a regex or "all-linear": PEFT resolves it; the weight shapes are checked
        names = self._module_names
        missing = [
            t
            for t in targets
            if not any(n == t or n.endswith(f".{t}") for n in names)  # PEFT's matching rule
        ]
        if missing:
            have = sorted({n.rsplit(".", 1)[-1] for n in self._layers})
            raise AdapterMismatch(
                f"{where} targets modules {missing} that this base model ({self.base}) does not "
                f"have (its linear layers: {', '.join(have)}): it was made for another "
                f"architecture; {RETRAIN}"
            )

    def _check_weights(self, path: Path, config: dict[str, Any], where: str) -> None:
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            return  # a pickled adapter_model.bin: its shapes are only known by loading it
        from safetensors import safe_open

        rank = config.get("r")
        if not isinstance(rank, int) or rank < 1:
            raise AdapterMismatch(
                f"{where} has rank r={rank!r} in adapter_config.json; a LoRA rank is a whole "
                "number of at least 1: retrain it with train.lora.r between 1 and the model's "
                "hidden size"
            )
        patterned = bool(config.get("rank_pattern"))
        try:
            with safe_open(str(weights), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:
            raise AdapterMismatch(
                f"{where} has an unreadable adapter_model.safetensors ({exc}); re-register the "
                "version from its training result"
            ) from None
        for name, shape in sorted(shapes.items()):
            for part, side in ((".lora_A.weight", "in"), (".lora_B.weight", "out")):
                if not name.endswith(part):
                    continue
                layer = name.removeprefix("base_model.model.")[: -len(part)]
                dims = self._layers.get(layer)
                if dims is None:
                    raise AdapterMismatch(
                        f"{where} has weights for layer {layer!r}, which this base model "
                        f"({self.base}) does not have: it was made for another architecture; "
                        f"{RETRAIN}"
                    )
                r, width = (shape[0], shape[1]) if side == "in" else (shape[1], shape[0])
                want = dims[0] if side == "in" else dims[1]
                if len(shape) != 2 or width != want:
                    raise AdapterMismatch(
                        f"{where} does not fit layer {layer!r}: its LoRA weight {name} has "
                        f"shape {list(shape)}, the base layer has {dims[0]} inputs and "
                        f"{dims[1]} outputs: it was made for another model size; {RETRAIN}"
                    )
                if not 1 <= r <= min(dims) or (not patterned and r != rank):
                    raise AdapterMismatch(
                        f"{where} has rank {r} on layer {layer!r} (adapter_config.json says "
                        f"r={rank}); a rank must match its config and be between 1 and "
                        f"{min(dims)} for this layer: retrain it with train.lora.r in that range"
                    )

    def _load(self, key: str, path: Path, merge: bool) -> _Loaded:
        from evertune.models import load_model, model_load_lock

        if self._base_module is None:
            raise RuntimeError("TransformersEngine.start() has not run yet")
        if not (path / "adapter_config.json").is_file():
            if (path / "config.json").is_file():  # a full fine-tune: its own weights
                return _Loaded(ModelGroup(load_model(path, self.dtype)), None, path, merged=True)
            raise EngineError(
                f"{path} holds neither a PEFT adapter (adapter_config.json) nor a model "
                f"(config.json)",
                status=500,
            )
        self.check_adapter(path, merge=merge)  # before anything touches the model
        shared = self._shared
        assert shared is not None
        # Loads patch torch globals: a version loading here must not overlap a pipeline step
        # loading a model (evertune.models.model_load_lock).
        with model_load_lock():
            if merge:
                return _Loaded(ModelGroup(self._merged_copy(shared, path)), None, path, True)
            # Injecting LoRA layers changes the module tree the batcher runs: between steps only.
            with self._step:
                try:
                    if not shared.peft:
                        from peft import PeftModel

                        shared.module = PeftModel.from_pretrained(
                            self._base_module, path, adapter_name=key
                        ).eval()
                        shared.peft = True
                    else:
                        shared.module.load_adapter(path, adapter_name=key)
                        shared.module.eval()
                except Exception:
                    self._undo_adapter(shared, key)
                    raise
        return _Loaded(shared, key, path)

    def _merged_copy(self, shared: ModelGroup, path: Path) -> Any:
        """A copy of the base weights with the adapter at `path` merged in.

        Copied from memory (the base is read from disk once). Once the base is wrapped for
        adapters, the PeftModel is copied (the adapters on it are small) and the new adapter
        is merged alone, which also drops the others' layers. Runs beside decoding (a forward
        pass changes no weight); `_load_lock` keeps adapters from being added or deleted
        meanwhile."""
        from peft import PeftModel

        if not shared.peft:
            module = copy.deepcopy(self._base_module)
            return PeftModel.from_pretrained(module, path).merge_and_unload().eval()
        wrapped = copy.deepcopy(shared.module)
        wrapped.load_adapter(path, adapter_name=MERGE_SCRATCH)
        return wrapped.merge_and_unload(adapter_names=[MERGE_SCRATCH]).eval()

    def _undo_adapter(self, shared: ModelGroup, key: str) -> None:
        """Remove what a failed `load_adapter` left of `key` (the served adapters stay)."""
        if not shared.peft:
            # The first wrap failed after PEFT injected layers into the base in place: put
            # the base layers back, so the base model (and the next wrap) is as it was.
            from peft.tuners.tuners_utils import BaseTunerLayer

            module = self._base_module
            for name, layer in list(module.named_modules()):
                if name and isinstance(layer, BaseTunerLayer):
                    parent, _, child = name.rpartition(".")
                    setattr(module.get_submodule(parent), child, layer.get_base_layer())
            return
        try:
            if key in shared.module.peft_config:
                shared.module.delete_adapter(key)
        except Exception as exc:
            log.warning("could not remove the failed adapter %s: %s", key, exc)

    def unload(self, key: str) -> None:
        """Stop serving `key`; its memory is freed when its last request has finished."""
        if key == BASE_KEY:
            raise EngineError("the base model cannot be unloaded", status=500)
        with self._state:
            if key not in self._models:
                return
            self._doomed.add(key)
            if self._users[key] == 0:
                self._remove(key)
        self._purge()

    def _remove(self, key: str) -> None:
        # Called with self._state held, when no request uses `key` any more. The adapter's
        # layers are deleted by `_purge`, outside this lock and never during a load.
        loaded = self._models.pop(key)
        self._doomed.discard(key)
        self._users.pop(key, None)
        if loaded.adapter is not None:
            self._trash.append(loaded.adapter)
        log.info("unloaded %s", key)

    def _purge(self) -> None:
        """Delete removed adapters from the shared PeftModel, unless a load runs: that load
        deletes them when it ends (deleting while it copies the module tree would break it,
        and the batcher must not wait for a load)."""
        if not self._load_lock.acquire(blocking=False):
            return
        try:
            self._purge_locked()
        finally:
            self._load_lock.release()

    def _purge_locked(self) -> None:
        # With self._load_lock held.
        with self._state:
            names, self._trash = self._trash, []
        if not names or self._shared is None:
            return
        with self._step:
            for name in names:
                try:
                    self._shared.module.delete_adapter(name)
                except Exception as exc:  # PEFT refusing to delete must not stop serving
                    log.warning("could not delete adapter %s: %s", name, exc)

    def _release(self, key: str) -> None:
        with self._state:
            self._users[key] -= 1
            if self._users[key] <= 0 and key in self._doomed:
                self._remove(key)
        self._purge()

    # -- requests ----------------------------------------------------------------------------
    def prepare(self, request: GenRequest) -> None:
        """Tokenize the prompt (no special tokens added, as in training) and fix max_tokens."""
        tok = self.tokenizer
        with self._tokenize_lock:
            ids = list(tok(request.prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            if tok.bos_token_id is None:
                raise EngineError("the prompt is empty", param="prompt")
            ids = [tok.bos_token_id]  # a model needs one token to condition on
        request.prompt_ids = ids
        request.prompt_tokens = len(ids)
        room = self.max_context - len(ids)
        if request.max_tokens is None:
            request.max_tokens = min(self.max_tokens_limit, room)
        if request.max_tokens < 1 or len(ids) + request.max_tokens > self.max_context:
            asked = max(request.max_tokens, 1)
            raise EngineError(
                f"This model's maximum context length is {self.max_context} tokens. However, you "
                f"requested {len(ids) + asked} tokens ({len(ids)} in the prompt, {asked} for the "
                f"completion). Please reduce the prompt or max_tokens.",
                param="prompt",
                code="context_length_exceeded",
            )

    async def stream(self, key: str, request: GenRequest) -> AsyncGenerator[Event, None]:
        """Generate `request` with the model under `key` (see `Engine.stream`)."""
        if request.prompt_ids is None:
            self.prepare(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | Failed] = asyncio.Queue()

        def sink(event: Event | Failed) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the client's event loop is gone: nobody is listening
                slot.cancelled = True

        slot = Slot(request=request, emit=sink)
        self.submit(key, slot)
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failed):
                    err = event.error
                    if isinstance(err, EngineError):
                        raise err
                    raise EngineError(f"generation failed: {err}", status=500) from err
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not slot.done:
                slot.cancelled = True  # the client went away; the batcher drops the row

    def submit(self, key: str, slot: Slot) -> None:
        """Queue a prepared slot for the model under `key` (the thread-level API)."""
        with self._state:
            loaded = self._models.get(key)
            if loaded is None or key in self._doomed:
                raise EngineError(f"model {key} is not loaded", status=503)
            self._users[key] += 1
        slot.adapter = loaded.adapter
        user_done = slot.on_finish

        def finished(s: Slot) -> None:
            self._release(key)
            if user_done is not None:
                user_done(s)

        slot.on_finish = finished
        with self._cond:
            if self._stopping:
                slot.fail(EngineError("the server is shutting down", status=503))
                return
            self._queue.append(_Pending(loaded.group, slot))
            self._cond.notify()

    # -- the batcher -------------------------------------------------------------------------
    def _take_batch(self) -> tuple[ModelGroup, list[Slot]] | None:
        """The next batch: the oldest request plus those that share its model, after the wait."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue[0]
            deadline = first.slot.t0 + self.batch_wait_s
            while not self._stopping:
                same = sum(1 for p in self._queue if p.group is first.group)
                remaining = deadline - time.perf_counter()
                if same >= self.max_batch_size or remaining <= 0:
                    break
                self._cond.wait(timeout=remaining)
            batch: list[Slot] = []
            rest: collections.deque[_Pending] = collections.deque()
            for p in self._queue:
                if p.group is first.group and len(batch) < self.max_batch_size:
                    batch.append(p.slot)
                else:
                    rest.append(p)
            self._queue = rest
            return first.group, batch

    def _take_more(self, group: ModelGroup, room: int) -> list[Slot]:
        """Requests for `group` at the head of the queue, up to `room`, without waiting.

        Only from the head: once a request for another model is the oldest waiting, the
        running batch takes no one else and drains, so that request is served next."""
        taken: list[Slot] = []
        with self._cond:
            while self._queue and len(taken) < room and self._queue[0].group is group:
                taken.append(self._queue.popleft().slot)
        return taken

    def _run(self) -> None:
        if self.threads:
            import torch

            # In this thread: OpenMP's thread count is per calling thread.
            torch.set_num_threads(self.threads)
        batch: RunningBatch | None = None
        while True:
            if batch is None or not batch.rows:
                taken = self._take_batch()
                if taken is None:
                    return
                group, slots = taken
                batch = RunningBatch(
                    group, self.tokenizer, self._eos, lock=self._step, pad_id=self._pad_id
                )
                batch.admit(slots)
            elif batch.can_admit and not self._stopping:
                # Continuous batching: whoever arrived during the last step joins now.
                more = self._take_more(batch.group, self.max_batch_size - len(batch.rows))
                if more:
                    batch.admit(more)
            if batch.rows:
                if self.on_batch is not None:
                    try:
                        self.on_batch(len(batch.rows))
                    except Exception as exc:  # a metrics hiccup must not stop the batcher
                        log.warning("on_batch callback failed: %s", exc)
                batch.step()
