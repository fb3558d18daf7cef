"""The in-process engine: transformers on CPU or one GPU, with dynamic batching.

    engine = TransformersEngine(base_path, merge_adapters=True, max_batch_size=8, batch_wait_ms=5)
    engine.start()                          # base weights loaded once
    engine.load("v3", adapter_folder)       # beside what is loaded; never replaces a key
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

Versions (`serve.merge_adapters`):
- merged (default): each version is a copy of the in-memory base weights with its LoRA
  adapter merged in. Same speed as the base model; one copy of the weights per loaded
  version; requests of different versions run in different batches.
- unmerged: the base model is wrapped once in a PeftModel and every version is an adapter
  on it; one batch can mix versions and the base (PEFT `adapter_names`), at the cost of the
  LoRA matmuls on every step. Memory per version is the adapter's size only.
A full fine-tune's result (a model folder rather than an adapter) is loaded as its own model
in both modes.

Hot swap safety: a key is immutable, a request holds its key from submission to its last
token, and `unload` waits for those holders; adapters are added or removed between decode
steps (the step lock), never while a forward pass runs.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertune.generation import _eos_ids
from evertune.serving.decode import Failed, ModelGroup, RunningBatch, Slot
from evertune.serving.engine import BASE_KEY, EngineError, Event, Finished, GenRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # tokens, for a model config without max_position_embeddings


@dataclass
class _Loaded:
    group: ModelGroup
    adapter: str | None  # the PEFT adapter name in the shared group (unmerged mode)
    path: Path | None


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

    def load(self, key: str, path: Path) -> None:
        """Serve the adapter (or full model) at `path` as `key`; see the module docstring."""
        path = Path(path)
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
            started = time.perf_counter()
            loaded = self._load(key, path)
            with self._state:
                self._models[key] = loaded
            log.info("loaded %s from %s in %.2fs", key, path, time.perf_counter() - started)

    def _load(self, key: str, path: Path) -> _Loaded:
        from evertune.models import load_model, model_load_lock

        if self._base_module is None:
            raise RuntimeError("TransformersEngine.start() has not run yet")
        if not (path / "adapter_config.json").is_file():
            if (path / "config.json").is_file():  # a full fine-tune: its own weights
                return _Loaded(ModelGroup(load_model(path, self.dtype)), None, path)
            raise EngineError(
                f"{path} holds neither a PEFT adapter (adapter_config.json) nor a model "
                f"(config.json)",
                status=500,
            )
        from peft import PeftModel

        # Loads patch torch globals: a version loading here must not overlap a pipeline step
        # loading a model (evertune.models.model_load_lock).
        with model_load_lock():
            if self.merge_adapters:
                # A copy of the weights already in memory: the base is read from disk once.
                module = copy.deepcopy(self._base_module)
                merged = PeftModel.from_pretrained(module, path).merge_and_unload().eval()
                return _Loaded(ModelGroup(merged), None, path)
            shared = self._shared
            assert shared is not None
            # Injecting LoRA layers changes the module tree the batcher runs: between steps only.
            with self._step:
                if not shared.peft:
                    shared.module = PeftModel.from_pretrained(
                        self._base_module, path, adapter_name=key
                    ).eval()
                    shared.peft = True
                else:
                    shared.module.load_adapter(path, adapter_name=key)
                    shared.module.eval()
        return _Loaded(shared, key, path)

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

    def _remove(self, key: str) -> None:
        # Called with self._state held, when no request uses `key` any more.
        loaded = self._models.pop(key)
        self._doomed.discard(key)
        self._users.pop(key, None)
        if loaded.adapter is not None:
            with self._step:
                try:
                    loaded.group.module.delete_adapter(loaded.adapter)
                except Exception as exc:  # PEFT refusing to delete must not stop serving
                    log.warning("could not delete adapter %s: %s", loaded.adapter, exc)
        log.info("unloaded %s", key)

    def _release(self, key: str) -> None:
        with self._state:
            self._users[key] -= 1
            if self._users[key] <= 0 and key in self._doomed:
                self._remove(key)

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
