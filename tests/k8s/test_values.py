"""Values files: bad ones give one clear error naming the file and every key at fault; the
CLI writes the files and keeps generated secrets across renders; `evertune k8s bootstrap`
registers the Secret's tokens.

    .venv/bin/python -m pytest -q tests/k8s/test_values.py
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evertune import auth, k8s
from evertune.cli import app as cli_app
from evertune.serving.keys import UnprotectedServingError, require_keys_off_loopback
from evertune.workspace import Workspace
from tests.k8s.variants import ROOT


def _values_file(tmp_path: Path, values: object) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values), "utf-8")
    return path


def _error(tmp_path: Path, values: object) -> k8s.ValuesError:
    path = _values_file(tmp_path, values)
    with pytest.raises(k8s.ValuesError) as caught:
        k8s.load_values(path)
    assert str(path) in str(caught.value)  # the message names the file
    return caught.value


# -- bad values -------------------------------------------------------------------------------
def test_an_unknown_key_is_named_with_the_allowed_ones(tmp_path: Path) -> None:
    err = _error(tmp_path, {"contrl": {"replicas": 3}, "serve": {"autoscalling": {}}})
    assert err.exit_code == 2
    assert len(err.problems) == 2  # every problem at once
    top, serve = sorted(err.problems)
    assert top.startswith("contrl: unknown key; allowed: ") and "control" in top
    assert serve.startswith("serve.autoscalling: unknown key; allowed: ")
    assert "autoscaling" in serve


def test_negative_replicas_name_the_key_and_the_value(tmp_path: Path) -> None:
    err = _error(tmp_path, {"control": {"replicas": -1}})
    assert err.problems == [
        "control.replicas: Input should be greater than or equal to 0 (got -1)"
    ]


def test_a_bad_evertune_config_key_is_named_under_config(tmp_path: Path) -> None:
    err = _error(tmp_path, {"config": {"train": {"n_epoch": 2}, "server": {"port": 0}}})
    assert any(p.startswith("config.train.n_epoch: unknown key") for p in err.problems)
    assert any(p.startswith("config.server.port: ") for p in err.problems)


def test_a_config_key_the_chart_sets_says_which_value_to_set(tmp_path: Path) -> None:
    err = _error(tmp_path, {"config": {"storage": {"state_db": "postgresql://u:pw@db/x"}}})
    assert err.problems == [
        "config.storage.state_db: set by the chart; set postgres.* (the password: "
        "secrets.postgresPassword) instead"
    ]


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"postgres": {"enabled": False}}, "postgres.host"),
        ({"mlflow": {"enabled": False}}, "mlflow.trackingUri"),
        ({"workspace": {"persistent": False}}, "ReadWriteMany"),
        ({"secrets": {"existingSecret": "s", "adminToken": "evt_" + "x" * 40}},
         "existingSecret is set, so adminToken would be ignored"),
        ({"secrets": {"servingKey": "short"}}, "servingKey must be 32-256 characters"),
        ({"serve": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
         "minReplicas (5) is larger than maxReplicas (2)"),
        ({"storage": {"bucket": "bucket"}}, "storage.bucket: String should match pattern"),
        ({"serve": {"stages": ["staging"]}}, "serve.stages.0: Input should be 'prod' or 'qa'"),
        ([1, 2], "top level must be a mapping"),
    ],
)  # fmt: skip
def test_inconsistent_values_are_explained(
    tmp_path: Path, values: object, needle: str
) -> None:
    assert needle in str(_error(tmp_path, values))


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(k8s.ValuesError, match="does not exist"):
        k8s.load_values(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("serve: [", "utf-8")
    with pytest.raises(k8s.ValuesError, match="not valid YAML"):
        k8s.load_values(broken)


def test_a_partial_section_keeps_the_defaults_it_leaves_out() -> None:
    # Helm's merge: turning GPU workers on keeps their GPU count, node pool and tolerations.
    v = k8s.parse_values({"ray": {"gpuWorkers": {"enabled": True, "maxReplicas": 6}},
                          "control": {"resources": {"requests": {"cpu": "1"}}}})
    assert (v.ray.gpuWorkers.gpus, v.ray.gpuWorkers.maxReplicas) == (1, 6)
    assert v.ray.gpuWorkers.nodeSelector == {"karpenter.sh/nodepool": "gpu"}
    assert v.control.resources == {"requests": {"cpu": "1", "memory": "8Gi"},
                                   "limits": {"cpu": "4", "memory": "16Gi"}}


# -- the CLI ----------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # The real entry point (python -m evertune.cli), as a person runs it: errors are printed by
    # main() without a traceback.
    return subprocess.run([sys.executable, "-m", "evertune.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_render_writes_the_files_and_keeps_generated_secrets(tmp_path: Path) -> None:
    values = _values_file(tmp_path, {"serve": {"vllm": {"enabled": True}}})
    out = tmp_path / "out"
    done = _cli("k8s", "render", "--values", str(values), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.yaml"))
    assert written == sorted(k8s.FILES.values())
    for name in written:
        assert str(out / name) in done.stdout
    assert "generated secrets.adminToken, secrets.servingKey, secrets.postgresPassword" in (
        done.stdout)
    config = out / k8s.FILES["config"]
    assert stat.S_IMODE(config.stat().st_mode) == 0o600  # it holds the Secret
    first = config.read_text("utf-8")

    # Rendering again into the same folder keeps the secrets (the database keeps its password)
    # and drops the file of a component switched off since.
    values.write_text(yaml.safe_dump({"ray": {"enabled": False}, "control": {"replicas": 1}}))
    done = _cli("k8s", "render", "-f", str(values), "-o", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "generated" not in done.stdout
    secret = [d for d in yaml.safe_load_all(config.read_text()) if d["kind"] == "Secret"][0]
    old = [d for d in yaml.safe_load_all(first) if d["kind"] == "Secret"][0]
    assert secret["stringData"] == old["stringData"]
    assert not (out / k8s.FILES["ray"]).exists() and not (out / k8s.FILES["rayjob"]).exists()


def test_render_of_a_bad_values_file_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    values = _values_file(tmp_path, {"control": {"replicas": -1}, "servce": {}})
    done = _cli("k8s", "render", "--values", str(values), "--out", str(tmp_path / "o"),
                cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert str(values) in done.stderr and "2 problem(s)" in done.stderr
    assert "control.replicas" in done.stderr and "servce: unknown key" in done.stderr
    assert not (tmp_path / "o").exists()


def test_the_shipped_values_files_render(tmp_path: Path) -> None:
    for path in (ROOT / "deploy" / "k8s").rglob("*.yaml"):
        result = k8s.render_to(path, tmp_path / path.stem)
        assert result.files


# -- bootstrap --------------------------------------------------------------------------------
def test_bootstrap_registers_the_secrets_tokens_once(tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "ws")
    env = {auth.TOKEN_ENV: "evt_" + "a" * 43, k8s.SERVING_KEY_ENV: "evt_" + "b" * 43}
    # Before: `serve` on 0.0.0.0 (the pods' server.host) refuses to start.
    with pytest.raises(UnprotectedServingError):
        require_keys_off_loopback(ws, "0.0.0.0")

    runner = CliRunner()
    done = runner.invoke(cli_app, ["-w", str(ws.root), "k8s", "bootstrap"], env=env)
    assert done.exit_code == 0, done.output
    assert "registered $EVERTUNE_TOKEN as admin token 'k8s-admin'" in done.output
    assert env[auth.TOKEN_ENV] not in done.output  # never the secret
    assert auth.authenticate(ws, env[auth.TOKEN_ENV]).role == "admin"
    require_keys_off_loopback(ws, "0.0.0.0")  # a serving key exists now

    # Idempotent: the Job may run again (a new release, a retry).
    assert k8s.bootstrap_tokens(ws, env) == [
        "$EVERTUNE_TOKEN already registered (admin token 'k8s-admin')",
        "$EVERTUNE_SERVING_KEY already registered (serving token 'k8s-serving')",
    ]


def test_bootstrap_refuses_a_short_a_missing_or_a_revoked_token(tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "ws")
    good = {auth.TOKEN_ENV: "evt_" + "a" * 43, k8s.SERVING_KEY_ENV: "evt_" + "b" * 43}
    with pytest.raises(k8s.BootstrapError, match=r"\$EVERTUNE_SERVING_KEY must hold"):
        k8s.bootstrap_tokens(ws, {auth.TOKEN_ENV: good[auth.TOKEN_ENV]})
    with pytest.raises(k8s.BootstrapError, match="it has 5"):
        k8s.bootstrap_tokens(ws, {**good, auth.TOKEN_ENV: "short"})
    k8s.bootstrap_tokens(ws, good)
    admin = auth.local_principal(ws)
    auth.revoke_token(ws, k8s.SERVING_KEY_NAME, admin)
    with pytest.raises(k8s.BootstrapError, match="was revoked"):
        k8s.bootstrap_tokens(ws, good)
