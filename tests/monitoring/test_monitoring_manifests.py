"""The monitoring manifests: valid custom resources, kustomize-buildable, selecting the trainer."""

from __future__ import annotations

import copy
import subprocess

import pytest
import yaml
from monkit_schema import crd_validator, errors

from tests.conftest import REPO, which

MONITORING = REPO / "k8s" / "base" / "monitoring"


@pytest.fixture(scope="module")
def built() -> list[dict]:
    """What `kubectl kustomize k8s/base/monitoring` renders."""
    out = subprocess.run([which("kubectl"), "kustomize", str(MONITORING)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("kind, crd", [("PodMonitor", "monitoring.coreos.com_podmonitors.yaml"),
                                       ("PrometheusRule", "monitoring.coreos.com_prometheusrules.yaml")])
def test_custom_resources_validate_against_their_crd(built, schemas_dir, kind, crd):
    validator = crd_validator(schemas_dir / crd)
    docs = by_kind(built, kind)
    assert docs, f"kustomize build has no {kind}"
    for doc in docs:
        assert errors(validator, doc) == [], doc["metadata"]["name"]


def test_schema_check_catches_a_misspelt_field(built, schemas_dir):
    validator = crd_validator(schemas_dir / "monitoring.coreos.com_podmonitors.yaml")
    doc = copy.deepcopy(by_kind(built, "PodMonitor")[0])
    doc["spec"]["podMetricsEndpoints"][0]["honourLabels"] = True
    doc["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    found = errors(validator, doc)
    assert any("honourLabels" in e for e in found) and any("interval" in e for e in found), found


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels and the In/NotIn/Exists operators)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


OPERATOR_LABELS = {"training.kubeflow.org/job-name": "clip-a", "training.kubeflow.org/replica-type": "worker"}


def test_trainer_podmonitor_selects_trainer_pods_by_their_metrics_ports(built):
    (monitor,) = [m for m in by_kind(built, "PodMonitor") if m["metadata"]["name"] == "clipforge-train"]
    spec = monitor["spec"]
    assert selects(spec["selector"], {"app.kubernetes.io/name": "clipforge-train", **OPERATOR_LABELS})
    assert selects(spec["selector"], {"app.kubernetes.io/name": "clipforge",
                                      "app.kubernetes.io/component": "train", **OPERATOR_LABELS})
    assert not selects(spec["selector"], {"app.kubernetes.io/name": "clipforge",
                                          "app.kubernetes.io/component": "download"})
    ports = [e["port"] for e in spec["podMetricsEndpoints"]]
    assert ports[0] == "metrics" and ports[1:] == [f"metrics-{r}" for r in range(1, 8)]
    assert spec["jobLabel"] == "training.kubeflow.org/job-name"


def test_base_pytorchjob_pods_are_selected_and_declare_the_metrics_port(built):
    """The base's PyTorchJob (owned by the Kubernetes manifests) is what the PodMonitor must find."""
    out = subprocess.run([which("kubectl"), "kustomize", str(MONITORING.parent)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    jobs = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "PyTorchJob"]
    (monitor,) = [m for m in by_kind(built, "PodMonitor") if m["metadata"]["name"] == "clipforge-train"]
    assert jobs
    for job in jobs:
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            pod = replica["template"]
            assert selects(monitor["spec"]["selector"], {**pod["metadata"]["labels"], **OPERATOR_LABELS})
            (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "pytorch"]
            assert "metrics" in [p.get("name") for p in container.get("ports", [])]


def test_pushgateway_is_scraped_keeping_pushed_labels(built):
    (service,) = by_kind(built, "Service")
    (deploy,) = by_kind(built, "Deployment")
    (monitor,) = [m for m in by_kind(built, "PodMonitor") if m["metadata"]["name"] == "clipforge-pushgateway"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    assert monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True


def test_core_kinds_validate_against_kubernetes_schemas(built):
    import kubernetes_validate

    for doc in built:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar(built):
    (cm,) = by_kind(built, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (REPO / "monitoring" / "grafana" / "clipforge.json").read_text()
    assert cm["data"]["clipforge.json"] == shipped
