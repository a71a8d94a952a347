"""The contrastive losses: open_clip's ClipLoss and SigLipLoss, set up for this process group."""

from __future__ import annotations

from open_clip.loss import ClipLoss, SigLipLoss

from stages.common.distributed import DistInfo
from stages.train.config import TrainConfig


def create_loss(cfg: TrainConfig, info: DistInfo):
    if cfg.siglip:
        return SigLipLoss(rank=info.rank, world_size=info.world_size)
    return ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                    rank=info.rank, world_size=info.world_size)
