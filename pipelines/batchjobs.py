"""The download (Indexed Job, one slice of the URL list per pod) and evaluate Jobs of `k8s/`."""

from __future__ import annotations

import dataclasses

from kubernetes import client as k8s

from pipelines import podspec
from pipelines.images import image

# Kubernetes gives each pod of an Indexed Job its index as JOB_COMPLETION_INDEX; the download stage's
# `--part-index auto` reads it, so each pod takes its own part of the one URL list.


@dataclasses.dataclass
class BatchJob:
    """A one-shot stage run: `python -m stages.<stage> <args>` in that stage's image."""

    stage: str
    name: str
    args: list[str]
    namespace: str = "clipforge"
    image: str = ""
    image_pull_policy: str = "IfNotPresent"
    cpu: str = "2"
    memory: str = "4Gi"
    gpus: int = 0
    shm_size: str = ""
    completions: int = 1  # download: number of URL-list slices
    backoff_limit: int = 2
    active_deadline_s: int = 12 * 3600
    ttl_s: int = 24 * 3600
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    # download: run after the stage in every pod; `--merge-parts` exits 3 while other parts are
    # still running, so the last pod to finish publishes the run's one manifest.json
    merge_args: list[str] = dataclasses.field(default_factory=list)

    @property
    def indexed(self) -> bool:
        return self.stage == "download"


PARTS_NOT_DONE = 3  # the download stage's exit status for a merge of unfinished parts


def command(job: BatchJob) -> list[str]:
    if not job.merge_args:
        return ["python", "-m", f"stages.{job.stage}", *job.args]
    merge = " ".join(job.merge_args)
    script = (f'python -m stages.{job.stage} "$@" && {{ python -m stages.{job.stage} {merge}; rc=$?; '
              f'[ $rc -eq 0 ] || [ $rc -eq {PARTS_NOT_DONE} ]; }}')
    return ["sh", "-c", script, job.stage, *job.args]


def _env(job: BatchJob) -> list[k8s.V1EnvVar]:
    return [k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1")]


def _pod(job: BatchJob) -> k8s.V1PodTemplateSpec:
    volumes, mounts = None, None
    if job.shm_size:
        volume, mount = podspec.shm_volume(job.shm_size)
        volumes, mounts = [volume], [mount]
    container = k8s.V1Container(
        name=job.stage, image=job.image or image(job.stage), image_pull_policy=job.image_pull_policy,
        command=command(job), env=_env(job), env_from=podspec.s3_env_from(),
        resources=podspec.resources(job.cpu, job.memory, job.gpus),
        security_context=podspec.container_security(), volume_mounts=mounts)
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=_labels(job), annotations=dict(podspec.NO_ISTIO)),
        spec=k8s.V1PodSpec(
            containers=[container], restart_policy="Never", volumes=volumes,
            security_context=podspec.pod_security(), node_selector=dict(job.node_selector) or None,
            tolerations=podspec.gpu_tolerations() if job.gpus else None))


def _labels(job: BatchJob) -> dict[str, str]:
    return {"app.kubernetes.io/name": "clipforge", "app.kubernetes.io/component": job.stage}


def build_job(job: BatchJob) -> k8s.V1Job:
    indexed = {"completion_mode": "Indexed", "completions": job.completions,
               "parallelism": job.completions} if job.indexed else {}
    return k8s.V1Job(
        api_version="batch/v1", kind="Job",
        metadata=k8s.V1ObjectMeta(name=job.name, namespace=job.namespace, labels=_labels(job)),
        spec=k8s.V1JobSpec(
            template=podspec.harden(_pod(job), job.stage), backoff_limit=job.backoff_limit, active_deadline_seconds=job.active_deadline_s,
            ttl_seconds_after_finished=job.ttl_s, **indexed))
