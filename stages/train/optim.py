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


class Schedule:
    """open_clip_train's LR schedules, counted in steps of a reference global batch.

    The reference is the global batch (samples per optimizer step) of the run that started the
    schedule; a resume restores it and the reference step reached, so a run resumed on another
    world size, per-rank batch or --accum-freq continues the same curve in samples instead of
    restarting a horizon measured in its own steps. Without a layout change the reference step is
    the optimizer step and the LR is exactly open_clip_train's. Stateful: state_dict() is saved
    with a checkpoint, load_state_dict() restores the reference.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, global_batch: int,
                 epoch_samples: int):
        self.optimizer, self.cfg = optimizer, cfg
        self.global_batch = global_batch        # this run's samples per optimizer step
        self.ref_batch = global_batch           # the schedule's samples per (reference) step
        self.epoch_samples = epoch_samples
        self.ref_step_at, self.step_at = 0.0, 0  # a (reference step, step) pair on the curve
        self.total_ref_steps = 0.0
        self._fn = None

    def set_horizon(self, total_samples: int) -> None:
        """The samples the whole schedule spans (warmup, cosine horizon)."""
        cfg, ref = self.cfg, self.ref_batch
        self.total_ref_steps = total_samples / ref
        if self.total_ref_steps == int(self.total_ref_steps):
            self.total_ref_steps = int(self.total_ref_steps)
        if cfg.skip_scheduler:  # open_clip_train never calls its scheduler: the LR stays at --lr
            self._fn = lambda step: cfg.lr
        elif cfg.lr_scheduler == "cosine":
            self._fn = cosine_lr(self.optimizer, cfg.lr, cfg.warmup, self.total_ref_steps)
        elif cfg.lr_scheduler == "const":
            self._fn = const_lr(self.optimizer, cfg.lr, cfg.warmup, self.total_ref_steps)
        else:
            cooldown = int(self.epoch_samples / ref * cfg.epochs_cooldown)
            self._fn = const_lr_cooldown(self.optimizer, cfg.lr, cfg.warmup, self.total_ref_steps,
                                         cooldown, cfg.lr_cooldown_power, cfg.lr_cooldown_end)

    def ref_step(self, step: int) -> float:
        if self.ref_batch == self.global_batch:
            return self.ref_step_at + (step - self.step_at)
        return self.ref_step_at + (step - self.step_at) * self.global_batch / self.ref_batch

    def __call__(self, step: int) -> float:
        """Set the optimizer's LR for `step` and return it."""
        return self._fn(self.ref_step(step))

    def state_dict(self, step: int = 0) -> dict:
        return {"name": self.cfg.lr_scheduler, "base_lr": self.cfg.lr, "warmup": self.cfg.warmup,
                "ref_global_batch": self.ref_batch, "total_ref_steps": self.total_ref_steps,
                "step": step, "ref_step": self.ref_step(step)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's position on the curve (format 1 had no reference: its own)."""
        self.ref_batch = int(state.get("ref_global_batch") or self.global_batch)
        self.step_at = int(state.get("step", 0))
        self.ref_step_at = float(state.get("ref_step", self.step_at))
        if self.ref_step_at == int(self.ref_step_at):
            self.ref_step_at = int(self.ref_step_at)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
                     steps_per_epoch: int) -> Schedule:
    """The schedule of a run that keeps one layout: `total_steps` steps of one global batch."""
    schedule = Schedule(optimizer, cfg, global_batch=1, epoch_samples=steps_per_epoch)
    schedule.set_horizon(total_steps)
    return schedule
