"""Multi-LoRA serving: every version an adapter on one base model in memory.

    .venv/bin/python -m pytest tests/serving/test_multi_lora.py -q

Real parts throughout: the tiny model, PEFT adapters with random weights registered in a real
MLflow registry, the gateway and its transformers engine (one decode thread), HTTP through
the ASGI app or uvicorn on loopback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from evertune.registry import Registry
from evertune.serving import Gateway
from tests.serving.fixtures import (
    SlowModel,
    app_for,
    make_adapter,
    new_gateway,
    register,
    run_server,
    serving_workspace,
    to_prod,
)

PROMPT = "The package has not arrived yet"


def body(model: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


async def ask_all(gateway: Gateway, models: list[str], max_tokens: int = 8) -> list[httpx.Response]:
    """One chat request per model, all at once, through the whole gateway (in-process)."""
    transport = httpx.ASGITransport(app=app_for(gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://asgi", timeout=60) as c:
        return list(
            await asyncio.gather(
                *(c.post("/v1/chat/completions", json=body(m, max_tokens)) for m in models)
            )
        )


def answers(gateway: Gateway, models: list[str], max_tokens: int = 8) -> list[str]:
    out = []
    for resp in asyncio.run(ask_all(gateway, models, max_tokens)):
        assert resp.status_code == 200, resp.text
        out.append(resp.json()["choices"][0]["message"]["content"])
    return out


def alone(gateway: Gateway, models: list[str], max_tokens: int = 8) -> dict[str, str]:
    """Each model's answer with nothing else in its batch."""
    return {m: answers(gateway, [m], max_tokens)[0] for m in models}


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def more_adapters(lively_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("more-adapters")
    return [make_adapter(lively_model, root / f"b{i}", seed=10 + i) for i in range(2)]


def test_versions_share_one_base_and_a_mixed_batch_answers_as_each_alone(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    ws = serving_workspace(
        tmp_path / "ws", lively_model, mlflow_template, merge_adapters=False, batch_wait_ms=300
    )
    versions = [register(ws, a, f"ftjob-m{i}") for i, a in enumerate(adapters)]
    gateway = new_gateway(ws)
    gateway.start()
    try:
        models = ["assistant@base"] + [f"assistant@v{v}" for v in versions]
        reference = alone(gateway, models)  # loads each version on its first request
        assert len(set(reference.values())) == len(models)  # every version answers its own
        engine = gateway.engine
        assert engine.adapters() == {f"v{v}" for v in versions}  # type: ignore[attr-defined]
        assert gateway.loaded_adapters() == len(versions)

        sizes: list[int] = []
        engine.on_batch = sizes.append  # type: ignore[attr-defined]
        mixed = models * 2  # two requests per version and the base, sent together
        assert answers(gateway, mixed) == [reference[m] for m in mixed]
        assert max(sizes) == len(mixed)  # one batch held all versions and the base

        text = asyncio.run(_get(gateway, "/metrics"))
        assert f"evertune_loaded_adapters {float(len(versions))}" in text
    finally:
        gateway.stop()


async def _get(gateway: Gateway, path: str) -> str:
    transport = httpx.ASGITransport(app=app_for(gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://asgi") as c:
        return (await c.get(path)).text


def test_least_recently_used_adapter_goes_beyond_max_adapters_and_stage_versions_stay(
    tmp_path: Path,
    lively_model: Path,
    adapters: list[Path],
    more_adapters: list[Path],
    mlflow_template: Path,
) -> None:
    ws = serving_workspace(
        tmp_path / "ws", lively_model, mlflow_template, merge_adapters=False, max_adapters=3
    )
    v1, v2, v3, v4 = (
        register(ws, a, f"ftjob-l{i}") for i, a in enumerate(adapters + more_adapters[:1])
    )
    to_prod(Registry(ws), v1)
    gateway = new_gateway(ws)
    gateway.start()
    engine = gateway.engine
    try:
        first = alone(gateway, [f"assistant@v{v2}", f"assistant@v{v3}"])
        answers(gateway, [f"assistant@v{v2}"])  # v2 is now more recent than v3
        assert engine.loaded() == {"base", f"v{v1}", f"v{v2}", f"v{v3}"}
        answers(gateway, [f"assistant@v{v4}"])  # a 4th adapter: the least recently used goes
        # v1 was used least recently of all, but PROD points at it: it stays.
        want = {"base", f"v{v1}", f"v{v2}", f"v{v4}"}
        wait_until(lambda: engine.loaded() == want, f"v{v3} to be unloaded")
        assert gateway.loaded_adapters() == 3
        # An evicted version is loaded again on its next request, and answers as before.
        assert answers(gateway, [f"assistant@v{v3}"]) == [first[f"assistant@v{v3}"]]
        want = {"base", f"v{v1}", f"v{v3}", f"v{v4}"}
        wait_until(lambda: engine.loaded() == want, f"v{v2} to be unloaded")
        assert answers(gateway, ["assistant"])  # PROD still serves
    finally:
        gateway.stop()


def test_concurrent_first_requests_load_an_adapter_once(
    tmp_path: Path,
    lively_model: Path,
    adapters: list[Path],
    mlflow_template: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ws = serving_workspace(tmp_path / "ws", lively_model, mlflow_template, merge_adapters=False)
    v1 = register(ws, adapters[0], "ftjob-c1")
    gateway = new_gateway(ws)
    gateway.start()
    try:
        with caplog.at_level(logging.INFO, logger="evertune.serving.transformers_engine"):
            got = answers(gateway, [f"assistant@v{v1}"] * 8)
        loads = [r for r in caplog.records if r.getMessage().startswith(f"loaded v{v1} ")]
        assert len(loads) == 1
        assert len(set(got)) == 1
        assert gateway.engine.loaded() == {"base", f"v{v1}"}
    finally:
        gateway.stop()


def other_architecture(lively_model: Path, out: Path) -> Path:
    """A Llama half as wide as the lively model, with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(lively_model)
    config.hidden_size, config.intermediate_size, config.head_dim = 32, 64, 8
    LlamaForCausalLM(config).save_pretrained(out)
    for f in lively_model.glob("*token*"):
        shutil.copy(f, out / f.name)
    return out


def other_weights(lively_model: Path, out: Path) -> Path:
    """The lively model's architecture and tokenizer with other weights."""
    import torch

    from evertune.models import load_model

    shutil.copytree(lively_model, out)
    model = load_model(lively_model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(7))
    model.save_pretrained(out)
    return out


def test_an_adapter_that_does_not_fit_the_base_is_refused_and_others_keep_serving(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    # Made for a narrower model whose folder is gone: only its weight shapes tell.
    narrow = other_architecture(lively_model, tmp_path / "narrow")
    misfit = make_adapter(narrow, tmp_path / "misfit", seed=5)
    shutil.rmtree(narrow)
    # Made for a model of the same shape with other weights (its folder is here).
    stranger = make_adapter(
        other_weights(lively_model, tmp_path / "other"), tmp_path / "stranger", seed=6
    )
    ws = serving_workspace(
        tmp_path / "ws", lively_model, mlflow_template, merge_adapters=False, batch_wait_ms=0
    )
    good = register(ws, adapters[0], "ftjob-i1")
    bad_shape = register(ws, misfit, "ftjob-i2")
    bad_base = register(ws, stranger, "ftjob-i3")
    gateway = new_gateway(ws)
    gateway.start()
    try:
        before = alone(gateway, [f"assistant@v{good}", "assistant@base"], max_tokens=24)
        shared = gateway.engine._shared  # type: ignore[attr-defined]
        shared.module = SlowModel(shared.module, 0.05)  # the stream is surely in flight
        with run_server(app_for(gateway)) as url:
            stream: dict[str, Any] = {}
            started = threading.Event()

            def long_request() -> None:
                with (
                    httpx.Client(base_url=url, timeout=60) as c,
                    c.stream(
                        "POST",
                        "/v1/chat/completions",
                        json=body(f"assistant@v{good}", 24, stream=True),
                    ) as resp,
                ):
                    lines = []
                    for line in resp.iter_lines():
                        started.set()
                        if line:
                            lines.append(line)
                stream["lines"] = lines

            t = threading.Thread(target=long_request)
            t.start()
            assert started.wait(30)
            with httpx.Client(base_url=url, timeout=60) as c:
                refused = {
                    v: c.post("/v1/chat/completions", json=body(f"assistant@v{v}"))
                    for v in (bad_shape, bad_base)
                }
            t.join(60)
        shared.module = shared.module.model
        for v, resp in refused.items():
            assert resp.status_code == 409, resp.text
            err = resp.json()["error"]
            assert err["code"] == "model_incompatible" and err["param"] == "model"
            assert f"assistant@v{v}" in err["message"] and "retrain" in err["message"]
        shape_msg = refused[bad_shape].json()["error"]["message"]
        assert "self_attn.o_proj" in shape_msg and "shape [4, 32]" in shape_msg
        base_msg = refused[bad_base].json()["error"]["message"]
        assert str(tmp_path / "other") in base_msg and "other weights" in base_msg
        # Nothing of them was loaded; the stream that was decoding finished untouched.
        assert gateway.engine.loaded() == {"base", f"v{good}"}
        deltas = [json.loads(ln[6:]) for ln in stream["lines"][:-1]]
        text = "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas)
        assert stream["lines"][-1] == "data: [DONE]" and text == before[f"assistant@v{good}"]
        assert alone(gateway, list(before), max_tokens=24) == before
    finally:
        gateway.stop()


def test_evicting_an_adapter_while_its_request_streams_does_not_fail_it(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    ws = serving_workspace(
        tmp_path / "ws",
        lively_model,
        mlflow_template,
        merge_adapters=False,
        max_adapters=1,
        batch_wait_ms=0,
        max_tokens_limit=64,
    )
    v1, v2 = (register(ws, a, f"ftjob-e{i}") for i, a in enumerate(adapters[:2]))
    gateway = new_gateway(ws)
    gateway.start()
    engine = gateway.engine
    try:
        expected = alone(gateway, [f"assistant@v{v1}"], max_tokens=40)[f"assistant@v{v1}"]
        shared = engine._shared  # type: ignore[attr-defined]
        shared.module = SlowModel(shared.module, 0.05, adapter=f"v{v1}")
        with run_server(app_for(gateway)) as url:
            stream: dict[str, Any] = {}
            started = threading.Event()

            def long_request() -> None:
                req = body(f"assistant@v{v1}", 40, stream=True)
                with (
                    httpx.Client(base_url=url, timeout=60) as c,
                    c.stream("POST", "/v1/chat/completions", json=req) as resp,
                ):
                    lines = []
                    for line in resp.iter_lines():
                        started.set()
                        if line:
                            lines.append(line)
                stream["lines"], stream["ended"] = lines, time.monotonic()

            t = threading.Thread(target=long_request)
            t.start()
            assert started.wait(30)
            with httpx.Client(base_url=url, timeout=60) as c:
                resp = c.post("/v1/chat/completions", json=body(f"assistant@v{v2}"))
            assert resp.status_code == 200, resp.text
            # v2 took v1's place (max_adapters: 1); v1 is still decoding its stream.
            assert gateway.loaded_adapters() == 1
            assert f"v{v1}" in engine._models and "lines" not in stream  # type: ignore[attr-defined]
            t.join(60)
        shared.module = shared.module.model
        deltas = [json.loads(ln[6:]) for ln in stream["lines"][:-1]]
        assert stream["lines"][-1] == "data: [DONE]"
        assert not any("error" in d for d in deltas)
        assert deltas[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas) == expected
        wait_until(lambda: engine.loaded() == {"base", f"v{v2}"}, f"v{v1} to be unloaded")
        assert f"v{v1}" not in shared.module.peft_config  # its layers went with it
    finally:
        gateway.stop()


def test_prod_is_served_merged_and_every_other_version_as_an_adapter(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    ws = serving_workspace(tmp_path / "ws", lively_model, mlflow_template, merge_adapters="prod")
    reg = Registry(ws)
    v1, v2, v3 = (register(ws, a, f"ftjob-p{i}") for i, a in enumerate(adapters))
    to_prod(reg, v1)
    gateway = new_gateway(ws)
    gateway.start()
    engine = gateway.engine
    try:
        got = alone(gateway, ["assistant", f"assistant@v{v2}", f"assistant@v{v3}"])
        assert engine.loaded() == {"base", f"v{v1}:merged", f"v{v2}", f"v{v3}"}
        assert engine.adapters() == {f"v{v2}", f"v{v3}"}  # type: ignore[attr-defined]
        # Promote v2: it gets its merged copy, its adapter goes; answers do not change.
        to_prod(reg, v2)
        wait_until(lambda: gateway.stage_versions()["prod"] == f"v{v2}", "prod to move")
        wait_until(lambda: f"v{v2}" not in engine.loaded(), f"v{v2}'s adapter to go")
        assert f"v{v2}:merged" in engine.loaded()
        assert answers(gateway, ["assistant"]) == [got[f"assistant@v{v2}"]]
        assert answers(gateway, [f"assistant@v{v3}"]) == [got[f"assistant@v{v3}"]]
    finally:
        gateway.stop()
