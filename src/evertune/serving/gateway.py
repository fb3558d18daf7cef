"""The OpenAI-compatible serving gateway: routes, model-name resolution, hot swap.

    from evertune.serving import Gateway
    from evertune.monitoring import metrics_router
    gateway = Gateway(ws)                     # stages ("prod", "qa"); `evertune serve`: ("prod",)
    app.include_router(gateway.router)        # /v1/models, /v1/chat/completions, /v1/completions,
    app.include_router(metrics_router())      # /v1/feedback; and /metrics
    gateway.start()                           # in the app's lifespan; gateway.stop() at exit

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="evt_…")
    client.chat.completions.create(model="assistant", messages=[...])   # model: "assistant@v3"

`start()` loads the base model once and the versions the `prod`/`qa` aliases point at, then
a follower thread polls the aliases every `serve.follow_seconds`. When an alias moves
(promote, rollback), the new version is loaded beside the old one and only then does the
stage pointer flip; a request holds the version it resolved until its last token, so
in-flight requests finish on their model and no request fails during a swap.

Every registered version is servable (`NAME@vN`): one not loaded is loaded on its first
request (once, however many requests ask at the same time). How (`serve.merge_adapters`, the
transformers engine): `true` = each version a merged copy of the base; `false` = each an
adapter on the one shared base (multi-LoRA: a batch mixes versions, memory per version is the
adapter's); `prod` = the version PROD points at is merged (the hottest runs at full speed) and
every other is an adapter (at promotion an adapter version gets its merged copy beside it,
then the pointer flips, as in any swap). Unloading: beyond `serve.max_adapters` adapter
versions, the least recently used one no stage points at goes; merged copies (and full
fine-tunes) no stage points at are kept for `KEEP_IDLE_VERSIONS` (a quick rollback). A version
a request still uses is taken out of routing at once and unloaded after its last request
(the engine waits for its holders too). An adapter that does not fit the served base is
refused with 409 `model_incompatible` naming the version, the mismatch and the fix; nothing
is loaded, and other versions and in-flight requests go on (`TransformersEngine.check_adapter`).
`evertune_loaded_adapters` on /metrics counts the versions served as adapters.

A canary (`evertune promote N --canary PCT`, the registry's `canary` alias and percent) is
followed the same way: loaded before any request goes to it, then PCT% of the callers of the
bare `NAME` (by a stable hash of `x-evertune-user`, else the serving key's name, else the
client address: sticky per caller, `canary_bucket`) get it, logged and labelled with stage
`canary` for `evertune.canary` to compare; `NAME@prod` and `NAME@vN` are never split. When
the canary ends, routing to it stops at once and it is unloaded like any version no stage
points at.

Every answer names the version that produced it: the `model` field (`NAME@v3`, or
`NAME@base` while no version is in prod) and the `x-evertune-version` header. Metrics go to
`evertune.monitoring` (labels: version, stage); a sample of requests goes to the request log,
redacted; `POST /v1/feedback` turns a rating or correction into a training record in the
bucket's `feedback/` prefix.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from evertune.errors import DataError, ModelError, NotFoundError
from evertune.monitoring.feedback import (
    UNTRAINED,
    build_record,
    check_response_id,
    receiver_problem,
    write_feedback,
)
from evertune.monitoring.metrics import METRICS, ServingMetrics
from evertune.monitoring.redact import DEFAULT_REDACTORS, Redactor
from evertune.monitoring.request_log import (
    RequestLog,
    get_request,
    get_served,
    response_digest,
)
from evertune.serving import protocol as oai
from evertune.serving.engine import (
    BASE_KEY,
    AdapterMismatch,
    Engine,
    EngineError,
    Event,
    Finished,
    GenRequest,
    TextDelta,
)
from evertune.serving.keys import ANONYMOUS, ServingKeys
from evertune.serving.names import Target, display_name, parse_model_name, version_label
from evertune.serving.protocol import OpenAIError

if TYPE_CHECKING:
    from pathlib import Path

    from evertune.registry import Registry
    from evertune.workspace import Workspace

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STAGES = ("prod", "qa")
KEEP_IDLE_VERSIONS = 1
"""Merged copies (and full models) no stage points at that stay loaded (LRU): each costs a
copy of the weights. Adapter versions are bounded by `serve.max_adapters` instead."""
MERGED_KEY = "{label}:merged"  # engine key of a version's merged copy in `prod` mode
RECENT_RESPONSES = 5000  # responses remembered (redacted) so feedback can find their prompt
PARSE_INLINE_BYTES = 256 * 1024  # larger bodies are parsed in a worker thread
NAMES_TTL_S = 5.0  # how long the list of registered versions is cached for /v1/models and 404s
CANARY = "canary"  # the stage label (metrics, request log, x-evertune-stage) of canary answers
USER_HEADER = "x-evertune-user"  # who the caller is, for the canary split (sticky per user)


def canary_bucket(version: int, caller: str) -> int:
    """Where `caller` falls for the canary of `version`: 0–9999; the caller gets the canary
    when this is below percent × 100. sha256, not hash(): every replica and restart agrees,
    so a user stays on one side; salted by the version so each canary tries other users."""
    digest = hashlib.sha256(f"{version}\0{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000


@dataclass
class _Handle:
    """A loaded model the gateway can route to."""

    key: str  # engine key: "base", "v3" (or "v3:merged", its merged copy in `prod` mode)
    version: int | None  # None = the base model
    engine: Engine | None = None  # the engine of the base it was trained on; None: the default
    adapter: bool = False  # an adapter on a transformers engine's shared base (max_adapters)
    stages: set[str] = field(default_factory=set)  # stages pointing here now
    refs: int = 0  # requests in flight on it
    last_used: float = field(default_factory=time.monotonic)
    retired: bool = False  # out of routing (evicted or replaced): unloaded at its last release

    @property
    def label(self) -> str:
        return version_label(self.version)


@dataclass
class _Call:
    """One request's bookkeeping, from arrival to its metrics and log row."""

    id: str
    endpoint: str  # chat | completions
    model: str  # the name the client sent
    handle: _Handle
    target: Target
    params: oai.SamplingParams
    prompt: Any  # messages (chat) or prompt(s) — for the log and feedback
    sampled: bool
    arrival: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    submit_at: float = 0.0  # perf_counter when the engine got the request
    created: int = field(default_factory=oai.now)
    receiver: str = ANONYMOUS  # the serving key that asked: feedback on it is trusted from it
    stage: str = ""  # metric/log label: the target's, or "canary" when the split sent it there

    def __post_init__(self) -> None:
        self.stage = self.stage or self.target.stage

    @property
    def answered_as(self) -> str:
        return display_name(self.model.partition("@")[0], self.handle.version)

    @property
    def headers(self) -> dict[str, str]:
        return {
            "x-evertune-version": self.handle.label,
            "x-evertune-stage": self.stage,
            "x-request-id": self.id,
        }


class BaseUnavailable(AdapterMismatch, ModelError):
    """The base model a version's facts name is not here (or holds other files): a 409 for a
    request, a ModelError for `evertune serve` starting with it in a stage."""


class _LoadedAdapters:
    """/metrics: `evertune_loaded_adapters`, read from the gateway at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def _family(self, value: float) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(
            "evertune_loaded_adapters",
            "Versions served as LoRA adapters on a shared base model (serve.max_adapters)",
            value=value,
        )

    def describe(self) -> Iterator[Any]:
        yield self._family(0)

    def collect(self) -> Iterator[Any]:
        yield self._family(self._gateway.loaded_adapters())


def make_engine(
    ws: Workspace,
    metrics: ServingMetrics | None = None,
    *,
    base: Path | None = None,
    max_lora_rank: int | None = None,
) -> Engine:
    """The engine `serve.engine` names, for `base` (default: the configured base model).

    `max_lora_rank` (vLLM fixes it at start) defaults to the largest rank of any registered
    version on that base, from the versions' own facts, and the configured rank."""
    from evertune.models import resolve_base_model

    cfg = ws.config.serve
    base = base or resolve_base_model(ws.config.model.base, ws.models_dir)
    sink = metrics or METRICS
    if cfg.engine == "vllm":
        from evertune.serving.vllm_engine import VllmEngine

        return VllmEngine(
            base,
            model_name=ws.config.model.name,
            dtype=ws.config.model.dtype,
            max_lora_rank=max_lora_rank or _max_lora_rank(ws, base),
            max_tokens_limit=cfg.max_tokens_limit,
            log_path=ws.state_dir / "vllm.log",
        )
    from evertune.serving.transformers_engine import TransformersEngine

    return TransformersEngine(
        base,
        dtype=ws.config.model.dtype,
        merge_adapters=cfg.merge_adapters is True,  # `prod`: the gateway merges PROD's only
        max_batch_size=cfg.max_batch_size,
        batch_wait_ms=cfg.batch_wait_ms,
        max_tokens_limit=cfg.max_tokens_limit,
        threads=getattr(cfg, "threads", 0),  # serve.threads, once config.py has it
        on_batch=lambda n: sink.batch_size.labels(engine="transformers").observe(n),
    )


def _max_lora_rank(ws: Workspace, base: Path) -> int:
    """The largest LoRA rank among registered versions trained on `base` (and the config's)."""
    from evertune.facts import fingerprint
    from evertune.registry import Registry

    ranks = [ws.config.train.lora.r]
    try:
        mine = fingerprint(base)
        for mv in Registry(ws).list_versions():
            r = (mv.facts.get("lora") or {}).get("r")
            if isinstance(r, int) and mv.facts.get("base_fingerprint") in (mine, None):
                ranks.append(r)
    except Exception as exc:  # no registry yet: the configured rank
        log.warning("could not read the versions' LoRA ranks: %s", exc)
    return max(ranks)


class Gateway:
    """OpenAI-compatible serving of one workspace model; see the module docstring."""

    def __init__(
        self,
        ws: Workspace,
        stages: Sequence[str] = STAGES,
        *,
        engine: Engine | None = None,
        metrics: ServingMetrics | None = None,
        redactors: Sequence[Redactor] = DEFAULT_REDACTORS,
    ) -> None:
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {tuple(stages)}")
        self.ws = ws
        self.name = ws.config.model.name
        self.cfg = ws.config.serve
        self.stages = tuple(stages)
        self.metrics = metrics or METRICS
        self.request_log = RequestLog(ws, sample=self.cfg.request_log_sample, redactors=redactors)
        self.keys = ServingKeys(ws)
        self._engine = engine
        # Engines of other bases: a version trained before model.base changed keeps being
        # served on its own base (evertune.facts), loaded beside the default one on demand.
        self._engines: dict[Path, Engine] = {}
        self._default_base: Path | None = None
        self._engine_start_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _handles, _pointers and handle refs
        self._key_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(
            threading.Lock
        )
        self._handles: dict[str, _Handle] = {}
        self._pointers: dict[str, _Handle | None] = dict.fromkeys(self.stages)
        # The canary (deploy.start_canary), followed like the stages when prod is served:
        # its handle and the share of callers of NAME it gets.
        self._canary: _Handle | None = None
        self._canary_percent = 0
        self._failed: dict[str, int] = {}  # stage → version whose load failed (not retried)
        self._recent: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._names: tuple[float, list[int]] = (float("-inf"), [])
        # Prompts are rendered and tokenized on this one thread, off the event loop (a long
        # prompt must not stall every route) and off asyncio's default pool (long prompts must
        # not take the workers other routes need). One thread: a fast tokenizer used by two
        # threads at once can raise ("Already borrowed"); serve.max_prompt_chars bounds the wait.
        self._prompt_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="evertune-tokenize"
        )
        # Engine unloads wait for a decode step (and a key's lock): off the event loop.
        self._janitor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="evertune-unload"
        )
        self._collector: _LoadedAdapters | None = None
        self._registry: Registry | None = None
        self._follower: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = False
        self.router = self._build_router()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("Gateway.start() has not run yet")
        return self._engine

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from evertune.registry import Registry

            self._registry = Registry(self.ws)
        return self._registry

    def start(self) -> None:
        """Load the base model and the stage versions, then start following the aliases.

        Raises when a stage's version cannot be loaded: a server must not come up serving
        something other than what prod says. (Later swaps that fail keep the old version.)
        """
        if self._started:
            return
        if self._engine is None:
            self._engine = make_engine(self.ws, self.metrics)
        self.engine.start()
        self._janitor = concurrent.futures.ThreadPoolExecutor(  # stop() shut the last one down
            max_workers=1, thread_name_prefix="evertune-unload"
        )
        self._default_base = self._configured_base()
        with self._lock:
            self._handles[BASE_KEY] = _Handle(BASE_KEY, None)
        self.sync(raise_errors=True)
        self._stop.clear()
        self._follower = threading.Thread(
            target=self._follow, name="evertune-follower", daemon=True
        )
        self._follower.start()
        self._collector = _LoadedAdapters(self)
        try:
            self.metrics.registry.register(self._collector)
        except ValueError:  # another gateway on these metrics already reports it
            self._collector = None
        self._started = True
        log.info("serving %s: %s", self.name, self.stage_versions())

    def stop(self) -> None:
        """Stop following, stop the engine, write the queued request-log rows."""
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=30)
            self._follower = None
        if self._collector is not None:
            self.metrics.registry.unregister(self._collector)
            self._collector = None
        self._janitor.shutdown(wait=True)  # the unloads asked for, before the engine stops
        if self._engine is not None and self._started:
            self.engine.stop()
        for other in self._engines.values():
            other.stop()
        self._engines.clear()
        self.request_log.close()
        self._started = False

    def loaded_adapters(self) -> int:
        """How many versions are served as adapters on a shared base now."""
        with self._lock:
            return sum(1 for h in self._handles.values() if h.adapter)

    def stage_versions(self) -> dict[str, str | None]:
        """What each served stage answers with now: {"prod": "v3", "qa": None}."""
        with self._lock:
            return {s: (h.label if h else None) for s, h in self._pointers.items()}

    def canary(self) -> tuple[str, int] | None:
        """The canary this gateway routes to now and its percent: ("v4", 10), or None."""
        with self._lock:
            if self._canary is None:
                return None
            return self._canary.label, self._canary_percent

    # -- following the aliases ---------------------------------------------------------------
    def _follow(self) -> None:
        while not self._stop.wait(self.cfg.follow_seconds):
            try:
                self.sync()
            except Exception as exc:  # a registry hiccup must not stop following
                log.warning("could not check the stage aliases: %s", exc)

    def sync(self, raise_errors: bool = False) -> dict[str, str | None]:
        """Check every stage alias once and swap where it moved; return the moves made."""
        moves: dict[str, str | None] = {}
        for stage in self.stages:
            mv = self.registry.alias_version(stage)
            version = mv.version if mv is not None else None
            with self._lock:
                current = self._pointers[stage]
            if (current.version if current else None) == version:
                self._failed.pop(stage, None)
                continue
            if version is not None and self._failed.get(stage) == version:
                continue  # already failed to load; wait for the alias to move again
            try:
                self._swap(stage, version)
            except Exception as exc:
                if raise_errors:
                    raise
                self._failed[stage] = version or 0
                log.error(
                    "could not load v%s for %s; still serving %s: %s",
                    version,
                    stage,
                    current.label if current else "nothing",
                    exc,
                )
                continue
            moves[stage] = version_label(version) if version is not None else None
        if "prod" in self.stages:  # the canary splits the callers of NAME, i.e. of prod
            self._sync_canary(moves, raise_errors)
        return moves

    def _sync_canary(self, moves: dict[str, str | None], raise_errors: bool) -> None:
        """Follow the canary alias and percent: load a new canary before routing to it, stop
        routing to one that ended (unloaded like any version no stage points at)."""
        state = self.registry.canary()
        version = state.version if state is not None else None
        percent = state.percent if state is not None else 0
        with self._lock:
            current = self._canary
            if (current.version if current else None) == version:
                self._canary_percent = percent  # the share may change without the version
                self._failed.pop(CANARY, None)
                return
        if version is not None and self._failed.get(CANARY) == version:
            return  # already failed to load; PROD keeps every caller meanwhile
        handle = None
        if version is not None:
            try:
                handle = self._ensure_loaded(version)
            except Exception as exc:
                if raise_errors:
                    raise
                self._failed[CANARY] = version
                log.error("could not load canary v%s; all callers stay on prod: %s", version, exc)
                return
        with self._lock:
            old = self._canary
            self._canary, self._canary_percent = handle, percent
            if handle is not None:
                handle.stages.add(CANARY)
            if old is not None:
                old.stages.discard(CANARY)
                old.last_used = time.monotonic()
        log.info(
            "canary: %s → %s (%s%%)",
            old.label if old else "none",
            handle.label if handle else "none",
            percent,
        )
        moves[CANARY] = handle.label if handle is not None else None
        self._evict_idle()

    def _swap(self, stage: str, version: int | None) -> None:
        """Load `version` beside what serves `stage`, then flip the stage pointer to it."""
        handle = self._ensure_loaded(version, prod=stage == "prod") if version is not None else None
        with self._lock:
            old = self._pointers[stage]
            self._pointers[stage] = handle
            if handle is not None:
                handle.stages.add(stage)
            if old is not None:
                old.stages.discard(stage)
                old.last_used = time.monotonic()
        self.metrics.stage_version.labels(stage=stage).set(version or 0)
        log.info(
            "%s: %s → %s", stage, old.label if old else "none", handle.label if handle else "none"
        )
        self._evict_idle()

    def _ensure_loaded(self, version: int, *, prod: bool = False) -> _Handle:
        """The handle of `version`, loading it into the engine first if needed (blocking).

        `prod`: it is (about to be) PROD's, so with `serve.merge_adapters: prod` it gets its
        merged copy (an adapter handle of it is then replaced and retired)."""
        label = version_label(version)
        merge = self._merge(prod)
        with self._key_locks[label]:
            with self._lock:
                handle = self._handles.get(label)
            if handle is not None and not (merge and handle.adapter):
                return handle  # a merged copy serves a non-PROD caller as well
            path = self.registry.version_artifact_path(version)
            engine = self._engine_for(path, version)
            fresh = self._load_into(engine, version, path, merge)
            with self._lock:
                old = self._handles.get(label)
                self._handles[label] = fresh
                drop = False
                if old is not None:  # its adapter form: the stages move to the merged copy
                    fresh.stages |= old.stages
                    for stage, pointed in self._pointers.items():
                        if pointed is old:
                            self._pointers[stage] = fresh
                    if self._canary is old:
                        self._canary = fresh
                    old.stages.clear()
                    old.retired = True
                    drop = old.refs == 0
            if old is not None and drop:
                self._unload_later(old)
            return fresh

    def _merge(self, prod: bool) -> bool:
        """Whether a version is loaded as a merged copy (`serve.merge_adapters`)."""
        mode = self.cfg.merge_adapters
        return mode is True or (mode == "prod" and prod)

    def _load_into(self, engine: Engine, version: int, path: Path, merge: bool) -> _Handle:
        """Load `version` into `engine` in the form `merge` says; its new handle."""
        from evertune.serving.transformers_engine import TransformersEngine

        label = version_label(version)
        if not isinstance(engine, TransformersEngine):  # vLLM serves adapters its own way
            engine.load(label, path)
            return _Handle(label, version, engine=engine)
        # `prod` mode keys the merged copy apart: its adapter form may still be finishing
        # requests under the plain label (keys are immutable).
        prod_mode = self.cfg.merge_adapters == "prod"
        key = MERGED_KEY.format(label=label) if merge and prod_mode else label
        engine.load(key, path, merge=merge)
        adapter = not merge and (path / "adapter_config.json").is_file()
        return _Handle(key, version, engine=engine, adapter=adapter)

    def _configured_base(self) -> Path | None:
        from evertune.models import resolve_base_model

        try:
            return resolve_base_model(self.ws.config.model.base, self.ws.models_dir).resolve()
        except Exception:  # a test engine without a real base: versions use the default engine
            return None

    def _engine_for(self, path: Path, version: int) -> Engine:
        """The engine of the base model `version` was trained on (its facts, not the live
        config); starts one for that base when it is not the default engine's."""
        from evertune.facts import RESULT_META, read_facts, version_base

        if not (path / RESULT_META).is_file():
            return self.engine  # no facts recorded: the engine checks adapter_config.json
        try:
            base = version_base(read_facts(path), self.ws.models_dir, what=f"v{version}")
        except ModelError as exc:  # its base is not here: never load it onto another one
            raise BaseUnavailable(str(exc)) from None
        base = base.resolve()
        if self._default_base is None or base == self._default_base:
            return self.engine
        with self._engine_start_lock:  # two versions of one new base: one engine
            engine = self._engines.get(base)
            if engine is None:
                log.info("v%s was trained on base %s: starting an engine for it", version, base)
                engine = make_engine(self.ws, self.metrics, base=base)
                engine.start()
                self._engines[base] = engine
        return engine

    def _engine_of(self, handle: _Handle) -> Engine:
        return handle.engine or self.engine

    def _evict_idle(self) -> None:
        """Take out of routing what is over the limits, least recently used first: adapter
        versions beyond `serve.max_adapters`, merged copies no stage points at beyond
        `KEEP_IDLE_VERSIONS`. Never a stage's version. Unloaded now when idle, else at the
        last release of the requests using it (`_release`)."""
        with self._lock:
            versions = [h for h in self._handles.values() if h.version is not None]
            adapters = [h for h in versions if h.adapter]
            spare = sorted((h for h in adapters if not h.stages), key=lambda h: h.last_used)
            victims = spare[: max(0, len(adapters) - self.cfg.max_adapters)]
            copies = sorted(
                (h for h in versions if not h.adapter and not h.stages), key=lambda h: h.last_used
            )
            victims += copies[: max(0, len(copies) - KEEP_IDLE_VERSIONS)]
            idle = []
            for h in victims:
                del self._handles[h.label]
                h.retired = True
                if h.refs == 0:
                    idle.append(h)
        for h in idle:
            self._unload_later(h)

    def _unload_later(self, handle: _Handle) -> None:
        with contextlib.suppress(RuntimeError):  # stopped: the engine went with all it held
            self._janitor.submit(self._unload, handle)

    def _unload(self, handle: _Handle) -> None:
        """Unload a retired handle's engine key unless the version was loaded again under
        the same key meanwhile (the engine reuses a key it still holds)."""
        with self._key_locks[handle.label]:
            with self._lock:
                now = self._handles.get(handle.label)
                if now is not None and now.key == handle.key and now.engine is handle.engine:
                    return
            try:
                self._engine_of(handle).unload(handle.key)
            except Exception as exc:
                log.warning("could not unload %s: %s", handle.key, exc)

    # -- resolving names ---------------------------------------------------------------------
    def _registered(self) -> list[int]:
        """Registered version numbers (cached for NAMES_TTL_S)."""
        read_at, versions = self._names
        if time.monotonic() - read_at > NAMES_TTL_S:
            try:
                versions = sorted(v.version for v in self.registry.list_versions())
            except Exception as exc:
                log.warning("could not list versions: %s", exc)
            self._names = (time.monotonic(), versions)
        return versions

    def model_entries(self) -> list[dict[str, Any]]:
        """What /v1/models lists: stage names, the base model, every registered version."""
        created = oai.now()
        with self._lock:
            pointers = dict(self._pointers)
            loaded = set(self._handles)

        def entry(model_id: str, version: int | None, stage: str) -> dict[str, Any]:
            label = version_label(version)
            return {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "evertune",
                "version": label,
                "stage": stage,
                "loaded": label in loaded,
            }

        out = []
        if "prod" in pointers:
            prod = pointers["prod"]
            version = prod.version if prod else None
            out += [entry(self.name, version, "prod"), entry(f"{self.name}@prod", version, "prod")]
        qa = pointers.get("qa")
        if qa is not None:
            out.append(entry(f"{self.name}@qa", qa.version, "qa"))
        out.append(entry(f"{self.name}@base", None, "base"))
        out += [entry(f"{self.name}@v{n}", n, "version") for n in self._registered()]
        return out

    def _not_found(self, raw: str, why: str) -> OpenAIError:
        valid = ", ".join(e["id"] for e in self.model_entries())
        return OpenAIError(
            404,
            f"The model `{raw}` does not exist{why}. Valid models: {valid}",
            param="model",
            code="model_not_found",
        )

    async def _acquire(self, raw: str, caller: str | None = None) -> tuple[_Handle, Target, str]:
        """Resolve a model name to a loaded handle and hold it (release with `_release`);
        also the stage label: the target's, or `canary` when the split sent `caller` there.

        Only the bare `NAME` is split: `NAME@prod` stays a way to ask PROD itself, and
        `NAME@vN` a way to ask one version."""
        target = parse_model_name(raw, self.name)
        if target is None:
            raise await asyncio.to_thread(self._not_found, raw, "")
        if target.kind in STAGES and target.kind not in self.stages:
            raise await asyncio.to_thread(
                self._not_found, raw, f" here: this server serves {', '.join(self.stages)} only"
            )
        for _ in range(3):  # an on-demand version evicted between loading and holding: retry
            with self._lock:
                handle: _Handle | None
                stage = target.stage
                if (
                    raw == self.name
                    and caller is not None
                    and self._canary is not None
                    and canary_bucket(self._canary.version or 0, caller)
                    < self._canary_percent * 100
                ):
                    handle, stage = self._canary, CANARY
                elif target.kind in STAGES:
                    handle = self._pointers[target.kind]
                    if handle is None and target.kind == "prod":
                        handle = self._handles[BASE_KEY]  # nothing promoted yet: the base model
                    if handle is None:
                        break
                else:
                    handle = self._handles.get(version_label(target.version))
                if handle is not None:
                    handle.refs += 1
                    handle.last_used = time.monotonic()
                    return handle, target, stage
            assert target.version is not None
            await self._load_on_demand(raw, target.version)
        raise await asyncio.to_thread(self._not_found, raw, f": no version is in {target.kind}")

    async def _load_on_demand(self, raw: str, version: int) -> None:
        try:
            await asyncio.to_thread(self.registry.get_version, version)
        except NotFoundError:
            raise await asyncio.to_thread(self._not_found, raw, "") from None
        try:
            await asyncio.to_thread(self._ensure_loaded, version)
        except AdapterMismatch as exc:
            raise OpenAIError(
                409,
                f"The model `{raw}` (version v{version}) cannot be served by this server: "
                f"{exc.message}",
                param="model",
                code="model_incompatible",
                type="invalid_request_error",
            ) from None
        except Exception as exc:
            raise OpenAIError(
                500, f"could not load {raw}: {exc}", code="model_load_failed"
            ) from exc
        self._evict_idle()

    def _release(self, handle: _Handle) -> None:
        with self._lock:
            handle.refs -= 1
            handle.last_used = time.monotonic()  # a long request ending is a recent use
            drop = handle.retired and handle.refs == 0
        if drop:
            self._unload_later(handle)

    # -- the routes --------------------------------------------------------------------------
    def _build_router(self) -> APIRouter:
        router = APIRouter()

        @router.get("/v1/models")
        async def list_models(request: Request) -> Response:
            try:
                self._check_ready()
                self.keys.check(request.headers.get("authorization"))
            except OpenAIError as err:
                return _error(err)
            data = await asyncio.to_thread(self.model_entries)
            return _json({"object": "list", "data": data})

        @router.get("/v1/models/{model_id}")
        async def get_model(model_id: str, request: Request) -> Response:
            try:
                self._check_ready()
                self.keys.check(request.headers.get("authorization"))
                entries = await asyncio.to_thread(self.model_entries)
                for e in entries:
                    if e["id"] == model_id:
                        return _json(e)
                raise await asyncio.to_thread(self._not_found, model_id, "")
            except OpenAIError as err:
                return _error(err)

        @router.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            return await self._complete(request, "chat")

        @router.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._complete(request, "completions")

        @router.post("/v1/feedback")
        async def feedback(request: Request) -> Response:
            try:
                sender = self.keys.check(request.headers.get("authorization"))
                # JSON only: a browser may send text/plain cross-origin without a preflight,
                # so accepting it would let any web page post training data.
                _require_json(request.headers.get("content-type"))
                body = oai.parse_json(await read_body(request, self.cfg.max_request_bytes))
                return _json(await self._feedback(body, sender))
            except OpenAIError as err:
                return _error(err)

        return router

    def _check_ready(self) -> None:
        if not self._started:
            raise OpenAIError(
                503, "The model server is starting; retry in a few seconds.", code="not_ready"
            )

    def _render_chat(self, messages: list[dict[str, str]], handle: _Handle) -> str:
        tok = self._engine_of(handle).tokenizer  # the version's base: its own chat template
        if not getattr(tok, "chat_template", None):
            raise oai.bad(
                "messages",
                "this model has no chat template; use /v1/completions with a prompt instead",
                "unsupported_model",
            )
        # Chat templates know system/user/assistant; "developer" is OpenAI's newer "system".
        msgs = [
            {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
            for m in messages
        ]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # templates raise for orders they do not support
            raise oai.bad("messages", f"the chat template refused these messages: {exc}") from None
        assert isinstance(text, str)
        return text

    def _prepare(self, engine: Engine, gens: list[GenRequest], param: str) -> None:
        """Tokenize every prompt (on `_prompt_pool`'s thread)."""
        limit = self.cfg.max_prompt_chars
        for gen in gens:
            if len(gen.prompt) > limit:  # the chat template's text, checked once more
                raise oai.bad(
                    param,
                    f"the rendered prompt is {len(gen.prompt)} characters; this server "
                    f"accepts at most {limit} (serve.max_prompt_chars: raise it in "
                    f"evertune.yaml or with --set serve.max_prompt_chars=N)",
                    "prompt_too_long",
                )
            try:
                engine.prepare(gen)
            except EngineError as exc:
                raise _from_engine(exc, param) from None

    async def _off_loop(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` on the prompt thread."""
        return await asyncio.get_running_loop().run_in_executor(self._prompt_pool, fn, *args)

    def _parse(self, raw: bytes, endpoint: str) -> oai.ChatParams | oai.CompletionParams:
        """The validated request (OpenAIError 400 naming what is wrong)."""
        body = oai.parse_json(raw)
        limits = {
            "max_tokens_limit": self.cfg.max_tokens_limit,
            "max_prompt_chars": self.cfg.max_prompt_chars,
        }
        if endpoint == "chat":
            return oai.parse_chat(body, **limits)
        return oai.parse_completion(body, **limits)

    async def _complete(self, request: Request, endpoint: str) -> Response:
        """Both completion endpoints: validate, resolve, generate, answer (or stream)."""
        t0 = time.perf_counter()
        handle: _Handle | None = None
        target: Target | None = None
        stage = ""
        try:
            self._check_ready()
            receiver = self.keys.check(request.headers.get("authorization"))
            raw = await read_body(request, self.cfg.max_request_bytes)
            if len(raw) > PARSE_INLINE_BYTES:
                # Parsing and checking megabytes takes tens of ms: not on the event loop.
                params = await asyncio.to_thread(self._parse, raw, endpoint)
            else:
                params = self._parse(raw, endpoint)
            del raw
            handle, target, stage = await self._acquire(params.model, _caller(request, receiver))
            if isinstance(params, oai.ChatParams):
                # In a thread too: Jinja over a long message takes a while.
                rendered = await self._off_loop(self._render_chat, params.messages, handle)
                prompts, source, param = [rendered], params.messages, "messages"
            else:
                prompts, param = params.prompts, "prompt"
                source = params.prompts if params.prompt_is_list else params.prompts[0]
            gens = [
                GenRequest(
                    prompt=p,
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    stop=params.stop,
                    seed=params.seed,
                    stream=params.stream,
                )
                for p in prompts
            ]
            await self._off_loop(self._prepare, self._engine_of(handle), gens, param)
        except Exception as exc:
            err = exc if isinstance(exc, OpenAIError) else None
            if err is None:
                # A bug, not the client's fault: still an OpenAI-shaped answer, and the model
                # this request held is released.
                log.exception("%s request failed before generation", endpoint)
                err = OpenAIError(500, f"internal error: {exc}", code="internal_error")
            if handle is not None:
                self._release(handle)
            self._count_error(endpoint, handle, target, err, stage)
            return _error(err)
        call = _Call(
            id=oai.new_id("chatcmpl" if endpoint == "chat" else "cmpl"),
            endpoint=endpoint,
            model=params.model,
            handle=handle,
            target=target,
            params=params,
            prompt=source,
            sampled=self.request_log.sampled(),
            t0=t0,
            receiver=receiver,
            stage=stage,
        )
        self.metrics.in_flight.labels(version=handle.label, stage=call.stage).inc()
        if params.stream:
            return StreamingResponse(
                self._stream(call, gens),
                media_type="text/event-stream",
                headers={**call.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        try:
            got: dict[int, Finished] = {}
            async with contextlib.aclosing(self._events(call, gens)) as events:
                async for i, event in events:
                    if isinstance(event, Finished):
                        got[i] = event
        except EngineError as exc:
            failure = _from_engine(exc, param)
            self._finish(call, None, failure)
            return _error(failure, call.headers)
        except BaseException:  # cancelled (client gone, shutdown): still release the model
            self._finish(call, None, OpenAIError(499, "request cancelled", code="cancelled"))
            raise
        finals = [got[i] for i in range(len(gens))]  # _events ends after every Finished
        self._finish(call, finals, None)
        return _json(self._response(call, finals), call.headers)

    async def _events(
        self, call: _Call, gens: list[GenRequest]
    ) -> AsyncGenerator[tuple[int, Event], None]:
        """Events of every prompt of a call, tagged with the prompt's index, as they come."""
        call.submit_at = time.perf_counter()
        key = call.handle.key
        engine = self._engine_of(call.handle)
        # aclosing: a client that goes away closes the engine streams at once, which cancels
        # their rows in the batch (the engine's `finally`), instead of at garbage collection.
        if len(gens) == 1:
            async with contextlib.aclosing(engine.stream(key, gens[0])) as events:
                async for event in events:
                    yield 0, event
            return
        queue: asyncio.Queue[tuple[int, Event | Exception]] = asyncio.Queue()

        async def pump(i: int, gen: GenRequest) -> None:
            try:
                async with contextlib.aclosing(engine.stream(key, gen)) as events:
                    async for event in events:
                        await queue.put((i, event))
            except Exception as exc:  # re-raised by the consumer below
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        left = len(gens)
        try:
            while left:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield i, item
                if isinstance(item, Finished):
                    left -= 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, call: _Call, gens: list[GenRequest]) -> AsyncIterator[bytes]:
        """The SSE body: chunks as tokens come, a final chunk per choice, usage, [DONE]."""
        chat = call.endpoint == "chat"
        finals: list[Finished | None] = [None] * len(gens)
        error: OpenAIError | None = None
        try:
            if chat:
                yield oai.sse(self._chunk(call, 0, {"role": "assistant", "content": ""}, None))
            async with contextlib.aclosing(self._events(call, gens)) as events:
                async for i, event in events:
                    if isinstance(event, TextDelta):
                        delta = {"content": event.text} if chat else event.text
                        yield oai.sse(self._chunk(call, i, delta, None))
                    else:
                        finals[i] = event
                        finish = oai.openai_finish(event.finish_reason)
                        yield oai.sse(self._chunk(call, i, {} if chat else "", finish))
            done = [f for f in finals if f is not None]
            if call.params.include_usage:
                chunk = self._chunk(call, 0, None, None)
                chunk["choices"] = []
                chunk["usage"] = oai.usage(
                    sum(f.prompt_tokens for f in done), sum(f.completion_tokens for f in done)
                )
                yield oai.sse(chunk)
        except EngineError as exc:
            error = _from_engine(exc, "messages" if chat else "prompt")
            yield oai.sse(error.body())
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: stop generating (closing _events cancels the rows).
            error = OpenAIError(499, "client closed the connection", code="client_closed")
            raise
        finally:
            complete = error is None and all(f is not None for f in finals)
            self._finish(call, [f for f in finals if f is not None] if complete else None, error)
        yield oai.SSE_DONE

    def _chunk(self, call: _Call, index: int, delta: Any, finish: str | None) -> dict[str, Any]:
        if call.endpoint == "chat":
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
            kind = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {
            "id": call.id,
            "object": kind,
            "created": call.created,
            "model": call.answered_as,
            "system_fingerprint": f"evertune-{call.handle.label}",
            "choices": [choice],
        }

    def _response(self, call: _Call, finals: list[Finished]) -> dict[str, Any]:
        if call.endpoint == "chat":
            f = finals[0]
            choices = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f.text},
                    "logprobs": None,
                    "finish_reason": oai.openai_finish(f.finish_reason),
                }
            ]
            kind = "chat.completion"
        else:
            choices = [
                {
                    "index": i,
                    "text": f.text,
                    "logprobs": None,
                    "finish_reason": oai.openai_finish(f.finish_reason),
                }
                for i, f in enumerate(finals)
            ]
            kind = "text_completion"
        return {
            "id": call.id,
            "object": kind,
            "created": call.created,
            "model": call.answered_as,
            "system_fingerprint": f"evertune-{call.handle.label}",
            "choices": choices,
            "usage": oai.usage(
                sum(f.prompt_tokens for f in finals), sum(f.completion_tokens for f in finals)
            ),
        }

    # -- bookkeeping -------------------------------------------------------------------------
    def _count_error(
        self,
        endpoint: str,
        handle: _Handle | None,
        target: Target | None,
        err: OpenAIError,
        stage: str = "",
    ) -> None:
        version = handle.label if handle else ""
        stage = stage or (target.stage if target else "")
        m = self.metrics
        m.requests.labels(endpoint=endpoint, version=version, stage=stage, status="error").inc()
        m.errors.labels(endpoint=endpoint, version=version, stage=stage, code=err.label).inc()

    def _finish(
        self, call: _Call, finals: list[Finished] | None, error: OpenAIError | None
    ) -> None:
        """Once per call: release the model, record metrics, remember and log the request."""
        self._release(call.handle)
        m, version, stage = self.metrics, call.handle.label, call.stage
        m.in_flight.labels(version=version, stage=stage).dec()
        duration = time.perf_counter() - call.t0
        m.duration.labels(endpoint=call.endpoint, version=version, stage=stage).observe(duration)
        if error is not None or finals is None:
            err = error or OpenAIError(500, "generation did not finish", code="incomplete")
            self._count_error(call.endpoint, call.handle, call.target, err, call.stage)
            self._log(call, None, err, duration)
            return
        m.requests.labels(endpoint=call.endpoint, version=version, stage=stage, status="ok").inc()
        m.prompt_tokens.labels(version=version, stage=stage).inc(
            sum(f.prompt_tokens for f in finals)
        )
        m.completion_tokens.labels(version=version, stage=stage).inc(
            sum(f.completion_tokens for f in finals)
        )
        queued = call.submit_at - call.t0  # validation, resolution, tokenization before the engine
        for f in finals:
            if f.ttft_s is not None:
                m.ttft.labels(version=version, stage=stage).observe(queued + f.ttft_s)
                if f.completion_tokens > 1:
                    tpot = (f.total_s - f.ttft_s) / (f.completion_tokens - 1)
                    m.tpot.labels(version=version, stage=stage).observe(tpot)
        self._remember(call, finals)
        self._log(call, finals, None, duration)

    def _remember(self, call: _Call, finals: list[Finished]) -> None:
        texts = [f.text for f in finals]
        source = {
            "endpoint": call.endpoint,
            "prompt": self.request_log.redact(call.prompt),
            "completion": self.request_log.redact(texts if len(texts) > 1 else texts[0]),
            "version": call.handle.label,
            "model": call.model,
            "receiver": call.receiver,  # who may give verified feedback on it
        }
        with self._lock:
            self._recent[call.id] = source
            while len(self._recent) > RECENT_RESPONSES:
                self._recent.popitem(last=False)
        # Every response (not only the logged sample) is recorded, so feedback on it can be
        # verified and trained on after it left memory or the process restarted.
        self.request_log.served({"id": call.id, **source}, redacted=True)

    def _log(
        self, call: _Call, finals: list[Finished] | None, error: OpenAIError | None, duration: float
    ) -> None:
        if not call.sampled:
            return
        finals = finals or []
        texts = [f.text for f in finals]
        p = call.params
        ttfts = [f.ttft_s for f in finals if f.ttft_s is not None]
        self.request_log.record({
            "id": call.id, "created_at": call.arrival, "model": call.model,
            "version": call.handle.label, "stage": call.stage, "endpoint": call.endpoint,
            "status": "ok" if error is None else "error", "prompt": call.prompt,
            "completion": (texts if len(texts) > 1 else texts[0]) if texts else None,
            "finish_reason": finals[0].finish_reason if finals else None,
            "prompt_tokens": sum(f.prompt_tokens for f in finals),
            "completion_tokens": sum(f.completion_tokens for f in finals),
            "ttft_s": (call.submit_at - call.t0) + min(ttfts) if ttfts else None,
            "duration_s": duration,
            "params": {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                       "stop": p.stop, "seed": p.seed, "stream": p.stream},
            "error": error.message if error else None, "receiver": call.receiver,
        })  # fmt: skip

    # -- feedback ----------------------------------------------------------------------------
    async def _feedback(self, body: dict[str, Any], sender: str) -> dict[str, Any]:
        """Validate one feedback body and store its record; see `evertune.monitoring.feedback`.

        The record trains on the prompt and answer this server produced for `id`, and only
        when `sender` is the caller who received that response; otherwise it is stored
        (`verified: false`, with a `reason` in the answer) and not trained on by default."""
        response_id = body.get("id")
        if not isinstance(response_id, str) or not response_id:
            raise oai.bad(
                "id",
                "'id' must be the id of a response (chatcmpl-… or cmpl-…)",
                "missing_required_parameter",
            )
        try:
            check_response_id(response_id)
        except ValueError as exc:
            raise oai.bad("id", str(exc)) from None
        rating = body.get("rating")
        if rating is not None and (not oai._is_number(rating) or not math.isfinite(rating)):
            raise oai.bad(
                "rating", "'rating' must be a number (e.g. 1 or -1, or a 1–5 score)", "invalid_type"
            )
        correction = body.get("correction")
        if correction is not None and (not isinstance(correction, str) or not correction.strip()):
            raise oai.bad("correction", "'correction' must be a non-empty string", "invalid_type")
        if rating is None and correction is None:
            raise oai.bad("rating", "send a 'rating', a 'correction', or both")
        comment = body.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise oai.bad("comment", "'comment' must be a string", "invalid_type")
        index = oai._int(body, "index") or 0
        if index < 0:
            raise oai.bad("index", f"'index' must be 0 or more (a choice's index), got {index}")
        source, reason = await self._feedback_source(response_id, body)
        if reason is None:
            # A response id is a capability only for whoever received it: another key that
            # learnt it must not put its rating or correction into the training data.
            reason = receiver_problem(
                response_id, sender, source.get("receiver"), serving_open=not self.keys.names()
            )
        verified = reason is None
        try:
            record = build_record(
                source,
                response_id=response_id,
                rating=rating,
                correction=self.request_log.redact(correction) if correction else None,
                comment=self.request_log.redact(comment) if comment else None,
                index=index,
                verified=verified,
                sender=sender,
                receiver=source.get("receiver"),
                reason=reason,
            )
        except ValueError as exc:
            message = str(exc)
            param = next((p for p in ("index", "messages") if p in message), "prompt")
            raise oai.bad(param, message) from None
        try:
            key = await asyncio.to_thread(write_feedback, self.ws, record, response_id)
        except DataError as exc:  # the bucket refused the object key
            raise oai.bad("id", str(exc)) from None
        except Exception as exc:
            raise OpenAIError(
                500, f"could not write the feedback to the bucket: {exc}", code="storage_error"
            ) from exc
        meta = record["feedback"]
        return {
            "id": meta["id"],
            "object": "feedback",
            "response_id": response_id,
            "label": meta["label"],
            "verified": verified,
            "reason": reason,  # None when verified: why it is not trained on by default
            "sender": sender,
            "key": key,
        }

    async def _feedback_source(
        self, response_id: str, body: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        """What was asked and answered (with its `receiver`), and why it is not known to be
        what this server served (None: it is).

        Remembered in memory, else `served_responses`, else the request log: then verified,
        and the body's `messages`/`prompt`/`completion` are ignored — except where only a
        digest was stored (`serve.log_prompts: false`) and the body's text matches it. Else
        the body's text, unverified (stored for review, not trained on by default)."""
        untrained = UNTRAINED
        with self._lock:
            source = dict(self._recent.get(response_id) or {})
        if source:
            return source, None
        served = await _lookup(get_served, self.ws, response_id)
        known = (
            {"version": served.version, "model": served.model, "receiver": served.receiver}
            if served
            else {}
        )
        if served is not None and served.prompt is not None:
            return {
                "endpoint": served.endpoint,
                "prompt": served.prompt,
                "completion": served.completion,
                **known,
            }, None
        claimed = _claimed(body, self.request_log.redact)
        if (
            served is not None
            and claimed is not None
            and claimed["endpoint"] == served.endpoint
            and response_digest(claimed["prompt"], claimed.get("completion")) == served.digest
        ):
            return {**claimed, **known}, None
        if served is None:
            logged = await _lookup(get_request, self.ws, response_id)
            if logged is not None and logged.prompt is not None:
                return {
                    "endpoint": logged.endpoint,
                    "prompt": logged.prompt,
                    "completion": logged.completion,
                    "version": logged.version,
                    "model": logged.model,
                    "receiver": logged.receiver,
                }, None
        if claimed is None and served is not None:
            raise oai.bad(
                "messages",
                f"Response {response_id!r} was served here, but its text was not stored "
                "(serve.log_prompts: false): send its 'messages' (or 'prompt') and "
                "'completion' exactly as served with the feedback",
            )
        if claimed is None:
            raise OpenAIError(
                404,
                f"No response {response_id!r} is known here (not recent, not recorded); send "
                f"'messages' (or 'prompt') and 'completion' with the feedback to store it for "
                f"review (it is not trained on unless data.trust_unverified_feedback is true)",
                param="id",
                code="response_not_found",
            )
        if served is not None:
            return claimed, (
                f"the text sent is not what response {response_id!r} served (its digest "
                f"differs): {untrained}"
            )
        return claimed, f"no response {response_id!r} is known here: {untrained}"


async def _lookup(fn: Callable[[Workspace, str], _T], ws: Workspace, response_id: str) -> _T:
    """`fn(ws, response_id)` in a thread; a state DB failure is a 503 to retry, not a 500."""
    try:
        return await asyncio.to_thread(fn, ws, response_id)
    except Exception as exc:
        raise OpenAIError(
            503,
            f"could not look up response {response_id!r} in the state DB ({exc}); retry shortly",
            code="state_db_unavailable",
        ) from exc


def _caller(request: Request, receiver: str) -> str:
    """Who asks, for the canary split: the `x-evertune-user` header, else the serving key's
    name, else the client's address (open serving without the header)."""
    user = (request.headers.get(USER_HEADER) or "").strip()
    if user:
        return f"user:{user}"
    if receiver != ANONYMOUS:
        return f"key:{receiver}"
    return f"addr:{request.client.host if request.client else 'unknown'}"


def _require_json(content_type: str | None) -> None:
    """415 unless the body is declared as JSON (`application/json`, any charset)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise OpenAIError(
            415,
            f"Unsupported Content-Type {content_type or '(none)'!r}: send the feedback as a JSON "
            "object with the header 'Content-Type: application/json'.",
            param="content-type",
            code="unsupported_media_type",
            type="invalid_request_error",
        )


def _claimed(body: dict[str, Any], redact: Any) -> dict[str, Any] | None:
    """The prompt and answer a feedback body says were served (redacted), None without a
    prompt; 400 naming the field when one is malformed.

    Messages are normalised as chat requests are ({role, content} with text content), so
    their digest matches the served response's."""
    endpoint: str
    prompt: Any
    if body.get("messages") is not None:
        raw = body["messages"]
        if not isinstance(raw, list) or not raw:
            raise oai.bad("messages", "'messages' must be a non-empty array of {role, content}")
        prompt = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in oai.CHAT_ROLES:
                raise oai.bad(
                    f"messages[{i}]",
                    f"each message must be an object with a role ({', '.join(oai.CHAT_ROLES)}) "
                    "and a content",
                )
            prompt.append(
                {"role": m["role"], "content": oai._content(m.get("content"), f"messages[{i}]")}
            )
        endpoint = "chat"
    elif body.get("prompt") is not None:
        prompt = body["prompt"]
        if not _text_or_texts(prompt):
            raise oai.bad("prompt", "'prompt' must be a string or an array of strings")
        endpoint = "completions"
    else:
        if body.get("completion") is not None:
            raise oai.bad("messages", "'completion' needs the 'messages' (or 'prompt') it answers")
        return None
    claimed: dict[str, Any] = {"endpoint": endpoint, "prompt": redact(prompt)}
    completion = body.get("completion")
    if completion is not None:
        if not _text_or_texts(completion):
            raise oai.bad("completion", "'completion' must be a string or an array of strings")
        claimed["completion"] = redact(completion)
    return claimed


def _text_or_texts(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    )


def _from_engine(exc: EngineError, param: str) -> OpenAIError:
    # The engine says "prompt" for whatever the prompt was made of; chat calls it messages.
    name = param if exc.param == "prompt" else exc.param
    return OpenAIError(exc.status, exc.message, param=name, code=exc.code)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 naming `serve.max_request_bytes` once it is over `limit`.

    Read chunk by chunk and refused as soon as it passes the limit (at once when the
    Content-Length says so): a 50 MB body is never held in memory whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, None)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int, size: int | None) -> OpenAIError:
    got = f"{size} bytes" if size is not None else "more than that"
    return OpenAIError(
        413,
        f"The request body is too large: this server accepts at most {limit} bytes "
        f"(serve.max_request_bytes), got {got}. Send a shorter prompt, or raise the limit in "
        f"evertune.yaml or with --set serve.max_request_bytes=N.",
        code="request_too_large",
    )


def _json(payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(payload, headers=headers)


def _error(err: OpenAIError, headers: dict[str, str] | None = None) -> Response:
    # ASCII JSON: a message that echoes client text (a lone surrogate, say) still encodes.
    return Response(
        json.dumps(err.body()),
        status_code=err.status,
        headers=headers,
        media_type="application/json",
    )
