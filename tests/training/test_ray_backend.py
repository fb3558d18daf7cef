"""`train.backend: ray` on a real Ray cluster: two workers train as one process does, a worker
killed with -9 is replaced and the job resumes, cancel stops the workers within a step, and a
cluster that cannot run the job is a clear error at start.

    pytest tests/training/test_ray_backend.py   # ~4.5 min on 2 shared CPU cores (load 3-5)

Most of that is Ray starting worker groups (controller, 2 workers importing torch and
transformers: ~45 s each on that machine; the kill test starts two); the training is seconds.

The module's cluster is `tests/ray_cluster.py`'s `ray_head()`: `ray start --head` on loopback
with 2 CPUs, its own temp dir and ports; jobs connect to it by address, as they would to a
production cluster.

As in test_process.py, EVERTUNE_TEST_STEP_DELAY_S slows each step so a test can act mid-run;
the driver passes EVERTUNE_* variables on to the workers (ray_run.PROPAGATE).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from evertune.errors import JobError
from evertune.facts import RESULT_META
from evertune.training import (
    cancel_job,
    create_job,
    get_job,
    list_checkpoints,
    list_events,
    list_metrics,
    start_job,
    wait_job,
)
from evertune.training.harness import Ranks, Recipe, StepLoss, forward_backward
from evertune.training.jobs import job_dir, newest_checkpoint, process_alive
from evertune.workspace import Workspace
from tests.postgres import free_port
from tests.ray_cluster import ray_head

pytest.importorskip("ray", reason="needs Ray: pip install -e '.[dev]' (or '.[ray]')")

pytestmark = pytest.mark.slow  # a Ray cluster and real training processes

DELAY = "EVERTUNE_TEST_STEP_DELAY_S"
# Dropout off: with it on, each rank draws its own masks and the runs differ by that noise.
SAME = ["train.lora.dropout=0"]


def wait_for(predicate, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def ray_cluster():
    """The address of a 2-CPU Ray head on loopback, for this module's tests."""
    with ray_head() as address:
        yield address


def on_ray(workspace: Workspace, address: str, *settings: str) -> Workspace:
    return Workspace.open(workspace.root, [
        *workspace.overrides, "train.backend=ray", f"train.ray.address={address}",
        "train.ray.num_workers=2", *settings,
    ])


def train_rows(ws: Workspace, job_id: str) -> list[dict]:
    return [r for r in list_metrics(ws, job_id) if "train_loss" in r]


def last_step(ws: Workspace, job_id: str) -> int:
    return max((r["step"] for r in train_rows(ws, job_id)), default=0)


def worker(ws: Workspace, job_id: str, rank: int) -> dict:
    return json.loads((job_dir(ws, job_id) / "workers" / f"rank-{rank}.json").read_text())


def adapter(path: Path) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(path / "adapter_model.safetensors")


def test_two_workers_train_as_one_process_does(workspace, sft_dataset, ray_cluster, run_inline):
    local_ws = Workspace.open(workspace.root, [*workspace.overrides, *SAME])
    local = run_inline(local_ws, create_job(local_ws, sft_dataset).id).job
    assert local.status == "succeeded", local.error

    ws = on_ray(workspace, ray_cluster, *SAME)
    job = start_job(ws, create_job(ws, sft_dataset).id)
    assert job.status == "running" and process_alive(job)  # the driver, as for local
    job = wait_job(ws, job.id, poll=0.2, timeout=240)
    assert job.status == "succeeded", job.error

    # Each step's batch was split over the two ranks; the sums make the local numbers.
    ours, theirs = train_rows(ws, job.id), train_rows(local_ws, local.id)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] and len(ours) >= 10
    for a, b in zip(ours, theirs, strict=True):
        assert a["trained_tokens"] == b["trained_tokens"]
        # Each rank pads its share to the share's longest unit: never more than the batch.
        assert a["padding_fraction"] <= b["padding_fraction"] + 1e-9
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3), a["step"]
    val = [r["val_loss"] for r in list_metrics(ws, job.id) if "val_loss" in r]
    local_val = [r["val_loss"] for r in list_metrics(local_ws, local.id) if "val_loss" in r]
    assert val == pytest.approx(local_val, rel=1e-3) and val
    assert job.trained_tokens == local.trained_tokens

    # The same adapter format and facts; the weights moved, and as far as the local run's.
    result = Path(job.result["path"])
    assert job.result["kind"] == "lora" and (result / "adapter_config.json").is_file()
    meta = json.loads((result / RESULT_META).read_text())
    assert meta["facts"]["method"] == "supervised" and meta["steps"] == ours[-1]["step"]
    trained, reference = adapter(result), adapter(Path(local.result["path"]))
    lora_b = [k for k in trained if "lora_B" in k]
    assert lora_b and all(trained[k].abs().max() > 0 for k in lora_b)  # B starts at zero
    for key, value in trained.items():  # (Adam amplifies rounding where a gradient is ~0)
        assert float((value - reference[key]).norm()) <= 1e-2 * float(reference[key].norm()), key

    messages = [e.message for e in list_events(ws, job.id)]
    assert "Ray Train started 2 CPU workers (gloo)" in " ".join(messages)
    assert any("split over 2 ranks" in m for m in messages)
    assert worker(ws, job.id, 0)["pid"] != worker(ws, job.id, 1)["pid"]
    # Rank 0 marks the job succeeded; the driver then sees the workers end and says so.
    done = f"[evertune] job {job.id} succeeded at step {ours[-1]['step']}"
    wait_for(lambda: done in (job_dir(ws, job.id) / "train.log").read_text(), "the driver's "
             "last line", timeout=60)


def test_a_worker_killed_mid_run_is_replaced_and_the_job_resumes(
    workspace, sft_dataset, ray_cluster, monkeypatch
):
    monkeypatch.setenv(DELAY, "0.2")
    ws = on_ray(workspace, ray_cluster, "train.n_epochs=2", "train.ray.max_failures=2")
    job = start_job(ws, create_job(ws, sft_dataset).id)  # checkpoint_every = 2
    total = 2 * -(-sft_dataset.counts["train"] // 4)

    wait_for(lambda: any(c.step_number >= 4 for c in list_checkpoints(ws, job.id)),
             "checkpoint 4", timeout=180)
    killed = worker(ws, job.id, 1)["pid"]
    os.kill(killed, signal.SIGKILL)
    killed_at = last_step(ws, job.id)
    job = wait_job(ws, job.id, poll=0.2, timeout=240)

    assert job.status == "succeeded", job.error
    assert worker(ws, job.id, 1)["pid"] != killed  # Ray started a new worker group
    messages = [e.message for e in list_events(ws, job.id)]
    assert sum(m.startswith("Ray Train started 2 CPU workers") for m in messages) == 2
    resumed = [m for m in messages if m.startswith("Resumed from checkpoint step")]
    assert len(resumed) == 1
    resume_step = int(resumed[0].split()[4])
    assert 4 <= resume_step <= killed_at + 1 < total
    # After the resume: exactly the steps after the checkpoint, up to the total.
    steps = [r["step"] for r in train_rows(ws, job.id)]
    assert steps[-(total - resume_step):] == list(range(resume_step + 1, total + 1))
    assert newest_checkpoint(job_dir(ws, job.id)) is not None
    assert get_job(ws, job.id).result["kind"] == "lora"


def test_cancel_stops_the_workers_within_a_step(workspace, sft_dataset, ray_cluster, monkeypatch):
    monkeypatch.setenv(DELAY, "0.3")
    ws = on_ray(workspace, ray_cluster, "train.n_epochs=3")
    job = start_job(ws, create_job(ws, sft_dataset).id)

    wait_for(lambda: last_step(ws, job.id) >= 2, "two training steps", timeout=180)
    assert cancel_job(ws, job.id).cancel_requested
    requested_at = last_step(ws, job.id)
    job = wait_job(ws, job.id, poll=0.1, timeout=60)

    assert job.status == "cancelled" and job.error is None
    assert requested_at <= last_step(ws, job.id) <= requested_at + 1
    assert any("Job cancelled at step" in e.message for e in list_events(ws, job.id))
    wait_for(lambda: process_alive(job) is False, "the driver to exit", timeout=30)


class Squares(Recipe):
    """A unit is (x1, x2, x3, y); the loss is the squared error of a linear model: a recipe
    small enough to check the rank arithmetic exactly."""

    method = "squares"

    def collate(self, units, pad_id, device=None):
        import torch

        return {"x": torch.tensor(list(units), dtype=torch.float64)}

    def loss(self, model, batch):
        err = (model(batch["x"][:, :3]).squeeze(-1) - batch["x"][:, 3]) ** 2
        return StepLoss(loss=err.mean(), total=float(err.detach().sum()), count=len(err),
                        tokens=3 * len(err), positions=4 * len(err),
                        metrics={"over_one": float((err > 1).sum())})


BATCHES = [  # 5 units (3 + 2 over two ranks), 1 unit (rank 1's share is empty), 4 units
    [[0.1 * i, 0.2 * i, -0.3 * i, float(i % 3)] for i in range(5)],
    [[1.0, 2.0, 3.0, -1.0]],
    [[0.5 * i, -0.1 * i, 0.3, 2.0 - i] for i in range(4)],
]


def _model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(3, 1).double()


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, ranks = _model(), Ranks()
        params = list(model.parameters())
        results = []
        for units in BATCHES:
            step = forward_backward(model, Squares(), units, 2, 0, None, params, ranks)
            results.append({"total": step.total, "count": step.count, "tokens": step.tokens,
                            "metrics": step.metrics, "grads": [p.grad.clone() for p in params]})
            for p in params:
                p.grad = None
        torch.save(results, Path(out) / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_sum_to_the_single_process_step(tmp_path):
    """Two gloo ranks (no Ray): each rank's gradient, loss total, count and metric sums equal
    one process's over the whole batch, an empty share included."""
    import torch
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    model = _model()
    params = list(model.parameters())
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False)
        for units, got in zip(BATCHES, results, strict=True):
            want = forward_backward(model, Squares(), units, 2, 0, None, params)
            assert got["count"] == want.count == len(units) and got["tokens"] == want.tokens
            assert got["total"] == pytest.approx(want.total, rel=1e-12)
            assert got["metrics"] == pytest.approx(want.metrics)
            for g, p in zip(got["grads"], params, strict=True):
                assert torch.allclose(g, p.grad, rtol=1e-12, atol=1e-15)
            for p in params:
                p.grad = None


def test_an_address_that_does_not_answer_fails_at_start(workspace, sft_dataset):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    ws = on_ray(workspace, address)
    job = create_job(ws, sft_dataset)
    t0 = time.monotonic()
    with pytest.raises(JobError) as caught:
        start_job(ws, job.id)
    assert time.monotonic() - t0 < 10
    message = str(caught.value)
    assert f"train.ray.address={address!r} does not answer" in message
    assert "ray start --head" in message
    job = get_job(ws, job.id)
    assert job.status == "failed" and job.error["code"] == "start_failed" and job.pid is None


def test_more_workers_than_the_cluster_has_cpus_fails_at_start(
    workspace, sft_dataset, ray_cluster
):
    ws = on_ray(workspace, ray_cluster, "train.ray.num_workers=3")
    job = create_job(ws, sft_dataset)
    with pytest.raises(JobError, match=r"train\.ray\.num_workers=3 .* needs 3 CPUs, but the Ray "
                                        r"cluster .* has 2; lower train\.ray\.num_workers"):
        start_job(ws, job.id)
    assert get_job(ws, job.id).status == "failed"
