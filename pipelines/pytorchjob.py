"""The PyTorchJob of the train stage, built once here for both the launcher and `k8s/` manifests.

`build_pytorchjob(TrainJob(...))` returns a kubeflow-training `KubeflowOrgV1PyTorchJob`. The
pipeline's launcher creates exactly this object; `pipelines.manifests` renders it into the kustomize
overlays, so `kubectl apply -k` and the pipeline run the same job for the same parameters.
"""

from __future__ import annotations

import dataclasses
import re

from kubeflow.training import models as kf
from kubernetes import client as k8s

from pipelines import podspec
from pipelines.images import image

API_VERSION = "kubeflow.org/v1"
CONTAINER = "pytorch"  # the operator only wires up the container of this name
METRICS_PORT = 9090
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclasses.dataclass
class TrainJob:
    """What a user changes about a training job; everything else follows from these."""

    name: str = "clipforge-train"
    namespace: str = "clipforge"
    image: str = dataclasses.field(default_factory=lambda: image("train"))
    image_pull_policy: str = "IfNotPresent"
    train_args: list[str] = dataclasses.field(default_factory=list)  # `clipforge train` flags
    nodes: int = 2  # pods; one torchrun each
    procs_per_node: int = 1  # torchrun workers per pod (one per GPU)
    gpus_per_node: int = 0
    cpu: str = "2"
    memory: str = "4Gi"
    shm_size: str = "1Gi"
    elastic_min_nodes: int = 0  # >0: elastic (c10d rendezvous), between this and `nodes` pods
    max_restarts: int = 3  # elastic: torchrun restarts of the worker group
    backoff_limit: int = 3
    active_deadline_s: int = 48 * 3600
    ttl_s: int = 24 * 3600
    clean_pod_policy: str = "Running"  # what the operator deletes when the job ends
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    run_id: str = ""  # a label, so pods of one run can be found
    queue_name: str = ""  # Kueue LocalQueue; Kueue admits the whole job at once or not at all
    priority_class: str = ""  # PriorityClass of the pods (and of the gang, when gang_scheduling)
    gang_scheduling: bool = False  # runPolicy.schedulingPolicy: all pods scheduled together or none

    def check(self) -> None:
        if not _DNS1035.match(self.name):
            raise ValueError(f"PyTorchJob name {self.name!r} is not a DNS-1035 label "
                             "(lower-case letters, digits and '-', starting with a letter, at most 63)")
        if self.nodes < 1 or self.procs_per_node < 1 or self.gpus_per_node < 0:
            raise ValueError(f"nodes={self.nodes}, procs_per_node={self.procs_per_node}, "
                             f"gpus_per_node={self.gpus_per_node}: need nodes, procs >= 1 and gpus >= 0")
        if self.gpus_per_node and self.procs_per_node != self.gpus_per_node:
            raise ValueError(f"procs_per_node={self.procs_per_node} but gpus_per_node={self.gpus_per_node}: "
                             "each torchrun process drives one GPU")
        if self.elastic and not 1 <= self.elastic_min_nodes <= self.nodes:
            raise ValueError(f"elastic_min_nodes={self.elastic_min_nodes} must be between 1 and nodes={self.nodes}")

    @property
    def elastic(self) -> bool:
        return self.elastic_min_nodes > 0


def labels(job: TrainJob) -> dict[str, str]:
    out = {"app.kubernetes.io/name": "clipforge", "app.kubernetes.io/component": "train"}
    if job.run_id:
        out["clipforge.dev/run-id"] = job.run_id
    return out


def command(job: TrainJob) -> list[str]:
    """Bare torchrun: it reads the operator's PET_* variables (nodes, rank, master, rendezvous)."""
    return ["torchrun", "--module", "stages.train", *job.train_args]


def _threads_per_proc(job: TrainJob) -> int:
    """Split the pod's CPUs between its torchrun workers; torch would otherwise oversubscribe them."""
    cores = int(job.cpu) if job.cpu.isdigit() else 1
    return max(1, cores // job.procs_per_node)


def _metrics_ports(job: TrainJob) -> list[k8s.V1ContainerPort]:
    """Local rank r serves metrics on METRICS_PORT + r; the PodMonitor scrapes these port names."""
    return [k8s.V1ContainerPort(name="metrics" if r == 0 else f"metrics-{r}", container_port=METRICS_PORT + r)
            for r in range(job.procs_per_node)]


# torchrun's agents: a fresh rendezvous store each round, so ranks restarted after a fault (on any
# node) never read the previous round's addresses; without it they fail to re-join or hang.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# NCCL ranks: a failed or timed-out collective ends the process (so the group restarts) and says why.
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}


def _container(job: TrainJob) -> k8s.V1Container:
    _, shm_mount = podspec.shm_volume(job.shm_size)
    env = [k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
           k8s.V1EnvVar(name="OMP_NUM_THREADS", value=str(_threads_per_proc(job)))]
    extra = {**TORCHRUN_ENV, **(NCCL_ENV if job.gpus_per_node else {})}
    env += [k8s.V1EnvVar(name=k, value=v) for k, v in extra.items()]
    return k8s.V1Container(
        name=CONTAINER, image=job.image, image_pull_policy=job.image_pull_policy, command=command(job),
        env=env, env_from=podspec.s3_env_from(),
        ports=_metrics_ports(job),
        resources=podspec.resources(job.cpu, job.memory, job.gpus_per_node),
        security_context=podspec.container_security(), volume_mounts=[shm_mount])


def _template(job: TrainJob) -> k8s.V1PodTemplateSpec:
    shm, _ = podspec.shm_volume(job.shm_size)
    node_selector = dict(job.node_selector) or None
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=labels(job), annotations=dict(podspec.NO_ISTIO)),
        spec=k8s.V1PodSpec(
            containers=[_container(job)], volumes=[shm], security_context=podspec.pod_security(),
            node_selector=node_selector, priority_class_name=job.priority_class or None,
            tolerations=podspec.gpu_tolerations() if job.gpus_per_node else None))


def _replica_specs(job: TrainJob) -> dict[str, kf.KubeflowOrgV1ReplicaSpec]:
    """Static jobs: one Master and nodes-1 Workers. Elastic jobs: Workers only (the webhook wants them)."""
    def spec(replicas: int) -> kf.KubeflowOrgV1ReplicaSpec:
        return kf.KubeflowOrgV1ReplicaSpec(replicas=replicas, restart_policy="OnFailure",
                                           template=podspec.harden(_template(job), "train"))

    if job.elastic:
        return {"Worker": spec(job.nodes)}
    specs = {"Master": spec(1)}
    if job.nodes > 1:
        specs["Worker"] = spec(job.nodes - 1)
    return specs


def _job_labels(job: TrainJob) -> dict[str, str]:
    out = labels(job)
    if job.queue_name:
        out[KUEUE_QUEUE_LABEL] = job.queue_name
    return out


def _scheduling(job: TrainJob) -> kf.KubeflowOrgV1SchedulingPolicy | None:
    """Gang scheduling (Volcano or scheduler-plugins): start no pod until enough of them fit."""
    if not job.gang_scheduling:
        return None
    return kf.KubeflowOrgV1SchedulingPolicy(min_available=job.elastic_min_nodes or job.nodes,
                                            priority_class=job.priority_class or None)


def build_pytorchjob(job: TrainJob) -> kf.KubeflowOrgV1PyTorchJob:
    job.check()
    elastic = None
    if job.elastic:
        elastic = kf.KubeflowOrgV1ElasticPolicy(
            min_replicas=job.elastic_min_nodes, max_replicas=job.nodes, max_restarts=job.max_restarts,
            rdzv_backend="c10d", rdzv_id=job.name)  # torchrun's job id: every restart agrees on it
    return kf.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION, kind="PyTorchJob",
        metadata=k8s.V1ObjectMeta(name=job.name, namespace=job.namespace, labels=_job_labels(job)),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(job.procs_per_node), elastic_policy=elastic,
            pytorch_replica_specs=_replica_specs(job),
            run_policy=kf.KubeflowOrgV1RunPolicy(
                backoff_limit=job.backoff_limit, active_deadline_seconds=job.active_deadline_s,
                ttl_seconds_after_finished=job.ttl_s, clean_pod_policy=job.clean_pod_policy,
                scheduling_policy=_scheduling(job))))
