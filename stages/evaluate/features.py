"""Encode an eval set's images and texts on this rank, checking each batch before the model sees it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from stages.common.distributed import DistInfo
from stages.common.errors import DataError
from stages.common.logs import progress
from stages.evaluate import shards
from stages.evaluate.evalsets import MULTILABEL, EvalSet
from stages.evaluate.model import LoadedModel


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """AMP on GPU as open_clip_train's --precision; the CPU runs fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _check_images(batch: dict, evalset: EvalSet) -> torch.Tensor:
    images = batch["image"]
    if isinstance(images, list):
        key, url, problem = next((k, u, p) for k, u, i, p in zip(batch["key"], batch["url"], images,
                                                                 batch["problem"], strict=True) if i is None)
        raise DataError(f"{url}: sample {key!r} has no usable image (.jpg/.jpeg/.png/.webp) in eval set "
                        f"{evalset.name}: {problem}")
    return images


def _check_labels(batch: dict, evalset: EvalSet) -> torch.Tensor:
    """[B] class indices, or [B, classes] multi-hot targets of a multilabel set."""
    n = len(evalset.classnames)
    if evalset.groups in ("fairface", "utkface"):  # the targets are the .npy metadata
        return torch.zeros(len(batch["key"]), dtype=torch.long)
    if evalset.task == MULTILABEL:
        for key, url, label in zip(batch["key"], batch["url"], batch["label"], strict=True):
            if label is None or len(label) != n or not set(label.tolist()) <= {0, 1}:
                raise DataError(f"{url}: sample {key!r} needs a .npy multi-hot target of {n} zeros and "
                                f"ones ({n} classes in {evalset.uri}), found "
                                f"{None if label is None else label.tolist()[:8]}")
        return torch.stack([torch.as_tensor(label) for label in batch["label"]]).long()
    for key, url, label in zip(batch["key"], batch["url"], batch["label"], strict=True):
        if not isinstance(label, int) or not 0 <= label < n:
            raise DataError(f"{url}: sample {key!r} has label {label!r}, outside 0..{n - 1} "
                            f"({n} classes in {evalset.uri})")
    return torch.tensor(batch["label"], dtype=torch.long)


def _check_metadata(batch: dict, evalset: EvalSet) -> torch.Tensor | None:
    if not evalset.groups:
        return None
    from stages.evaluate.subgroups import metadata_array

    for key, url, meta in zip(batch["key"], batch["url"], batch["meta"], strict=True):
        if meta is None:
            raise DataError(f"{url}: sample {key!r} has no usable .npy metadata, which eval set "
                            f"{evalset.name} needs for its subgroup metrics")
    return metadata_array(batch["meta"], evalset.groups)


def _batches(evalset: EvalSet, loaded: LoadedModel, batch_size: int, workers: int, ctx: DistInfo,
             log: logging.Logger):
    """Batches of this rank's part; the members they ignored add up in evalset.ignored."""
    data = shards.loader(evalset, loaded.preprocess, batch_size, workers, ctx.rank, ctx.world_size,
                         evalset.keys, evalset.max_samples)
    samples = min(evalset.samples or 0, evalset.max_samples or evalset.samples or 0)
    total = -(-samples // (batch_size * ctx.world_size)) if samples else None
    for batch in progress(data, total, f"{evalset.name} batches", log):
        for suffix, n in batch.pop("ignored").items():
            evalset.ignored[suffix] = evalset.ignored.get(suffix, 0) + n
        yield batch


@torch.inference_mode()
def encode_classification(evalset: EvalSet, loaded: LoadedModel, device: torch.device, amp: Callable,
                          batch_size: int, workers: int, ctx: DistInfo, log: logging.Logger):
    """(normalised image features, labels, .npy metadata or None) of this rank's samples, on the
    CPU in fp32."""
    feats, labels, metas = [], [], []
    for batch in _batches(evalset, loaded, batch_size, workers, ctx, log):
        images = _check_images(batch, evalset)
        labels.append(_check_labels(batch, evalset))
        meta = _check_metadata(batch, evalset)
        if meta is not None:
            metas.append(meta)
        with amp():
            feats.append(loaded.model.encode_image(images.to(device), normalize=True).float().cpu())
    return _cat(feats), _cat(labels), _cat(metas)


@torch.inference_mode()
def encode_retrieval(evalset: EvalSet, loaded: LoadedModel, device: torch.device, amp: Callable,
                     batch_size: int, workers: int, ctx: DistInfo, log: logging.Logger):
    """(image features, caption features, image index of each caption) of this rank's samples."""
    image_feats, text_feats, owners = [], [], []
    seen = 0
    for batch in _batches(evalset, loaded, batch_size, workers, ctx, log):
        images = _check_images(batch, evalset)
        texts = []
        for i, (key, url, captions) in enumerate(zip(batch["key"], batch["url"], batch["captions"], strict=True)):
            if not captions:
                raise DataError(f"{url}: sample {key!r} has no caption (.txt) in eval set {evalset.name}")
            texts += captions
            owners += [seen + i] * len(captions)
        seen += len(images)
        with amp():
            image_feats.append(loaded.model.encode_image(images.to(device), normalize=True).float().cpu())
            tokens = loaded.tokenizer(texts).to(device)
            text_feats.append(loaded.model.encode_text(tokens, normalize=True).float().cpu())
    return _cat(image_feats), _cat(text_feats), torch.tensor(owners, dtype=torch.long)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor, or None when this rank got no samples (its part is then skipped when combining)."""
    return torch.cat(parts) if parts else None
