"""Metrics from features: zero-shot classification (as CLIP_benchmark) and retrieval (as open_clip_train)."""

from __future__ import annotations

import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 (when there are at least 5 classes) and mean per-class recall."""
    num_classes = logits.shape[1]
    ranked = logits.topk(min(5, num_classes), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    metrics = {"acc1": hits[:, 0].float().mean().item()}
    if num_classes >= 5:
        metrics["acc5"] = hits.any(dim=1).float().mean().item()
    metrics["mean_per_class_recall"] = mean_per_class_recall(ranked[:, 0], labels, num_classes)
    return metrics


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Mean average precision over the classes (CLIP_benchmark's average_precision_per_class)."""
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class

    return {"mean_average_precision": average_precision_per_class(logits, targets).mean().item()}


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Recall averaged over the classes that occur in the labels (as CLIP_benchmark's balanced accuracy)."""
    seen = labels.unique()
    recalls = [(pred[labels == c] == c).float().mean() for c in seen]
    return torch.stack(recalls).mean().item() if recalls else 0.0


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor) -> dict[str, float]:
    """R@1/5/10, mean and median rank both ways (stages.common.retrieval, computed in blocks).

    `text_to_image[j]` is the image caption j belongs to. With one caption per image this is
    open_clip_train's get_clip_metrics (text_retrieval_* = its image_to_text_*, image_retrieval_* =
    text_to_image_*).
    """
    from stages.common.retrieval import retrieval_metrics as blockwise

    return blockwise(image_features, text_features, text_to_image)
