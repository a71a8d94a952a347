"""Image-text retrieval metrics computed in blocks: memory grows with N x block, never N x N.

R@1/5/10, mean and median rank both ways, with 1-based ranks as open_clip_train's get_clip_metrics:
the rank of the right answer is the number of candidates that score strictly higher (ties favour
the right answer). An image may have several captions: image->text counts the best-ranked of its
own captions. Train validation and the evaluate stage both use this; `dense_retrieval_ranks` is the
N x N computation it must equal, kept for the tests.
"""

from __future__ import annotations

import torch

BLOCK = 1024


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                    block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(0-based rank of each image's best own caption, 0-based rank of each caption's image)."""
    n_images = len(image_features)
    owner = text_to_image.long()
    i2t = torch.empty(n_images, dtype=torch.long)
    for lo in range(0, n_images, block):
        hi = min(lo + block, n_images)
        scores = image_features[lo:hi] @ text_features.t()  # [b, texts]
        # the best score among each image's own captions, picked from these same products
        cols = ((owner >= lo) & (owner < hi)).nonzero().squeeze(1)
        rows = owner[cols] - lo
        own_best = torch.full((hi - lo,), float("-inf"), dtype=scores.dtype)
        own_best = own_best.scatter_reduce(0, rows, scores[rows, cols], reduce="amax")
        i2t[lo:hi] = (scores > own_best.view(-1, 1)).sum(dim=1)
    t2i = torch.empty(len(text_features), dtype=torch.long)
    for lo in range(0, len(text_features), block):
        hi = min(lo + block, len(text_features))
        scores = (image_features @ text_features[lo:hi].t()).t()  # [b, images], same products
        own = scores.gather(1, owner[lo:hi].view(-1, 1))
        t2i[lo:hi] = (scores > own).sum(dim=1)
    return i2t, t2i


def dense_retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor,
                          text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ranks from the full N x N score matrix (the reference the blocks must equal)."""
    scores = image_features @ text_features.t()
    owns = text_to_image.view(1, -1) == torch.arange(len(image_features)).view(-1, 1)
    own_i2t = scores.masked_fill(~owns, float("-inf")).max(dim=1, keepdim=True).values
    t_scores = scores.t()
    own_t2i = t_scores.gather(1, text_to_image.view(-1, 1))
    return (scores > own_i2t).sum(dim=1), (t_scores > own_t2i).sum(dim=1)


def rank_metrics(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    ranks = ranks.double()
    out = {f"{prefix}_recall@{k}": (ranks < k).double().mean().item() for k in (1, 5, 10)}
    out[f"{prefix}_mean_rank"] = ranks.mean().item() + 1
    out[f"{prefix}_median_rank"] = torch.floor(ranks.quantile(0.5)).item() + 1  # numpy-style median
    return out


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      i2t_name: str = "text_retrieval", t2i_name: str = "image_retrieval",
                      block: int = BLOCK) -> dict[str, float]:
    i2t, t2i = retrieval_ranks(image_features, text_features, text_to_image, block)
    return {**rank_metrics(i2t, i2t_name), **rank_metrics(t2i, t2i_name)}
