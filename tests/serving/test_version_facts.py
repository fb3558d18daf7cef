"""A version carries its own facts: editing model.base after v1 is in PROD changes new rounds
only; v1 keeps serving on the base it was trained on, and a base whose files changed is
refused rather than used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from evertune.errors import ModelError
from evertune.evaluation.evaluate import _base_of
from evertune.evaluation.report import ModelRef
from evertune.facts import RESULT_META, read_facts, training_facts
from evertune.registry import Registry
from evertune.workspace import Workspace
from tests.serving.fixtures import (
    app_for,
    new_gateway,
    register,
    run_server,
    serving_workspace,
    to_prod,
)

ASK = {"model": "assistant", "messages": [{"role": "user", "content": "Where is my parcel?"}],
       "max_tokens": 8, "temperature": 0}


def other_base(lively_model: Path, out: Path, seed: int) -> Path:
    """The same architecture and tokenizer as `lively_model`, other weights."""
    import torch

    from evertune.models import load_model

    shutil.copytree(lively_model, out)
    model = load_model(lively_model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2, generator=gen)
    model.save_pretrained(out)
    return out


def trained_on(adapter: Path, base: Path, out: Path) -> Path:
    """`adapter` as a training job leaves it: with the facts file naming its base."""
    from evertune.models import load_tokenizer

    shutil.copytree(adapter, out)
    facts = training_facts(
        base_model=str(base), base_path=base, kind="lora", method="supervised",
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["o_proj", "q_proj"]},
        tokenizer=load_tokenizer(base), max_seq_len=128, dtype="auto", dataset="ds-test",
    )
    meta = {"job_id": "ftjob-x", "kind": "lora", "base_model": str(base),
            "base_model_path": str(base), "facts": facts.to_dict()}
    (out / RESULT_META).write_text(json.dumps(meta), "utf-8")
    return out


def set_base(ws: Workspace, base: Path) -> Workspace:
    """Edit model.base in evertune.yaml, as a person would, and reopen the workspace."""
    path = ws.root / "evertune.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["model"]["base"] = str(base)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Workspace.open(ws.root)


def ask(ws: Workspace, model: str = "assistant") -> tuple[str, str]:
    gateway = new_gateway(ws)
    gateway.start()
    try:
        with run_server(app_for(gateway)) as url:
            resp = httpx.post(f"{url}/v1/chat/completions", json={**ASK, "model": model},
                              timeout=60)
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]["message"]["content"], resp.headers[
                "x-evertune-version"]
    finally:
        gateway.stop()


def answer_on(base: Path, adapter: Path | None) -> str:
    """What `adapter` answers when loaded onto `base` directly (no gateway)."""
    from evertune.generation import generate
    from evertune.models import load_for_inference, load_tokenizer

    tok = load_tokenizer(base)
    prompt = tok.apply_chat_template(ASK["messages"], add_generation_prompt=True, tokenize=False)
    model = load_for_inference(base, adapter)
    return generate(model, tok, [prompt], max_new_tokens=8)[0].text


@pytest.mark.slow
def test_v1_keeps_serving_on_its_base_after_model_base_changes(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    base_a = lively_model
    base_b = other_base(lively_model, tmp_path / "base-b", seed=7)
    ws = serving_workspace(tmp_path / "ws", base_a, mlflow_template)
    adapter = trained_on(adapters[0], base_a, tmp_path / "v1")
    v1 = register(ws, adapter, "ftjob-v1")
    to_prod(Registry(ws), v1)
    before, version = ask(ws)
    assert version == "v1"
    on_wrong_base = answer_on(base_b, adapter)
    assert on_wrong_base != before, "bases too alike for this test to show anything"

    ws = set_base(ws, base_b)
    after, version = ask(ws)
    assert version == "v1"
    assert after == before  # served on base A, as trained; the live config shapes new rounds
    base_now, _ = ask(ws, "assistant@base")  # the configured base is what @base serves
    assert base_now == answer_on(base_b, None)

    facts = Registry(ws).get_version(v1).facts
    assert facts["base_model"] == str(base_a) and facts["lora"]["r"] == 4
    # Evaluation loads a version on its own base too, not on the edited model.base.
    ref = ModelRef("v1", adapter=Registry(ws).version_artifact_path(v1), version="1")
    assert _base_of(ws, ref) == base_a.resolve()


@pytest.mark.slow
def test_a_base_with_other_files_under_the_same_name_is_refused(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    base = shutil.copytree(lively_model, tmp_path / "base")
    ws = serving_workspace(tmp_path / "ws", base, mlflow_template)
    adapter = trained_on(adapters[0], base, tmp_path / "v1")
    v1 = register(ws, adapter, "ftjob-v1")
    to_prod(Registry(ws), v1)
    other_base(lively_model, tmp_path / "b2", seed=9)
    shutil.copy(tmp_path / "b2" / "model.safetensors", base / "model.safetensors")

    gateway = new_gateway(ws)
    with pytest.raises(ModelError) as err:
        gateway.start()  # a server must not come up serving v1 on other weights
    gateway.stop()
    message = str(err.value)
    assert "v1 was trained on base model" in message and "other weights" in message
    assert read_facts(adapter).base_fingerprint is not None


def test_vllm_max_lora_rank_comes_from_the_versions(
    tmp_path: Path, lively_model: Path, adapters: list[Path], mlflow_template: Path
) -> None:
    from evertune.serving.gateway import _max_lora_rank

    ws = serving_workspace(tmp_path / "ws", lively_model, mlflow_template)
    register(ws, trained_on(adapters[0], lively_model, tmp_path / "v1"), "ftjob-v1")
    ws = Workspace.open(ws.root, overrides=["train.lora.r=2"])
    assert _max_lora_rank(ws, lively_model) == 4  # v1's rank, although the config says 2
