"""The train stage's options: open_clip_train's flag names where the concept is the same."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from stages.common.config import CommonConfig
from stages.common.errors import ConfigError

PRECISIONS = ["amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32"]


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
    image_key: str = _f("jpg;jpeg;png;webp", "member suffix(es) of the image, ';'-separated (the first present wins)")
    caption_key: str = _f("txt", "member suffix of the caption, or json:FIELD for a field of the .json member")
    max_image_pixels: int = _f(0, "skip (and count) images with more pixels, undecoded (0: PIL's limit)")
    max_unusable_samples: int = _f(1000, "fail when a data worker reads this many samples in a row without a usable one")
    data_timeout: float = _f(600.0, "fail when no batch arrives from the data workers for this many seconds (0: wait forever)")
    val_num_samples: int | None = _f(10000, "validate on at most this many samples (all ranks together)")
    # schedule
    batch_size: int = _f(64, "batch size per rank (per accumulation micro-batch)")
    epochs: int = _f(1, "epochs to train (ignored when --steps is given)")
    steps: int | None = _f(None, "total optimizer steps; overrides --epochs")
    lr: float = _f(5e-4, "peak learning rate")
    wd: float = _f(0.2, "weight decay (not on gains, biases, logit scale, embeddings)")
    beta1: float | None = _f(None, "Adam beta1 (default: 0.9)")
    beta2: float | None = _f(None, "Adam beta2 (default: 0.98 for ViT models, 0.999 for others, as open_clip_train)")
    eps: float | None = _f(None, "Adam epsilon (default: 1e-6 for ViT models, 1e-8 for others, as open_clip_train)")
    warmup: int = _f(10000, "warmup steps")
    lr_scheduler: str = _f("cosine", "LR schedule", choices=["cosine", "const", "const-cooldown"])
    epochs_cooldown: float | None = _f(None, "const-cooldown: epochs of cooldown at the end")
    lr_cooldown_end: float = _f(0.0, "const-cooldown: LR at the end of the cooldown")
    lr_cooldown_power: float = _f(1.0, "const-cooldown: power of the polynomial decay")
    accum_freq: int = _f(1, "gradient accumulation: micro-batches per optimizer step")
    precision: str = _f("fp32", "numeric precision (open_clip_train's modes)", choices=PRECISIONS)
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
    checkpoint_format: str = _f("", "'sharded': each rank writes its shard through "
                                    "torch.distributed.checkpoint into a step_<N>/ folder; 'single': "
                                    "rank 0 writes one step_<N>.pt (default: sharded with --fsdp, "
                                    "else single)", choices=["", "sharded", "single"])
    consolidate_checkpoint: bool = _f(False, "with sharded checkpoints, also write the whole "
                                             "checkpoint as one file, step_<N>/consolidated.pt")
    resume: str = _f("", "'latest' (this run's checkpoints, if any) or a checkpoint URI")
    max_nonfinite_steps: int = _f(20, "stop after this many non-finite losses in a row")
    step_timeout: float = _f(0.0, "seconds without step progress after which a rank logs where it hung "
                                   "and exits so the group restarts (0: 10x the slowest recent step, "
                                   "at least 300)")
    # validation, logs, metrics
    val_every_steps: int = _f(0, "validate every N steps and at the end (0: only at the end)")
    log_every_n_steps: int = _f(100, "log a progress line every N steps")
    tensorboard: str = _f("", "write TensorBoard scalars to this local folder (needs the tensorboard package)")
    peak_flops: float = _f(0.0, "peak FLOP/s of one device for MFU (default: looked up for known GPUs)")
    # zero-shot classification during training (stages.train.zeroshot)
    imagenet_val: str = _f("", "ImageNet val folder (class folders, as open_clip_train's --imagenet-val)")
    imagenet_v2: str = _f("", "ImageNetV2 matched-frequency folder (class folders 0..999)")
    zeroshot_data: list[str] = _f([], "sets in CLIP_benchmark wds layout (URI or NAME=URI, any store)")
    zeroshot_frequency: int = _f(2, "zero-shot every N epochs and after the last (0: by epoch never)")
    zeroshot_every_steps: int = _f(0, "also zero-shot every N optimizer steps (0: off)")
    zeroshot_batch_size: int = _f(64, "images per zero-shot batch")

    # ---- more of open_clip_train's flags, same meaning (stages/train/openclip_flags.py lists them all)
    # model and weights
    cache_dir: str = _f("", "cache folder for released weights and tokenizers (default: Hugging Face's)")
    pretrained_image: bool = _f(False, "ImageNet weights for the image tower's backbone where open_clip has them")
    lock_image_unlocked_groups: int = _f(0, "with --lock-image: leave the last N layer groups of the image tower trainable")
    lock_image_freeze_bn_stats: bool = _f(False, "with --lock-image: freeze BatchNorm statistics of the locked layers")
    lock_text_unlocked_layers: int = _f(0, "with --lock-text: leave the last N layers of the text tower trainable")
    lock_text_freeze_layer_norm: bool = _f(False, "with --lock-text: freeze the LayerNorms of the locked layers")
    image_mean: list[float] | None = _f(None, "override the image mean")
    image_std: list[float] | None = _f(None, "override the image std")
    image_interpolation: str | None = _f(None, "override the resize interpolation",
                                         choices=["bicubic", "bilinear", "random"])
    image_resize_mode: str | None = _f(None, "override the resize (and crop) mode of evaluation transforms",
                                       choices=["shortest", "longest", "squash"])
    aug_cfg: list[str] = _f([], "training augmentation, KEY=VALUE pairs (open_clip's AugmentationCfg)", nargs="*")
    force_image_size: list[int] | None = _f(None, "override the model's image size (one value, or H W)")
    force_quick_gelu: bool = _f(False, "use QuickGELU (as OpenAI's models do)")
    force_custom_text: bool = _f(False, "build a CustomTextCLIP (separate text tower)")
    force_context_length: int | None = _f(None, "override the text context length")
    use_bnb_linear: str = _f("", "replace linear layers with this bitsandbytes triton SwitchBack layer (needs bitsandbytes<0.50 and a CUDA GPU)")
    # losses
    coca_caption_loss_weight: float = _f(2.0, "CoCa: weight of the caption loss")
    coca_contrastive_loss_weight: float = _f(1.0, "CoCa: weight of the contrastive loss")
    distill_model: str = _f("", "distill from this open_clip model (with --distill-pretrained)")
    distill_pretrained: str = _f("", "weights of the --distill-model: a tag, hf-hub:ID or a URI")
    loss_dist_impl: str | None = _f(None, "SigLIP's distributed exchange (default: bidir)",
                                    choices=["bidir", "shift", "reduce", "gather"])
    # optimizer and schedule
    opt: str = _f("adamw", "optimizer: adamw, or any timm optimizer as timm/NAME (e.g. timm/lamb)")
    momentum: float | None = _f(None, "momentum (timm optimizers that take one)")
    skip_scheduler: bool = _f(False, "keep the LR at --lr: no warmup, no decay")
    use_bn_sync: bool = _f(False, "SyncBatchNorm across ranks (GPUs; on the CPU, BatchNorm models are refused)")
    # data
    dataset_type: str = _f("auto", "webdataset, csv (a table of image paths and captions), synthetic "
                                   "(random images, for smoke tests), auto (csv for .csv/.tsv, else webdataset)",
                           choices=["webdataset", "csv", "synthetic", "auto"])
    csv_separator: str = _f("\t", "csv: the column separator (default: tab)")
    csv_img_key: str = _f("filepath", "csv: the column of image paths (any store; relative to the table)")
    csv_caption_key: str = _f("title", "csv: the column of captions")
    val_frequency: int = _f(0, "validate at the end of every N-th epoch (0: only at the end, or --val-every-steps)")
    # reporting and logs
    report_to: str = _f("", "tensorboard, wandb, or both comma-separated; TensorBoard events go to {run}/tensorboard/")
    wandb_project_name: str = _f("open-clip", "wandb project")
    wandb_notes: str = _f("", "wandb run notes")
    debug: bool = _f(False, "log at DEBUG level (same as --log-level DEBUG)")
    log_local: bool = _f(False, "every node's local rank 0 logs progress, not only global rank 0")
    # distributed
    dist_url: str = _f("", "process group init method (default env://, as torchrun sets up)")
    dist_backend: str = _f("", "process group backend (default: nccl on GPUs, gloo on CPU)")
    no_set_device_rank: bool = _f(False, "use device index 0 on every rank (one visible GPU per process)")
    # open_clip_train flags whose concept clipforge replaces: translated, or refused naming ours
    logs: str | None = _f(None, "open_clip_train's log root: the same as --root ({logs}/{name}/checkpoints)")
    name: str | None = _f(None, "open_clip_train's experiment name: the same as --run-id")
    save_frequency: int | None = _f(None, "also checkpoint at the end of every N-th epoch (step checkpoints: "
                                          "--save-every-steps)")
    save_most_recent: bool = _f(False, "always on: LATEST names the newest checkpoint")
    delete_previous_checkpoint: bool = _f(False, "the same as --keep-last 1")
    remote_sync: str | None = _f(None, "refused: write to the store directly with --root s3://...")
    remote_sync_frequency: int | None = _f(None, "refused: see --remote-sync")
    remote_sync_protocol: str | None = _f(None, "refused: see --remote-sync", choices=["s3", "fsspec"])
    horovod: bool = _f(False, "refused: clipforge runs under torchrun / PyTorchJob")
    copy_codebase: bool = _f(False, "refused: the container image is the code (run.json records versions)")
    torchscript: bool = _f(False, "refused: use --torchcompile")
    trace: bool = _f(False, "refused: a traced model cannot be trained (open_clip_train refuses it too)")

    def __post_init__(self) -> None:
        from stages.train.openclip_flags import translate

        translate(self)  # --name is open_clip_train's --run-id
        # without --run-id every rank would pick its own; stages.common.distributed makes them agree
        self.run_id_given = bool(self.run_id)

    @property
    def checkpoint_dir(self) -> str:
        return f"{self.run_dir}/checkpoints"

    @property
    def sharded_checkpoints(self) -> bool:
        return self.checkpoint_format == "sharded" or (not self.checkpoint_format and self.fsdp)

    @property
    def has_val(self) -> bool:
        return self.val_data.lower() not in ("", "none")

    def validate(self) -> None:
        """Catch bad options before any data or model is touched; reads nothing, changes nothing."""
        from stages.train.openclip_flags import check_combinations

        self._check_numbers()
        check_combinations(self)
        from stages.train.pretrained import check_pretrained

        check_pretrained(self)  # a lookup in open_clip's table of released tags: nothing is read
        if self.fsdp and self.ddp_static_graph:
            raise ConfigError("--ddp-static-graph applies to DDP; with --fsdp there is no DDP wrapper, "
                              "drop one of the two")
        if self.consolidate_checkpoint and not self.sharded_checkpoints:
            raise ConfigError("--consolidate-checkpoint applies to sharded checkpoints (--fsdp or "
                              "--checkpoint-format sharded); single-file checkpoints are one file already")
        if self.lr_scheduler == "const-cooldown" and self.epochs_cooldown is None:
            raise ConfigError("--lr-scheduler const-cooldown needs --epochs-cooldown")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(f"--tensorboard {self.tensorboard}: the tensorboard package is not "
                              "installed (pip install tensorboard), or leave the flag out")
        if self.gather_with_grad and self.siglip:
            raise ConfigError("--gather-with-grad applies to the CLIP loss, not --siglip")
        from stages.common.shards import SampleKeys

        SampleKeys.from_flags(self.image_key, self.caption_key, self.max_image_pixels)

    def check_inputs(self, world_size: int | None = None) -> None:
        """Look at the inputs (cheap, before any model): the model name resolves, the shards exist,
        one optimizer step fits in an epoch, and the first samples have an image and a caption."""
        from stages.common.models import resolve_model

        self.model = resolve_model(self.model or _hub_model(self.pretrained), self.model_config)
        from stages.train.pretrained import check_pretrained, check_pretrained_image
        from stages.train.sources import check_sources
        from stages.train.zeroshot import open_sets

        check_pretrained(self)
        check_pretrained_image(self)
        if check_sources(self):
            self._check_data(world_size or int(os.environ.get("WORLD_SIZE", "1")))
        open_sets(self)

    def _check_numbers(self) -> None:
        positive = {"--batch-size": self.batch_size, "--accum-freq": self.accum_freq,
                    "--epochs": self.epochs, "--max-nonfinite-steps": self.max_nonfinite_steps,
                    "--log-every-n-steps": self.log_every_n_steps,
                    "--max-unusable-samples": self.max_unusable_samples,
                    "--zeroshot-batch-size": self.zeroshot_batch_size}
        if self.steps is not None:
            positive["--steps"] = self.steps
        if self.train_num_samples is not None:
            positive["--train-num-samples"] = self.train_num_samples
        if self.val_num_samples is not None:
            positive["--val-num-samples"] = self.val_num_samples
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} {value}: must be at least 1")
        for flag, value in {"--save-every-steps": self.save_every_steps, "--keep-last": self.keep_last,
                            "--warmup": self.warmup, "--workers": self.workers,
                            "--val-every-steps": self.val_every_steps, "--lr": self.lr,
                            "--step-timeout": self.step_timeout,
                            "--max-image-pixels": self.max_image_pixels,
                            "--data-timeout": self.data_timeout,
                            "--zeroshot-frequency": self.zeroshot_frequency,
                            "--zeroshot-every-steps": self.zeroshot_every_steps}.items():
            if value < 0:
                raise ConfigError(f"{flag} {value}: must not be negative")

    def _check_data(self, world: int) -> None:
        """Shards exist, one optimizer step's worth of samples fits in an epoch, samples are usable."""
        from stages.train.data import probe_train_data, resolve_train_shards

        sources = resolve_train_shards(self.train_data, self.train_data_upsampling_factors or None)
        per_step = self.batch_size * self.accum_freq * world
        if self.train_num_samples is not None and self.train_num_samples < per_step:
            raise ConfigError(
                f"--train-num-samples {self.train_num_samples} is less than one optimizer step needs: "
                f"--batch-size {self.batch_size} x --accum-freq {self.accum_freq} x {world} ranks = {per_step}")
        if not sources:
            raise ConfigError(f"--train-data {self.train_data}: no shards")
        probe_train_data(self)


def _hub_model(pretrained: str) -> str:
    """`--pretrained hf-hub:ORG/REPO` without --model: the Hub repo names the architecture too."""
    return pretrained if pretrained.startswith("hf-hub:") else ""
