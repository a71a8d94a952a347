"""Zero-shot classification during training, as open_clip_train's --imagenet-val/--imagenet-v2 and
--zeroshot-frequency, plus a step interval and any set in CLIP_benchmark's wds layout on any store.

Every rank takes its share of the images (and of the classes when the classifier is built, in
`stages.common.zeroshot`); the counts are summed over the ranks. Results go to the log, the
trainer's metrics (clipforge_train_val_metric{metric="<set>-zeroshot-top1"}) and one JSON row per
set and evaluation in {run}/eval/during_training.jsonl.

The ImageNet folders are read as open_clip_train reads them: --imagenet-val with torchvision's
ImageFolder (class folders in sorted order), --imagenet-v2 as ImageNetV2's matched-frequency
layout (folders named 0..999 by class index). Both take open_clip's ImageNet names and the OpenAI
templates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import torch

from stages.common import classmeta, storage
from stages.common.errors import DataError
from stages.common.shards import IMAGE_KEYS, SampleKeys, iter_samples

log = logging.getLogger("clipforge.train")
JSONL = "eval/during_training.jsonl"


@dataclasses.dataclass
class ZeroShotSet:
    name: str
    uri: str
    classnames: list[str]
    templates: list[str]
    images: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # ImageFolder: (path, label)
    shards: list[str] = dataclasses.field(default_factory=list)  # wds layout


def _image_folder(name: str, path: str, numeric: bool) -> ZeroShotSet:
    if not os.path.isdir(path):
        raise DataError(f"--{name} {path}: not a folder of class folders (ImageNet val layout)")
    folders = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if numeric:
        folders = sorted((d for d in folders if d.isdigit()), key=int)
    if not folders:
        raise DataError(f"--{name} {path}: no class folders")
    images = []
    for index, folder in enumerate(folders):
        label = int(folder) if numeric else index
        for file in sorted(os.listdir(os.path.join(path, folder))):
            if file.lower().rsplit(".", 1)[-1] in (*IMAGE_KEYS, "jpeg"):
                images.append((os.path.join(path, folder, file), label))
    templates = classmeta.templates_for("imagenet1k", path)
    return ZeroShotSet("imagenet-val" if name == "imagenet-val" else "imagenet-v2", path,
                       classmeta.classnames_for("imagenet1k", path), templates, images=images)


def _lines(uri: str) -> list[str] | None:
    if not storage.exists(uri):
        return None
    return [line.strip() for line in storage.read_text(uri).splitlines() if line.strip()]


def _wds_set(name: str, uri: str) -> ZeroShotSet:
    uri = uri.rstrip("/")
    test = storage.join(uri, "test")
    shards = sorted((u for u in storage.listdir(test) if u.endswith(".tar")),
                    key=lambda u: (len(u), u)) if storage.exists(test) else []
    if not shards:
        raise DataError(f"--zeroshot-data {uri}: no shards in {test}/ (CLIP_benchmark wds layout)")
    names_uri = storage.join(uri, "classnames.txt")
    templates_uri = storage.join(uri, "zeroshot_classification_templates.txt")
    classnames = _lines(names_uri) or classmeta.classnames_for(name, names_uri)
    templates = _lines(templates_uri) or classmeta.templates_for(name, templates_uri)
    return ZeroShotSet(name, uri, classnames, templates, shards=shards)


def open_sets(cfg: Any) -> list[ZeroShotSet]:
    """Every zero-shot set of the run, checked (layout, class names, templates) before training."""
    sets = []
    if cfg.imagenet_val:
        sets.append(_image_folder("imagenet-val", cfg.imagenet_val, numeric=False))
    if cfg.imagenet_v2:
        sets.append(_image_folder("imagenet-v2", cfg.imagenet_v2, numeric=True))
    for spec in cfg.zeroshot_data:
        name, sep, uri = spec.partition("=")
        if not sep or "/" in name or ":" in name:
            name, uri = spec.rstrip("/").rsplit("/", 1)[-1], spec
        sets.append(_wds_set(name, uri))
    return sets


def due(cfg: Any, step: int, steps_per_epoch: int, last: bool) -> bool:
    """After this step? Every --zeroshot-every-steps steps, and (open_clip_train's rule) at the end
    of every --zeroshot-frequency-th epoch and of the last one."""
    if cfg.zeroshot_every_steps and step % cfg.zeroshot_every_steps == 0:
        return True
    epoch_done = step % steps_per_epoch == 0
    epochs = step // steps_per_epoch
    return bool(cfg.zeroshot_frequency) and (
        (epoch_done and epochs % cfg.zeroshot_frequency == 0) or last)


def _my_samples(zs: ZeroShotSet, keys: SampleKeys, rank: int, world: int):
    """(PIL image, label) of this rank's share: every world-th sample."""
    if zs.images:
        for path, label in zs.images[rank::world]:
            with open(path, "rb") as f:
                yield keys.open_image(f.read()), label
        return
    index = 0
    for url in zs.shards:
        for _, sample in iter_samples(url):
            if index % world == rank:
                yield keys.open_image(keys.image_bytes(sample)), keys.label(sample)
            index += 1


@torch.no_grad()
def _counts(model, preprocess, classifier, zs, device, batch_size, rank, world) -> torch.Tensor:
    keys = SampleKeys()
    totals = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, samples
    images, labels = [], []

    def flush():
        feats = model.encode_image(torch.stack(images).to(device), normalize=True).float().cpu()
        ranked = (100.0 * feats @ classifier).topk(min(5, classifier.shape[1]), dim=1).indices
        hits = ranked == torch.tensor(labels).view(-1, 1)
        totals.add_(torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(labels)],
                                 dtype=torch.float64))
        images.clear()
        labels.clear()

    for image, label in _my_samples(zs, keys, rank, world):
        images.append(preprocess(image))
        labels.append(label)
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    return totals


def evaluate(bundle: Any, sets: list[ZeroShotSet], device: torch.device, batch_size: int,
             rank: int, world: int) -> dict[str, dict[str, Any]]:
    """{set: {"metrics", "samples"}}: top-1/top-5 over every rank's share, identical on all ranks."""
    import torch.distributed as dist

    from stages.common.zeroshot import classifier as build_classifier

    model = bundle.model
    was_training = model.training
    model.eval()
    out = {}
    try:
        for zs in sets:
            started = time.time()
            classifier = build_classifier(model, bundle.tokenizer, zs.classnames, zs.templates, device)
            totals = _counts(model, bundle.preprocess_val, classifier, zs, device, batch_size, rank, world)
            if world > 1:
                dist.all_reduce(totals)
            n = max(int(totals[2]), 1)
            prefix = "imagenet-zeroshot-val" if zs.name == "imagenet-val" else f"{zs.name}-zeroshot"
            out[zs.name] = {"metrics": {f"{prefix}-top1": totals[0].item() / n,
                                        f"{prefix}-top5": totals[1].item() / n},
                            "samples": int(totals[2]), "elapsed_s": round(time.time() - started, 3)}
    finally:
        model.train(was_training)
    return out


def record(run_dir: str, step: int, epoch: int, results: dict[str, dict[str, Any]]) -> None:
    """Append one row per set to {run}/eval/during_training.jsonl (rewritten whole: S3 cannot append)."""
    uri = storage.join(run_dir, JSONL)
    previous = storage.read_text(uri) if storage.exists(uri) else ""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = [json.dumps({"step": step, "epoch": epoch, "dataset": name, "time": stamp, **res})
            for name, res in results.items()]
    storage.write_text(uri, previous + "".join(r + "\n" for r in rows))
    for name, res in results.items():
        log.info("Zero-shot Step: %d %s (%d samples) %s", step, name, res["samples"],
                 " ".join(f"{k}: {v:.4f}" for k, v in res["metrics"].items()))
