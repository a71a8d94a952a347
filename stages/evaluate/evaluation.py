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
from stages.evaluate.evalsets import CLASSIFICATION, EvalSet
from stages.evaluate.model import LoadedModel


def _template_fn(template: str) -> Callable[[str], str]:
    # CLIP_benchmark templates name the class {c}; str.format would also trip on other braces.
    return lambda classname: template.replace("{c}", classname)


@torch.no_grad()
def zero_shot_weights(loaded: LoadedModel, evalset: EvalSet, device: torch.device,
                      amp: Callable) -> torch.Tensor:
    """[embed_dim, classes]: per class, every template encoded, normalised, averaged, normalised."""
    import open_clip

    with amp():
        weights = open_clip.build_zero_shot_classifier(
            loaded.model, loaded.tokenizer, evalset.classnames,
            [_template_fn(t) for t in evalset.templates], num_classes_per_batch=10, device=device)
    return weights.float().cpu()


def evaluate_set(evalset: EvalSet, loaded: LoadedModel, device: torch.device, cfg: Any, ctx: DistInfo,
                 log: logging.Logger) -> dict[str, Any]:
    """Metrics of one eval set (identical on every rank) with its sample count and elapsed time."""
    started = time.time()
    amp = features.autocast_for(device, cfg.precision)
    args = (evalset, loaded, device, amp, cfg.batch_size, cfg.workers, ctx, log)
    if evalset.task == CLASSIFICATION:
        classifier = zero_shot_weights(loaded, evalset, device, amp)
        parts = distributed.gather(features.encode_classification(*args), ctx)
        image_feats, labels = _join(parts, 0, evalset), _join(parts, 1, evalset)
        metrics = scores.classification_metrics(100.0 * image_feats @ classifier, labels)
    else:
        parts = distributed.gather(features.encode_retrieval(*args), ctx)
        image_feats, text_feats = _join(parts, 0, evalset), _join(parts, 1, evalset)
        metrics = scores.retrieval_metrics(image_feats, text_feats, _owners(parts))
    elapsed = time.time() - started
    ignored = _total_ignored(evalset, ctx)
    log.info("%s: %d samples in %.1fs%s", evalset.name, len(image_feats), elapsed,
             f"; members ignored, never decoded: {ignored}" if ignored else "")
    return {"task": evalset.task, "uri": evalset.uri, "samples": len(image_feats),
            "metrics": metrics, "elapsed_s": round(elapsed, 3), "ignored_members": ignored}


def _total_ignored(evalset: EvalSet, ctx: Dist) -> dict[str, int]:
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
