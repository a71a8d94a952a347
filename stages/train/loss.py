"""The losses: open_clip's own `create_loss` (CLIP, SigLIP, CoCa, distillation), set up for this process group."""

from __future__ import annotations

from types import SimpleNamespace

import open_clip

from stages.common.distributed import DistInfo
from stages.train.config import TrainConfig


def create_loss(cfg: TrainConfig, info: DistInfo):
    """open_clip_train picks the loss from its args; the same namespace is built here from ours."""
    args = SimpleNamespace(
        distill=bool(cfg.distill_model), model=cfg.model, siglip=cfg.siglip,
        local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
        coca_caption_loss_weight=cfg.coca_caption_loss_weight,
        coca_contrastive_loss_weight=cfg.coca_contrastive_loss_weight,
        loss_dist_impl=cfg.loss_dist_impl, rank=info.rank, world_size=info.world_size, horovod=False)
    return open_clip.create_loss(args)
