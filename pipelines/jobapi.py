"""The Kubernetes calls the launcher makes, through the official `kubernetes` client.

The kubeflow-training SDK's `TrainingClient` turns every API failure into a bare RuntimeError, so a
404 (the job was deleted), a 409 (it already exists) and an API server restart look the same; the
launcher needs to tell them apart, so it calls the CustomObjects and CoreV1 APIs itself.
"""

from __future__ import annotations

import os

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from pipelines.pytorchjob import API_VERSION

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "pytorchjobs"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# Where the pipeline's train step mounts the launcher's token Secret (cluster.LAUNCHER_TOKEN_SECRET).
LAUNCHER_TOKEN_DIR = "/var/run/secrets/clipforge/launcher"


def api_client(configuration: k8s.Configuration | None = None, token_dir: str | None = None) -> k8s.ApiClient:
    """The launcher's token when mounted; else the pod's service account; else the kubeconfig.

    In tests: the given configuration. The token is re-read as it is rotated, as in-cluster config does.
    """
    if configuration is None:
        configuration = _configuration(token_dir or os.environ.get("CLIPFORGE_LAUNCHER_TOKEN_DIR", LAUNCHER_TOKEN_DIR))
    return k8s.ApiClient(configuration)


def _configuration(token_dir: str) -> k8s.Configuration:
    from kubernetes import config
    from kubernetes.config.incluster_config import InClusterConfigLoader

    configuration = k8s.Configuration()
    if os.path.exists(os.path.join(token_dir, "token")):
        InClusterConfigLoader(token_filename=os.path.join(token_dir, "token"),
                              cert_filename=os.path.join(token_dir, "ca.crt")).load_and_set(configuration)
        return configuration
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return configuration


def is_transient(exc: Exception) -> bool:
    """An API server that is restarting, overloaded or unreachable, as opposed to a real answer."""
    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUS or exc.status == 0
    import urllib3

    return isinstance(exc, (urllib3.exceptions.HTTPError, OSError))


def status_of(exc: Exception) -> int:
    return exc.status if isinstance(exc, ApiException) else 0


class JobApi:
    """Create, read and delete one PyTorchJob; find its pods and read their logs."""

    def __init__(self, client: k8s.ApiClient, name: str, namespace: str, request_timeout_s: float = 30):
        self.custom, self.core = k8s.CustomObjectsApi(client), k8s.CoreV1Api(client)
        self.name, self.namespace, self.timeout = name, namespace, request_timeout_s

    def create(self, body: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body,
                                                           _request_timeout=self.timeout)

    def get(self) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name,
                                                        _request_timeout=self.timeout)

    def delete(self) -> None:
        """Background propagation: the operator's pods go with the job."""
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name, propagation_policy="Background",
            _request_timeout=self.timeout)

    def pods(self, replica_type: str, index: int) -> list[dict]:
        selector = (f"{JOB_NAME_LABEL}={self.name},{REPLICA_TYPE_LABEL}={replica_type},"
                    f"{REPLICA_INDEX_LABEL}={index}")
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector,
                                             _request_timeout=self.timeout)
        return [self.core.api_client.sanitize_for_serialization(p) for p in pods.items]

    def log_stream(self, pod: str, container: str, since_s: int | None = None):
        """The container's log as a urllib3 response to read in chunks (never all in memory)."""
        kwargs = {"since_seconds": since_s} if since_s else {}
        return self.core.read_namespaced_pod_log(pod, self.namespace, container=container, follow=True,
                                                 _preload_content=False, **kwargs)
