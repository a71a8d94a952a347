"""Batches of an eval set, read through the shared shard layer (`stages.common.shards`).

Only the image (PIL, under the pixel limit), the captions (UTF-8) and the class label (an
integer) are decoded; every other member is counted as ignored and never decoded, so an eval set
from a shared bucket cannot run code (no pickle, torch.load or gzip decoders).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.common import shards as wds_shards
from stages.common.shards import SampleKeys, Unusable, rank_shards
from stages.evaluate import labels
from stages.evaluate.evalsets import MULTILABEL, RETRIEVAL, EvalSet
from stages.train.data.decode import ImageDecoder


def share(total: int | None, part: int, parts: int) -> int | None:
    """Part `part` of `total` split as evenly as it goes into `parts` (None: no cap)."""
    if not total:
        return None
    return total // parts + (1 if part < total % parts else 0)


class EvalStream(IterableDataset):
    """Records of this rank's part of an eval set, batched; each batch says which members it ignored."""

    def __init__(self, evalset: EvalSet, preprocess: Callable, batch_size: int, keys: SampleKeys,
                 rank: int, world: int, max_samples: int | None):
        super().__init__()
        self.evalset, self.batch_size, self.keys = evalset, batch_size, keys
        # the training loader's decoder: the transform's ToTensor + Normalize run once per batch,
        # straight into the (shared-memory) batch tensor; no draft-mode JPEG decoding, so the
        # pixels are the ones the transform itself gives
        self.decoder = ImageDecoder(preprocess, keys, draft=False)
        self.rank, self.world = rank, world
        self.shards, self.split_samples = rank_shards(evalset.shards, rank, world)
        self.cap = share(max_samples, rank, world)
        self._wants_npy = bool(evalset.groups) or evalset.task == MULTILABEL

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.shards[worker::workers]
        cap = share(self.cap, worker, workers) if self.cap else None
        records, ignored, taken, index = [], Counter(), 0, 0
        for url in mine:
            for _, sample in wds_shards.iter_samples(url):
                index += 1
                if self.split_samples and (index - 1) % self.world != self.rank:
                    continue
                if cap is not None and taken >= cap:
                    break
                ignored.update(k for k in self.keys.ignored(sample)
                               if not (self._wants_npy and k == labels.METADATA_KEY))
                records.append(self._record(sample))
                taken += 1
                if len(records) == self.batch_size:
                    yield _collate(records, ignored, self.decoder)
                    records, ignored = [], Counter()
        if records:
            yield _collate(records, ignored, self.decoder)

    def _record(self, sample: dict) -> dict:
        record = {"key": sample["__key__"], "url": sample.get("__url__", ""), "image": None, "problem": ""}
        try:
            record["image"] = self.decoder.decode(self.keys.image_bytes(sample))
        except Unusable as exc:
            record["problem"] = str(exc)
        if self.evalset.task == RETRIEVAL:
            try:
                text = self.keys.caption_text(sample)
                record["captions"] = [t.strip() for t in text.splitlines() if t.strip()]
            except Unusable:
                record["captions"] = []
        else:
            try:
                record["label"] = (labels.metadata(sample) if self.evalset.task == MULTILABEL
                                   else self.keys.label(sample))
            except Unusable:
                record["label"] = None
        if self.evalset.groups:
            try:
                record["meta"] = labels.metadata(sample)
            except Unusable:
                record["meta"] = None
        return record


def _collate(records: list[dict], ignored: Counter, decoder: ImageDecoder) -> dict:
    """Batch records; samples without an image keep a None so the caller can name them."""
    batch = {key: [r.get(key) for r in records] for key in records[0]}
    images = batch["image"]
    batch["image"] = decoder.collate(images) if all(i is not None for i in images) else images
    batch["ignored"] = dict(ignored)
    return batch


def loader(evalset: EvalSet, preprocess: Callable, batch_size: int, workers: int, rank: int = 0,
           world: int = 1, keys: SampleKeys | None = None, max_samples: int | None = None) -> DataLoader:
    """Batches of {"image", "label"|"captions", "key", "url", "ignored"} for this rank's part."""
    stream = EvalStream(evalset, preprocess, batch_size, keys or SampleKeys(), rank, world, max_samples)
    # Workers each take whole shards; with sample-level splitting every worker would read everything.
    num_workers = 0 if stream.split_samples else min(workers, len(stream.shards))
    return DataLoader(stream, batch_size=None, num_workers=num_workers)
