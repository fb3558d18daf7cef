"""The SFT recipe in this process on the tiny model: masking, LoRA, full weights, resume, parent.

pytest tests/training/test_sft.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evertune.data.templating import IGNORE_INDEX, to_example, tokenize_example
from evertune.facts import fingerprint, read_facts
from evertune.models import load_model, load_tokenizer
from evertune.training import (
    create_job,
    get_job,
    harness,
    jobs,
    list_checkpoints,
    list_events,
    list_metrics,
)
from evertune.training.sft import collate, loss_sum, lr_at, plan_batches
from evertune.workspace import Workspace


def capture_model(monkeypatch) -> list:
    """Keep a reference to the model the recipe builds (to inspect it after training)."""
    built: list = []
    real = harness.build_model

    def build(*args, **kwargs):
        model, kind = real(*args, **kwargs)
        built.append(model)
        return model, kind

    monkeypatch.setattr(harness, "build_model", build)
    return built


def test_prompt_is_masked_and_padding_is_not_learned(tiny_model):
    tok = load_tokenizer(tiny_model)
    examples = [
        tokenize_example(to_example({"input": q, "output": a}, tok), tok, 128, False)
        for q, a in [
            ("billing or shipping?", "billing"),
            ("my card was charged twice", "refund the order"),
        ]
    ]
    batch = collate(examples, tok.pad_token_id)
    for row, ex in enumerate(examples):
        n_prompt = ex.labels.count(IGNORE_INDEX)
        assert n_prompt > 0 and all(
            label == IGNORE_INDEX for label in batch["labels"][row, :n_prompt]
        )
        assert batch["labels"][row, len(ex.input_ids) - 1] == tok.eos_token_id  # EOS is learned
        assert (batch["labels"][row, len(ex.input_ids) :] == IGNORE_INDEX).all()  # padding is not
        assert (batch["attention_mask"][row, len(ex.input_ids) :] == 0).all()
    assert batch["attention_mask"].sum() == sum(len(e.input_ids) for e in examples)

    model = load_model(tiny_model)
    with torch.no_grad():
        total, n = loss_sum(model, batch)
        # Equal to the model's own loss, and padding contributes nothing: the padded batch
        # gives the same summed loss as each example alone.
        assert torch.allclose(total / n, model(**batch).loss, atol=1e-5)
        alone = [loss_sum(model, collate([e], tok.pad_token_id)) for e in examples]
    assert n == sum(k for _, k in alone)
    assert torch.allclose(total, sum(s for s, _ in alone), rtol=1e-5)


def test_batch_plans_cover_every_example_and_group_by_length():
    lengths = [(i * 37) % 200 + 5 for i in range(50)]
    for mode in ("padded", "group_by_length"):
        plan = plan_batches(lengths, 4, mode, seed=0, epoch=0)
        assert sorted(i for b in plan for i in b) == list(range(50))
        assert plan == plan_batches(lengths, 4, mode, seed=0, epoch=0)  # deterministic
        assert plan != plan_batches(lengths, 4, mode, seed=0, epoch=1)  # reshuffled per epoch

    def padding(plan):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plan)

    grouped = plan_batches(lengths, 4, "group_by_length", 0, 0)
    assert padding(grouped) < padding(plan_batches(lengths, 4, "padded", 0, 0)) / 3
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # an OOM shows at step 1


def test_lr_schedule():
    assert lr_at(0, 100, 4, 1.0) == pytest.approx(0.2)  # warmup never starts at 0
    assert lr_at(3, 100, 4, 1.0) == pytest.approx(0.8)
    assert lr_at(4, 100, 4, 1.0) == pytest.approx(1.0)
    assert lr_at(52, 100, 4, 1.0) == pytest.approx(0.5)
    assert lr_at(99, 100, 4, 1.0) == pytest.approx(1 / 96)
    assert lr_at(52, 100, 4, 1.0, "cosine") == pytest.approx(0.5)


def test_lora_changes_the_adapter_and_leaves_base_weights_bit_identical(
    workspace, sft_dataset, run_inline, tiny_model, monkeypatch
):
    built = capture_model(monkeypatch)
    job = create_job(workspace, sft_dataset)
    result = run_inline(workspace, job.id)
    job = get_job(workspace, job.id)
    assert job.status == "succeeded", job.error
    steps = -(-len(sft_dataset.records("train")) // 4)
    assert result.steps == steps and job.trained_tokens == result.trained_tokens > 0

    (model,) = built
    base = load_model(tiny_model).state_dict()
    trained = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }
    assert trained.keys() == base.keys()
    assert all(torch.equal(trained[k], base[k]) for k in base), "a base weight changed"
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # PEFT initialises B to zero

    out = Path(job.result["path"])
    assert job.result["kind"] == "lora" and (out / "adapter_config.json").is_file()
    meta = json.loads((out / "evertune_job.json").read_text())
    assert meta["job_id"] == job.id and meta["dataset"] == sft_dataset.id
    assert meta["base_model"] == str(tiny_model) and meta["hyperparameters"]["lora_r"] == 16
    # The version's own facts: what serving and evaluation load it with, whatever the config
    # says later (evertune.facts).
    facts = read_facts(out)
    assert facts.base_fingerprint == fingerprint(tiny_model) and facts.kind == "lora"
    assert facts.lora["r"] == 16 and facts.max_seq_len == 128 and facts.chat_template_sha256

    rows = list_metrics(workspace, job.id)
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))  # log_every = 1
    assert all(r["total_steps"] == steps and r["tokens_per_s"] > 0 for r in train_rows)
    val = [r for r in rows if "val_loss" in r]
    assert len(val) == 1 and val[0]["val_perplexity"] == pytest.approx(
        2.718281828 ** val[0]["val_loss"]
    )
    # checkpoint_every = 2, keep_checkpoints = 2: the two newest before the end remain
    kept = [c.step_number for c in list_checkpoints(workspace, job.id)]
    last_even = (steps - 1) // 2 * 2
    assert kept == [last_even, last_even - 2]
    assert sorted(
        p.name for p in (jobs.job_dir(workspace, job.id) / "checkpoints").iterdir()
    ) == sorted(f"step-{s}" for s in kept)


def test_a_parent_on_other_weights_under_the_same_base_name_is_refused(
    workspace, sft_dataset, run_inline, tiny_model, monkeypatch
):
    # The parent's facts name this very base spec, but a fingerprint of other files: the
    # folder was overwritten since, so continuing from it would train on the wrong weights.
    parent_dir = workspace.root / "parent"
    parent_dir.mkdir()
    (parent_dir / "adapter_config.json").write_text("{}")
    facts = {"base_model": str(tiny_model), "base_fingerprint": "0" * 64}
    (parent_dir / "evertune_job.json").write_text(json.dumps({"facts": facts}))
    from evertune import registry

    monkeypatch.setattr(registry.Registry, "version_artifact_path", lambda self, v: parent_dir)
    job = create_job(workspace, sft_dataset, parent="1")
    run_inline(workspace, job.id)
    job = get_job(workspace, job.id)
    assert job.status == "failed" and "other weights" in job.error["message"]


def test_full_finetune_writes_a_loadable_model(workspace, sft_dataset, run_inline):
    ws = Workspace.open(
        workspace.root,
        [*workspace.overrides, "train.full_finetune=true", "train.learning_rate=0.001"],
    )
    job = create_job(ws, sft_dataset)
    run_inline(ws, job.id)
    job = get_job(ws, job.id)
    assert job.status == "succeeded" and job.result["kind"] == "full"
    from evertune.models import load_for_inference

    model = load_for_inference(Path(job.config["model"]["base"]), Path(job.result["path"]))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_cancel_then_resume_continues_at_the_exact_step(
    workspace, run_inline, make_sft_dataset, monkeypatch
):
    """A job stopped mid-epoch 2 and resumed ends with the same weights as one never stopped."""
    ws = Workspace.open(
        workspace.root, [*workspace.overrides, "train.n_epochs=2", "train.checkpoint_every=5"]
    )
    dataset = make_sft_dataset(ws, n=40)
    straight = create_job(ws, dataset)
    run_inline(ws, straight.id)

    job = create_job(ws, dataset)
    calls = {"n": 0}

    def cancel_at_step_13(ws_, job_id):
        calls["n"] += 1
        return "cancelled" if calls["n"] == 14 else None  # checked before each step

    monkeypatch.setattr(harness, "stop_requested", cancel_at_step_13)
    first = run_inline(ws, job.id)
    assert get_job(ws, job.id).status == "cancelled" and first.step == 13
    # the cancel saved a checkpoint at 13, so nothing learned is lost
    assert list_checkpoints(ws, job.id)[0].step_number == 13
    monkeypatch.setattr(harness, "stop_requested", lambda ws_, job_id: None)

    jobs.transition(ws, job.id, "queued")
    second = run_inline(ws, job.id)
    done, ref = get_job(ws, job.id), get_job(ws, straight.id)
    assert done.status == "succeeded" and second.resumed_from == 13
    total = 2 * -(-dataset.counts["train"] // 4)
    assert first.steps == 13 and second.steps == total - 13 and second.step == total
    assert done.trained_tokens == ref.trained_tokens
    from safetensors.torch import load_file

    a = load_file(Path(done.result["path"]) / "adapter_model.safetensors")
    b = load_file(Path(ref.result["path"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert "Resumed from checkpoint step 13" in " ".join(e.message for e in list_events(ws, job.id))


def test_parent_continues_from_the_parent_adapter(
    workspace, sft_dataset, run_inline, tiny_model, monkeypatch
):
    from peft import LoraConfig, get_peft_model

    # A parent adapter with a rank the config does not use and non-zero B weights, so it is
    # unmistakably not a fresh adapter.
    torch.manual_seed(1)
    parent = get_peft_model(
        load_model(tiny_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in parent.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    parent_dir = workspace.root / "parent-adapter"
    parent.save_pretrained(parent_dir)
    (parent_dir / "evertune_job.json").write_text(json.dumps({"base_model": str(tiny_model)}))
    expected = {k: v.clone() for k, v in parent.state_dict().items() if "lora_" in k}

    from evertune import registry

    asked = []
    monkeypatch.setattr(
        registry.Registry, "version_artifact_path", lambda self, v: asked.append(v) or parent_dir
    )
    built = capture_model(monkeypatch)
    start_weights: dict = {}
    real_optimizer = torch.optim.AdamW

    def snapshot_then_adamw(params, **kw):  # runs after the model is built, before step 1
        start_weights.update(
            {k: v.detach().clone() for k, v in built[0].state_dict().items() if "lora_" in k}
        )
        return real_optimizer(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", snapshot_then_adamw)

    job = create_job(workspace, sft_dataset, parent="3")
    run_inline(workspace, job.id)
    job = get_job(workspace, job.id)
    assert asked == ["3"] and job.status == "succeeded", job.error
    assert start_weights.keys() == expected.keys()
    assert all(torch.equal(start_weights[k], expected[k]) for k in expected)
    cfg = json.loads((Path(job.result["path"]) / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_parent_trained_on_another_base_is_refused(workspace, sft_dataset, run_inline, monkeypatch):
    parent_dir = workspace.root / "other"
    parent_dir.mkdir()
    (parent_dir / "adapter_config.json").write_text("{}")
    (parent_dir / "evertune_job.json").write_text(json.dumps({"base_model": "someone/else"}))
    from evertune import registry

    monkeypatch.setattr(registry.Registry, "version_artifact_path", lambda self, v: parent_dir)
    job = create_job(workspace, sft_dataset, parent="1")
    run_inline(workspace, job.id)
    job = get_job(workspace, job.id)
    assert job.status == "failed" and job.error["code"] == "bad_model"
    assert "someone/else" in job.error["message"] and "model.base" in job.error["message"]


def test_no_example_fits_fails_with_bad_dataset(workspace, sft_dataset, run_inline):
    ws = Workspace.open(workspace.root, [*workspace.overrides, "data.max_seq_len=16"])
    job = create_job(ws, sft_dataset)
    run_inline(ws, job.id)
    job = get_job(ws, job.id)
    assert job.status == "failed" and job.error["code"] == "bad_dataset"
    assert "data.max_seq_len=16" in job.error["message"]
