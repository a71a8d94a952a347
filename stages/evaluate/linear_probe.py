"""Linear probe as CLIP_benchmark defines it: a linear head trained on frozen, normalised image
features of the train split, scored on the test split.

The same recipe as `clip_benchmark.metrics.linear_probe`: seed, `torch.nn.Linear`, AdamW at
--fewshot-lr without weight decay (CLIP_benchmark's choice when no val split is given), its cosine
schedule stepped per batch, --fewshot-epochs over shuffled batches, --fewshot-k samples per class
(-1: all). Its own `train()` runs only on CUDA (it moves the head with `.cuda()`); this runs on the
evaluation device. The features are encoded by every rank's share and gathered, as zero-shot.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from stages.common import distributed
from stages.common.distributed import DistInfo
from stages.common.errors import DataError
from stages.evaluate import features, scores
from stages.evaluate.evalsets import CLASSIFICATION, EvalSet
from stages.evaluate.model import LoadedModel


def _features(evalset: EvalSet, loaded: LoadedModel, device, amp, cfg, ctx: DistInfo, log) -> tuple:
    parts = distributed.gather(features.encode_classification(
        evalset, loaded, device, amp, cfg.batch_size, cfg.workers, ctx, log), ctx)
    kept = [p for p in parts if p[0] is not None]
    if not kept:
        raise DataError(f"{evalset.uri}: the shards {evalset.shards[:3]}... hold no samples")
    # clone: features come out of inference mode, and the head's backward must save them
    return torch.cat([p[0] for p in kept]).clone(), torch.cat([p[1] for p in kept]).clone()


def fewshot_indices(targets: torch.Tensor, k: int) -> list[int]:
    """CLIP_benchmark's selection: a random permutation, then up to k per class (k < 0: all)."""
    counts: dict[int, int] = {}
    keep = []
    for p in torch.randperm(len(targets)).tolist():
        label = int(targets[p])
        counts.setdefault(label, 0)
        if k < 0 or counts[label] < k:
            counts[label] += 1
            keep.append(p)
    short = [c for c, n in counts.items() if k > 0 and n != k]
    if short:
        raise DataError(f"--fewshot-k {k}: class(es) {short[:5]} have fewer train samples than that")
    return keep


def train_head(train_x: torch.Tensor, train_y: torch.Tensor, classes: int, lr: float, epochs: int,
               batch_size: int, seed: int, weight_decay: float = 0.0) -> torch.nn.Linear:
    from clip_benchmark.metrics.linear_probe import FeatureDataset, cosine_lr

    loader = torch.utils.data.DataLoader(FeatureDataset(train_x, train_y), batch_size=batch_size, shuffle=True)
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    schedule = cosine_lr(optimizer, lr, 0.0, epochs * len(loader))
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loader):
            schedule(i + epoch * len(loader))
            optimizer.zero_grad()
            criterion(head(x), y).backward()
            optimizer.step()
    return head


def evaluate(evalset: EvalSet, loaded: LoadedModel, device: torch.device, amp: Callable, cfg: Any,
             ctx: DistInfo, log: logging.Logger) -> tuple[torch.Tensor, dict[str, float]]:
    """(test features, metrics) of a linear probe on this set's train split."""
    train_set = dataclasses.replace(evalset, shards=evalset.train_shards, task=CLASSIFICATION, samples=None)
    train_x, train_y = _features(train_set, loaded, device, amp, cfg, ctx, log)
    test_x, test_y = _features(dataclasses.replace(evalset, task=CLASSIFICATION), loaded, device, amp, cfg,
                               ctx, log)
    evalset.ignored.update(train_set.ignored)
    torch.manual_seed(cfg.seed)
    keep = fewshot_indices(train_y, cfg.fewshot_k)
    head = train_head(train_x[keep], train_y[keep], int(train_y.max()) + 1, cfg.fewshot_lr,
                      cfg.fewshot_epochs, cfg.batch_size, cfg.seed)
    with torch.no_grad():
        logits = head(test_x)
    log.info("%s: linear probe on %d train samples, %d epochs", evalset.name, len(keep), cfg.fewshot_epochs)
    return test_x, scores.classification_metrics(logits, test_y)
