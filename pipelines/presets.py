"""The parameters behind `k8s/base` and its overlays: one `Preset` per kustomize directory.

Change a preset here, then `clipforge pipeline render-k8s` rewrites the YAML; a test fails while the
checked-in YAML and these presets disagree.
"""

from __future__ import annotations

import dataclasses

from pipelines.batchjobs import INDEX_ENV, BatchJob
from pipelines.pytorchjob import METRICS_PORT, TrainJob

NAMESPACE = "clipforge"
ROOT = "s3://clipforge/runs"
METRICS = ["--metrics-port", str(METRICS_PORT), "--metrics-addr", "0.0.0.0"]


@dataclasses.dataclass
class Preset:
    train: TrainJob
    download: BatchJob
    evaluate: BatchJob


def _run(run_id: str) -> str:
    return f"{ROOT}/{run_id}"


def _parts(run_id: str) -> str:
    """Each download pod is its own run under {run}/parts/<index>: shards never collide."""
    return f"{_run(run_id)}/parts"


def _download(run_id: str, slices: int, extra: list[str], **kw) -> BatchJob:
    args = ["--root", _parts(run_id), "--run-id", f"$({INDEX_ENV})", *extra]
    return BatchJob(stage="download", name="clipforge-download", namespace=NAMESPACE, args=args,
                    completions=slices, **kw)


def _train_data(run_id: str, slices: int) -> str:
    return "::".join(f"{_parts(run_id)}/{i}/data" for i in range(slices))


def _train_args(run_id: str, slices: int, extra: list[str]) -> list[str]:
    return ["--root", ROOT, "--run-id", run_id, "--train-data", _train_data(run_id, slices),
            "--resume", "latest", *extra, *METRICS]


def _evaluate(run_id: str, eval_data: str, **kw) -> BatchJob:
    args = ["--root", ROOT, "--run-id", run_id, "--checkpoint", f"{_run(run_id)}/checkpoints/LATEST",
            "--eval-data", eval_data, "--val-data", f"{_parts(run_id)}/0/data"]
    return BatchJob(stage="evaluate", name="clipforge-evaluate", namespace=NAMESPACE, args=args, **kw)


def base() -> Preset:
    """A modest CPU job over a URL list split into 4 files (urls-0.parquet … urls-3.parquet)."""
    run, slices = "example", 4
    url_list = f"s3://clipforge/input/urls-$({INDEX_ENV}).parquet"
    return Preset(
        train=TrainJob(name="clipforge-train", namespace=NAMESPACE, run_id=run, nodes=2, cpu="4",
                       memory="8Gi", shm_size="1Gi", train_args=_train_args(run, slices, [
                           "--model", "clipforge-tiny", "--batch-size", "64", "--epochs", "1",
                           "--warmup", "100", "--workers", "2", "--save-every-steps", "500",
                           "--device", "cpu"])),
        download=_download(run, slices, ["--url-list", url_list, "--processes", "2", "--threads", "32"]),
        evaluate=_evaluate(run, "imagenet-v2=s3://clipforge/evalsets/imagenetv2"))


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
        download=_download(run, 1, ["--demo", "--processes", "1", "--threads", "8"], cpu="1", memory="1Gi"),
        evaluate=_evaluate(run, f"demo={_parts(run)}/0/evalsets/demo", cpu="1", memory="2Gi"))


def gpu() -> Preset:
    """ViT-B-32 on 4 nodes x 8 GPUs with NCCL; elastic between 2 and 4 nodes, 3 restarts."""
    run, slices = "example", 4
    gpu_nodes = {"nvidia.com/gpu.present": "true"}
    url_list = f"s3://clipforge/input/urls-$({INDEX_ENV}).parquet"
    return Preset(
        train=TrainJob(name="clipforge-train", namespace=NAMESPACE, run_id=run, nodes=4, procs_per_node=8,
                       gpus_per_node=8, elastic_min_nodes=2, max_restarts=3, cpu="64", memory="480Gi",
                       shm_size="64Gi", node_selector=gpu_nodes, train_args=_train_args(run, slices, [
                           "--model", "ViT-B-32", "--batch-size", "256", "--epochs", "32",
                           "--lr", "5e-4", "--warmup", "2000", "--precision", "amp", "--workers", "6",
                           "--local-loss", "--gather-with-grad", "--save-every-steps", "1000",
                           "--device", "cuda"])),
        download=_download(run, slices, ["--url-list", url_list, "--processes", "8", "--threads", "64"],
                           cpu="8", memory="16Gi"),
        evaluate=_evaluate(run, "imagenet-v2=s3://clipforge/evalsets/imagenetv2", gpus=1, cpu="8",
                           memory="32Gi", shm_size="8Gi", node_selector=gpu_nodes))


PRESETS = {"base": base, "cpu-smoke": cpu_smoke, "gpu": gpu}
