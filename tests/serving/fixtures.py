"""Fixtures for serving and monitoring tests: a lively tiny model, LoRA versions, a gateway.

The tiny model from `evertune.testing` is freshly initialised, so its greedy answers are one
repeated token whatever the prompt; here its weights are re-drawn with a larger spread so
answers depend on the prompt and on the adapter, which is what the tests compare. Versions
are real PEFT LoRA adapters with non-zero random weights, registered in a real MLflow
registry (its schema migrated once per session and copied, as tests/test_registry.py does).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from evertune.registry import Registry
from evertune.workspace import Workspace
from tests.conftest import make_workspace

THREADS = 1
"""torch threads of test engines: on a shared 2-core CI machine, 2 OpenMP threads spin at
every op waiting for a descheduled sibling and decode several times slower than 1."""

FAST_SERVE = {"follow_seconds": 0.1, "batch_wait_ms": 20.0, "max_tokens_limit": 64}


@pytest.fixture(scope="session")
def lively_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from evertune.models import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("lively-model")
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2, generator=gen)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class SlowModel:
    """The model, `delay` seconds slower per forward pass: a long request is surely still
    decoding when the next ones arrive, however fast the machine."""

    def __init__(self, model: Any, delay: float = 0.02, adapter: str | None = None) -> None:
        self.model = model
        self.delay = delay
        self.adapter = adapter  # with PEFT adapters per row: slow only batches using this one

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **inputs: Any) -> Any:
        names = inputs.get("adapter_names")
        if self.adapter is None or names is None or self.adapter in names:
            time.sleep(self.delay)
        return self.model(**inputs)


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter of `base` with non-zero random weights (answers differ by seed)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from evertune.models import load_model

    torch.manual_seed(seed)
    model = get_peft_model(
        load_model(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(lively_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(lively_model, root / f"a{i}", seed=i) for i in (1, 2, 3)]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated MLflow SQLite DB: the schema costs ~3 s once instead of in every workspace."""
    ws, _ = Workspace.init(tmp_path_factory.mktemp("mlflow-template"))
    Registry(ws).client.search_experiments()
    return ws.state_dir / "mlflow.db"


def serving_workspace(root: Path, model: Path, template: Path, **serve: Any) -> Workspace:
    ws = make_workspace(root, model, serve={**FAST_SERVE, **serve})
    shutil.copy(template, ws.state_dir / "mlflow.db")
    return ws


def register(ws: Workspace, adapter: Path, job_id: str) -> int:
    job = SimpleNamespace(
        id=job_id,
        model=ws.config.model.base,
        training_file="ds-test",
        parent=None,
        hyperparameters={"n_epochs": 1},
        result={"path": str(adapter), "kind": "lora"},
        run_id=None,
        status="succeeded",
    )
    return Registry(ws).register_version(job, None, []).version


def to_prod(reg: Registry, version: int) -> None:
    """pending → approved → qa → prod, as deploy does."""
    for stage in ("approved", "qa", "prod"):
        reg.transition(version, stage, actor="test", reason="serving test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_server(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve `app` with uvicorn on loopback (`port`, else a free one) in a thread; yield its
    base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def app_for(gateway: Any) -> Any:
    from fastapi import FastAPI

    from evertune.monitoring import metrics_router

    app = FastAPI()
    app.include_router(gateway.router)
    app.include_router(metrics_router(gateway.metrics))
    return app


def new_gateway(ws: Workspace, stages: tuple[str, ...] = ("prod", "qa"), **kw: Any) -> Any:
    """A started-later `Gateway` whose transformers engine decodes on `THREADS` threads."""
    from evertune.serving import Gateway, make_engine

    engine = make_engine(ws, kw.get("metrics"))
    engine.threads = THREADS  # type: ignore[attr-defined]
    return Gateway(ws, stages, engine=engine, **kw)
