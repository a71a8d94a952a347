"""NetworkPolicies in k8s/base, read the way a CNI applies them (rules allow; no rule, no traffic).

No cluster can run here, so `reaches` below evaluates the rendered policies with the NetworkPolicy
rules (peers by namespace/pod labels or IP block, ports with endPort) for concrete destinations.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import kubernetes_validate
import pytest
from k8skit import KUBERNETES_VERSION

NS = "clipforge"


@dataclasses.dataclass
class Peer:
    """A pod (namespace and labels) or an address outside the cluster (ip only)."""

    namespace: str = ""
    labels: dict = dataclasses.field(default_factory=dict)
    ip: str = ""


DOWNLOAD = Peer(NS, {"app.kubernetes.io/name": "clipforge", "app.kubernetes.io/component": "download"})
TRAINER = Peer(NS, {"app.kubernetes.io/name": "clipforge", "app.kubernetes.io/component": "train"})
MINIO = Peer("minio", {"app": "minio"})
KUBE_DNS = Peer("kube-system", {"k8s-app": "kube-dns"})
PUSHGATEWAY = Peer(NS, {"app.kubernetes.io/name": "clipforge-pushgateway"})
PROMETHEUS = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
OTHER_APP = Peer("default", {"app": "web"})
EVALUATE = Peer(NS, {"app.kubernetes.io/name": "clipforge", "app.kubernetes.io/component": "evaluate"})
EXPORT = Peer(NS, {"app.kubernetes.io/name": "clipforge", "app.kubernetes.io/component": "export"})


def _selects(selector: dict | None, labels: dict) -> bool:
    return selector is not None and all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_matches(rule_peer: dict, peer: Peer, policy_ns: str) -> bool:
    if "ipBlock" in rule_peer:
        if not peer.ip:
            return False
        block, ip = rule_peer["ipBlock"], ipaddress.ip_address(peer.ip)
        net = ipaddress.ip_network(block["cidr"])
        return ip.version == net.version and ip in net and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if peer.ip:
        return False
    ns_ok = (_selects(rule_peer["namespaceSelector"], {"kubernetes.io/metadata.name": peer.namespace})
             if "namespaceSelector" in rule_peer else peer.namespace == policy_ns)
    pod_ok = _selects(rule_peer["podSelector"], peer.labels) if "podSelector" in rule_peer else True
    return ns_ok and pod_ok


def _port_matches(ports: list[dict] | None, port: int, protocol: str) -> bool:
    return not ports or any(p.get("protocol", "TCP") == protocol and p["port"] <= port <= p.get("endPort", p["port"])
                            for p in ports)


def reaches(policies: list[dict], src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    """Is src -> dst:port allowed by the policies that select src (egress) and dst (ingress)?"""
    def allowed(direction: str, pod: Peer, other: Peer) -> bool:
        selecting = [p for p in policies if p["metadata"]["namespace"] == pod.namespace and not pod.ip
                     and _selects(p["spec"]["podSelector"], pod.labels) and direction in p["spec"]["policyTypes"]]
        if not selecting:
            return True  # no policy selects the pod in this direction: everything is allowed
        key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        return any(_port_matches(rule.get("ports"), port, protocol)
                   and (not rule.get(peers_key) or any(_peer_matches(peer, other, p["metadata"]["namespace"])
                                                       for peer in rule[peers_key]))
                   for p in selecting for rule in p["spec"].get(key) or [])
    return allowed("Egress", src, dst) and allowed("Ingress", dst, src)


@pytest.fixture(scope="module")
def policies(built) -> list[dict]:
    found = [o for o in built["base"] if o["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["name"] for p in found} == {"clipforge-download", "clipforge-trainer", "clipforge-evaluate",
                                                         "clipforge-export"}
    return found


def test_policies_validate_strictly(policies):
    for policy in policies:
        kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("ip,port", [("93.184.215.14", 443), ("8.8.8.8", 80), ("2606:4700::6810:84e5", 443)])
def test_download_pods_reach_the_internet(policies, ip, port):
    assert reaches(policies, DOWNLOAD, Peer(ip=ip), port)


@pytest.mark.parametrize("ip", ["169.254.169.254", "fd00:ec2::254", "10.96.0.1", "10.244.3.7", "172.20.0.10",
                                "192.168.1.1", "100.64.0.1", "127.0.0.1", "fe80::1"])
def test_download_pods_do_not_reach_cluster_ranges_or_the_metadata_address(policies, ip):
    assert not reaches(policies, DOWNLOAD, Peer(ip=ip), 80)


def test_download_pods_reach_the_object_store_dns_and_pushgateway_but_not_other_pods(policies):
    assert reaches(policies, DOWNLOAD, MINIO, 9000)
    assert reaches(policies, DOWNLOAD, KUBE_DNS, 53, "UDP") and not reaches(policies, DOWNLOAD, KUBE_DNS, 8080)
    assert reaches(policies, DOWNLOAD, PUSHGATEWAY, 9091) and not reaches(policies, DOWNLOAD, PUSHGATEWAY, 22)
    assert not reaches(policies, DOWNLOAD, OTHER_APP, 80)
    assert not reaches(policies, DOWNLOAD, TRAINER, 29500)
    assert not reaches(policies, OTHER_APP, DOWNLOAD, 80)  # nothing connects to a download pod


def test_trainer_pods_accept_only_peers_and_the_metrics_scraper(policies):
    assert reaches(policies, TRAINER, TRAINER, 29500)  # rendezvous / gloo / NCCL between the pods
    assert reaches(policies, PROMETHEUS, TRAINER, 9090) and reaches(policies, PROMETHEUS, TRAINER, 9097)
    assert not reaches(policies, PROMETHEUS, TRAINER, 29500)  # the scraper gets the metrics ports only
    assert not reaches(policies, OTHER_APP, TRAINER, 9090)
    assert not reaches(policies, Peer(NS, {"app.kubernetes.io/name": "other"}), TRAINER, 29500)
    assert not reaches(policies, Peer(ip="203.0.113.9"), TRAINER, 9090)


def test_trainer_pods_reach_peers_and_the_store_but_not_the_metadata_address(policies):
    assert reaches(policies, TRAINER, MINIO, 9000) and reaches(policies, TRAINER, PUSHGATEWAY, 9091)
    assert not reaches(policies, TRAINER, Peer(ip="169.254.169.254"), 80)
    assert not reaches(policies, TRAINER, OTHER_APP, 80)


def test_the_evaluator_itself_allows_what_no_policy_selects(policies):
    assert reaches(policies, OTHER_APP, Peer(ip="169.254.169.254"), 80)  # not ours: no policy applies
    assert reaches([], DOWNLOAD, Peer(ip="169.254.169.254"), 80)


def test_evaluate_pods_reach_only_the_store_dns_and_pushgateway(policies):
    assert reaches(policies, EVALUATE, MINIO, 9000) and reaches(policies, EVALUATE, PUSHGATEWAY, 9091)
    assert reaches(policies, EVALUATE, KUBE_DNS, 53, "UDP")
    for ip in ("93.184.215.14", "169.254.169.254", "10.96.0.1"):
        assert not reaches(policies, EVALUATE, Peer(ip=ip), 443)
    assert not reaches(policies, EVALUATE, TRAINER, 29500) and not reaches(policies, OTHER_APP, EVALUATE, 80)


def test_export_pods_reach_the_hub_over_https_but_not_cluster_ranges(policies):
    assert reaches(policies, EXPORT, Peer(ip="18.164.174.10"), 443)  # huggingface.co lives on the internet
    assert not reaches(policies, EXPORT, Peer(ip="18.164.174.10"), 80)
    for ip in ("169.254.169.254", "fd00:ec2::254", "10.96.0.1", "192.168.1.1"):
        assert not reaches(policies, EXPORT, Peer(ip=ip), 443)
    assert reaches(policies, EXPORT, MINIO, 9000) and not reaches(policies, OTHER_APP, EXPORT, 80)
