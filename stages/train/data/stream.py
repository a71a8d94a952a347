"""One rank's batches: each DataLoader worker reads its items, shuffles, decodes and batches them.

Every rank yields exactly its quota of batches per epoch: a worker that runs out of items goes
round them again, so uneven shards never leave one rank waiting in an all-reduce. Each batch
carries its worker's position after it (`WorkerState`), so the loader can say at any step where
every worker is, and a resumed worker continues from there without reading what came before.

Loud failures: a worker that passes over `max_unusable` samples in a row without a usable one,
or a whole pass over its items without one, stops with an error naming its shards, the reasons
counted and the member keys the samples have.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from stages.common.shards import SampleKeys, Unusable, describe_keys, iter_samples, key_hint, read_sample_at
from stages.train.data.decode import ImageDecoder, sample_seed
from stages.train.data.plan import (
    Item,
    WorkerState,
    assign,
    epoch_items,
    rng_state,
    set_rng_state,
    worker_quota,
)
from stages.train.data.pool import BufferPool

log = logging.getLogger("stages.train.data")

SAMPLE_SHUFFLE = 2000          # raw samples held for shuffling in each worker
SAMPLE_SHUFFLE_INITIAL = 500   # samples read before the first one leaves the buffer
PREFETCH = 2                   # batches each DataLoader worker works ahead
_PASS_END = object()           # marks the end of one pass over a worker's items


@dataclass
class Batch:
    """A batch with where it came from; the loader strips this before the trainer sees it."""

    images: torch.Tensor | None  # None: the worker's closing report (or an error), no data
    texts: torch.Tensor | None
    worker: int                  # the DataLoader worker
    skipped: int                 # unusable samples the worker passed over in this pass
    slot: int = -1               # the BufferPool slot the images are in (-1: a tensor of their own)
    pinned: bool = False         # copied by pin_memory: the slot's tensor is no longer referred to
    plan_worker: int = 0         # the part of the plan the worker reads (rotated after a resume)
    state: dict | None = None    # the worker's position right after this batch
    error: str | None = None     # the worker stopped: why
    keys: list[str] | None = None  # the samples' __key__s, in batch order

    def pin_memory(self) -> Batch:
        if self.images is None:
            return self
        return Batch(self.images.pin_memory(), self.texts.pin_memory(), self.worker, self.skipped,
                     self.slot, True, self.plan_worker, self.state, self.error, self.keys)


@dataclass
class StreamPlan:
    shards: list[str]
    samples: list[int | None]
    weights: list[float]
    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    num_batches: int | None        # None: read each shard once (validation)
    resampled: bool
    shuffle: bool
    keys: SampleKeys = field(default_factory=SampleKeys)
    max_samples: int | None = None  # validation: at most this many samples on this rank
    max_unusable: int = 1000        # samples in a row without a usable one before failing


class WorkerReader:
    """Raw samples of one worker's items, through a shuffle buffer whose contents it can name.

    The buffer follows webdataset's `shuffle` (fill to `initial`, then read two per sample out
    until `size`); it is written here because webdataset's keeps no state a checkpoint could save.
    The buffer drains at the end of each pass, so a position is always inside one pass.
    """

    def __init__(self, plan: StreamPlan, items: list[Item], tag: str, state: WorkerState | None):
        self.plan, self.items, self.tag = plan, items, tag
        self.state = state or WorkerState()
        self.rng = random.Random(f"samples:{tag}")
        if self.state.rng is not None:
            set_rng_state(self.rng, self.state.rng)
        self.reasons: Counter = Counter()
        self.recent_urls: list[str] = []
        self.restored = bool(state)

    def snapshot(self, buffer: list) -> dict:
        st = self.state
        st.buffer = [list(pos) for pos, _ in buffer]
        st.rng = rng_state(self.rng)
        return st.to_state()

    def cycle_items(self, cycle: int) -> list[Item]:
        if cycle == 0:
            return self.items
        again = list(self.items)
        random.Random(f"cycle:{self.tag}:{cycle}").shuffle(again)
        return again

    def samples(self) -> Iterator[Any]:
        """Samples (or _PASS_END); `self.buffer` is the shuffle buffer while they flow."""
        st = self.state
        while True:
            items = self.cycle_items(st.cycle)
            self.buffer = self._restore(items, st.buffer) if st.buffer else []
            source = self._raw(items)
            for _, sample in (self._shuffle(source) if self.plan.shuffle else source):
                yield sample
            yield _PASS_END
            if not self.plan.shuffle or self.plan.num_batches is None:
                return
            st.cycle, st.item, st.offset, st.byte, st.buffer = st.cycle + 1, 0, None, None, []

    def _raw(self, items: list[Item]) -> Iterator[tuple[tuple[int, int], dict]]:
        st = self.state
        while st.item < len(items):
            item = items[st.item]
            url = self.plan.shards[item.shard]
            start, byte = (item.first(), None) if st.offset is None else (st.offset, st.byte)
            stop = None if item.stop is None else max(item.stop, max(item.picks, default=-1) + 1)
            self.recent_urls = (self.recent_urls + [url])[-3:]
            got = 0
            try:
                for offset, sample in iter_samples(url, start, item.keep, stop, byte):
                    st.offset, st.byte = offset + 1, sample.pop("__next__", None)
                    got += 1
                    yield (st.item, offset, sample.get("__byte__")), sample
            except Exception as exc:  # noqa: BLE001 - a bad shard must not stop training
                st.skipped += 1
                self.reasons["unreadable_shard"] += 1
                log.warning("shard %s unreadable after %d samples (%s: %s); skipping the rest of it",
                            url, got, type(exc).__name__, exc)
            st.item, st.offset, st.byte = st.item + 1, None, None

    def _shuffle(self, source: Iterator) -> Iterator:
        buf, rng = self.buffer, self.rng
        size, initial = SAMPLE_SHUFFLE, min(SAMPLE_SHUFFLE_INITIAL, SAMPLE_SHUFFLE)
        for entry in source:
            buf.append(entry)
            if len(buf) < size:
                nxt = next(source, None)
                if nxt is not None:
                    buf.append(nxt)
            if len(buf) >= initial:
                yield _pick(buf, rng)
        while buf:
            yield _pick(buf, rng)

    def _restore(self, items: list[Item], positions: list[list]) -> list:
        """The shuffle buffer a checkpoint named: each sample read again with one seek to its
        header (or, where its byte offset is unknown, from its shard up to it)."""
        by_item: dict[int, list[list]] = {}
        for pos in positions:
            by_item.setdefault(pos[0], []).append(pos)
        found: dict[tuple[int, int], tuple] = {}
        for i, entries in by_item.items():
            url = self.plan.shards[items[i].shard]
            direct = [(o, b) for _, o, b in entries if b is not None]
            for offset, sample in read_sample_at(url, direct):
                found[(i, offset)] = ((i, offset, sample.pop("__byte__", None)), sample)
            walk = {o for _, o, b in entries if b is None}
            if walk:
                for offset, sample in iter_samples(url, min(walk), walk.__contains__, max(walk) + 1):
                    found[(i, offset)] = ((i, offset, sample.get("__byte__")), sample)
        missing = len(positions) - len(found)
        if missing:
            log.warning("resume: %d samples of the shuffle buffer could not be read again", missing)
        return [found[(p[0], p[1])] for p in positions if (p[0], p[1]) in found]


def _pick(buf: list, rng: random.Random) -> Any:
    k = rng.randint(0, len(buf) - 1)
    buf[k], buf[-1] = buf[-1], buf[k]
    return buf.pop()


class ResampledReader(WorkerReader):
    """Shards drawn with replacement (--dataset-resampled): one endless pass; a resume re-seeds."""

    def _raw(self, items: list[Item]) -> Iterator[tuple[tuple[int, int], dict]]:
        draw = random.Random(f"resample:{self.tag}")
        population = range(len(self.plan.shards))
        while True:
            index = draw.choices(population, weights=self.plan.weights, k=1)[0]
            url = self.plan.shards[index]
            self.recent_urls = (self.recent_urls + [url])[-3:]
            try:
                for offset, sample in iter_samples(url):
                    yield (index, offset), sample
            except Exception as exc:  # noqa: BLE001
                self.state.skipped += 1
                self.reasons["unreadable_shard"] += 1
                log.warning("shard %s unreadable (%s: %s); skipping the rest of it", url, type(exc).__name__, exc)

    def snapshot(self, buffer: list) -> dict:
        return {**self.state.to_state(), "buffer": [], "rng": None}


class ShardStream(IterableDataset):
    """Yields `Batch`es for one rank; each DataLoader worker reads its own items."""

    def __init__(self, plan: StreamPlan, decoder: ImageDecoder, tokenizer: Callable, prefetch: int = PREFETCH):
        super().__init__()
        self.plan = plan
        self.decoder = decoder
        self.tokenizer = tokenizer
        # slots per worker: its prefetched batches, the one it fills, the one the trainer uses and
        # the one it used before (still referred to while the next batch is fetched)
        self.pool = BufferPool(plan.num_workers, prefetch + 3)
        self.epoch = mp.Value("i", 0)          # shared with persistent workers
        self.resume_active = mp.Value("i", 0)  # 1 while the pass `resume` describes is on
        self.resume: dict | None = None        # set before the workers start (see DataInfo)

    def active_resume(self, epoch: int) -> dict | None:
        spec = self.resume
        if spec is None or not self.resume_active.value or spec["epoch"] != epoch:
            return None
        return spec

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch.value
        tag = self.pool.iteration.value  # marks the pool slots this iteration's batches use
        spec = self.active_resume(epoch)
        # The DataLoader asks its workers in turn from worker 0; after a resume the turn is at
        # worker `rotate` % num_workers, so the workers take on the parts that keep the batch order.
        worker = (loader_worker + (spec["rotate"] if spec else 0)) % num_workers
        saved = spec["workers"][worker] if spec else None
        state = WorkerState.from_state(saved) if saved else None
        p = self.plan
        quota = None
        if p.num_batches is not None:
            total = spec["batches"] if spec else p.num_batches
            quota = worker_quota(total, worker, num_workers) - (state.made if state else 0)
        generation = spec.get("generation", 0) if spec else 0
        seed_tag = f"{p.seed}:{epoch}:{p.rank}:{worker}" + (f":g{generation}" if generation else "")
        items = self._items(epoch, worker, num_workers, spec)
        reader_cls = ResampledReader if p.resampled else WorkerReader
        reader = reader_cls(p, items, seed_tag, state)
        if quota is not None and quota <= 0:  # its part of the pass was all taken before a resume
            yield Batch(None, None, loader_worker, state.skipped if state else 0, plan_worker=worker)
            return
        yield from self._batches(reader, loader_worker, worker, quota, tag)

    def _items(self, epoch: int, worker: int, num_workers: int, spec: dict | None) -> list[Item]:
        p = self.plan
        if spec and spec.get("items") is not None:
            return [Item.from_state(x) for x in spec["items"][worker]]
        if not p.shuffle:  # validation: each shard once, split over ranks and workers, in order
            return [Item(i) for i in range(len(p.shards))][p.rank::p.world_size][worker::num_workers]
        return assign(epoch_items(len(p.shards), p.seed, epoch), p.rank, p.world_size, worker, num_workers)

    def _decode(self, sample: dict, epoch: int, cycle: int) -> tuple[Any, str]:
        keys, p = self.plan.keys, self.plan
        # augmentation drawn from the sample's own seed: exact on resume, with any workers or ranks
        seed = sample_seed(p.seed, epoch, cycle, sample.get("__url__", "").rsplit("/", 1)[-1], sample["__key__"]) if p.shuffle else None
        return self.decoder.decode(keys.image_bytes(sample), seed), keys.caption_text(sample)

    def _batches(self, reader: WorkerReader, loader_worker: int, worker: int, quota: int | None,
                 tag: int) -> Iterator[Batch]:
        p, st = self.plan, reader.state
        images: list[Any] = []
        texts: list[str] = []
        keys: list[str] = []
        made, in_row, usable_in_pass, taken = 0, 0, 0, 0
        recent: list[dict] = []
        first_pass_end = True
        cap = self._worker_cap(worker)
        for sample in reader.samples():
            if sample is _PASS_END:
                if quota is not None and usable_in_pass == 0 and not (first_pass_end and reader.restored):
                    yield self._failure(reader, worker, recent, "a whole pass over its shards gave no usable sample")
                    return
                usable_in_pass, first_pass_end = 0, False
                continue
            try:
                image, text = self._decode(sample, self.epoch.value, st.cycle)
            except Unusable as exc:
                st.skipped += 1
                in_row += 1
                reader.reasons[exc.reason] += 1
                recent = (recent + [sample])[-8:]
                log.debug("skipping sample %s: %s", sample.get("__key__"), exc)
                if in_row >= p.max_unusable:
                    yield self._failure(reader, worker, recent, f"{in_row} samples in a row gave no usable one")
                    return
                continue
            in_row, usable_in_pass = 0, usable_in_pass + 1
            images.append(image)
            texts.append(text)
            keys.append(sample["__key__"])
            taken += 1
            if len(images) == p.batch_size or (cap is not None and taken >= cap):
                st.made += 1
                made += 1
                yield self._collate(images, texts, keys, loader_worker, worker, tag, reader)
                images, texts, keys = [], [], []
                if (quota is not None and made >= quota) or (cap is not None and taken >= cap):
                    return
        if images and quota is None:  # validation keeps its last, partial batch
            yield self._collate(images, texts, keys, loader_worker, worker, tag, reader)
        yield Batch(None, None, loader_worker, st.skipped, plan_worker=worker)  # reports skips at the end

    def _worker_cap(self, worker: int) -> int | None:
        """Validation with --val-num-samples: this worker's share of this rank's cap."""
        cap = self.plan.max_samples
        if cap is None:
            return None
        n = self.plan.num_workers
        return cap // n + (1 if worker < cap % n else 0)

    def _failure(self, reader: WorkerReader, worker: int, recent: list[dict], what: str) -> Batch:
        p = self.plan
        reasons = ", ".join(f"{k} {v}" for k, v in reader.reasons.most_common()) or "none counted"
        seen = describe_keys(recent) if recent else "no samples at all"
        message = (f"rank {p.rank}, data worker {worker}: {what} (reasons: {reasons}); shards "
                   f"{', '.join(reader.recent_urls)}; the samples have {seen}; looking for image "
                   f"--image-key {p.keys.image} and caption --caption-key {p.keys.caption}")
        if recent:
            message += f"; try {key_hint(p.keys, recent)}"
        return Batch(None, None, 0, reader.state.skipped, plan_worker=worker, error=message)

    def _collate(self, images: list[Any], texts: list[str], keys: list[str], loader_worker: int, worker: int,
                 tag: int, reader: WorkerReader) -> Batch:
        slot, out = self.pool.take(*self.decoder.batch_shape(images), tag=tag)
        state = reader.snapshot(getattr(reader, "buffer", [])) if self.plan.num_batches is not None else None
        return Batch(self.decoder.collate(images, out), self.tokenizer(texts), loader_worker,
                     reader.state.skipped, slot, plan_worker=worker, state=state, keys=list(keys))
