"""Every rendered object validates: built-in kinds against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors), RayCluster / RayJob / ServiceMonitor
against their CRDs' published schemas (tests/k8s/crds, with jsonschema).

    .venv/bin/python -m pytest -q tests/k8s/test_schemas.py
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate import utils as kv_utils

from tests.k8s.variants import VARIANTS, find, objects

# The oldest Kubernetes minor the manifests target (EKS standard support, late 2026); the
# schemas of 1.25-1.37 ship inside kubernetes-validate 1.37.0. Validating against an older
# minor than the cluster's catches fields that only newer API servers know.
KUBERNETES_VERSION = "1.33.0"
CRDS = Path(__file__).parent / "crds"


def _strict(node: Any) -> Any:
    """A CRD schema that rejects unknown fields, as the API server does under kubectl's default
    strict field validation (a structural schema only prunes them)."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items() if key != "properties"}
    if "properties" in node:
        out["properties"] = {name: _strict(s) for name, s in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    # OpenAPI 3.0 schemas are JSON Schema draft 4 plus keywords jsonschema ignores (nullable,
    # x-kubernetes-*); the int-or-string fields carry their own anyOf.
    found = {}
    for path in sorted(CRDS.glob("*.json")):
        doc = json.loads(path.read_text("utf-8"))
        found[(doc["apiVersion"], doc["kind"])] = jsonschema.Draft4Validator(
            _strict(doc["openAPIV3Schema"])
        )
    return found


def problems(obj: dict[str, Any]) -> list[str]:
    """What is wrong with `obj` (empty: valid); an object with no schema is a problem too."""
    validator = crd_validators().get((obj["apiVersion"], obj["kind"]))
    if validator is not None:
        return [
            f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {obj['apiVersion']} {obj['kind']}: vendor its CRD"]
    return []


CASES = [
    pytest.param(variant, i, id=f"{variant}:{o['kind']}/{o['metadata']['name']}")
    for variant in VARIANTS
    for i, o in enumerate(objects(variant))
]


@pytest.mark.parametrize(("variant", "index"), CASES)
def test_object_validates_against_its_schema(variant: str, index: int) -> None:
    assert problems(objects(variant)[index]) == []


def test_the_pinned_kubernetes_version_ships_with_kubernetes_validate() -> None:
    assert KUBERNETES_VERSION in kv_utils.all_versions()


def test_crd_schemas_are_vendored_for_every_custom_kind() -> None:
    assert set(crd_validators()) == {
        ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
    }  # fmt: skip


def test_every_required_kind_is_rendered() -> None:
    kinds = {o["kind"] for variant in VARIANTS for o in objects(variant)}
    assert kinds >= {
        "Namespace", "ServiceAccount", "ConfigMap", "Secret", "PersistentVolumeClaim",
        "StatefulSet", "Service", "Deployment", "Job", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "RayCluster", "RayJob", "ServiceMonitor",
    }  # fmt: skip


def test_the_validators_reject_a_misspelt_field_and_a_wrong_type() -> None:
    # Guards the guard: a validator that accepted anything would pass every test above.
    deployment = copy.deepcopy(find("default", "Deployment", "control")[0])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert "readinesProbe" in problems(deployment)[0]
    deployment = copy.deepcopy(find("default", "Deployment", "control")[0])
    deployment["spec"]["replicas"] = "2"
    assert problems(deployment)

    cluster = copy.deepcopy(find("default", "RayCluster")[0])
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in p for p in problems(cluster))
    cluster = copy.deepcopy(find("default", "RayCluster")[0])
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "1"
    assert problems(cluster)

    monitor = copy.deepcopy(find("default", "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    assert problems(monitor)
