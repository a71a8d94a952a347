"""Validation during training: CLIP val loss and open_clip_train's retrieval metrics.

Every rank encodes its part of the val set (at most --val-num-samples over all ranks); the
features are gathered and the retrieval metrics computed in blocks (`stages.common.retrieval`),
so neither time nor memory on one rank grows with the square of the val set, and no rank waits
on another for longer than its own share takes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip import get_input_dtype

from stages.common.retrieval import retrieval_metrics
from stages.train.loop import get_autocast
from stages.train.model import unwrap


def _encode(model, val_data, device: torch.device, precision: str):
    autocast, input_dtype = get_autocast(precision, device), get_input_dtype(precision)
    image_feats, text_feats, total_loss, count = [], [], 0.0, 0
    with torch.inference_mode():
        for images, texts in val_data.loader:
            images = images.to(device=device, dtype=input_dtype)
            with autocast():
                out = model(images, texts.to(device))
                logits = out["logit_scale"].mean() * out["image_features"] @ out["text_features"].t()
                labels = torch.arange(images.shape[0], device=device)
                loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
            image_feats.append(out["image_features"].float().cpu())
            text_feats.append(out["text_features"].float().cpu())
            total_loss += float(loss) * images.shape[0]
            count += images.shape[0]
    return image_feats, text_feats, total_loss, count


def _gather(part: tuple) -> list[tuple]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [part]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


def evaluate(model, val_data, device: torch.device, precision: str, parts_per_rank: bool = True) -> dict[str, float]:
    """Val loss (mean over samples) and mean/median rank and R@1/5/10 in both directions.

    `parts_per_rank`: each rank holds its part of the val set and the parts are gathered; False
    when every rank encodes all of it (--fsdp, whose sharded forward needs every rank each batch).
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    image_feats, text_feats, total_loss, count = _encode(model, val_data, device, precision)
    model.train(was_training)
    part = (torch.cat(image_feats) if image_feats else None,
            torch.cat(text_feats) if text_feats else None, total_loss, count)
    parts = _gather(part) if parts_per_rank else [part]
    images = [p[0] for p in parts if p[0] is not None]
    texts = [p[1] for p in parts if p[1] is not None]
    count = sum(p[3] for p in parts)
    if not count:
        return {}
    images, texts = torch.cat(images), torch.cat(texts)
    metrics = retrieval_metrics(images, texts, torch.arange(len(texts)),
                                i2t_name="image_to_text", t2i_name="text_to_image")
    # open_clip_train's names: image_to_text_R@1, ...
    metrics = {k.replace("_recall@", "_R@"): v for k, v in metrics.items()}
    return {"val_loss": sum(p[2] for p in parts) / count, "num_samples": float(count), **metrics}
