"""The parameters behind `k8s/base` and its overlays: one `Preset` per kustomize directory.

Change a preset here, then `clipforge pipeline render-k8s` rewrites the YAML; a test fails while the
checked-in YAML and these presets disagree.
"""

from __future__ import annotations

import dataclasses

from pipelines.batchjobs import BatchJob
from pipelines.pytorchjob import METRICS_PORT, TrainJob
from pipelines.stage_args import download_argv, evaluate_argv, merge_argv, train_argv

NAMESPACE = "clipforge"
ROOT = "s3://clipforge/runs"
METRICS = ["--metrics-port", str(METRICS_PORT), "--metrics-addr", "0.0.0.0"]
GPU_QUEUE = "clipforge"  # a Kueue LocalQueue the cluster admin points at a ClusterQueue
GPU_PRIORITY_CLASS = "clipforge-training"  # rendered into the gpu overlay


@dataclasses.dataclass
class Preset:
    train: TrainJob
    download: BatchJob
    evaluate: BatchJob


def _run(run_id: str) -> str:
    return f"{ROOT}/{run_id}"


def _download(run_id: str, parts: int, options: dict, **kw) -> BatchJob:
    """An Indexed Job of `parts` pods; pod i downloads part i of the one URL list into {run}/data
    (`--part-index auto` reads the index Kubernetes gives each pod), and the last one to finish
    merges the parts' manifests into {run}/data/manifest.json."""
    args = download_argv(ROOT, run_id, options, num_parts=parts, part_index="auto")
    merge = merge_argv(ROOT, run_id, parts) if parts > 1 else []
    return BatchJob(stage="download", name="clipforge-download", namespace=NAMESPACE, args=args,
                    completions=parts, merge_args=merge, **kw)


def _data(run_id: str, parts: int) -> str:
    return f"{_run(run_id)}/data"


def _train_args(run_id: str, parts: int, extra: list[str]) -> list[str]:
    return [*train_argv(ROOT, run_id, _data(run_id, parts), {}), *extra, *METRICS]


def _evaluate(run_id: str, eval_data: str, parts: int, **kw) -> BatchJob:
    args = evaluate_argv(ROOT, run_id, f"{_run(run_id)}/checkpoints/LATEST", [eval_data],
                         _data(run_id, parts), {})
    return BatchJob(stage="evaluate", name="clipforge-evaluate", namespace=NAMESPACE, args=args, **kw)


def base() -> Preset:
    """A modest CPU job; 4 download pods share one URL list."""
    run, slices = "example", 4
    url_list = "s3://clipforge/input/urls.parquet"
    return Preset(
        train=TrainJob(name="clipforge-train", namespace=NAMESPACE, run_id=run, nodes=2, cpu="4",
                       memory="8Gi", shm_size="1Gi", train_args=_train_args(run, slices, [
                           "--model", "clipforge-tiny", "--batch-size", "64", "--epochs", "1",
                           "--warmup", "100", "--workers", "2", "--save-every-steps", "500",
                           "--device", "cpu"])),
        download=_download(run, slices, {"url_list": url_list, "processes": 2, "threads": 32}),
        evaluate=_evaluate(run, "imagenet-v2=s3://clipforge/evalsets/imagenetv2", slices))


def cpu_smoke() -> Preset:
    """The demo data, clipforge-micro, 2 pods x 1 process on gloo: finishes in minutes on any cluster."""
    run = "smoke"
    return Preset(
        train=TrainJob(name="clipforge-train", namespace=NAMESPACE, run_id=run, nodes=2, cpu="1",
                       memory="2Gi", shm_size="256Mi", active_deadline_s=3600, max_restarts=0,
                       train_args=_train_args(run, 1, [
                           "--model", "clipforge-micro", "--batch-size", "32", "--steps", "30",
                           "--warmup", "5", "--workers", "1", "--save-every-steps", "10",
                           "--log-every-n-steps", "5", "--device", "cpu"])),
        download=_download(run, 1, {"demo": True, "processes": 1, "threads": 8}, cpu="1", memory="1Gi"),
        evaluate=_evaluate(run, f"demo={_run(run)}/evalsets/demo", 1, cpu="1", memory="2Gi"))


def gpu() -> Preset:
    """ViT-B-32 on 4 nodes x 8 GPUs with NCCL; elastic between 2 and 4 nodes, 3 restarts; queued in
    Kueue's `clipforge` LocalQueue, gang-scheduled (at least 2 pods at once) at `clipforge-training` priority."""
    run, slices = "example", 4
    gpu_nodes = {"nvidia.com/gpu.present": "true"}
    url_list = "s3://clipforge/input/urls.parquet"
    return Preset(
        train=TrainJob(name="clipforge-train", namespace=NAMESPACE, run_id=run, nodes=4, procs_per_node=8,
                       gpus_per_node=8, elastic_min_nodes=2, max_restarts=3, cpu="64", memory="480Gi",
                       shm_size="64Gi", node_selector=gpu_nodes, queue_name=GPU_QUEUE,
                       priority_class=GPU_PRIORITY_CLASS, gang_scheduling=True, train_args=_train_args(run, slices, [
                           "--model", "ViT-B-32", "--batch-size", "256", "--epochs", "32",
                           "--lr", "5e-4", "--warmup", "2000", "--precision", "amp", "--workers", "6",
                           "--local-loss", "--gather-with-grad", "--save-every-steps", "1000",
                           "--device", "cuda"])),
        download=_download(run, slices, {"url_list": url_list, "processes": 8, "threads": 64},
                           cpu="8", memory="16Gi"),
        evaluate=_evaluate(run, "imagenet-v2=s3://clipforge/evalsets/imagenetv2", slices, gpus=1, cpu="8",
                           memory="32Gi", shm_size="8Gi", node_selector=gpu_nodes))


PRESETS = {"base": base, "cpu-smoke": cpu_smoke, "gpu": gpu}
