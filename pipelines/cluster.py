"""Namespace-wide objects of `k8s/base`: service accounts and RBAC, the S3 Secret template and ConfigMap."""

from __future__ import annotations

from kubernetes import client as k8s

from pipelines import podspec

LAUNCHER_SA = "clipforge-launcher"
# The launcher's API token as a Secret: Kubernetes fills it (token, ca.crt, namespace) for LAUNCHER_SA,
# and only the pipeline's train step mounts it (jobapi.LAUNCHER_TOKEN_DIR), so the run's own account
# needs no clipforge rights and the other steps cannot create jobs.
LAUNCHER_TOKEN_SECRET = "clipforge-launcher-token"
_LABELS = {"app.kubernetes.io/name": "clipforge"}


def _meta(name: str, namespace: str) -> k8s.V1ObjectMeta:
    return k8s.V1ObjectMeta(name=name, namespace=namespace, labels=dict(_LABELS))


def namespace(name: str) -> k8s.V1Namespace:
    return k8s.V1Namespace(api_version="v1", kind="Namespace",
                           metadata=k8s.V1ObjectMeta(name=name, labels=dict(_LABELS)))


# Exactly the API calls of pipelines/launcher.py (through kubeflow-training's TrainingClient):
# create_job, wait_for_job_conditions -> get_job, get_job_logs -> list pods + read (follow) their
# logs, delete_job. tests/k8s/test_k8s_rbac.py records the launcher's requests and checks this set.
LAUNCHER_RULES = (
    ("kubeflow.org", "pytorchjobs", ("create", "get", "delete")),
    ("", "pods", ("list",)),
    ("", "pods/log", ("get",)),
)


def launcher_rbac(ns: str) -> list:
    """The train step's identity: PyTorchJobs (create, get, delete) and its pods' logs, nothing else.

    The account mounts no token anywhere by itself; its token Secret is mounted by the train step only.
    """
    rules = [k8s.V1PolicyRule(api_groups=[group], resources=[resource], verbs=list(verbs))
             for group, resource, verbs in LAUNCHER_RULES]
    return [
        k8s.V1ServiceAccount(api_version="v1", kind="ServiceAccount", metadata=_meta(LAUNCHER_SA, ns),
                             automount_service_account_token=False),
        k8s.V1Secret(api_version="v1", kind="Secret", type="kubernetes.io/service-account-token",
                     metadata=k8s.V1ObjectMeta(name=LAUNCHER_TOKEN_SECRET, namespace=ns, labels=dict(_LABELS),
                                               annotations={"kubernetes.io/service-account.name": LAUNCHER_SA})),
        k8s.V1Role(api_version="rbac.authorization.k8s.io/v1", kind="Role",
                   metadata=_meta(LAUNCHER_SA, ns), rules=rules),
        k8s.V1RoleBinding(
            api_version="rbac.authorization.k8s.io/v1", kind="RoleBinding", metadata=_meta(LAUNCHER_SA, ns),
            role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=LAUNCHER_SA),
            subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=LAUNCHER_SA, namespace=ns)]),
    ]


def workload_service_accounts(ns: str) -> list:
    """One identity per workload with no API rights and no token mounted (download, trainer pods, ...)."""
    return [k8s.V1ServiceAccount(api_version="v1", kind="ServiceAccount", metadata=_meta(name, ns),
                                 automount_service_account_token=False)
            for name in sorted(set(podspec.SERVICE_ACCOUNTS.values()))]


def s3_settings(ns: str) -> list:
    """A Secret template (fill in, never commit values) and the endpoint ConfigMap."""
    secret = k8s.V1Secret(
        api_version="v1", kind="Secret", type="Opaque", metadata=_meta(podspec.S3_SECRET, ns),
        string_data={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    config = k8s.V1ConfigMap(
        api_version="v1", kind="ConfigMap", metadata=_meta(podspec.S3_CONFIG_MAP, ns),
        data={"AWS_ENDPOINT_URL": "http://minio.minio.svc.cluster.local:9000",
              "AWS_DEFAULT_REGION": "us-east-1",
              "PUSHGATEWAY_URL": "http://clipforge-pushgateway:9091"})
    return [secret, config]


def priority_class(name: str, value: int = 1000) -> k8s.V1PriorityClass:
    """Training pods' priority; preemption off, so a queued job never evicts running work."""
    return k8s.V1PriorityClass(
        api_version="scheduling.k8s.io/v1", kind="PriorityClass", metadata=k8s.V1ObjectMeta(
            name=name, labels=dict(_LABELS)), value=value, preemption_policy="Never", global_default=False,
        description="clipforge training jobs")
