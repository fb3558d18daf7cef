"""Base models: the packaged default converts once and is reused; bad specs are explained."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from evertune import models
from evertune.errors import ModelError
from evertune.models import load_for_inference, load_model, load_tokenizer, resolve_base_model


def test_packaged_default_is_converted_once_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `evertune up` resolves it from two threads at start-up (pipeline warm-up and serving);
    # two loads at once used to leave tied weights on the meta device and fail the save.
    monkeypatch.setenv(models.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    conversions: list[Path] = []
    convert = models._convert_gguf
    monkeypatch.setattr(models, "_convert_gguf",
                        lambda gguf, target: (conversions.append(target), convert(gguf, target)))
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: resolve_base_model("smollm2-135m-instruct", tmp_path),
                              range(2)))
    assert len(conversions) == 1 and paths[0] == paths[1]
    path = paths[0]
    weights = path / "model.safetensors"
    assert weights.is_file() and (path / "tokenizer.json").is_file()
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert resolve_base_model("smollm2-135m-instruct", tmp_path) == path
    assert weights.stat().st_mtime_ns == mtime  # not converted again
    assert time.perf_counter() - t0 < 1.0
    model = load_model(path)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert getattr(model.config, "quantization_config", None) is None
    tok = load_tokenizer(path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


CONVERT = """
import logging, sys
from evertune.models import resolve_base_model
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
print(resolve_base_model("smollm2-135m-instruct", __import__("pathlib").Path(sys.argv[1])))
"""


@pytest.mark.slow
def test_two_workspaces_started_together_convert_the_default_once(tmp_path: Path) -> None:
    # Two workspaces' processes start at the same moment on a fresh machine: one converts,
    # the other waits on the cache's file lock and uses that result; both name one folder.
    import os
    import subprocess
    import sys

    from evertune.workspace import Workspace

    env = {**os.environ, models.MODEL_CACHE_ENV: str(tmp_path / "machine-cache")}
    workspaces = [Workspace.init(tmp_path / name)[0] for name in ("ws-a", "ws-b")]
    procs = [
        subprocess.Popen([sys.executable, "-c", CONVERT, str(ws.models_dir)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for ws in workspaces
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1 and paths.pop().startswith(str(tmp_path / "machine-cache"))
    assert sum(err.count("converting smollm2-135m-instruct") for _, err in outs) == 1
    assert not any(ws.models_dir.exists() and any(ws.models_dir.iterdir()) for ws in workspaces)


def test_local_folder_is_used_as_is(tiny_model: Path, tmp_path: Path) -> None:
    assert resolve_base_model(str(tiny_model), tmp_path) == tiny_model.resolve()
    model = load_for_inference(tiny_model)
    assert not model.training


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base_model(str(tmp_path / "empty"), tmp_path)


def test_unknown_spec_lists_the_options(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="smollm2-135m-instruct"):
        resolve_base_model("not-a-model", tmp_path)


def test_adapter_folder_must_hold_an_adapter(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_for_inference(tiny_model, tmp_path / "junk")
