"""AdamW with open_clip_train's parameter groups, and open_clip_train's LR schedules."""

from __future__ import annotations

import torch
from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

from stages.train.config import TrainConfig


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, norms, logit scale and 1-d embeddings get no weight decay (as open_clip_train)."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


SHIPPED_VITS = ("clipforge-", "coca_clipforge-")


def default_adam_params(model_name: str) -> dict[str, float]:
    """open_clip_train's defaults by model family (from the CLIP paper): ViTs 0.98/1e-6, others 0.999/1e-8.

    open_clip_train tells a ViT by "vit" in the name; clipforge's shipped configs are ViTs without
    it in their names, so they get the ViT values.
    """
    from open_clip_train.params import get_default_params

    return get_default_params("ViT" if model_name.startswith(SHIPPED_VITS) else model_name)


def create_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.opt.lower().startswith("timm/"):
        return _timm_optimizer(model, cfg)
    defaults = default_adam_params(cfg.model)
    beta1, beta2, eps = (v if v is not None else defaults[k]
                         for k, v in (("beta1", cfg.beta1), ("beta2", cfg.beta2), ("eps", cfg.eps)))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay_free = [p for n, p in named if no_weight_decay(n, p)]
    rest = [p for n, p in named if not no_weight_decay(n, p)]
    return torch.optim.AdamW(
        [{"params": decay_free, "weight_decay": 0.0}, {"params": rest, "weight_decay": cfg.wd}],
        lr=cfg.lr, betas=(beta1, beta2), eps=eps, fused=can_fuse([p for _, p in named]))


def _timm_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory with the arguments open_clip_train gives it (its own param groups)."""
    from timm.optim import create_optimizer_v2

    kwargs = {}
    if cfg.eps is not None:  # open_clip_train passes eps=None, which timm rejects; None means timm's default
        kwargs["eps"] = cfg.eps
    if cfg.beta1 is not None:
        kwargs["betas"] = (cfg.beta1, cfg.beta2)
    if cfg.momentum is not None:
        kwargs["momentum"] = cfg.momentum
    return create_optimizer_v2(model, cfg.opt.lower().split("timm/", 1)[1], lr=cfg.lr, weight_decay=cfg.wd,
                               **kwargs)


def can_fuse(params: list[torch.Tensor]) -> bool:
    """The fused AdamW kernel (CPU and CUDA): the same update, several times faster than the
    per-tensor loop open_clip_train uses (6x on the demo model on CPU, whose token embedding dominates)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
                     steps_per_epoch: int):
    """A function step -> lr that also sets the optimizer's LR; a pure function of the step."""
    if cfg.skip_scheduler:  # open_clip_train never calls its scheduler: the LR stays at --lr
        return lambda step: cfg.lr
    if cfg.lr_scheduler == "cosine":
        return cosine_lr(optimizer, cfg.lr, cfg.warmup, total_steps)
    if cfg.lr_scheduler == "const":
        return const_lr(optimizer, cfg.lr, cfg.warmup, total_steps)
    cooldown_steps = int(steps_per_epoch * cfg.epochs_cooldown)
    return const_lr_cooldown(optimizer, cfg.lr, cfg.warmup, total_steps, cooldown_steps,
                             cfg.lr_cooldown_power, cfg.lr_cooldown_end)


def scheduler_state(cfg: TrainConfig, total_steps: int, steps_per_epoch: int, step: int) -> dict:
    """What defines the schedule, saved with a checkpoint (the schedule itself is stateless)."""
    return {"name": cfg.lr_scheduler, "base_lr": cfg.lr, "warmup": cfg.warmup,
            "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "step": step}
