"""The trainer's Prometheus metrics (names as in docs/CONTRACTS.md) and model FLOPs utilization.

Each rank serves its own endpoint at --metrics-port + local rank, with a `rank` label, so a
PodMonitor scrapes every worker of a PyTorchJob.
"""

from __future__ import annotations

import copy
import logging

import torch

from stages.common.metrics import StageMetrics

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12,
              "L40S": 362e12, "L4": 121e12, "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12,
              "RTX 3090": 71e12}
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class TrainMetrics:
    def __init__(self, run_id: str, rank: int):
        m = StageMetrics("train", run_id, const_labels={"run_id": run_id, "rank": str(rank)})
        self.stage = m
        self.step = m.gauge("step", "Optimizer steps completed")
        self.samples = m.counter("samples_total", "Samples trained on (all ranks)")
        self.loss = m.gauge("loss", "Training loss of the last step")
        self.lr = m.gauge("learning_rate", "Learning rate of the last step")
        self.logit_scale = m.gauge("logit_scale", "exp(logit_scale) of the model")
        self.step_seconds = m.histogram("step_duration_seconds", "Wall time of one optimizer step",
                                        STEP_BUCKETS)
        self.data_wait = m.counter("data_wait_seconds_total", "Time spent waiting for batches")
        self.samples_per_second = m.gauge("samples_per_second", "Training throughput (all ranks)")
        self.mfu = m.gauge("mfu_ratio", "Model FLOPs utilization (0-1)")
        self.ckpt_seconds = m.gauge("checkpoint_duration_seconds",
                                    "Time the last checkpoint took to write (in the background)")
        self.ckpt_blocking_seconds = m.gauge("checkpoint_blocking_seconds",
                                             "Time the last checkpoint held up the training loop")
        self.ckpt_fallbacks = m.counter("checkpoint_fallbacks_total",
                                        "Resumes that skipped a missing/corrupt checkpoint for an earlier one")
        self.ckpt_prune_failures = m.counter("checkpoint_prune_failures_total",
                                             "Old checkpoints --keep-last could not delete")
        self.ckpt_step = m.gauge("last_checkpoint_step", "Step of the last checkpoint")
        self.ckpt_time = m.gauge("last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint")
        self.nonfinite = m.counter("nonfinite_steps_total", "Steps skipped for a NaN/Inf loss")
        self.gpu_allocated = m.gauge("gpu_memory_allocated_bytes", "torch.cuda.memory_allocated")
        self.gpu_reserved = m.gauge("gpu_memory_reserved_bytes", "torch.cuda.memory_reserved")
        self.val_loss = m.gauge("val_loss", "Validation loss")
        self.val_metric = m.gauge("val_metric", "Validation retrieval metrics", labels=["metric"])

    def serve(self, port: int, addr: str, local_rank: int) -> None:
        if port:
            self.stage.serve(port + local_rank, addr)

    def gpu_memory(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.gpu_allocated.set(torch.cuda.memory_allocated(device))
            self.gpu_reserved.set(torch.cuda.memory_reserved(device))

    def validation(self, results: dict[str, float]) -> None:
        for name, value in results.items():
            if name == "val_loss":
                self.val_loss.set(value)
            else:
                self.val_metric.labels(metric=name).set(value)


def peak_flops(device: torch.device, override: float) -> float:
    """Peak FLOP/s of one device: --peak-flops, else the table for known GPUs, else 0 (unknown)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return 0.0


def flops_per_sample(model: torch.nn.Module, image_size: int | tuple, context_length: int) -> float:
    """Training FLOPs (forward + backward) per image-text pair, counted on a meta-device copy."""
    from torch.utils.flop_counter import FlopCounterMode

    size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    try:
        meta = copy.deepcopy(model).to("meta")
        images = torch.empty(2, 3, *size, device="meta")
        texts = torch.zeros(2, context_length, dtype=torch.long, device="meta")
        counter = FlopCounterMode(display=False)
        with counter:
            out = meta(images, texts)
            (out["image_features"].sum() + out["text_features"].sum()).backward()
        return counter.get_total_flops() / 2
    except Exception as exc:  # noqa: BLE001 - MFU is informative; training goes on without it
        log.warning("could not count model FLOPs (%s); MFU will not be reported", exc)
        return 0.0
