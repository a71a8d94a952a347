"""Pod pieces every clipforge workload shares: security, S3 settings as env, /dev/shm, GPUs.

Built as kubernetes client models so the launcher and the rendered manifests use the same objects.
"""

from __future__ import annotations

from kubernetes import client as k8s

RUN_AS_USER = 1000  # the `clipforge` user of every image (docker/*.Dockerfile)
S3_SECRET = "clipforge-s3"  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
S3_CONFIG_MAP = "clipforge-s3"  # AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, PUSHGATEWAY_URL
GPU_RESOURCE = "nvidia.com/gpu"
NO_ISTIO = {"sidecar.istio.io/inject": "false"}  # a sidecar keeps batch pods from finishing
# Each workload's identity: no API rights, no token mounted (only the pipeline's train step, with
# cluster.LAUNCHER_SA, talks to the API server).
SERVICE_ACCOUNTS = {"download": "clipforge-download", "train": "clipforge-trainer",
                    "evaluate": "clipforge-evaluate", "export": "clipforge-export"}
# The root filesystem is read-only: scratch space and HOME (library caches) are the writable paths.
WRITABLE_DIRS = {"tmp": ("/tmp", "4Gi"), "home": ("/home/clipforge", "4Gi")}


def pod_security() -> k8s.V1PodSecurityContext:
    return k8s.V1PodSecurityContext(
        run_as_non_root=True, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, fs_group=RUN_AS_USER,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def container_security() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False, privileged=False, run_as_non_root=True, read_only_root_filesystem=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def s3_env_from(secret: str = S3_SECRET, config_map: str = S3_CONFIG_MAP) -> list[k8s.V1EnvFromSource]:
    """The standard AWS_* variables: credentials from a Secret, endpoint and region from a ConfigMap."""
    return [k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=config_map)),
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))]


def resources(cpu: str, memory: str, gpus: int = 0) -> k8s.V1ResourceRequirements:
    """Requests equal limits (Guaranteed QoS): training pods should not be the first evicted."""
    amounts = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts[GPU_RESOURCE] = str(gpus)
    return k8s.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts))


def shm_volume(size: str) -> tuple[k8s.V1Volume, k8s.V1VolumeMount]:
    """A memory-backed /dev/shm: DataLoader workers and NCCL outgrow the runtime's 64 MiB default."""
    volume = k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=size))
    return volume, k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")


def writable_volumes() -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    volumes = [k8s.V1Volume(name=name, empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=size))
               for name, (_, size) in WRITABLE_DIRS.items()]
    return volumes, [k8s.V1VolumeMount(name=name, mount_path=path) for name, (path, _) in WRITABLE_DIRS.items()]


def harden(template: k8s.V1PodTemplateSpec, stage: str) -> k8s.V1PodTemplateSpec:
    """The stage's service account without a token, and the emptyDirs a read-only root needs."""
    volumes, mounts = writable_volumes()
    spec = template.spec
    spec.service_account_name = SERVICE_ACCOUNTS[stage]
    spec.automount_service_account_token = False
    spec.volumes = [*(spec.volumes or []), *volumes]
    for container in spec.containers:
        container.volume_mounts = [*(container.volume_mounts or []), *mounts]
    return template


def gpu_tolerations() -> list[k8s.V1Toleration]:
    return [k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]


def to_dict(obj) -> dict:
    """A kubernetes/kubeflow client model as the plain dict `kubectl` would read (camelCase keys)."""
    return k8s.ApiClient().sanitize_for_serialization(obj)
