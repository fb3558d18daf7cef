"""Hostile input to the serving gateway: can one bad request hurt the others?

    .venv/bin/python bench/hostile_input.py                    # tiny test model (~2 min, 2 CPUs)
    .venv/bin/python bench/hostile_input.py --model default    # SmolLM2-135M-Instruct
    .venv/bin/python bench/hostile_input.py --innocent 70 --oversized 20 --prompt-mb 10
    .venv/bin/python bench/hostile_input.py --only poison --src /tmp/old/src   # another tree

The gateway (engine `transformers`, `serve.*` at their evertune.yaml defaults) runs in a
child process on a loopback port, so its resident memory (VmRSS in /proc) is its own; the
clients are httpx in this process. Three measurements:

1. Poisoned batch. `--innocent` greedy chat requests and one poisoned request (`seed`
   2^64, `temperature` 1e-300, `temperature` NaN: one run each) sent concurrently, so they
   share batches; counted: innocent requests that did not answer 200, and the poisoned
   request's status. Target: 0 innocent failures (a bad request gets its own 400).
2. Memory. The server's VmRSS before and after `--oversized` chat requests with a
   `--prompt-mb` MB prompt each (alternately with a Content-Length and chunked, which the
   server can only count as it reads), with their statuses and the slowest refusal.
   Target: every one refused (413), RSS after within 100 MB of before.
3. Latency. A small request (`GET /v1/models`, and a 1-token chat request) sent over and
   over, alone, then while a `--prompt-mb` MB request is being refused, then while a prompt
   at the `serve.max_prompt_chars` cap is being tokenized: p50 and max latency of the small
   requests that ran during the big one. Chat requests are tokenized one at a time, so a
   small chat request waits for a capped prompt's tokenization; other routes do not.

`--src` runs the server on another source tree (PYTHONPATH), e.g. the code before a change
(`git archive HEAD src | tar -x -C /tmp/old`), with the same clients. Writes
bench/results/hostile-<model>-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = "assistant"
POISONS: dict[str, bytes] = {
    "seed=2^64": json.dumps({"seed": 2**64, "temperature": 1.0}).encode(),
    "temperature=1e-300": json.dumps({"temperature": 1e-300}).encode(),
    "temperature=NaN": b'{"temperature": NaN}',
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "default"], default="tiny")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(
            os.environ.get("EVERTUNE_MODEL_CACHE", Path.home() / ".cache" / "evertune" / "models")
        ),
        help="where the packaged default model is converted once",
    )
    p.add_argument("--innocent", type=int, default=70, help="innocent requests per poisoned run")
    p.add_argument("--oversized", type=int, default=20, help="oversized requests (memory run)")
    p.add_argument("--prompt-mb", type=float, default=10.0, help="size of an oversized prompt")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    p.add_argument("--only", default="poison,memory,latency", help="which measurements")
    p.add_argument("--src", type=Path, default=None, help="run the server on this src tree")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    # Internal: the child process that serves.
    p.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the server (child process) --------------------------------------------------------------
def serve(root: Path, port: int, threads: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from evertune.serving import Gateway, make_engine
    from evertune.workspace import Workspace

    ws = Workspace.open(root)
    engine = make_engine(ws)
    engine.threads = threads  # type: ignore[attr-defined]
    gateway = Gateway(ws, ("prod",), engine=engine)
    gateway.start()
    app = FastAPI()
    app.include_router(gateway.router)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


def start_server(args: argparse.Namespace, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve())
    cmd = [sys.executable, __file__, "--serve", str(root), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--threads", str(args.threads)], env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start in 300 s")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


# -- the measurements ------------------------------------------------------------------------
def chat(content: str, **kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        **kw,
    }


def poisoned_runs(url: str, n: int) -> dict[str, Any]:
    """Per poison: innocent requests that failed out of `n`, and the poisoned one's status."""
    import httpx

    async def run(poison: bytes | None) -> tuple[int, int | None, float]:
        limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=n + 1)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            good = [
                client.post("/v1/chat/completions", json=chat(f"My order {i} has not arrived"))
                for i in range(n)
            ]
            coros = list(good)
            if poison is not None:
                # The poison's fields after an innocent body's (the last of a duplicate key
                # wins), as raw JSON: NaN is a literal no JSON encoder writes.
                head = json.dumps(chat("My card was charged twice"))[:-1]
                raw = head + ", " + poison.decode()[1:]
                bad = client.post(
                    "/v1/chat/completions",
                    content=raw.encode(),
                    headers={"content-type": "application/json"},
                )
                coros.insert(n // 2, bad)
            start = time.perf_counter()
            done = await asyncio.gather(*coros, return_exceptions=True)
            wall = time.perf_counter() - start
        status = [r.status_code if isinstance(r, httpx.Response) else -1 for r in done]
        poisoned = status.pop(n // 2) if poison is not None else None
        return sum(1 for s in status if s != 200), poisoned, wall

    out: dict[str, Any] = {}
    for name, poison in [("none", None), *POISONS.items()]:
        failed, poisoned, wall = asyncio.run(run(poison))
        out[name] = {"innocent": n, "failed": failed, "poisoned_status": poisoned, "wall_s": wall}
        print(f"  poison {name:<20} innocent failed {failed}/{n}, poisoned -> {poisoned}")
    return out


def chunks(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def big_body(mb: float) -> bytes:
    text = ("My card was charged twice for the same order. " * (int(mb * 2**20) // 46 + 1))[
        : int(mb * 2**20)
    ]
    return json.dumps(chat(text)).encode()


def post_big(url: str, data: bytes, chunked: bool) -> tuple[int, float]:
    import httpx

    start = time.perf_counter()
    try:
        resp = httpx.post(
            f"{url}/v1/chat/completions",
            content=chunks(data) if chunked else data,
            headers={"content-type": "application/json"},
            timeout=600,
        )
        status = resp.status_code
    except httpx.HTTPError:
        status = -1  # the connection broke: the client never saw an answer
    return status, time.perf_counter() - start


def memory_run(url: str, pid: int, count: int, mb: float) -> dict[str, Any]:
    data = big_body(mb)
    before, _ = rss_mb(pid)
    statuses, seconds = [], []
    for i in range(count):
        status, took = post_big(url, data, chunked=i % 2 == 1)
        statuses.append(status)
        seconds.append(took)
    time.sleep(1.0)  # let the server free what it will
    after, peak = rss_mb(pid)
    print(
        f"  RSS {before:.0f} MB -> {after:.0f} MB (peak {peak:.0f}) after {count} x {mb:g} MB; "
        f"statuses {sorted(set(statuses))}, slowest {max(seconds):.2f} s"
    )
    return {
        "requests": count, "prompt_mb": mb, "rss_before_mb": before, "rss_after_mb": after,
        "rss_peak_mb": peak, "statuses": statuses, "seconds_max": max(seconds),
        "seconds_median": statistics.median(seconds),
    }  # fmt: skip


def small_latencies(url: str, until: threading.Event, kind: str) -> list[tuple[float, float]]:
    """(start, seconds) of each small request sent until `until` is set."""
    import httpx

    out: list[tuple[float, float]] = []
    with httpx.Client(base_url=url, timeout=600) as client:
        while not until.is_set():
            start = time.perf_counter()
            if kind == "models":
                client.get("/v1/models").raise_for_status()
            else:
                resp = client.post("/v1/chat/completions", json=chat("Hi", max_tokens=1))
                resp.raise_for_status()
            out.append((start, time.perf_counter() - start))
    return out


def during(url: str, big: bytes | None, kind: str) -> dict[str, Any]:
    """Latency of small `kind` requests alone (big None: 3 s) or while `big` is answered."""
    stop = threading.Event()
    got: list[tuple[float, float]] = []
    worker = threading.Thread(target=lambda: got.extend(small_latencies(url, stop, kind)))
    worker.start()
    time.sleep(0.3)  # the small requests are flowing before the big one starts
    begin = time.perf_counter()
    status, took = (None, 3.0) if big is None else post_big(url, big, chunked=False)
    if big is None:
        time.sleep(took)
    end = time.perf_counter()
    stop.set()
    worker.join()
    # Those that overlapped the big one, including the one still waiting when it ended.
    lat = [t for start, t in got if start + t >= begin and start <= end] or [float("nan")]
    return {
        "big_status": status, "big_s": took, "small_n": len(lat),
        "small_p50_ms": 1000 * statistics.median(lat), "small_max_ms": 1000 * max(lat),
    }  # fmt: skip


def latency_runs(url: str, mb: float, max_prompt_chars: int) -> dict[str, Any]:
    huge = big_body(mb)
    # Just under the cap once the chat template is added: tokenized, then refused as too long
    # for the context (or answered, with a model whose context is that large).
    capped = json.dumps(chat("x " * ((max_prompt_chars - 200) // 2))).encode()
    out: dict[str, Any] = {}
    for kind in ("models", "chat"):
        for name, big in (("alone", None), (f"{mb:g}MB refused", huge), ("cap tokenized", capped)):
            r = during(url, big, kind)
            out[f"{kind}/{name}"] = r
            print(
                f"  small {kind:<6} {name:<15} p50 {r['small_p50_ms']:7.1f} ms, max "
                f"{r['small_max_ms']:8.1f} ms (n={r['small_n']}; big: {r['big_status']} in "
                f"{r['big_s']:.2f} s)"
            )
    return out


# -- main ------------------------------------------------------------------------------------
def make_workspace(root: Path, base: Path) -> Any:
    import yaml

    from evertune.workspace import Workspace

    Workspace.init(root)
    cfg = root / "evertune.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["base"] = str(base)
    raw["model"]["name"] = MODEL
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Workspace.open(root)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.port, args.threads)
        return 0
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="evertune-hostile-") as tmp_s:
        tmp = Path(tmp_s)
        if args.model == "tiny":
            from evertune.testing import build_tiny_model

            base = build_tiny_model(tmp / "tiny")
        else:
            from evertune.models import resolve_base_model

            base = resolve_base_model("smollm2-135m-instruct", args.cache)
        ws = make_workspace(tmp / "ws", base)
        max_chars = int(getattr(ws.config.serve, "max_prompt_chars", 200_000))
        proc, url = start_server(args, tmp / "ws")
        record: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "load_start": os.getloadavg(),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        try:
            rss0, _ = rss_mb(proc.pid)
            print(f"server up at {url}, RSS {rss0:.0f} MB")
            if "poison" in only:
                print(f"1. poisoned batch ({args.innocent} innocent + 1 poisoned, concurrent)")
                record["poison"] = poisoned_runs(url, args.innocent)
            if "memory" in only:
                print(f"2. memory ({args.oversized} x {args.prompt_mb:g} MB prompts)")
                record["memory"] = memory_run(url, proc.pid, args.oversized, args.prompt_mb)
            if "latency" in only:
                print("3. small-request latency beside a big one")
                record["latency"] = latency_runs(url, args.prompt_mb, max_chars)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        record["load_end"] = os.getloadavg()
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"hostile-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(record, indent=2))
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
