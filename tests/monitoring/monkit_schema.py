"""Validate custom resources against the openAPIV3Schema of their CRD in k8s/schemas."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml


def _strict(node):
    """The CRD schema as JSON Schema: int-or-string made explicit, unknown fields rejected
    (what `kubectl apply` with strict field validation does)."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _strict(value) for key, value in node.items()}
    if node.pop("x-kubernetes-int-or-string", False):
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node and \
            not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    return node


def crd_validator(crd_file: Path) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
