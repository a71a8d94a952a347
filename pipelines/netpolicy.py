"""NetworkPolicies of `k8s/base`: what each stage's pods may reach, and who reaches them.

- download pods: egress to the internet (the URL list's sites) and to the object store, DNS and the
  Pushgateway; never to cluster-internal ranges or the cloud metadata address; no ingress.
- trainer pods (the PyTorchJob's): ingress only from their peers (rendezvous, gloo/NCCL) and the
  metrics scraper on the metrics ports; egress to peers, DNS, the object store and the Pushgateway.
- evaluate pods: no ingress; egress to DNS, the object store and the Pushgateway only.
- export pods: no ingress; egress to DNS, the object store, the Pushgateway and the Hugging Face Hub
  (HTTPS to the internet, never to cluster-internal ranges or the metadata address).

The object store and the scraper are found by namespace (`OBJECT_STORE_NAMESPACE`,
`SCRAPER_NAMESPACE`); an overlay patches them where a cluster names them otherwise. An external
store (S3, GCS) is "the internet" for the download pods; trainer pods that read from one need the
`internet` peer added to their egress in an overlay.
"""

from __future__ import annotations

from kubernetes import client as k8s

from pipelines.pytorchjob import METRICS_PORT

OBJECT_STORE_NAMESPACE = "minio"  # AWS_ENDPOINT_URL in k8s/base/s3.yaml points there
SCRAPER_NAMESPACE = "monitoring"  # where Prometheus runs (kube-prometheus-stack's default)
PUSHGATEWAY = {"app.kubernetes.io/name": "clipforge-pushgateway"}
# Private (RFC 1918), shared (RFC 6598), link-local (cloud metadata: 169.254.169.254) and loopback.
INTERNAL_V4 = ["10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
               "192.168.0.0/16"]
# Unique-local (AWS metadata fd00:ec2::254 is in it), link-local and loopback.
INTERNAL_V6 = ["::1/128", "fc00::/7", "fe80::/10"]
_LABELS = {"app.kubernetes.io/name": "clipforge"}


def _component(name: str) -> k8s.V1LabelSelector:
    return k8s.V1LabelSelector(match_labels={"app.kubernetes.io/name": "clipforge",
                                             "app.kubernetes.io/component": name})


def _namespace(name: str) -> k8s.V1NetworkPolicyPeer:
    return k8s.V1NetworkPolicyPeer(namespace_selector=k8s.V1LabelSelector(
        match_labels={"kubernetes.io/metadata.name": name}))


def internet() -> list[k8s.V1NetworkPolicyPeer]:
    return [k8s.V1NetworkPolicyPeer(ip_block=k8s.V1IPBlock(cidr="0.0.0.0/0", _except=list(INTERNAL_V4))),
            k8s.V1NetworkPolicyPeer(ip_block=k8s.V1IPBlock(cidr="::/0", _except=list(INTERNAL_V6)))]


def _dns() -> k8s.V1NetworkPolicyEgressRule:
    peer = k8s.V1NetworkPolicyPeer(
        namespace_selector=k8s.V1LabelSelector(match_labels={"kubernetes.io/metadata.name": "kube-system"}),
        pod_selector=k8s.V1LabelSelector(match_labels={"k8s-app": "kube-dns"}))
    return k8s.V1NetworkPolicyEgressRule(to=[peer], ports=[k8s.V1NetworkPolicyPort(protocol=p, port=53)
                                                           for p in ("UDP", "TCP")])


def _store_and_pushgateway() -> list[k8s.V1NetworkPolicyEgressRule]:
    return [k8s.V1NetworkPolicyEgressRule(to=[_namespace(OBJECT_STORE_NAMESPACE)]),
            k8s.V1NetworkPolicyEgressRule(
                to=[k8s.V1NetworkPolicyPeer(pod_selector=k8s.V1LabelSelector(match_labels=dict(PUSHGATEWAY)))],
                ports=[k8s.V1NetworkPolicyPort(protocol="TCP", port=9091)])]


def _policy(name: str, ns: str, spec: k8s.V1NetworkPolicySpec) -> k8s.V1NetworkPolicy:
    return k8s.V1NetworkPolicy(api_version="networking.k8s.io/v1", kind="NetworkPolicy",
                               metadata=k8s.V1ObjectMeta(name=name, namespace=ns, labels=dict(_LABELS)),
                               spec=spec)


def download_policy(ns: str) -> k8s.V1NetworkPolicy:
    return _policy("clipforge-download", ns, k8s.V1NetworkPolicySpec(
        pod_selector=_component("download"), policy_types=["Ingress", "Egress"], ingress=[],
        egress=[_dns(), *_store_and_pushgateway(), k8s.V1NetworkPolicyEgressRule(to=internet())]))


def trainer_policy(ns: str, max_procs_per_node: int = 8) -> k8s.V1NetworkPolicy:
    """Metrics ports are METRICS_PORT + local rank, one per process on a node."""
    peers = k8s.V1NetworkPolicyPeer(pod_selector=_component("train"))
    scraper = k8s.V1NetworkPolicyPeer(namespace_selector=k8s.V1LabelSelector(
        match_labels={"kubernetes.io/metadata.name": SCRAPER_NAMESPACE}))
    metrics = k8s.V1NetworkPolicyPort(protocol="TCP", port=METRICS_PORT,
                                      end_port=METRICS_PORT + max_procs_per_node - 1)
    return _policy("clipforge-trainer", ns, k8s.V1NetworkPolicySpec(
        pod_selector=_component("train"), policy_types=["Ingress", "Egress"],
        ingress=[k8s.V1NetworkPolicyIngressRule(_from=[peers]),
                 k8s.V1NetworkPolicyIngressRule(_from=[scraper], ports=[metrics])],
        egress=[k8s.V1NetworkPolicyEgressRule(to=[peers]), _dns(), *_store_and_pushgateway()]))


def evaluate_policy(ns: str) -> k8s.V1NetworkPolicy:
    return _policy("clipforge-evaluate", ns, k8s.V1NetworkPolicySpec(
        pod_selector=_component("evaluate"), policy_types=["Ingress", "Egress"], ingress=[],
        egress=[_dns(), *_store_and_pushgateway()]))


def export_policy(ns: str) -> k8s.V1NetworkPolicy:
    """The Hub is reached over HTTPS only: `push_to_hub` is the one call that leaves the cluster."""
    hub = k8s.V1NetworkPolicyEgressRule(to=internet(), ports=[k8s.V1NetworkPolicyPort(protocol="TCP", port=443)])
    return _policy("clipforge-export", ns, k8s.V1NetworkPolicySpec(
        pod_selector=_component("export"), policy_types=["Ingress", "Egress"], ingress=[],
        egress=[_dns(), *_store_and_pushgateway(), hub]))


def network_policies(ns: str) -> list[k8s.V1NetworkPolicy]:
    return [download_policy(ns), trainer_policy(ns), evaluate_policy(ns), export_policy(ns)]
