"""What the gateway asks of an inference engine, and the events an engine answers with.

    engine = TransformersEngine(base_path, merge_adapters=False)     # or VllmEngine(...)
    engine.start()
    engine.load("v3", adapter_folder)            # a version under an immutable key
    req = GenRequest(prompt="<|im_start|>user\\nHi<|im_end|>\\n…", max_tokens=32, stream=True)
    engine.prepare(req)                          # tokenizes and checks limits (EngineError → 400)
    async for event in engine.stream("v3", req):
        ...                                      # TextDelta(text) … then Finished(...)

Engines are structural (`Engine` is a Protocol): the transformers engine decodes in-process
with a batcher thread, the vLLM engine proxies to the `vllm serve` process it started. Keys
are immutable: a key always names the same weights (`base`, `v3`), so loading a new version
never replaces one that in-flight requests are using.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BASE_KEY = "base"
"""The engine key of the base model (no adapter); versions are keyed `v<N>`."""

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class GenRequest:
    """One completion to generate. `max_tokens=None` means: up to the engine's default
    (`serve.max_tokens_limit`, capped by what the context window leaves)."""

    prompt: str
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False  # True: TextDelta events per decode step; False: only Finished
    # Filled by Engine.prepare:
    prompt_ids: list[int] | None = None
    prompt_tokens: int = 0


@dataclass(frozen=True)
class TextDelta:
    """New text since the previous delta (never part of a stop string)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of one completion. Times are seconds from `Engine.stream` being called."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None  # None when no token was generated
    total_s: float


Event = TextDelta | Finished


class EngineError(Exception):
    """A request the engine cannot serve as asked; `status` 400 is the caller's fault.

    `param` names the request parameter at fault and `code` is the OpenAI error code
    (`context_length_exceeded`, …), so the gateway can answer with an OpenAI error object.
    """

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


class AdapterMismatch(EngineError):
    """A version's adapter does not fit the base model an engine serves (409): the message
    names what does not match and the fix; nothing was loaded."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=409, param="model", code="model_incompatible")


class Engine(Protocol):
    """An inference engine serving a base model and versions of it under immutable keys."""

    name: str
    """`transformers` or `vllm` (the `serve.engine` value)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer (the gateway renders chat templates with it)."""
        ...

    def start(self) -> None:
        """Load the base model (or start the server); serves `BASE_KEY` afterwards."""
        ...

    def stop(self) -> None:
        """Finish or cancel what runs and release the model (or stop the server)."""
        ...

    def load(self, key: str, path: Path) -> None:
        """Serve the version at `path` (a PEFT adapter or a full model folder) as `key`.

        Idempotent for a key already loaded from the same path; a key is never reloaded
        with other weights (EngineError); an adapter that does not fit the base is refused
        with `AdapterMismatch`. (The transformers engine also takes `merge=`: a merged copy
        or an adapter on its shared base, per key.)"""
        ...

    def unload(self, key: str) -> None:
        """Stop serving `key` once the requests that use it have finished."""
        ...

    def loaded(self) -> set[str]:
        """The keys served now (`BASE_KEY` included)."""
        ...

    def prepare(self, request: GenRequest) -> None:
        """Tokenize `request.prompt` and resolve `max_tokens`; EngineError when it cannot fit."""
        ...

    def stream(self, key: str, request: GenRequest) -> AsyncGenerator[Event, None]:
        """Generate a prepared request with the model under `key`; ends with `Finished`.

        Closing the iterator early cancels the generation."""
        ...
