"""Serving benchmark: what dynamic batching buys, and what the gateway itself costs.

    python bench/serving.py                    # SmolLM2-135M-Instruct on CPU (~3 min on 2 cores)
    python bench/serving.py --model tiny       # the 2-layer test model (~30 s)
    python bench/serving.py --requests 48 --clients 8 --max-tokens 64
    python bench/serving.py --scenario multi-lora --threads 1   # versions as adapters (~5 min)

One process: a workspace whose base model is the benchmarked one, the real `Gateway` (engine
`transformers`, `serve.max_batch_size` / `serve.batch_wait_ms` from the flags, defaults as in
evertune.yaml), served by uvicorn on a loopback port, and httpx clients in threads.

1. Batching. The same `--requests` chat requests (greedy, streamed, `--max-tokens` each) are
   sent by one client one after another, then by `--clients` concurrent clients. Throughput
   is completion tokens per second of wall time (greedy decoding gives both runs the same
   tokens); TTFT is send → first content chunk; TPOT is (last chunk − first chunk) /
   (completion tokens − 1), per request, p50 and p95. Target: concurrent ≥ 2.5× sequential.
2. Gateway overhead. `--overhead-reps` pairs of the same short request (4 tokens, greedy),
   alternating a direct `engine.stream` call (prompt already rendered) and an HTTP call to
   /v1/chat/completions; the added latency is the median of the paired differences. It
   includes the HTTP round trip itself (client, loopback, uvicorn), measured separately with
   a no-op route and reported beside it. Target: < 5 ms per request.

`--scenario multi-lora`: many versions served as LoRA adapters on one base in memory
(`serve.merge_adapters: false|prod`). `--versions` (10) versions are made from random LoRA
weights on the base (the configured `train.lora` shape: rank 16 on every linear layer) and
registered.
3. Memory. Resident memory (VmRSS, after gc) of a fresh serving process holding the base and
   (a) one version as a merged copy (`serve.merge_adapters: true`, the default), (b) one
   version as an adapter, (c) all `--versions` as adapters, each having answered one request.
   Target: (c) ≤ 1.3× the smaller of (a) and (b).
4. Throughput. `serve.merge_adapters: prod`, v1 in PROD (merged) and v2..v5 adapters. The same
   `--requests` greedy streamed requests from `--clients` clients go to PROD (one merged
   version), then round-robin to the 4 adapter versions (mixed batches), interleaved
   `--repeats` times; output tokens/s, medians. Target: mixed ≥ 0.7× merged.

The machine may be shared: figures move with other load on the CPU (the JSON record keeps
the load average at start and end). Writes bench/results/serving-<model>-<time>.json
(serving-multi-lora-<model>-<time>.json for the multi-LoRA scenario).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGET_RATIO = 2.5
TARGET_OVERHEAD_MS = 5.0
TARGET_RSS_RATIO = 1.3  # many versions as adapters vs one version
TARGET_MIXED_RATIO = 0.7  # mixed batch over 4 adapters vs one merged version
MIXED_VERSIONS = 4
PROMPTS = [
    "My card was charged twice for the same order and I want a refund.",
    "The package has not arrived yet and the tracking number does not work.",
    "I cannot log in to my account after resetting the password.",
    "The app crashes when I open the settings page on my phone.",
    "I would like to return these shoes because they are too small.",
    "Please explain how to change the delivery address of an order.",
    "Write a short polite reply to a customer whose parcel was damaged.",
    "What is the difference between a refund and a store credit?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=["default", "tiny"],
        default="default",
        help="default: SmolLM2-135M-Instruct; tiny: the 2-layer test model",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(
            os.environ.get("EVERTUNE_MODEL_CACHE", Path.home() / ".cache" / "evertune" / "models")
        ),
        help="where the packaged default model is converted once",
    )
    p.add_argument("--requests", type=int, default=32, help="requests per load run")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in the batched run")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    p.add_argument("--max-batch-size", type=int, default=8, help="serve.max_batch_size")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="serve.batch_wait_ms")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="sequential/concurrent runs, interleaved; the median of each counts",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads of the engine (0 = torch's default: all cores)",
    )
    p.add_argument("--overhead-reps", type=int, default=40, help="direct/HTTP pairs")
    p.add_argument(
        "--scenario",
        choices=["batching", "multi-lora"],
        default="batching",
        help="batching: batching and gateway overhead; multi-lora: versions as adapters",
    )
    p.add_argument("--versions", type=int, default=10, help="multi-lora: versions made")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)  # internal: merged1|adapter1|adaptersN
    p.add_argument("--workspace", type=Path, help=argparse.SUPPRESS)  # internal, with --rss-child
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    return p.parse_args(argv)


def base_model(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model == "tiny":
        from evertune.testing import build_tiny_model

        return build_tiny_model(tmp / "tiny")
    from evertune.models import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct", args.cache)


def make_workspace(root: Path, base: Path, args: argparse.Namespace) -> Any:
    import yaml

    from evertune.workspace import Workspace

    Workspace.init(root)
    cfg = root / "evertune.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["base"] = str(base)
    raw["model"]["name"] = "bench"
    raw.setdefault("serve", {}).update(
        {
            "max_batch_size": args.max_batch_size,
            "batch_wait_ms": args.batch_wait_ms,
            "max_tokens_limit": max(args.max_tokens, 64),
        }
    )
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Workspace.open(root)


def serve(app: Any) -> tuple[str, Any, threading.Thread]:
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


def stream_one(client: Any, body: dict[str, Any]) -> dict[str, float]:
    """One streamed chat request: TTFT, TPOT and completion tokens."""
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
    end = time.perf_counter()
    first = first or end
    last = last or end
    return {
        "ttft_s": first - sent,
        "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else float("nan"),
        "tokens": tokens,
        "latency_s": end - sent,
    }


def load_run(
    url: str, clients: int, n: int, max_tokens: int, models: tuple[str, ...] = ("bench",)
) -> dict[str, Any]:
    """`n` streamed requests from `clients` threads, to `models` round-robin; throughput and
    latency percentiles."""
    import httpx

    jobs: queue.Queue[dict[str, Any]] = queue.Queue()
    for i in range(n):
        jobs.put(
            {
                "model": models[i % len(models)],
                "temperature": 0,
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            }
        )
    results: list[dict[str, float]] = []
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            while True:
                try:
                    body = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.append(stream_one(client, body))
                except Exception as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_s"] for r in results]
    tpot = [r["tpot_s"] for r in results if r["tpot_s"] == r["tpot_s"]]  # drop NaN (1 token)
    return {
        "clients": clients, "requests": len(results), "errors": errors, "wall_s": wall,
        "completion_tokens": tokens, "tokens_per_s": tokens / wall,
        "requests_per_s": len(results) / wall,
        "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p95_ms": 1000 * pct(ttft, 95),
        "tpot_p50_ms": 1000 * pct(tpot, 50), "tpot_p95_ms": 1000 * pct(tpot, 95),
    }  # fmt: skip


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric medians over repeated runs (errors: all of them)."""
    out: dict[str, Any] = {"repeats": len(runs), "errors": [e for r in runs for e in r["errors"]]}
    for key, value in runs[0].items():
        if isinstance(value, int | float) and key != "clients":
            out[key] = statistics.median(r[key] for r in runs)
        elif key not in out:
            out[key] = value
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class NullEngine:
    """An engine that answers at once (4 tokens, no model): isolates the gateway's own cost."""

    name = "null"
    max_context = 1 << 20

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def load(self, key: str, path: Path) -> None: ...

    def unload(self, key: str) -> None: ...

    def loaded(self) -> set[str]:
        return {"base"}

    def prepare(self, request: Any) -> None:
        ids = self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        request.prompt_ids, request.prompt_tokens = ids, len(ids)
        request.max_tokens = request.max_tokens or 4

    async def stream(self, key: str, request: Any) -> Any:
        from evertune.serving.engine import Finished

        yield Finished("four tokens here", "length", request.prompt_tokens, 4, 0.0, 0.0)


def null_engine_run(ws: Any, tokenizer: Any, reps: int) -> dict[str, float]:
    """The gateway's own cost per request, with an engine that takes no time: a direct
    `NullEngine.stream` call vs the same through the whole gateway in-process (ASGI)."""
    import httpx
    from fastapi import FastAPI

    from evertune.monitoring import ServingMetrics
    from evertune.serving import Gateway
    from evertune.serving.engine import BASE_KEY, GenRequest

    engine = NullEngine(tokenizer)
    gateway = Gateway(ws, engine=engine, metrics=ServingMetrics())  # type: ignore[arg-type]
    gateway.start()
    app = FastAPI()
    app.include_router(gateway.router)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    body = {"model": "bench", "messages": messages, "max_tokens": 4, "temperature": 0}
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    async def run() -> tuple[list[float], list[float]]:
        direct, asgi = [], []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://asgi") as client:
            for i in range(reps + 20):
                t = time.perf_counter()
                req = GenRequest(prompt, max_tokens=4, temperature=0)
                engine.prepare(req)
                async for _ in engine.stream(BASE_KEY, req):
                    pass
                d = time.perf_counter() - t
                t = time.perf_counter()
                resp = await client.post("/v1/chat/completions", json=body)
                a = time.perf_counter() - t
                assert resp.status_code == 200, resp.text
                if i >= 20:
                    direct.append(1000 * d)
                    asgi.append(1000 * a)
        return direct, asgi

    try:
        direct, asgi = asyncio.run(run())
    finally:
        gateway.stop()
    added = [a - d for a, d in zip(asgi, direct, strict=True)]
    return {
        "null_engine_reps": reps,
        "null_engine_added_p50_ms": statistics.median(added),
        "null_engine_added_p95_ms": pct(added, 95),
    }


def overhead_run(url: str, gateway: Any, app: Any, reps: int) -> dict[str, Any]:
    """Paired calls of the same short greedy request: direct engine, in-process ASGI, HTTP.

    Direct: `engine.prepare` + `engine.stream` on an already rendered prompt. ASGI: the whole
    gateway (auth, validation, chat template, name resolution, metrics, request log, JSON)
    called in-process from the same event loop, so the difference is the gateway's own
    cost. HTTP: the same through uvicorn on loopback with an httpx client, which adds the
    HTTP stack and two more thread hops (measured alone with a no-op route: the floor)."""
    import httpx

    from evertune.serving.engine import BASE_KEY, Finished, GenRequest

    messages = [{"role": "user", "content": PROMPTS[0]}]
    body = {"model": "bench", "messages": messages, "max_tokens": 4, "temperature": 0}
    prompt = gateway.engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    loop = asyncio.new_event_loop()
    asgi = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://asgi")

    async def direct() -> Finished:
        req = GenRequest(prompt, max_tokens=4, temperature=0)
        gateway.engine.prepare(req)
        final = None
        async for event in gateway.engine.stream(BASE_KEY, req):
            final = event
        assert isinstance(final, Finished)
        return final

    timings: dict[str, list[float]] = {"direct": [], "asgi": [], "http": [], "floor": []}
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(reps + 3):  # the first rounds warm up every path
            t = time.perf_counter()
            final = loop.run_until_complete(direct())
            d = time.perf_counter() - t
            t = time.perf_counter()
            resp = loop.run_until_complete(asgi.post("/v1/chat/completions", json=body))
            a = time.perf_counter() - t
            assert resp.status_code == 200, resp.text
            t = time.perf_counter()
            resp = client.post("/v1/chat/completions", json=body)
            h = time.perf_counter() - t
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["message"]["content"] == final.text
            t = time.perf_counter()
            client.get("/bench/ping")
            f = time.perf_counter() - t
            if i >= 3:
                for key, value in (("direct", d), ("asgi", a), ("http", h), ("floor", f)):
                    timings[key].append(1000 * value)
    loop.run_until_complete(asgi.aclose())
    loop.close()
    asgi_added = [a - d for a, d in zip(timings["asgi"], timings["direct"], strict=True)]
    http_added = [h - d for h, d in zip(timings["http"], timings["direct"], strict=True)]
    return {
        "reps": reps,
        "direct_p50_ms": statistics.median(timings["direct"]),
        "asgi_p50_ms": statistics.median(timings["asgi"]),
        "http_p50_ms": statistics.median(timings["http"]),
        "gateway_added_p50_ms": statistics.median(asgi_added),
        "gateway_added_p90_ms": pct(asgi_added, 90),
        "http_added_p50_ms": statistics.median(http_added),
        "http_added_p90_ms": pct(http_added, 90),
        "http_roundtrip_floor_p50_ms": statistics.median(timings["floor"]),
    }


def make_versions(ws: Any, base: Path, n: int) -> list[int]:
    """`n` registered versions: LoRA adapters of `base` with random weights (the workspace's
    `train.lora` shape), made from one PEFT model re-drawn per version."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model

    from evertune.models import load_model
    from evertune.registry import Registry

    lora = ws.config.train.lora
    model = get_peft_model(
        load_model(base),
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        ),
    )
    reg = Registry(ws)
    versions = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:  # small: answers stay text-like, yet differ per version
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        out = ws.root / "adapters" / f"a{i}"
        model.save_pretrained(out)
        job = SimpleNamespace(
            id=f"ftjob-bench-{i}", model=ws.config.model.base, training_file="ds-bench",
            parent=None, hyperparameters={"n_epochs": 1}, result={"path": str(out), "kind": "lora"},
            run_id=None, status="succeeded",
        )  # fmt: skip
        versions.append(reg.register_version(job, None, []).version)
    return versions


def rss_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak (MiB), from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    return {"rss_mib": fields["VmRSS"], "peak_rss_mib": fields["VmHWM"]}


def rss_child(args: argparse.Namespace) -> int:
    """In a fresh process: serve the workspace's versions as `args.rss_child` says, answer
    one request per version, print the resident memory as JSON."""
    import gc

    from evertune.monitoring import ServingMetrics
    from evertune.serving import Gateway, make_engine
    from evertune.workspace import Workspace

    mode = args.rss_child
    ws = Workspace.open(args.workspace)
    count = 1 if mode.endswith("1") else int(mode.removeprefix("adapters"))
    ws.config.serve.merge_adapters = mode == "merged1"
    ws.config.serve.max_adapters = max(count, 1)
    metrics = ServingMetrics()
    engine = make_engine(ws, metrics)
    engine.threads = args.threads  # type: ignore[attr-defined]
    gateway = Gateway(ws, ("prod",), engine=engine, metrics=metrics)
    gateway.start()
    try:
        models = [f"bench@v{v}" for v in range(1, count + 1)]
        asyncio.run(_ask_each(gateway, models))
        gc.collect()
        record = {"mode": mode, "versions": count, "loaded": sorted(engine.loaded()), **rss_mib()}
    finally:
        gateway.stop()
    print(json.dumps(record))
    return 0


async def _ask_each(gateway: Any, models: list[str]) -> None:
    import httpx
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(gateway.router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://asgi", timeout=600) as c:
        for model in models:
            body = {"model": model, "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPTS[0]}]}  # fmt: skip
            resp = await c.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text


def measure_rss(ws: Any, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    import subprocess

    cmd = [sys.executable, __file__, "--rss-child", mode, "--workspace", str(ws.root),
           "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def multi_lora(args: argparse.Namespace) -> int:
    """The multi-LoRA scenario (module docstring, 3 and 4)."""
    from fastapi import FastAPI

    from evertune.monitoring import ServingMetrics, metrics_router
    from evertune.registry import Registry
    from evertune.serving import Gateway, make_engine

    if args.versions < MIXED_VERSIONS + 1:
        raise SystemExit(f"--versions must be at least {MIXED_VERSIONS + 1}")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = base_model(args, tmp)
        ws = make_workspace(tmp / "ws", base, args)
        t = time.perf_counter()
        versions = make_versions(ws, base, args.versions)
        print(f"model {base} | {len(versions)} versions made in {time.perf_counter() - t:.0f}s")
        memory = {}
        for mode in ("merged1", "adapter1", f"adapters{args.versions}"):
            memory[mode] = measure_rss(ws, args, mode)
            m = memory[mode]
            print(f"RSS {mode:>11}: {m['rss_mib']:7.0f} MiB (peak {m['peak_rss_mib']:.0f})")
        many = memory[f"adapters{args.versions}"]["rss_mib"]
        rss_ratios = {
            "vs_one_merged": many / memory["merged1"]["rss_mib"],
            "vs_one_adapter": many / memory["adapter1"]["rss_mib"],
        }
        rss_ratio = max(rss_ratios.values())

        reg = Registry(ws)
        for stage in ("approved", "qa", "prod"):
            reg.transition(versions[0], stage, actor="bench", reason="multi-lora bench")
        ws.config.serve.merge_adapters = "prod"
        metrics = ServingMetrics()
        engine = make_engine(ws, metrics)
        engine.threads = args.threads  # type: ignore[attr-defined]
        gateway = Gateway(ws, ("prod",), engine=engine, metrics=metrics)
        gateway.start()
        app = FastAPI()
        app.include_router(gateway.router)
        app.include_router(metrics_router(metrics))
        url, server, thread = serve(app)
        mixed_models = tuple(f"bench@v{v}" for v in versions[1 : 1 + MIXED_VERSIONS])
        labels = {"engine": "transformers"}

        def batches() -> tuple[float, float]:
            get = metrics.registry.get_sample_value
            return (get("evertune_batch_size_sum", labels) or 0.0), (
                get("evertune_batch_size_count", labels) or 0.0
            )

        try:
            load_run(url, 2, 4, 8)  # warm-up: first calls allocate
            load_run(url, 4, 4, 8, mixed_models)  # and load the adapters
            loaded = sorted(gateway.engine.loaded())
            every: dict[str, list[dict[str, Any]]] = {"merged": [], "mixed": []}
            for rep in range(args.repeats):
                for name, models in (("merged", ("bench",)), ("mixed", mixed_models)):
                    s0, c0 = batches()
                    r = load_run(url, args.clients, args.requests, args.max_tokens, models)
                    s1, c1 = batches()
                    r["mean_batch_size"] = (s1 - s0) / max(c1 - c0, 1)
                    every[name].append(r)
                    print(
                        f"{rep + 1}/{args.repeats} {name:>6}: {r['tokens_per_s']:7.1f} tok/s "
                        f"TTFT p50 {r['ttft_p50_ms']:6.0f} ms  TPOT p50/p95 "
                        f"{r['tpot_p50_ms']:5.1f}/{r['tpot_p95_ms']:5.1f} ms  batch "
                        f"{r['mean_batch_size']:.1f}  errors {len(r['errors'])}",
                        flush=True,
                    )
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            gateway.stop()
    runs = {name: median_run(rs) for name, rs in every.items()}
    mixed_ratio = runs["mixed"]["tokens_per_s"] / runs["merged"]["tokens_per_s"]
    print(f"engine keys during the throughput runs: {', '.join(loaded)}")
    print(
        f"RSS with {args.versions} versions as adapters: {rss_ratios['vs_one_merged']:.2f}x one "
        f"merged version, {rss_ratios['vs_one_adapter']:.2f}x one adapter "
        f"(target <= {TARGET_RSS_RATIO}x) {'PASS' if rss_ratio <= TARGET_RSS_RATIO else 'MISS'}"
    )
    print(
        f"throughput, {args.clients} clients round-robin over {MIXED_VERSIONS} adapters / one "
        f"merged version: {runs['mixed']['tokens_per_s']:.1f} / "
        f"{runs['merged']['tokens_per_s']:.1f} tok/s = {mixed_ratio:.2f}x (target >= "
        f"{TARGET_MIXED_RATIO}x) {'PASS' if mixed_ratio >= TARGET_MIXED_RATIO else 'MISS'}"
    )
    record = {
        "bench": "serving-multi-lora", "model": args.model, "base": str(base),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "memory": memory, "rss_ratios": rss_ratios, "runs": runs, "all_runs": every,
        "mixed_throughput_ratio": mixed_ratio, "loaded": loaded,
        "targets": {"rss_ratio": TARGET_RSS_RATIO, "mixed_throughput_ratio": TARGET_MIXED_RATIO},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = RESULTS / f"serving-multi-lora-{args.model}-{stamp}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.rss_child:
        return rss_child(args)
    if args.scenario == "multi-lora":
        return multi_lora(args)
    from fastapi import FastAPI

    from evertune.monitoring import ServingMetrics, metrics_router
    from evertune.serving import Gateway, make_engine

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = base_model(args, tmp)
        ws = make_workspace(tmp / "ws", base, args)
        # Name the model "bench": the prod stage serves the base model (nothing promoted).
        ws.config.model.name = "bench"
        metrics = ServingMetrics()
        engine = make_engine(ws, metrics)
        engine.threads = args.threads  # type: ignore[attr-defined]  # a TransformersEngine
        gateway = Gateway(ws, engine=engine, metrics=metrics)
        t = time.perf_counter()
        gateway.start()
        startup = time.perf_counter() - t
        app = FastAPI()
        app.include_router(gateway.router)
        app.include_router(metrics_router(metrics))
        app.get("/bench/ping")(lambda: {})
        url, server, thread = serve(app)
        try:
            print(f"model {base} | gateway started in {startup:.1f}s | {url}", flush=True)
            load_run(url, 2, 4, 8)  # warm-up: first calls allocate and tune kernels
            batch_sum = "evertune_batch_size_sum"
            labels = {"engine": "transformers"}

            def batches() -> tuple[float, float]:
                get = metrics.registry.get_sample_value
                return (get(batch_sum, labels) or 0.0), (
                    get("evertune_batch_size_count", labels) or 0.0
                )

            every: dict[str, list[dict[str, Any]]] = {"sequential": [], "concurrent": []}
            for rep in range(args.repeats):
                for name, clients in (("sequential", 1), ("concurrent", args.clients)):
                    s0, c0 = batches()
                    r = load_run(url, clients, args.requests, args.max_tokens)
                    s1, c1 = batches()
                    r["mean_batch_size"] = (s1 - s0) / max(c1 - c0, 1)
                    every[name].append(r)
                    print(
                        f"{rep + 1}/{args.repeats} {name:>10}: {r['tokens_per_s']:7.1f} tok/s "
                        f"{r['requests_per_s']:5.2f} req/s  TTFT p50/p95 {r['ttft_p50_ms']:6.0f}/"
                        f"{r['ttft_p95_ms']:6.0f} ms  TPOT p50/p95 {r['tpot_p50_ms']:5.1f}/"
                        f"{r['tpot_p95_ms']:5.1f} ms  batch {r['mean_batch_size']:.1f}  "
                        f"errors {len(r['errors'])}",
                        flush=True,
                    )
            runs = {name: median_run(rs) for name, rs in every.items()}
            ratio = runs["concurrent"]["tokens_per_s"] / runs["sequential"]["tokens_per_s"]
            overhead = overhead_run(url, gateway, app, args.overhead_reps)
            overhead.update(null_engine_run(ws, gateway.engine.tokenizer, 10 * args.overhead_reps))
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            gateway.stop()

    for name, r in runs.items():
        print(
            f"median {name:>10}: {r['tokens_per_s']:7.1f} tok/s  TTFT p50/p95 "
            f"{r['ttft_p50_ms']:.0f}/{r['ttft_p95_ms']:.0f} ms  TPOT p50/p95 "
            f"{r['tpot_p50_ms']:.1f}/{r['tpot_p95_ms']:.1f} ms  batch {r['mean_batch_size']:.1f}"
        )
    print(
        f"throughput ratio ({args.clients} clients / sequential): {ratio:.2f}x "
        f"(target >= {TARGET_RATIO}x) {'PASS' if ratio >= TARGET_RATIO else 'MISS'}"
    )
    added = overhead["gateway_added_p50_ms"]
    print(
        f"gateway added latency p50 (in-process, over a direct engine call of "
        f"{overhead['direct_p50_ms']:.1f} ms): {added:.2f} ms (p90 "
        f"{overhead['gateway_added_p90_ms']:.2f}) (target < {TARGET_OVERHEAD_MS} ms) "
        f"{'PASS' if added < TARGET_OVERHEAD_MS else 'MISS'}"
    )
    print(
        f"gateway's own cost with an instant engine (in-process): "
        f"{overhead['null_engine_added_p50_ms']:.2f} ms p50, "
        f"{overhead['null_engine_added_p95_ms']:.2f} ms p95"
    )
    print(
        f"over loopback HTTP (uvicorn + httpx): +{overhead['http_added_p50_ms']:.2f} ms p50 "
        f"(the HTTP round trip of a no-op route alone: "
        f"{overhead['http_roundtrip_floor_p50_ms']:.2f} ms)"
    )
    record = {
        "bench": "serving", "model": args.model, "base": str(base), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs, "all_runs": every, "throughput_ratio": ratio, "overhead": overhead,
        "targets": {"throughput_ratio": TARGET_RATIO, "added_latency_ms": TARGET_OVERHEAD_MS},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"serving-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
