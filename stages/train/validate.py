"""Validation during training: CLIP val loss and open_clip_train's retrieval metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import get_input_dtype
from open_clip_train.train import get_clip_metrics

from stages.train.loop import get_autocast
from stages.train.model import unwrap


def evaluate(model, val_data, device: torch.device, precision: str) -> dict[str, float]:
    """Val loss (mean over samples) and mean/median rank and R@1/5/10 in both directions."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
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
    model.train(was_training)
    if not count:
        return {}
    metrics = get_clip_metrics(torch.cat(image_feats), torch.cat(text_feats),
                               out["logit_scale"].mean().float().cpu())
    return {"val_loss": total_loss / count, "num_samples": float(count),
            **{k: float(v) for k, v in metrics.items()}}
