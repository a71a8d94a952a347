"""The clipforge pipeline: download -> train -> evaluate -> export, passing object-storage URIs.

`build_pipeline(registry, tag, ...)` returns the kfp pipeline; its parameters (and defaults) are
those of `clip_pipeline` below, which also become the flags of `clipforge pipeline run/submit`.
"""

import inspect
from types import SimpleNamespace

from kfp import dsl
from kfp import kubernetes as kfk

from pipelines import podspec
from pipelines.components import make_components
from pipelines.images import image

PIPELINE_NAME = "clipforge"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_CONFIG_KEYS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "PUSHGATEWAY_URL")
DESCRIPTION = "Download, train, evaluate and export an OpenCLIP model"
HF_SECRET = "clipforge-hf"  # optional: HF_TOKEN for --push-to-hub


def clip_pipeline(
    root: str = "s3://clipforge/runs", run_id: str = "",
    # data
    url_list: str = "", demo: bool = True, demo_samples: int = 4000, image_size: int = 0,
    samples_per_shard: int = 500, download_processes: int = 1, download_threads: int = 32,
    download_args: str = "",
    # model and training
    model: str = "clipforge-demo", batch_size: int = 64, steps: int = 800, epochs: int = 1,
    lr: float = 2e-3, warmup: int = 20, precision: str = "fp32", workers: int = 1,
    save_every_steps: int = 100, train_args: str = "",
    # where training runs
    launcher: str = "pytorchjob", nodes: int = 2, procs_per_node: int = 1, gpus_per_node: int = 0,
    train_cpu: str = "2", train_memory: str = "4Gi", shm_size: str = "1Gi", train_image: str = "",
    namespace: str = "clipforge", active_deadline_s: int = 172800, cleanup: str = "on-success",
    # eval and export
    eval_data: str = "", eval_batch_size: int = 64, eval_args: str = "",
    push_to_hub: str = "", export_args: str = "",
) -> None:
    """Parameters: `demo` downloads the generated demo set instead of `url_list`; `steps` > 0 wins over
    `epochs`; `launcher` is 'pytorchjob' (cluster) or 'local' (torchrun beside the step);
    `eval_data` is space-separated NAME=URI eval sets (default with demo: the demo eval set)."""
    raise NotImplementedError("wrapped by build_pipeline")


def build_pipeline(registry: str = "", tag: str = "", image_pull_policy: str = "IfNotPresent",
                   gpu_node_selector: dict[str, str] | None = None):
    """The kfp pipeline with images from `registry`/`tag` and the cluster settings of each step."""
    ops = make_components(registry, tag)
    default_train_image = image("train", registry, tag)

    names = list(inspect.signature(clip_pipeline).parameters)

    def pipeline(*args):  # kfp calls it with one channel per parameter, in order
        _wire(ops, default_train_image, image_pull_policy, gpu_node_selector or {},
              SimpleNamespace(**dict(zip(names, args, strict=True))))

    pipeline.__signature__ = inspect.signature(clip_pipeline)
    pipeline.__annotations__ = dict(clip_pipeline.__annotations__)
    pipeline.__name__ = pipeline.__qualname__ = "clip_pipeline"
    pipeline.__doc__ = clip_pipeline.__doc__
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(pipeline)


def _wire(ops, default_train_image: str, image_pull_policy: str, gpu_node_selector: dict, p) -> None:
    data = ops["download"](
        root=p.root, run_id=p.run_id, url_list=p.url_list, demo=p.demo, demo_samples=p.demo_samples,
        image_size=p.image_size, samples_per_shard=p.samples_per_shard, processes=p.download_processes,
        threads=p.download_threads, extra_args=p.download_args).set_display_name("download")
    the_run = data.outputs["run_id"]
    trained = ops["train"](
        root=p.root, run_id=the_run, train_data=data.outputs["data"], model=p.model,
        batch_size=p.batch_size, steps=p.steps, epochs=p.epochs, lr=p.lr, warmup=p.warmup,
        precision=p.precision, workers=p.workers, save_every_steps=p.save_every_steps,
        extra_args=p.train_args, launcher=p.launcher, nodes=p.nodes, procs_per_node=p.procs_per_node,
        gpus_per_node=p.gpus_per_node, cpu=p.train_cpu, memory=p.train_memory, shm_size=p.shm_size,
        train_image=p.train_image, default_train_image=default_train_image,
        image_pull_policy=image_pull_policy, namespace=p.namespace,
        active_deadline_s=p.active_deadline_s, cleanup=p.cleanup,
        gpu_node_selector=",".join(f"{k}={v}" for k, v in gpu_node_selector.items())).set_display_name("train")
    evaluated = ops["evaluate"](
        root=p.root, run_id=the_run, checkpoint=trained.output, eval_data=p.eval_data,
        demo_eval=data.outputs["demo_eval"], val_data=data.outputs["data"], batch_size=p.eval_batch_size,
        workers=p.workers, extra_args=p.eval_args).set_display_name("evaluate")
    exported = ops["export"](
        root=p.root, run_id=the_run, checkpoint=trained.output, push_to_hub=p.push_to_hub,
        extra_args=p.export_args).set_display_name("export").after(evaluated)
    for task in (data, trained, evaluated, exported):
        _cluster_settings(task, image_pull_policy)
    kfk.use_secret_as_env(exported, HF_SECRET, {"HF_TOKEN": "HF_TOKEN"}, optional=True)
    for task in (trained, evaluated):
        kfk.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    kfk.add_toleration(evaluated, key=podspec.GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    for key, value in gpu_node_selector.items():
        kfk.add_node_selector(evaluated, label_key=key, label_value=value)


def _cluster_settings(task, image_pull_policy: str) -> None:
    kfk.use_secret_as_env(task, podspec.S3_SECRET, {k: k for k in S3_SECRET_KEYS})
    kfk.use_config_map_as_env(task, podspec.S3_CONFIG_MAP, {k: k for k in S3_CONFIG_KEYS})
    kfk.set_image_pull_policy(task, image_pull_policy)
    kfk.add_pod_annotation(task, "sidecar.istio.io/inject", "false")
    kfk.set_security_context(task, run_as_user=podspec.RUN_AS_USER, run_as_group=podspec.RUN_AS_USER,
                             run_as_non_root=True)
    for name, (path, size) in podspec.WRITABLE_DIRS.items():  # what a read-only root filesystem needs
        kfk.empty_dir_mount(task, volume_name=name, mount_path=path, size_limit=size)
