"""The train stage's options: open_clip_train's flag names where the concept is the same."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from stages.common.config import CommonConfig
from stages.common.errors import ConfigError


def _f(default, help: str, **meta):
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass
class TrainConfig(CommonConfig):
    """Train an open_clip model on webdataset shards (torchrun / PyTorchJob / one process)."""

    # model
    model: str = _f("", "open_clip model name (see open_clip.list_models()); default clipforge-micro, "
                        "or the name of the --model-config file")
    model_config: str = _f("", "URI of a custom open_clip model JSON; its file stem is the model name")
    pretrained: str = _f("", "URI of weights to start from: .safetensors, or a clipforge/open_clip checkpoint")
    lock_image: bool = _f(False, "freeze the image tower (LiT)")
    lock_text: bool = _f(False, "freeze the text tower")
    force_patch_dropout: float | None = _f(None, "override the model's patch dropout (0 disables it)")
    grad_checkpointing: bool = _f(False, "activation checkpointing in both towers")
    torchcompile: bool = _f(False, "torch.compile the model")
    # data
    train_data: str = _f("", "run folder, data/ folder, manifest.json or brace pattern(s); '::' joins sources")
    train_data_upsampling_factors: str = _f("", "one factor per '::' source, joined by '::'")
    val_data: str = _f("auto", "val shards; 'auto': the manifest's val split; '' or 'none': no validation")
    dataset_resampled: bool = _f(False, "sample shards with replacement")
    train_num_samples: int | None = _f(None, "samples per epoch (default: the manifest's count)")
    workers: int = _f(2, "DataLoader workers per rank")
    # schedule
    batch_size: int = _f(64, "batch size per rank (per accumulation micro-batch)")
    epochs: int = _f(1, "epochs to train (ignored when --steps is given)")
    steps: int | None = _f(None, "total optimizer steps; overrides --epochs")
    lr: float = _f(5e-4, "peak learning rate")
    wd: float = _f(0.2, "weight decay (not on gains, biases, logit scale, embeddings)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    eps: float = _f(1e-6, "AdamW epsilon")
    warmup: int = _f(10000, "warmup steps")
    lr_scheduler: str = _f("cosine", "LR schedule", choices=["cosine", "const", "const-cooldown"])
    epochs_cooldown: float | None = _f(None, "const-cooldown: epochs of cooldown at the end")
    lr_cooldown_end: float = _f(0.0, "const-cooldown: LR at the end of the cooldown")
    lr_cooldown_power: float = _f(1.0, "const-cooldown: power of the polynomial decay")
    accum_freq: int = _f(1, "gradient accumulation: micro-batches per optimizer step")
    precision: str = _f("fp32", "numeric precision", choices=["amp", "amp_bf16", "bf16", "fp32"])
    grad_clip_norm: float | None = _f(None, "clip the gradient norm to this")
    # loss
    local_loss: bool = _f(False, "compute the loss against the local batch only (with gathered negatives)")
    gather_with_grad: bool = _f(False, "all-gather features with gradients")
    siglip: bool = _f(False, "sigmoid loss (SigLIP) instead of the softmax CLIP loss")
    # distributed
    ddp_static_graph: bool = _f(False, "DDP static_graph=True")
    fsdp: bool = _f(False, "shard parameters, gradients and optimizer state across ranks (FSDP2) "
                           "instead of replicating them (DDP)")
    device: str = _f("auto", "device", choices=["auto", "cpu", "cuda"])
    seed: int = _f(0, "random seed")
    # checkpoints and resume
    save_every_steps: int = _f(1000, "write a checkpoint every N steps (and always at the end); 0: end only")
    keep_last: int = _f(5, "keep only the newest K step checkpoints (0: keep all); LATEST's target "
                           "and the earlier ones it falls back to are never deleted")
    resume: str = _f("", "'latest' (this run's checkpoints, if any) or a checkpoint URI")
    max_nonfinite_steps: int = _f(20, "stop after this many non-finite losses in a row")
    # validation, logs, metrics
    val_every_steps: int = _f(0, "validate every N steps and at the end (0: only at the end)")
    log_every_n_steps: int = _f(100, "log a progress line every N steps")
    tensorboard: str = _f("", "write TensorBoard scalars to this local folder (needs the tensorboard package)")
    peak_flops: float = _f(0.0, "peak FLOP/s of one device for MFU (default: looked up for known GPUs)")

    def __post_init__(self) -> None:
        # without --run-id every rank would pick its own; stages.train.distributed makes them agree
        self.run_id_given = bool(self.run_id)

    @property
    def checkpoint_dir(self) -> str:
        return f"{self.run_dir}/checkpoints"

    @property
    def has_val(self) -> bool:
        return self.val_data.lower() not in ("", "none")

    def validate(self) -> None:
        """Catch bad options before any data or model is touched (cheap checks first)."""
        self._check_numbers()
        if not self.train_data:
            raise ConfigError("--train-data is required: a run folder, data/ folder, manifest.json "
                              "or brace pattern of webdataset shards")
        if self.fsdp and self.ddp_static_graph:
            raise ConfigError("--ddp-static-graph applies to DDP; with --fsdp there is no DDP wrapper, "
                              "drop one of the two")
        if self.lr_scheduler == "const-cooldown" and self.epochs_cooldown is None:
            raise ConfigError("--lr-scheduler const-cooldown needs --epochs-cooldown")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(f"--tensorboard {self.tensorboard}: the tensorboard package is not "
                              "installed (pip install tensorboard), or leave the flag out")
        if self.gather_with_grad and self.siglip:
            raise ConfigError("--gather-with-grad applies to the CLIP loss, not --siglip")
        from stages.common.models import resolve_model

        self.model = resolve_model(self.model, self.model_config)
        self._check_data()

    def _check_numbers(self) -> None:
        positive = {"--batch-size": self.batch_size, "--accum-freq": self.accum_freq,
                    "--epochs": self.epochs, "--max-nonfinite-steps": self.max_nonfinite_steps,
                    "--log-every-n-steps": self.log_every_n_steps}
        if self.steps is not None:
            positive["--steps"] = self.steps
        if self.train_num_samples is not None:
            positive["--train-num-samples"] = self.train_num_samples
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} {value}: must be at least 1")
        for flag, value in {"--save-every-steps": self.save_every_steps, "--keep-last": self.keep_last,
                            "--warmup": self.warmup, "--workers": self.workers,
                            "--val-every-steps": self.val_every_steps, "--lr": self.lr}.items():
            if value < 0:
                raise ConfigError(f"{flag} {value}: must not be negative")

    def _check_data(self) -> None:
        """Shards exist, and one optimizer step's worth of samples fits in an epoch."""
        from stages.train.data import resolve_train_shards

        sources = resolve_train_shards(self.train_data, self.train_data_upsampling_factors or None)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = self.batch_size * self.accum_freq * world
        if self.train_num_samples is not None and self.train_num_samples < per_step:
            raise ConfigError(
                f"--train-num-samples {self.train_num_samples} is less than one optimizer step needs: "
                f"--batch-size {self.batch_size} x --accum-freq {self.accum_freq} x {world} ranks = {per_step}")
        if not sources:
            raise ConfigError(f"--train-data {self.train_data}: no shards")
