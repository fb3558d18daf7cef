"""The GPU engine: a `vllm serve` process with LoRA enabled, and a proxy to it.

    engine = VllmEngine(base_path, model_name="assistant")   # serve.engine: vllm
    engine.start()          # runs `vllm serve BASE --enable-lora …` and waits for /health
    engine.load("v3", adapter_folder)                        # → vLLM adapter "assistant-v3"
    async for event in engine.stream("v3", req): ...         # /v1/completions, streamed

vLLM does the batching (continuous batching, paged KV cache) and applies LoRA adapters per
request, so versions share the GPU without merged copies. Each version is loaded through
vLLM's runtime adapter API (`POST /v1/load_lora_adapter`, enabled by the environment variable
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) under an immutable name `<model>-v<N>`: a name is
never loaded twice with other weights, so a swap never changes what an in-flight request
runs on; an old version is unloaded once the gateway has no request on it.

The gateway renders chat templates itself and always sends text prompts to
`/v1/completions` (with `add_special_tokens: false`, the training rule), so both engines see
exactly the same prompt text. vLLM is imported by nothing here: the server is a separate
process (install `vllm` on the GPU machine); `launch=False` with `base_url` attaches to one
started elsewhere, and `transport` lets tests answer in place of vLLM.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertune.serving.engine import BASE_KEY, EngineError, Event, Finished, GenRequest, TextDelta

if TYPE_CHECKING:
    import httpx
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 900.0  # first start compiles CUDA graphs and may download nothing else
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def vllm_available() -> bool:
    """Whether the `vllm` package is importable here (GPU machines with the extra installed)."""
    return importlib.util.find_spec("vllm") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmEngine:
    """Proxy engine over a `vllm serve` process; see the module docstring."""

    name = "vllm"

    def __init__(
        self,
        base: Path,
        *,
        model_name: str,
        dtype: str = "auto",
        max_loras: int = 4,
        max_lora_rank: int = 16,
        max_tokens_limit: int = 1024,
        extra_args: list[str] | None = None,
        launch: bool = True,
        base_url: str | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.base = Path(base)
        self.model_name = model_name
        self.dtype = dtype
        self.max_loras = max_loras
        # vLLM only takes certain ranks; use the smallest that fits the adapters we train.
        self.max_lora_rank = next((r for r in _LORA_RANKS if r >= max_lora_rank), _LORA_RANKS[-1])
        self.max_tokens_limit = max_tokens_limit
        self.extra_args = list(extra_args or [])
        self.launch = launch
        self.port = port
        self.base_url = base_url
        self.log_path = log_path
        self.transport = transport
        self.startup_timeout_s = startup_timeout_s
        self.max_context = 0
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sync: httpx.Client | None = None
        self._async: dict[int, httpx.AsyncClient] = {}  # one client per event loop
        self._loaded: dict[str, Path | None] = {}
        self._lock = threading.Lock()

    # -- names -------------------------------------------------------------------------------
    def served_name(self, key: str) -> str:
        """The name vLLM knows `key` by: the base under `base`, version N as `<model>-vN`."""
        return BASE_KEY if key == BASE_KEY else f"{self.model_name}-{key}"

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise RuntimeError("VllmEngine.start() has not run yet")
        return self._tokenizer

    # -- lifecycle ---------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The `vllm serve` command line this engine runs."""
        exe = Path(sys.executable).with_name("vllm")
        head = [str(exe)] if exe.is_file() else [shutil.which("vllm") or "vllm"]
        return [
            *head, "serve", str(self.base),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--served-model-name", BASE_KEY,
            "--dtype", self.dtype,
            "--enable-lora",
            "--max-loras", str(self.max_loras),
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-cpu-loras", str(self.max_loras * 2),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start `vllm serve` (unless attaching to `base_url`) and wait until it answers."""
        import httpx

        from evertune.models import load_tokenizer

        self._tokenizer = load_tokenizer(self.base)
        if self.launch:
            if not vllm_available():
                raise EngineError(
                    "serve.engine is 'vllm' but the vllm package is not installed; on a GPU "
                    "machine run `pip install vllm`, or set serve.engine: transformers",
                    status=500,
                )
            self.port = self.port or _free_port()
            self.base_url = f"http://127.0.0.1:{self.port}"
            env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
            out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            log.info("starting %s", " ".join(self.command()))
            self._proc = subprocess.Popen(
                self.command(), env=env, stdout=out, stderr=subprocess.STDOUT
            )
        if not self.base_url:
            raise EngineError("VllmEngine(launch=False) needs base_url", status=500)
        self._sync = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(60.0, connect=5.0),
            transport=self.transport,  # type: ignore[arg-type]
        )
        self._wait_ready()
        self._loaded[BASE_KEY] = None
        self.max_context = self._model_len()

    def _wait_ready(self) -> None:
        import httpx

        assert self._sync is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                where = f"; see {self.log_path}" if self.log_path else ""
                raise EngineError(
                    f"vllm serve exited with status {self._proc.returncode} while starting{where}",
                    status=500,
                )
            try:
                if self._sync.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(
                    f"vllm serve did not answer /health within {self.startup_timeout_s:.0f}s",
                    status=500,
                )
            time.sleep(1.0)

    def _model_len(self) -> int:
        assert self._sync is not None
        try:
            data = self._sync.get("/v1/models").json().get("data", [])
            for m in data:
                if m.get("id") == BASE_KEY and m.get("max_model_len"):
                    return int(m["max_model_len"])
        except Exception as exc:  # older servers: fall back to the model config
            log.debug("could not read max_model_len from vllm: %s", exc)
        return 0

    def stop(self) -> None:
        """Stop the vLLM process (if this engine started it) and close the clients."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        self._async.clear()  # their loops close them; nothing is pending once the gateway stops
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None

    # -- versions ----------------------------------------------------------------------------
    def loaded(self) -> set[str]:
        with self._lock:
            return set(self._loaded)

    def load(self, key: str, path: Path) -> None:
        """Load the adapter at `path` into vLLM as `<model>-<key>` (never reloaded in place)."""
        path = Path(path)
        with self._lock:
            if key in self._loaded:
                if self._loaded[key] != path:
                    raise EngineError(
                        f"{self.served_name(key)} is already loaded from {self._loaded[key]}; "
                        f"vLLM adapter names are immutable",
                        status=500,
                    )
                return
        if not (path / "adapter_config.json").is_file():
            raise EngineError(
                f"{path} is not a LoRA adapter; the vllm engine serves LoRA versions only "
                f"(train with train.full_finetune: false, or use serve.engine: transformers)",
                status=500,
            )
        assert self._sync is not None, "VllmEngine.start() has not run yet"
        name = self.served_name(key)
        resp = self._sync.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
        )
        # A restarted gateway may find the adapter still loaded in a vLLM it attached to.
        if resp.status_code != 200 and "already" not in resp.text:
            raise EngineError(f"vLLM refused to load {name} from {path}: {resp.text}", status=500)
        with self._lock:
            self._loaded[key] = path

    def unload(self, key: str) -> None:
        """Unload `<model>-<key>` from vLLM (the gateway calls this once no request uses it)."""
        if key == BASE_KEY:
            raise EngineError("the base model cannot be unloaded", status=500)
        with self._lock:
            if key not in self._loaded:
                return
            del self._loaded[key]
        if self._sync is None:
            return
        resp = self._sync.post("/v1/unload_lora_adapter", json={"lora_name": self.served_name(key)})
        if resp.status_code != 200:
            log.warning("vLLM did not unload %s: %s", self.served_name(key), resp.text)

    # -- requests ----------------------------------------------------------------------------
    def prepare(self, request: GenRequest) -> None:
        """Count prompt tokens with the base tokenizer and resolve max_tokens."""
        ids = list(self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
        request.prompt_ids = ids
        request.prompt_tokens = len(ids)
        context = self.max_context or 0
        room = (context - len(ids)) if context else self.max_tokens_limit
        if request.max_tokens is None:
            request.max_tokens = min(self.max_tokens_limit, room)
        if context and (request.max_tokens < 1 or len(ids) + request.max_tokens > context):
            raise EngineError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(ids) + max(request.max_tokens, 1)} tokens. Please reduce the prompt or "
                f"max_tokens.",
                param="prompt",
                code="context_length_exceeded",
            )

    def _client(self) -> httpx.AsyncClient:
        import httpx

        loop = id(asyncio.get_running_loop())
        client = self._async.get(loop)
        if client is None:
            assert self.base_url, "VllmEngine.start() has not run yet"
            client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(600.0, connect=5.0),
                transport=self.transport,  # type: ignore[arg-type]
            )
            self._async[loop] = client
        return client

    async def stream(self, key: str, request: GenRequest) -> AsyncGenerator[Event, None]:
        """Proxy one completion to vLLM as a stream; events as from any engine."""
        if request.prompt_ids is None:
            self.prepare(request)
        if key not in self._loaded:
            raise EngineError(f"model {key} is not loaded", status=503)
        body: dict[str, Any] = {
            "model": self.served_name(key),
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "add_special_tokens": False,  # the prompt is already templated, as in training
        }
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        t0 = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        reason = "length"
        usage: dict[str, int] = {}
        async with self._client().stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                raise _vllm_error(resp.status_code, text)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _vllm_error(500, json.dumps(chunk))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = choice.get("text") or ""
                    if piece:
                        first = first or time.perf_counter()
                        parts.append(piece)
                        if request.stream:
                            yield TextDelta(piece)
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
        yield Finished(
            text="".join(parts),
            finish_reason="stop" if reason == "stop" else "length",
            prompt_tokens=int(usage.get("prompt_tokens", request.prompt_tokens)),
            completion_tokens=int(usage.get("completion_tokens", len(parts))),
            ttft_s=None if first is None else first - t0,
            total_s=time.perf_counter() - t0,
        )


def _vllm_error(status: int, text: str) -> EngineError:
    """vLLM's error body (OpenAI-shaped) as an EngineError with its message and param."""
    try:
        body = json.loads(text)
        err = body.get("error", body) if isinstance(body, dict) else {}
        message = str(err.get("message") or text)
        return EngineError(message, status=status, param=err.get("param"), code=err.get("code"))
    except (ValueError, AttributeError):
        return EngineError(f"vLLM answered {status}: {text}", status=status)
