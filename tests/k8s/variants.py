"""What tests/k8s renders: the shipped values files, plus one with every optional branch on.

    .venv/bin/python -m pytest -q tests/k8s

No cluster and no `helm`/`kubectl`: rendering is Python (evertune.k8s), and the tests check the
objects against the Kubernetes OpenAPI schemas (kubernetes-validate), the vendored CRD schemas
(tests/k8s/crds) and the code they run (routes, CLI commands, config keys, env names).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evertune import k8s

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VALUES = ROOT / "deploy" / "k8s" / "values.yaml"
GPU_EXTERNAL_VALUES = ROOT / "deploy" / "k8s" / "examples" / "gpu-external.yaml"

# The branches neither shipped file takes: vLLM with the in-cluster stores, fixed replicas
# (no HPA), both stages, an S3-compatible endpoint, secrets given in the values, an existing
# namespace, pull secrets, IRSA, no Ray autoscaler, a user port.
ALL_ON: dict[str, Any] = {
    "release": "et",
    "namespace": {"name": "ml-platform", "create": False},
    "imagePullSecrets": ["regcred"],
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
    "secrets": {
        "adminToken": "evt_" + "a" * 43, "servingKey": "evt_" + "s" * 43,
        "postgresPassword": "p" * 32, "awsAccessKeyId": "AKIAEXAMPLE",
        "awsSecretAccessKey": "secret", "hfToken": "hf_example",
    },
    "storage": {"bucket": "s3://landing", "s3EndpointUrl": "http://minio.storage.svc:9000"},
    "postgres": {"storageClassName": "gp3", "nodeSelector": {"pool": "db"}},
    "mlflow": {"allowedHosts": ["mlflow.example.com"]},
    "control": {"replicas": 3, "serviceType": "LoadBalancer"},
    "serve": {"stages": ["prod", "qa"], "replicas": 3, "autoscaling": {"enabled": False},
              "vllm": {"enabled": True, "gpus": 2,
                       "image": {"repository": "registry.example/evertune-gpu", "tag": "1"}}},
    "ray": {"autoscaling": False, "gpuWorkers": {"enabled": True, "replicas": 1},
            "jobExample": {"entrypointNumGpus": 1}},
    "serviceMonitor": {"labels": {"release": "prom"}, "interval": "15s"},
    "config": {"server": {"port": 9000}, "train": {"n_epochs": 1}},
}  # fmt: skip

# Fixed Secret data so renders are deterministic (resolve_secrets would generate them).
SECRET_DATA = {
    "EVERTUNE_TOKEN": "evt_" + "t" * 43, "EVERTUNE_SERVING_KEY": "evt_" + "k" * 43,
    "PGPASSWORD": "pw" * 16,
}  # fmt: skip


@functools.cache
def values(variant: str) -> k8s.Values:
    if variant == "default":
        return k8s.load_values(DEFAULT_VALUES)
    if variant == "gpu-external":
        return k8s.load_values(GPU_EXTERNAL_VALUES)
    if variant == "all-on":
        return k8s.parse_values(ALL_ON, "all-on")
    raise KeyError(variant)


VARIANTS = ("default", "gpu-external", "all-on")


@functools.cache
def rendered(variant: str) -> k8s.Rendered:
    v = values(variant)
    data, _ = k8s.resolve_secrets(v, SECRET_DATA)
    return k8s.render(v, data)


def objects(variant: str) -> list[dict[str, Any]]:
    return k8s.k8s_objects(rendered(variant))


def find(variant: str, kind: str, component: str | None = None) -> list[dict[str, Any]]:
    """Objects of `kind` (and app.kubernetes.io/component) in a variant."""
    return [
        o for o in objects(variant)
        if o["kind"] == kind and (component is None or o["metadata"].get("labels", {}).get(
            "app.kubernetes.io/component") == component)
    ]  # fmt: skip


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in an object, CRDs included."""
    kind, spec = obj["kind"], obj.get("spec", {})
    name = f"{kind}/{obj['metadata']['name']}"
    if kind in ("Deployment", "StatefulSet", "Job"):
        yield name, spec["template"]["spec"]
    elif kind == "RayCluster":
        yield f"{name} head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield f"{name} {group['groupName']}", group["template"]["spec"]
    elif kind == "RayJob":
        yield f"{name} submitter", spec["submitterPodTemplate"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]
