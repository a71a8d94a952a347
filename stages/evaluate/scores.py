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


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Recall averaged over the classes that occur in the labels (as CLIP_benchmark's balanced accuracy)."""
    seen = labels.unique()
    recalls = [(pred[labels == c] == c).float().mean() for c in seen]
    return torch.stack(recalls).mean().item() if recalls else 0.0


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor) -> dict[str, float]:
    """R@1/5/10, mean and median rank both ways, 1-based ranks as open_clip_train's get_clip_metrics.

    `text_to_image[j]` is the image caption j belongs to. An image may have several captions; image->
    text counts the best-ranked of its own captions. With one caption per image this is exactly
    get_clip_metrics (text_retrieval_* = its image_to_text_*, image_retrieval_* = text_to_image_*).
    """
    scores = image_features @ text_features.t()  # [images, texts]
    owns = text_to_image.view(1, -1) == torch.arange(len(image_features)).view(-1, 1)
    # rank of an entry = how many candidates score strictly higher (ties favour the true match)
    own_scores_i2t = scores.masked_fill(~owns, float("-inf")).max(dim=1, keepdim=True).values
    i2t_rank = (scores > own_scores_i2t).sum(dim=1)
    t_scores = scores.t()  # [texts, images]
    own_scores_t2i = t_scores.gather(1, text_to_image.view(-1, 1))
    t2i_rank = (t_scores > own_scores_t2i).sum(dim=1)
    metrics = {}
    for prefix, ranks in (("text_retrieval", i2t_rank), ("image_retrieval", t2i_rank)):
        ranks = ranks.double()
        for k in (1, 5, 10):
            metrics[f"{prefix}_recall@{k}"] = (ranks < k).double().mean().item()
        metrics[f"{prefix}_mean_rank"] = ranks.mean().item() + 1
        metrics[f"{prefix}_median_rank"] = torch.floor(ranks.quantile(0.5)).item() + 1  # numpy-style median
    return metrics
