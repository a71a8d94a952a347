"""The clipforge pipeline: plan -> download (fan-out) -> merge -> train -> evaluate -> export.

`build_pipeline(registry, tag, ...)` returns the kfp pipeline. Its parameters and defaults (those of
a production GPU run) are the signature of `clip_pipeline` inside it, and nowhere else: the flags of
`clipforge pipeline run/submit` are read off the built pipeline's inputs (pipelines/params.py), each
step gets its stage options as a dict keyed by the stage's flag names (pipelines/stage_args.py), and
the train step's cluster settings as a dict keyed by `TrainJob`'s fields.
"""

import dataclasses
from typing import NamedTuple

from kfp import dsl
from kfp import kubernetes as kfk
from kfp.dsl import Markdown, Metrics, Model

from pipelines import podspec
from pipelines.admission import STEP_LABEL
from pipelines.cluster import LAUNCHER_TOKEN_SECRET
from pipelines.components import make_components
from pipelines.images import image
from pipelines.jobapi import LAUNCHER_TOKEN_DIR

PIPELINE_NAME = "clipforge"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_CONFIG_KEYS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "PUSHGATEWAY_URL")
DESCRIPTION = "Download, train, evaluate and export an OpenCLIP model"
KFP_ARTIFACT_ROOTS = {"kfp-gcs": "/gcs", "kfp-minio": "/minio", "kfp-s3": "/s3"}
HF_SECRET = "clipforge-hf"  # optional: HF_TOKEN for --push-to-hub
# the train step's pod owns its PyTorchJob when both share a namespace
POD_ENV = {"POD_NAME": "metadata.name", "POD_UID": "metadata.uid", "POD_NAMESPACE": "metadata.namespace"}
class Outputs(NamedTuple):
    metrics: Metrics
    eval_table: Markdown
    model: Model


@dataclasses.dataclass(frozen=True)
class StepSize:
    """Requests (= limits for memory) of a step's own pod. The train step's pod only launches and
    watches the PyTorchJob; the job's pods are sized by the train_* parameters."""

    cpu: str
    memory: str


STEP_SIZES = {"plan": StepSize("100m", "256Mi"), "download_parts": StepSize("100m", "256Mi"), "download": StepSize("8", "16Gi"),
              "merge_downloads": StepSize("500m", "1Gi"), "train": StepSize("500m", "1Gi"),
              "evaluate": StepSize("8", "32Gi"), "export": StepSize("2", "8Gi")}


def build_pipeline(registry: str = "", tag: str = "", image_pull_policy: str = "IfNotPresent",
                   gpu_node_selector: dict[str, str] | None = None,
                   step_sizes: dict[str, StepSize] | None = None):
    """The kfp pipeline with images from `registry`/`tag` and the cluster settings of each step."""
    ops = make_components(registry, tag)
    compiled_train_image = image("train", registry, tag)
    gpu_nodes = dict(gpu_node_selector or {})
    sizes = {**STEP_SIZES, **(step_sizes or {})}

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def clip_pipeline(
        root: str = "s3://clipforge/runs", run_id: str = "",
        # data
        url_list: str = "", demo: bool = False, demo_samples: int = 4000, image_size: int = 0,
        samples_per_shard: int = 10000, download_tasks: int = 4, download_processes: int = 8,
        download_threads: int = 64, download_args: str = "",
        # model and training
        model: str = "ViT-B-32", batch_size: int = 256, steps: int = 0, epochs: int = 32,
        lr: float = 5e-4, warmup: int = 2000, precision: str = "amp_bf16", workers: int = 6,
        save_every_steps: int = 1000, train_args: str = "",
        # where training runs
        launcher: str = "pytorchjob", nodes: int = 4, procs_per_node: int = 0, gpus_per_node: int = 8,
        train_cpu: str = "64", train_memory: str = "480Gi", shm_size: str = "64Gi", train_image: str = "",
        namespace: str = "clipforge", active_deadline_s: int = 172800, cleanup: str = "on-success",
        on_existing: str = "adopt", keep_job_on_cancel: bool = False,
        # scheduling
        queue_name: str = "", priority_class: str = "", gang_scheduling: bool = False,
        # eval and export
        eval_data: str = "", eval_batch_size: int = 256, eval_args: str = "",
        push_to_hub: str = "", export_args: str = "",
    ) -> Outputs:
        """Download, train, evaluate and export an OpenCLIP model.

        Args:
            root: object-store folder of all runs (any fsspec URI)
            run_id: the run's folder under root; empty: a new timestamp. Rerun with the same id to resume
            url_list: parquet/csv URL list of image-text pairs (img2dataset)
            demo: download the generated demo set instead of url_list
            download_tasks: parallel download tasks, each taking one part of the URL list
            steps: optimizer steps; 0: train for `epochs`
            launcher: 'pytorchjob' (cluster) or 'local' (torchrun beside the step)
            procs_per_node: torchrun processes per pod; 0: one per GPU (1 without GPUs)
            cleanup: delete the PyTorchJob 'on-success', 'always' or 'never'
            on_existing: a job of this run exists: 'adopt' (follow it if running, replace it if finished), 'replace', 'fail'
            keep_job_on_cancel: leave the PyTorchJob running when the run is terminated
            queue_name: Kueue LocalQueue of the PyTorchJob (label kueue.x-k8s.io/queue-name)
            priority_class: PriorityClass of the training pods
            gang_scheduling: schedule all training pods at once or none (runPolicy.schedulingPolicy)
            eval_data: space-separated NAME=URI eval sets; with demo, the demo eval set
            push_to_hub: Hugging Face Hub repo id to push the export to (token: Secret clipforge-hf)
        """
        planned = ops["plan"](root=root, run_id=run_id, demo=demo, url_list=url_list,
                              download_tasks=download_tasks, launcher=launcher, gpus_per_node=gpus_per_node,
                              procs_per_node=procs_per_node, cleanup=cleanup, on_existing=on_existing)
        the_run = planned.outputs["run_id"]
        parts = ops["download_parts"](
            root=root, run_id=the_run, num_parts=download_tasks, extra_args=download_args,
            options={"url_list": url_list, "demo": demo, "demo_samples": demo_samples, "image_size": image_size,
                     "samples_per_shard": samples_per_shard, "processes": download_processes,
                     "threads": download_threads})
        with dsl.ParallelFor(parts.output) as part:
            data = ops["download"](part=part)
        merged = ops["merge_downloads"](root=root, run_id=the_run, num_parts=download_tasks,
                                        parts=dsl.Collected(data.output), demo=demo)
        trained = ops["train"](
            root=root, run_id=the_run, train_data=merged.outputs["data"], extra_args=train_args,
            launcher=launcher, default_image=compiled_train_image,
            options={"model": model, "batch_size": batch_size, "steps": steps, "epochs": epochs, "lr": lr,
                     "warmup": warmup, "precision": precision, "workers": workers,
                     "save_every_steps": save_every_steps},
            job={"nodes": nodes, "procs_per_node": planned.outputs["procs_per_node"],
                 "gpus_per_node": gpus_per_node, "cpu": train_cpu, "memory": train_memory,
                 "shm_size": shm_size, "image": train_image, "image_pull_policy": image_pull_policy,
                 "namespace": namespace, "active_deadline_s": active_deadline_s, "node_selector": gpu_nodes,
                 "queue_name": queue_name, "priority_class": priority_class,
                 "gang_scheduling": gang_scheduling, "cleanup": cleanup, "on_existing": on_existing,
                 "keep_on_cancel": keep_job_on_cancel})
        evaluated = ops["evaluate"](
            root=root, run_id=the_run, checkpoint=trained.output, eval_data=eval_data,
            demo_eval=merged.outputs["demo_eval"], val_data=merged.outputs["data"], extra_args=eval_args,
            options={"batch_size": eval_batch_size, "workers": workers})
        exported = ops["export"](root=root, run_id=the_run, checkpoint=trained.output, extra_args=export_args,
                                 options={"push_to_hub": push_to_hub}).after(evaluated)

        steps_by_name = {"plan": planned, "download_parts": parts, "download": data, "merge_downloads": merged, "train": trained,
                         "evaluate": evaluated, "export": exported}
        for name, task in steps_by_name.items():
            _cluster_settings(task.set_display_name(name.replace("_", "-")), image_pull_policy, sizes[name])
            kfk.add_pod_label(task, STEP_LABEL, name.replace("_", "-"))  # k8s/kfp/ locks its root filesystem
        kfk.use_secret_as_env(exported, HF_SECRET, {"HF_TOKEN": "HF_TOKEN"}, optional=True)
        # Only the train step holds the launcher's API token: the run's account needs no rights of ours.
        kfk.use_secret_as_volume(trained, secret_name=LAUNCHER_TOKEN_SECRET, mount_path=LAUNCHER_TOKEN_DIR)
        for env, field in POD_ENV.items():
            kfk.use_field_path_as_env(trained, env_name=env, field_path=field)
        for task in (trained, evaluated):
            kfk.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        # zero-shot on the training's kind of hardware: one GPU when the PyTorchJob has GPUs
        evaluated.set_accelerator_type(podspec.GPU_RESOURCE).set_accelerator_limit(planned.outputs["eval_gpus"])
        kfk.add_toleration(evaluated, key=podspec.GPU_RESOURCE, operator="Exists", effect="NoSchedule")
        for key, value in gpu_nodes.items():
            kfk.add_node_selector(evaluated, label_key=key, label_value=value)
        return Outputs(evaluated.outputs["metrics"], evaluated.outputs["table"], exported.outputs["model"])

    return clip_pipeline


def _cluster_settings(task, image_pull_policy: str, size: StepSize) -> None:
    # Every step writes to the object store (or starts a job): a cache hit would hand back the
    # outputs of an earlier run instead of doing the work, so no step is cached.
    task.set_caching_options(False)
    task.set_cpu_request(size.cpu).set_cpu_limit(size.cpu)
    task.set_memory_request(size.memory).set_memory_limit(size.memory)
    kfk.use_secret_as_env(task, podspec.S3_SECRET, {k: k for k in S3_SECRET_KEYS})
    kfk.use_config_map_as_env(task, podspec.S3_CONFIG_MAP, {k: k for k in S3_CONFIG_KEYS})
    kfk.set_image_pull_policy(task, image_pull_policy)
    kfk.add_pod_annotation(task, "sidecar.istio.io/inject", "false")
    kfk.set_security_context(task, run_as_user=podspec.RUN_AS_USER, run_as_group=podspec.RUN_AS_USER,
                             run_as_non_root=True)
    for name, (path, limit) in podspec.WRITABLE_DIRS.items():  # what a read-only root filesystem needs
        kfk.empty_dir_mount(task, volume_name=name, mount_path=path, size_limit=limit)
    # KFP stages output artifacts under these local roots before uploading them (kfp.dsl.types.
    # artifact_types' mount prefixes): with a read-only root enforced by admission they must be writable.
    for name, path in KFP_ARTIFACT_ROOTS.items():
        kfk.empty_dir_mount(task, volume_name=name, mount_path=path, size_limit="1Gi")
