"""Helpers for the manifest tests: kustomize builds, the PyTorchJob CRD schema and webhook rules."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUBERNETES_VERSION = "1.32.0"  # the oldest release clipforge supports (Indexed Jobs, seccomp GA)
DIRS = ("base", "overlays/cpu-smoke", "overlays/gpu")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def kustomize(kubectl: str, rel: str) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(K8S / rel)], check=True, capture_output=True, text=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def ours(objs: list[dict]) -> list[dict]:
    """The objects rendered from pipelines/presets.py (monitoring/ brings its own, tested there)."""
    from pipelines import manifests

    names = {(o["kind"], o["metadata"]["name"]) for text in manifests.base_files().values()
             for o in yaml.safe_load_all(text) if o}
    return [o for o in objs if (o["kind"], o["metadata"]["name"]) in names]


def _int_or_string(node):
    """The CRD marks int-or-string fields with an extension jsonschema does not know."""
    if isinstance(node, dict):
        node = {k: _int_or_string(v) for k, v in node.items()}
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return node
    if isinstance(node, list):
        return [_int_or_string(v) for v in node]
    return node


def pytorchjob_schema(schemas_dir: Path) -> dict:
    crd = yaml.safe_load((schemas_dir / "kubeflow.org_pytorchjobs.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _int_or_string(version["schema"]["openAPIV3Schema"])


def webhook_errors(job: dict) -> list[str]:
    """The training operator's admission rules beyond the schema (schemas/PROVENANCE.md)."""
    errors = []
    if not _DNS1035.match(job["metadata"]["name"]):
        errors.append(f"name {job['metadata']['name']!r} is not a DNS-1035 label")
    specs = job["spec"].get("pytorchReplicaSpecs", {})
    for rtype, spec in specs.items():
        if rtype not in ("Master", "Worker"):
            errors.append(f"replica type {rtype!r} is not Master or Worker")
        containers = spec["template"]["spec"]["containers"]
        if any(not c.get("image") for c in containers):
            errors.append(f"{rtype}: a container has no image")
        if not any(c["name"] == "pytorch" for c in containers):
            errors.append(f"{rtype}: no container named 'pytorch'")
    if "Master" in specs and specs["Master"].get("replicas", 1) != 1:
        errors.append("Master replicas must be exactly 1")
    elastic = job["spec"].get("elasticPolicy")
    if elastic is not None and "Worker" not in specs:
        errors.append("elasticPolicy needs a Worker replica spec")
    if elastic and "nProcPerNode" in elastic and "nprocPerNode" in job["spec"]:
        errors.append("elasticPolicy.nProcPerNode and spec.nprocPerNode are both set")
    return errors


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a workload: a Job's template, each PyTorchJob replica's template."""
    if obj["kind"] == "Job":
        return [(obj["metadata"]["name"], obj["spec"]["template"])]
    if obj["kind"] == "PyTorchJob":
        return [(f"{obj['metadata']['name']}/{rtype}", spec["template"])
                for rtype, spec in obj["spec"]["pytorchReplicaSpecs"].items()]
    return []


def stage_command(container: dict) -> tuple[str, list[str]]:
    """(stage, its flags) from `python -m stages.X …` or `torchrun --module stages.X …`."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if argv[:2] == ["sh", "-c"]:  # `sh -c 'python -m stages.X "$@" && …' NAME FLAGS…`
        script = shlex.split(argv[2])
        stage = next(w for i, w in enumerate(script) if i and script[i - 1] == "-m")
        assert '"$@"' in argv[2], f"container {container['name']}: the script drops its flags"
        return stage.removeprefix("stages."), argv[4:]
    for i, word in enumerate(argv):
        if word.startswith("stages.") and i > 0 and argv[i - 1] in ("-m", "--module"):
            return word.removeprefix("stages."), argv[i + 1:]
    raise AssertionError(f"container {container['name']}: no `-m stages.<stage>` in {argv}")
