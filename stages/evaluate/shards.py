"""Stream eval shards with webdataset straight from any fsspec store, split across ranks and workers."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import webdataset as wds

from stages.common import storage
from stages.evaluate.evalsets import IMAGE_EXTS, RETRIEVAL, EvalSet

# webdataset opens local paths and a few URL schemes itself; everything else goes through fsspec.
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "hf")


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    return storage.open_read(url, mode)


def register_fsspec_openers() -> None:
    """Make webdataset open object-store URLs with fsspec (`webdataset.gopen` is also a function)."""
    gopen_module = sys.modules["webdataset.gopen"]
    for scheme in FSSPEC_SCHEMES:
        gopen_module.gopen_schemes[scheme] = _fsspec_open


def rank_shards(shards: list[str], rank: int, world: int) -> tuple[list[str], bool]:
    """This rank's shards; (all shards, True) when there are too few to give each rank one."""
    if world <= 1:
        return shards, False
    if len(shards) >= world:
        return shards[rank::world], False
    return shards, True


def _sample_filter(rank: int, world: int) -> Callable:
    def keep_every_nth(samples):
        for i, sample in enumerate(samples):
            if i % world == rank:
                yield sample
    return keep_every_nth


def _to_record(task: str, preprocess: Callable) -> Callable[[dict], dict]:
    def convert(sample: dict) -> dict:
        image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
        record = {"key": sample["__key__"], "url": sample.get("__url__", ""),
                  "image": None if image is None else preprocess(image.convert("RGB"))}
        if task == RETRIEVAL:
            text = sample.get("txt")
            record["captions"] = [] if text is None else [t.strip() for t in text.splitlines() if t.strip()]
        else:
            record["label"] = sample.get("cls")
        return record
    return convert


def _collate(records: list[dict]) -> dict:
    """Batch records; samples without an image keep a None so the caller can name them."""
    batch = {key: [r.get(key) for r in records] for key in records[0]}
    images = batch["image"]
    batch["image"] = torch.stack(images) if all(i is not None for i in images) else images
    return batch


def loader(evalset: EvalSet, preprocess: Callable, batch_size: int, workers: int,
           rank: int = 0, world: int = 1) -> wds.WebLoader:
    """Batches of {"image", "label"|"captions", "key", "url"} for this rank's part of an eval set."""
    register_fsspec_openers()
    shards, split_samples = rank_shards(evalset.shards, rank, world)
    stages: list[Any] = [wds.SimpleShardList(shards)]
    if not split_samples:
        stages.append(wds.split_by_worker)
    stages += [wds.tarfile_to_samples(), wds.decode("pil")]
    if split_samples:
        stages.append(_sample_filter(rank, world))
    stages += [wds.map(_to_record(evalset.task, preprocess)),
               wds.batched(batch_size, collation_fn=_collate, partial=True)]
    # Workers each take whole shards; with sample-level splitting every worker would read everything.
    num_workers = 0 if split_samples else min(workers, len(shards))
    return wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=num_workers)
