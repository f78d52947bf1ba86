"""Regenerate the vendored CRD schemas from their upstream CustomResourceDefinitions.

    python tests/deploy/schemas/prune.py KNATIVE_SERVICE_CRD.yaml KUBERAY_RAYSERVICE_CRD.yaml

Upstream files (Apache-2.0): knative/serving config/core/300-resources/service.yaml and
ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayservices.yaml (commits in README.md).

Only the served `v1` openAPIV3Schema is kept. In the RayService schema, every embedded Pod template
(`template`) is replaced by "any object": those are core Kubernetes PodTemplateSpecs, which the
tests check with kubernetes-validate's strict core schemas instead (a 1 MB CRD shrinks to a few
kB without losing a check). Descriptions are dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent


def _strip(node: Any, *, prune_templates: bool) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description":
                continue
            if key == "properties" and isinstance(value, dict):
                props = {}
                for name, sub in value.items():
                    if prune_templates and name == "template" and "spec" in sub.get("properties", {}):
                        props[name] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    else:
                        props[name] = _strip(sub, prune_templates=prune_templates)
                out[key] = props
            else:
                out[key] = _strip(value, prune_templates=prune_templates)
        return out
    if isinstance(node, list):
        return [_strip(v, prune_templates=prune_templates) for v in node]
    return node


def v1_schema(crd_file: Path, *, prune_templates: bool) -> dict[str, Any]:
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strip(version["schema"]["openAPIV3Schema"], prune_templates=prune_templates)
    return {"group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "schema": schema}


def main() -> None:
    knative, kuberay = (Path(p) for p in sys.argv[1:3])
    for name, path, prune in (
        ("knative-service-v1.json", knative, False),
        ("kuberay-rayservice-v1.json", kuberay, True),
    ):
        (HERE / name).write_text(json.dumps(v1_schema(path, prune_templates=prune), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
