"""The recipes beside SFT on the tiny model: continued pretraining, DPO, KTO, and chains.

pytest tests/training/test_methods.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from evertune.data.templating import IGNORE_INDEX, Example, to_preference, tokenize_example
from evertune.facts import read_facts
from evertune.models import load_model, load_tokenizer
from evertune.training import create_job, get_job, harness, list_events, list_metrics
from evertune.training.dpo import REFERENCE_FILE, DpoRecipe, collate_pairs, dpo_losses, run_dpo
from evertune.training.dpo import Pair as DpoPair
from evertune.training.harness import collate, loss_sum, token_logps
from evertune.training.kto import kto_losses, run_kto
from evertune.training.pretrain import collate_blocks, pack, run_pretrain
from evertune.training.sft import run_sft
from evertune.workspace import Workspace

from .conftest import WORDS

# -- data ---------------------------------------------------------------------------------------


def _add(ws: Workspace, name: str, rows: list[dict]):
    from evertune.data.store import add_files

    path = ws.root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    (version,) = add_files(ws, [path]).versions
    return version


def text_rows(n: int, seed: int = 0) -> list[dict]:
    """Documents of a small 'domain' language: numbered sentences built from a fixed phrase."""
    rng = random.Random(seed)
    return [
        {"text": f"doc {i}. " + " ".join(
            "the ledger entry for account " + rng.choice(["north", "south", "east", "west"])
            + " is settled" for _ in range(rng.randint(1, 6)))}
        for i in range(n)
    ]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs preferring a fixed-format answer over a shorter, free one (the base, which
    gives short answers more probability, starts out preferring the rejected one)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        team = rng.choice(["billing", "shipping", "returns"])
        rows.append({
            "prompt": f"{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 12))),
            "chosen": f"team: {team}. priority: normal. reply: today",
            "rejected": " ".join(rng.choices(WORDS, k=rng.randint(1, 2))),
        })
    return rows


def run(ws: Workspace, job_id: str, recipe):
    from evertune.training.jobs import transition

    transition(ws, job_id, "running", message="Started in-process (test)")
    threads = torch.get_num_threads()
    try:
        return recipe(ws, job_id)
    finally:
        torch.set_num_threads(threads)


# -- continued pretraining --------------------------------------------------------------------


def test_packing_fills_blocks_and_restarts_positions_per_document():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    blocks = pack(docs, 4)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [b.position_ids for b in blocks] == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1]]
    # a document's first token (and a continuation's) is never a target
    assert blocks[0].labels == [IGNORE_INDEX, 2, 3, IGNORE_INDEX]
    assert blocks[1].labels == [IGNORE_INDEX, 6, 7, 8]
    batch = collate_blocks(blocks, pad_id=0)
    assert "attention_mask" not in batch and batch["n_tokens"] == 10
    assert batch["labels"][2].tolist() == [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]


def test_a_packed_block_scores_each_document_as_if_it_were_alone(tiny_model):
    """Attention does not cross a document boundary: the loss of two documents packed into one
    row equals the sum of their losses computed one per row."""
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32").eval()
    a, b = tok("the ledger entry is settled")["input_ids"], tok("ship it east today")["input_ids"]
    packed = collate_blocks(pack([a, b], len(a) + len(b)), tok.pad_token_id)
    with torch.no_grad():
        together, n_together = loss_sum(model, packed)
        alone = [loss_sum(model, collate_blocks(pack([d], len(d)), tok.pad_token_id))
                 for d in (a, b)]
    assert n_together == sum(n for _, n in alone) == len(a) + len(b) - 2
    assert torch.allclose(together, sum(s for s, _ in alone), rtol=1e-4)


def test_pretrain_job_trains_on_packed_text_without_padding(workspace):
    ws = Workspace.open(workspace.root, [*workspace.overrides, "train.n_epochs=2",
                                         "train.pretrain.block_size=64"])
    dataset = _add(ws, "corpus.jsonl", text_rows(60))
    assert dataset.kind == "pretrain"
    job = create_job(ws, dataset)  # train.method auto: text → pretrain
    assert job.method == "pretrain" and job.hyperparameters["block_size"] == 64
    result = run(ws, job.id, run_pretrain)
    done = get_job(ws, job.id)
    assert done.status == "succeeded", done.error
    rows = [m for m in list_metrics(ws, job.id) if "train_loss" in m]
    # full blocks, no padding: only the batch holding the last (short) block pads at all
    assert sum(m["padding_fraction"] > 0 for m in rows) <= 2
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert result.padding_fraction < 0.05
    facts = read_facts(Path(done.result["path"]))
    assert facts.method == "pretrain" and [s["method"] for s in facts.stages] == ["pretrain"]


def test_pretrain_unpacked_pads_the_same_documents(workspace):
    ws = Workspace.open(workspace.root, [*workspace.overrides, "train.pretrain.packing=false",
                                         "train.pretrain.block_size=64", "train.batching=padded"])
    job = create_job(ws, _add(ws, "corpus.jsonl", text_rows(60)))
    result = run(ws, job.id, run_pretrain)
    assert get_job(ws, job.id).status == "succeeded"
    assert result.padding_fraction > 0.2  # mixed lengths padded to each batch's longest


# -- DPO ----------------------------------------------------------------------------------------


def test_dpo_losses_follow_the_papers():
    c, r = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    logits = (c - r) - (rc - rr)  # [2, -1]
    sig, reward_c, reward_r = dpo_losses(c, r, rc, rr, beta=0.5)
    assert torch.allclose(sig, -torch.nn.functional.logsigmoid(0.5 * logits))
    assert torch.allclose(reward_c, 0.5 * (c - rc)) and torch.allclose(reward_r, 0.5 * (r - rr))
    ipo, _, _ = dpo_losses(c, r, rc, rr, beta=0.5, loss_type="ipo")
    assert torch.allclose(ipo, (logits - 1.0) ** 2)
    n_c, n_r = torch.tensor([10.0, 2.0]), torch.tensor([20.0, 4.0])  # TRL: per-token means
    per_token, _, _ = dpo_losses(c, r, rc, rr, beta=0.5, loss_type="ipo", lengths=(n_c, n_r))
    want = ((c - rc) / n_c - (r - rr) / n_r - 1.0) ** 2
    assert torch.allclose(per_token, want)
    hinge, _, _ = dpo_losses(c, r, rc, rr, beta=0.5, loss_type="hinge")
    assert torch.allclose(hinge, torch.tensor([0.0, 1.5]))
    smoothed, _, _ = dpo_losses(c, r, rc, rr, beta=0.5, label_smoothing=0.1)
    flipped = -torch.nn.functional.logsigmoid(-0.5 * logits)
    assert torch.allclose(smoothed, 0.9 * sig + 0.1 * flipped)


def test_rpo_adds_the_chosen_answers_per_token_nll(tiny_model):
    """train.dpo.rpo_alpha: the DPO loss plus alpha x the chosen answer's mean token NLL."""
    tokenizer = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32")
    rows = preference_rows(3)
    prefs = [to_preference(r, tokenizer) for r in rows]
    pairs = [DpoPair(tokenize_example(Example(p.prompt, p.chosen), tokenizer, 128, True),
                     tokenize_example(Example(p.prompt, p.rejected), tokenizer, 128, True))
             for p in prefs]
    for p in pairs:
        p.ref = (-5.0, -5.0)
    batch = collate_pairs(pairs, int(tokenizer.pad_token_id))
    recipe = DpoRecipe()
    recipe.beta, recipe.loss_type, recipe.smoothing = 0.1, "sigmoid", 0.0
    with torch.no_grad():
        recipe.rpo_alpha = 0.0
        plain = recipe.loss(model, batch)
        recipe.rpo_alpha = 2.0
        rpo = recipe.loss(model, batch)
        logps = token_logps(model, batch)[:3]
    counts = (batch["labels"][:3, 1:] != IGNORE_INDEX).sum(-1)
    nll = float((-logps / counts).mean())
    assert nll > 0 and abs(float(rpo.loss) - float(plain.loss) - 2.0 * nll) < 1e-4


def _margins(model_path: Path, adapter: Path | None, rows: list[dict]) -> list[float]:
    """logp(chosen) − logp(rejected) of each row under the base (+ adapter)."""
    from peft import PeftModel

    tok = load_tokenizer(model_path)
    model = load_model(model_path, "float32")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    with torch.no_grad():
        for row in rows:
            p = to_preference(row, tok)
            ex = [tokenize_example(Example(p.prompt, a), tok, 128, True)
                  for a in (p.chosen, p.rejected)]
            lp = token_logps(model, collate(ex, tok.pad_token_id))
            out.append(float(lp[0] - lp[1]))
    return out


def test_dpo_raises_the_chosen_over_the_rejected_answer(workspace, tiny_model):
    ws = Workspace.open(workspace.root, [*workspace.overrides, "train.n_epochs=3",
                                         "train.dpo.beta=0.5"])
    rows = preference_rows(48)
    dataset = _add(ws, "pairs.jsonl", rows)
    job = create_job(ws, dataset)
    assert job.method == "dpo" and job.hyperparameters["beta"] == 0.5
    run(ws, job.id, run_dpo)
    done = get_job(ws, job.id)
    assert done.status == "succeeded", done.error
    assert (Path(done.result["path"]).parent / REFERENCE_FILE).is_file()
    held_out = preference_rows(16, seed=7)
    before = _margins(tiny_model, None, held_out)
    after = _margins(tiny_model, Path(done.result["path"]), held_out)
    won = sum(a > b for a, b in zip(after, before, strict=True))
    assert won >= 14, (before, after)  # the preferred format generalises to new prompts
    # the reward margin saturates the sigmoid loss near beta x gain = 5: the gain is real
    gain = sum(a - b for a, b in zip(after, before, strict=True)) / len(after)
    assert gain > 2.0, gain
    metrics = [m for m in list_metrics(ws, job.id) if "reward_accuracy" in m]
    assert metrics[-1]["reward_accuracy"] > 0.9 and metrics[-1]["reward_margin"] > 0
    assert any("val_reward_accuracy" in m for m in list_metrics(ws, job.id))
    assert read_facts(Path(done.result["path"])).method == "dpo"


def test_dpo_reference_is_the_starting_weights_and_survives_a_resume(workspace, monkeypatch):
    """A DPO job stopped mid-run and resumed reads its cached reference log-probs (the
    checkpoint's weights have moved) and ends with the same adapter as a straight run."""
    ws = Workspace.open(workspace.root, [*workspace.overrides, "train.n_epochs=2",
                                         "train.checkpoint_every=3"])
    dataset = _add(ws, "pairs.jsonl", preference_rows(24))
    straight = create_job(ws, dataset)
    run(ws, straight.id, run_dpo)

    job = create_job(ws, dataset)
    calls = {"n": 0}

    def stop_after_4(ws_, job_id):
        calls["n"] += 1
        return "cancelled" if calls["n"] == 5 else None

    monkeypatch.setattr(harness, "stop_requested", stop_after_4)
    computed: list[int] = []
    real = DpoRecipe.prepare

    def counting(self, setup, model, units, resumed):
        computed.append(int((setup.folder / REFERENCE_FILE).is_file()))
        return real(self, setup, model, units, resumed)

    monkeypatch.setattr(DpoRecipe, "prepare", counting)
    first = run(ws, job.id, run_dpo)
    assert get_job(ws, job.id).status == "cancelled" and first.step == 4
    monkeypatch.setattr(harness, "stop_requested", lambda ws_, job_id: None)
    from evertune.training.jobs import transition

    transition(ws, job.id, "queued")
    second = run(ws, job.id, run_dpo)
    assert second.resumed_from == 4 and computed == [0, 1]  # the resume read the cache
    from safetensors.torch import load_file

    a = load_file(Path(get_job(ws, job.id).result["path"]) / "adapter_model.safetensors")
    b = load_file(Path(get_job(ws, straight.id).result["path"]) / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("method", ["supervised", "dpo"])
def test_micro_batches_give_the_same_update_as_whole_batches(workspace, sft_dataset, method):
    """Gradient accumulation is exact: passes of one unit train the same adapter as one pass
    over the batch (token-weighted for supervised, pair-weighted for DPO), and DPO's auto
    setting halves the batch so a pass holds batch_size sequences."""
    dataset = sft_dataset if method == "supervised" else _add(workspace, "p.jsonl",
                                                               preference_rows(24))
    adapters = []
    for micro in (0, 1):
        ws = Workspace.open(workspace.root, [*workspace.overrides, "train.n_epochs=1",
                                             "train.batch_size=4", "train.lora.dropout=0",
                                             f"train.micro_batch_size={micro}"])
        job = create_job(ws, dataset)
        run(ws, job.id, run_dpo if method == "dpo" else run_sft)
        done = get_job(ws, job.id)
        assert done.status == "succeeded", done.error
        started = next(e.message for e in list_events(ws, job.id) if "trainable" in e.message)
        passes = {0: ", " if method == "supervised" else " in passes of 2", 1: " in passes of 1"}
        assert f"batch 4{passes[micro]}" in started, started
        adapters.append(_adapter(done))
    a, b = adapters
    # Float sums in another order drift by ~1e-4 through Adam's steps; weighting each pass
    # as a mean (the classic accumulation bug) moves weights by ~1e-1.
    assert all(torch.allclose(a[k], b[k], atol=5e-4) for k in a)
    assert any(not torch.allclose(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)


def _adapter(job) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(job.result["path"]) / "adapter_model.safetensors")


# -- KTO ----------------------------------------------------------------------------------------


def test_kto_losses_push_desirable_up_and_undesirable_down():
    logps = torch.tensor([-1.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0])
    losses, rewards, z0 = kto_losses(logps, ref, torch.tensor([-5.0]), torch.tensor([-4.0]),
                                     torch.tensor([True, False]), beta=0.1)
    assert float(z0) == 0.0  # KL estimate clamped at 0
    losses.sum().backward()
    assert logps.grad[0] < 0 < logps.grad[1]  # descent raises the good, lowers the bad


def test_kto_learns_from_ratings_alone(workspace, tiny_model):
    from evertune.training.kto import Rated  # noqa: F401  (the unit the recipe trains on)

    ws = Workspace.open(workspace.root, [*workspace.overrides, "train.n_epochs=3",
                                         "train.kto.beta=0.5"])
    rows = []
    for r in preference_rows(40):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"] + " again", "completion": r["rejected"],
                     "label": False})
    dataset = _add(ws, "ratings.jsonl", rows)
    if dataset.kind != "kto":
        pytest.skip("rated rows are not a dataset kind of their own in this build")
    job = create_job(ws, dataset)
    assert job.method == "kto"
    run(ws, job.id, run_kto)
    done = get_job(ws, job.id)
    assert done.status == "succeeded", done.error
    last_epoch = [m for m in list_metrics(ws, job.id) if "reward_desirable" in m][-10:]
    assert sum(m["reward_desirable"] for m in last_epoch) > 0
    assert sum(m["reward_undesirable"] for m in last_epoch) < 0
    held_out = preference_rows(16, seed=9)
    after = _margins(tiny_model, Path(done.result["path"]), held_out)
    before = _margins(tiny_model, None, held_out)
    assert sum(a > b for a, b in zip(after, before, strict=True)) >= 13


# -- chains -------------------------------------------------------------------------------------


def test_a_stage_continues_from_the_previous_stage_and_lists_the_lineage(workspace):
    """supervised → dpo: the DPO job starts from the SFT job's adapter (its reference is that
    adapter, not the base) and its facts list both stages."""
    from .conftest import add_sft_dataset

    sft_data = add_sft_dataset(workspace, n=32)
    first = create_job(workspace, sft_data)
    run(workspace, first.id, run_sft)
    pairs = _add(workspace, "pairs.jsonl", preference_rows(16))
    second = create_job(workspace, pairs, parent=first.id)
    assert second.parent == first.id and second.method == "dpo"
    run(workspace, second.id, run_dpo)
    done = get_job(workspace, second.id)
    assert done.status == "succeeded", done.error
    facts = read_facts(Path(done.result["path"]))
    assert [(s["method"], s["dataset"], s["job"]) for s in facts.stages] == [
        ("supervised", sft_data.id, first.id), ("dpo", pairs.id, second.id)]
    events = " ".join(e.message for e in list_events(workspace, second.id))
    assert "reference model's log-probs" in events


def test_a_stage_cannot_continue_from_an_unfinished_job(workspace, sft_dataset):
    from evertune.errors import JobError

    queued = create_job(workspace, sft_dataset)
    with pytest.raises(JobError, match="only continue from a succeeded"):
        create_job(workspace, sft_dataset, parent=queued.id)
