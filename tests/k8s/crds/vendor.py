"""Vendor the openAPIV3Schema of CRDs for tests/k8s (KubeRay, prometheus-operator).

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayclusters.yaml > rc.yaml
    python tests/k8s/crds/vendor.py rc.yaml rj.yaml sm.yaml      # writes tests/k8s/crds/*.json

Keeps only version v1 of each CRD (the one the manifests use) and drops the `description`
texts, which are most of the size and never affect validation. Sources and commits: README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
VERSION = "v1"


def strip_descriptions(node: Any, in_properties: bool = False) -> Any:
    """The schema without `description` keywords (a property called "description" stays)."""
    if isinstance(node, dict):
        return {
            key: strip_descriptions(value, in_properties=key == "properties" and not in_properties)
            for key, value in node.items()
            if in_properties or key != "description"
        }
    if isinstance(node, list):
        return [strip_descriptions(item) for item in node]
    return node


def vendor(crd_path: Path) -> Path:
    crd = yaml.safe_load(crd_path.read_text("utf-8"))
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v["name"] == VERSION)
    out = HERE / f"{spec['group']}_{spec['names']['plural']}.{VERSION}.json"
    doc = {
        "apiVersion": f"{spec['group']}/{VERSION}",
        "kind": spec["names"]["kind"],
        "annotations": crd["metadata"].get("annotations", {}),
        "openAPIV3Schema": strip_descriptions(version["schema"]["openAPIV3Schema"]),
    }
    # Compact: a generated file, refreshed by this script, never edited by hand.
    out.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n", "utf-8")
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(vendor(Path(arg)))
