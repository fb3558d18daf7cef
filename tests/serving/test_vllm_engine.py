"""The vLLM engine: immutable adapter names, the proxy protocol, and swaps through the gateway.

Without vLLM (no GPU here) the engine talks to a fake vLLM OpenAI server (httpx
MockTransport) that checks what a real one would: the adapter API, the names used, the
completion request. `test_real_vllm` runs the real `vllm serve` where vllm and CUDA exist.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from evertune.registry import Registry
from evertune.serving import Gateway
from evertune.serving.engine import BASE_KEY, EngineError, Finished, GenRequest, TextDelta
from evertune.serving.vllm_engine import VllmEngine, vllm_available
from tests.serving.fixtures import app_for, register, serving_workspace, to_prod


class FakeVllm:
    """Answers like `vllm serve --enable-lora` with runtime LoRA updating."""

    def __init__(self) -> None:
        self.adapters: dict[str, str] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        self.calls.append((path, body))
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base", "max_model_len": 256}]})
        if path == "/v1/load_lora_adapter":
            if body["lora_name"] in self.adapters:
                return httpx.Response(
                    400,
                    json={
                        "error": {
                            "message": f"The lora adapter "
                            f"'{body['lora_name']}' has already been loaded."
                        }
                    },
                )
            self.adapters[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text="Success")
        if path == "/v1/unload_lora_adapter":
            self.adapters.pop(body["lora_name"])
            return httpx.Response(200, text="Success")
        if path == "/v1/completions":
            model = body["model"]
            if model != "base" and model not in self.adapters:
                return httpx.Response(
                    404,
                    json={
                        "error": {
                            "message": f"model {model} not found",
                            "param": "model",
                            "code": None,
                        }
                    },
                )
            assert body["add_special_tokens"] is False and body["stream"] is True
            text = f"[{model}]"
            chunks = [
                {"choices": [{"index": 0, "text": text[:3], "finish_reason": None}]},
                {"choices": [{"index": 0, "text": text[3:], "finish_reason": "length"}]},
                {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
            ]
            sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
        return httpx.Response(404)


def fake_engine(base: Path, fake: FakeVllm) -> VllmEngine:
    return VllmEngine(
        base,
        model_name="assistant",
        launch=False,
        base_url="http://vllm",
        transport=httpx.MockTransport(fake),
    )


async def collect(engine: VllmEngine, key: str, req: GenRequest) -> tuple[list[str], Finished]:
    deltas, final = [], None
    async for event in engine.stream(key, req):
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        else:
            final = event
    assert final is not None
    return deltas, final


def test_versions_load_under_immutable_names(lively_model: Path, adapters: list[Path]) -> None:
    fake = FakeVllm()
    engine = fake_engine(lively_model, fake)
    engine.start()
    assert engine.max_context == 256 and engine.loaded() == {BASE_KEY}
    engine.load("v1", adapters[0])
    engine.load("v1", adapters[0])  # idempotent: no second load call
    assert fake.adapters == {"assistant-v1": str(adapters[0])}
    assert [p for p, _ in fake.calls].count("/v1/load_lora_adapter") == 1
    with pytest.raises(EngineError, match="immutable"):
        engine.load("v1", adapters[1])
    deltas, final = asyncio.run(collect(engine, "v1", GenRequest("hi", max_tokens=4, stream=True)))
    assert "".join(deltas) == final.text == "[assistant-v1]"
    assert (final.prompt_tokens, final.completion_tokens, final.finish_reason) == (7, 2, "length")
    sent = next(b for p, b in fake.calls if p == "/v1/completions")
    assert (sent["prompt"], sent["max_tokens"], sent["model"]) == ("hi", 4, "assistant-v1")
    engine.unload("v1")
    assert fake.adapters == {} and engine.loaded() == {BASE_KEY}
    with pytest.raises(EngineError, match="not loaded"):
        asyncio.run(collect(engine, "v1", GenRequest("hi", max_tokens=4)))
    with pytest.raises(EngineError, match="context length"):
        engine.prepare(GenRequest("hello " * 300, max_tokens=4))
    engine.stop()


def test_a_full_model_version_is_refused_with_the_fix(lively_model: Path) -> None:
    engine = fake_engine(lively_model, FakeVllm())
    engine.start()
    with pytest.raises(EngineError, match="LoRA versions only"):
        engine.load("v9", lively_model)  # a model folder, not an adapter


def test_the_command_line_enables_lora(lively_model: Path) -> None:
    engine = VllmEngine(lively_model, model_name="assistant", port=9100, max_lora_rank=12)
    cmd = engine.command()
    assert cmd[1:3] == ["serve", str(lively_model)]
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "16"
    assert cmd[cmd.index("--served-model-name") + 1] == "base"


def test_the_gateway_swaps_vllm_adapters_without_reusing_names(
    tmp_path: Path,
    lively_model: Path,
    adapters: list[Path],
    mlflow_template: Path,
) -> None:
    ws = serving_workspace(tmp_path / "ws", lively_model, mlflow_template, engine="vllm")
    reg = Registry(ws)
    versions = [register(ws, a, f"ftjob-v{i}") for i, a in enumerate(adapters)]
    to_prod(reg, versions[0])
    fake = FakeVllm()
    gateway = Gateway(ws, engine=fake_engine(lively_model, fake))
    gateway.start()
    try:
        client = TestClient(app_for(gateway))
        body = {
            "model": "assistant",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        }
        first = client.post("/v1/chat/completions", json=body).json()
        assert first["model"] == "assistant@v1"
        assert first["choices"][0]["message"]["content"] == "[assistant-v1]"
        for v in versions[1:]:
            to_prod(reg, v)
            gateway.sync()
            answer = client.post("/v1/chat/completions", json=body).json()
            assert answer["choices"][0]["message"]["content"] == f"[assistant-v{v}]"
        loads = [b["lora_name"] for p, b in fake.calls if p == "/v1/load_lora_adapter"]
        unloads = [b["lora_name"] for p, b in fake.calls if p == "/v1/unload_lora_adapter"]
        assert loads == ["assistant-v1", "assistant-v2", "assistant-v3"]  # each name once
        assert unloads == ["assistant-v1"]  # v2 stays as the one idle version kept
    finally:
        gateway.stop()


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (GPU machines only)")
def test_real_vllm(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vllm needs a CUDA GPU")
    from evertune.models import resolve_base_model
    from tests.serving.fixtures import make_adapter

    base = resolve_base_model("smollm2-135m-instruct", tmp_path / "models")
    adapter = make_adapter(base, tmp_path / "adapter", seed=1)
    engine = VllmEngine(
        base,
        model_name="assistant",
        log_path=tmp_path / "vllm.log",
        extra_args=["--gpu-memory-utilization", "0.3", "--max-model-len", "1024"],
    )
    engine.start()
    try:
        engine.load("v1", adapter)
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
        )
        for key in (BASE_KEY, "v1"):
            deltas, final = asyncio.run(
                collect(engine, key, GenRequest(prompt, max_tokens=8, temperature=0, stream=True))
            )
            assert final.completion_tokens >= 1 and "".join(deltas) == final.text
        engine.unload("v1")
    finally:
        engine.stop()
