"""One eval set, end to end on every rank: classifier weights, features, gathered metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from stages.common import distributed
from stages.common.distributed import DistInfo
from stages.common.errors import DataError
from stages.evaluate import features, scores
from stages.evaluate.evalsets import LINEAR_PROBE, MULTILABEL, RETRIEVAL, EvalSet
from stages.evaluate.model import LoadedModel


def zero_shot_weights(loaded: LoadedModel, classnames: list[str], templates: list[str],
                      device: torch.device, amp: Callable) -> torch.Tensor:
    """[embed_dim, classes], the classes' text encoding split over the ranks."""
    from stages.common.zeroshot import classifier

    return classifier(loaded.model, loaded.tokenizer, classnames, templates, device, amp)


def evaluate_set(evalset: EvalSet, loaded: LoadedModel, device: torch.device, cfg: Any, ctx: DistInfo,
                 log: logging.Logger) -> dict[str, Any]:
    """Metrics of one eval set (identical on every rank) with its sample count and elapsed time."""
    started = time.time()
    amp = features.autocast_for(device, cfg.precision)
    args = (evalset, loaded, device, amp, cfg.batch_size, cfg.workers, ctx, log)
    if evalset.task == RETRIEVAL:
        parts = distributed.gather(features.encode_retrieval(*args), ctx)
        image_feats, text_feats = _join(parts, 0, evalset), _join(parts, 1, evalset)
        metrics = scores.retrieval_metrics(image_feats, text_feats, _owners(parts))
        metrics["mean_recall@1"] = 0.5 * (metrics["text_retrieval_recall@1"] + metrics["image_retrieval_recall@1"])
    elif evalset.task == LINEAR_PROBE:
        from stages.evaluate import linear_probe

        image_feats, metrics = linear_probe.evaluate(evalset, loaded, device, amp, cfg, ctx, log)
    else:
        parts = distributed.gather(features.encode_classification(*args), ctx)
        image_feats, labels = _join(parts, 0, evalset), _join(parts, 1, evalset)
        meta = torch.cat([p[2] for p in parts if p[2] is not None]) if evalset.groups else None
        metrics = _classify(evalset, loaded, image_feats, labels, meta, device, amp)
    elapsed = time.time() - started
    ignored = _total_ignored(evalset, ctx)
    log.info("%s: %d samples in %.1fs%s", evalset.name, len(image_feats), elapsed,
             f"; members ignored, never decoded: {ignored}" if ignored else "")
    out = {"task": evalset.task, "uri": evalset.uri, "samples": len(image_feats),
           "metrics": metrics, "elapsed_s": round(elapsed, 3), "ignored_members": ignored}
    if evalset.builtin:
        out["builtin_metadata"] = dict(evalset.builtin)
    return out


def _classify(evalset: EvalSet, loaded: LoadedModel, image_feats: torch.Tensor, labels: torch.Tensor,
              meta: torch.Tensor | None, device: torch.device, amp: Callable) -> dict[str, float]:
    """Zero-shot classification metrics: single-label, multilabel (mAP), and DataComp's subgroups."""
    from stages.evaluate import subgroups

    if evalset.groups in ("fairface", "utkface"):
        objectives = subgroups.split_objectives(evalset.classnames, evalset.templates, evalset.uri)
        preds = {}
        for objective, (names, templates) in objectives.items():
            weights = zero_shot_weights(loaded, names, templates, device, amp)
            preds[objective] = (image_feats @ weights).argmax(dim=1)
        return subgroups.fairface_metrics(preds, meta)
    logits = 100.0 * image_feats @ zero_shot_weights(loaded, evalset.classnames, evalset.templates, device, amp)
    if evalset.task == MULTILABEL:
        return scores.multilabel_metrics(logits, labels)
    metrics = scores.classification_metrics(logits, labels)
    if evalset.groups:
        metrics.update(subgroups.wilds_metrics(evalset.groups, logits, labels, meta))
    return metrics


def _total_ignored(evalset: EvalSet, ctx: DistInfo) -> dict[str, int]:
    """Members no rank decoded, by suffix, over all ranks."""
    total: dict[str, int] = {}
    for part in distributed.gather(dict(evalset.ignored), ctx):
        for suffix, n in part.items():
            total[suffix] = total.get(suffix, 0) + n
    return dict(sorted(total.items()))


def _join(parts: list[tuple], index: int, evalset: EvalSet) -> torch.Tensor:
    tensors = [p[index] for p in parts if p[index] is not None]
    if not tensors:
        raise DataError(f"{evalset.uri}: the shards {evalset.shards[:3]}... hold no samples")
    return torch.cat(tensors)


def _owners(parts: list[tuple]) -> torch.Tensor:
    """Each caption's image index in the gathered order (ranks' image indices shifted by offset)."""
    out, offset = [], 0
    for image_feats, _, owners in parts:
        if image_feats is None:
            continue
        out.append(owners + offset)
        offset += len(image_feats)
    return torch.cat(out)
