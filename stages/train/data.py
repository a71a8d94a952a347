"""The train stage's data loader: webdataset shards from any fsspec store into (images, texts) batches.

What it adds over open_clip_train's `get_wds_dataset`:
- shards from any fsspec URI (s3://, gs://, ...; importing this module registers the openers in
  webdataset), given as a download-stage manifest, run folder or brace patterns, '::'-joined;
- every rank yields exactly `num_batches` per epoch: a worker that runs out of shards goes round
  its shards again, so uneven shards never leave one rank waiting in an all-reduce;
- the shard order of an epoch is a pure function of (seed, epoch), so a resumed run sees the
  same order, and `state()` lets it continue an epoch without replaying consumed shards;
- undecodable samples and truncated shards are skipped, logged and counted, never fatal;
- faster per worker (see `ImageDecoder`, `BufferPool`): JPEG draft mode (the decoder scales by
  1/2, 1/4, 1/8 while decoding, never below the transform's output size), only the image and
  caption are decoded, images are converted to RGB once, captions are tokenized per batch, and
  each image goes from uint8 straight into the batch's normalized float tensor, which a worker
  allocates in shared memory and reuses once the trainer has let go of it (no stack, no copy
  into shared memory, no page faults on fresh memory for every batch).
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing as mp
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset  # noqa: F401 - imported so that webdataset.gopen is in sys.modules
from braceexpand import braceexpand
from PIL import Image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from stages.common import storage
from stages.common.errors import DataError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEY = "txt"
SAMPLE_SHUFFLE = 2000          # raw samples held for shuffling in each worker
SAMPLE_SHUFFLE_INITIAL = 500   # samples read before the first one leaves the buffer
PREFETCH = 2                   # batches each DataLoader worker works ahead
_PASS_END = -1                 # marks the end of one pass over a worker's shards
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "memory", "sftp")


# ---------------------------------------------------------------- webdataset + fsspec

def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    return storage.open_read(url, mode)


def register_fsspec_openers() -> None:
    """Let webdataset open shards on any fsspec store (it has no s3:// handler of its own)."""
    gopen_module = sys.modules["webdataset.gopen"]  # webdataset.gopen is also a function
    for scheme in FSSPEC_SCHEMES:
        gopen_module.gopen_schemes[scheme] = _gopen_fsspec


register_fsspec_openers()


# ---------------------------------------------------------------- shard specs

@dataclass
class Source:
    """One '::' part of --train-data: its shards, their sample counts (None: unknown), its weight."""

    spec: str
    shards: list[str]
    samples: list[int | None]
    weight: float = 1.0


def _manifest_uri(spec: str) -> str | None:
    """The manifest a spec names: the file itself, or one in a run folder or data/ folder."""
    stripped = spec.rstrip("/")
    if stripped.endswith(".json"):
        return stripped
    for candidate in (storage.join(stripped, "manifest.json"), storage.join(stripped, "data", "manifest.json")):
        if storage.exists(candidate):
            return candidate
    return None


def _from_manifest(spec: str, uri: str, split: str) -> Source:
    try:
        manifest = storage.read_json(uri)
    except Exception as exc:
        raise DataError(f"{spec}: cannot read the manifest {uri}: {exc}") from exc
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise DataError(f"{spec}: {uri} is not a clipforge manifest (no 'splits'); see docs/CONTRACTS.md")
    shards = list(manifest["splits"].get(split, {}).get("shards", []))
    counts = {s.get("uri"): s.get("samples") for s in manifest.get("shards", []) if isinstance(s, dict)}
    return Source(spec, shards, [counts.get(s) for s in shards])


def _expand_pattern(spec: str) -> list[str]:
    out: list[str] = []
    for item in braceexpand(spec):
        out.extend(storage.glob(item) if any(c in item for c in "*?[") else [item])
    return out


def _check_present(spec: str, shards: list[str]) -> None:
    """Every shard exists; one listing per folder rather than one request per shard."""
    by_dir: dict[str, list[str]] = {}
    for uri in shards:
        by_dir.setdefault(uri.rsplit("/", 1)[0] if "/" in uri else ".", []).append(uri)
    missing: list[str] = []
    for folder, uris in by_dir.items():
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in storage.listdir(folder)}
        missing += [u for u in uris if u.rsplit("/", 1)[-1] not in present]
    if missing:
        raise DataError(f"--train-data source {spec!r}: {len(missing)} of {len(shards)} shards do not "
                        f"exist, e.g. {missing[0]}")


def _sizes_json(shards: list[str]) -> list[int | None]:
    """Sample counts from a sizes.json beside the shards (open_clip's convention), if there is one."""
    folder = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
    uri = storage.join(folder, "sizes.json")
    sizes = storage.read_json(uri) if storage.exists(uri) else {}
    return [sizes.get(s.rsplit("/", 1)[-1]) for s in shards]


def _resolve_source(spec: str, split: str = "train") -> Source:
    spec = spec.strip()
    if not spec:
        raise DataError("--train-data has an empty '::' source")
    if not any(c in spec for c in "{*?[") and not spec.endswith(".tar"):
        manifest = _manifest_uri(spec)
        if manifest is None:
            raise DataError(f"data source {spec!r}: no manifest.json there (nor in data/), and it is "
                            "not a shard pattern such as s3://bucket/data/{00000..00099}.tar")
        source = _from_manifest(spec, manifest, split)
        if not source.shards:
            raise DataError(f"data source {spec!r}: the manifest {manifest} lists no {split} shards")
        return source
    shards = _expand_pattern(spec)
    if not shards:
        raise DataError(f"data source {spec!r} matches no shards")
    _check_present(spec, shards)
    return Source(spec, shards, _sizes_json(shards))


def _parse_factors(factors: str | None, n_sources: int) -> list[float]:
    if not factors:
        return [1.0] * n_sources
    parts = [p.strip() for p in factors.split("::")]
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise DataError(f"--train-data-upsampling-factors {factors!r}: not numbers joined by '::'") from exc
    if len(values) != n_sources:
        raise DataError(f"--train-data-upsampling-factors {factors!r} gives {len(values)} factors for "
                        f"{n_sources} '::' sources of --train-data")
    if any(v <= 0 or not math.isfinite(v) for v in values):
        raise DataError(f"--train-data-upsampling-factors {factors!r}: factors must be positive")
    return values


def resolve_sources(spec: str, upsampling_factors: str | None, split: str = "train") -> list[Source]:
    if not spec or not spec.strip():
        raise DataError("--train-data is empty: give a manifest, run folder or shard pattern")
    parts = spec.split("::")
    factors = _parse_factors(upsampling_factors, len(parts))
    sources = [_resolve_source(p, split) for p in parts]
    for source, factor in zip(sources, factors, strict=True):
        source.weight = factor
    return sources


def resolve_train_shards(spec: str, upsampling_factors: str | None) -> list[tuple[list[str], float]]:
    """(shards, upsampling factor) per '::' source; DataError naming the source that has no shards."""
    return [(s.shards, s.weight) for s in resolve_sources(spec, upsampling_factors)]


# ---------------------------------------------------------------- epoch plan (pure functions)

def rank_worker_shards(n_shards: int, seed: int, epoch: int, rank: int, world_size: int,
                       worker: int, num_workers: int) -> list[int]:
    """Indices of the shards one worker of one rank reads in an epoch (without replacement).

    The epoch's order depends only on (seed, epoch); ranks take every world_size-th shard and
    workers every num_workers-th of those, as open_clip does. With fewer shards than slots a slot
    borrows a shard, so no worker is left empty.
    """
    order = list(range(n_shards))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    mine = order[rank::world_size] or [order[rank % n_shards]]
    return mine[worker::num_workers] or [mine[worker % len(mine)]]


def worker_quota(num_batches: int, worker: int, num_workers: int) -> int:
    """Batches a worker yields per epoch; they add up to num_batches exactly."""
    return num_batches // num_workers + (1 if worker < num_batches % num_workers else 0)


def batches_done_by_worker(batches: int, num_batches: int, worker: int, num_workers: int) -> int:
    """How many of the first `batches` batches came from a worker (DataLoader takes them in turn)."""
    full_rounds = num_batches // num_workers * num_workers
    in_rounds = min(batches, full_rounds)
    done = in_rounds // num_workers + (1 if worker < in_rounds % num_workers else 0)
    return done + (1 if worker < batches - full_rounds else 0)


# ---------------------------------------------------------------- decoding

class ImageDecoder:
    """Decode image bytes and apply open_clip's transform, faster when the transform allows.

    open_clip's transforms end with ToTensor + Normalize; here those two run per batch instead:
    each sample's uint8 image is written straight into the batch's normalized float tensor, which a
    DataLoader worker keeps in shared memory (`BufferPool`), so handing the batch over copies
    nothing (torch.stack + the move into shared memory are two 38 MB copies per 64 x 224 px
    batch, each paying page faults on fresh memory). When the first geometric step resizes
    (RandomResizedCrop, Resize: open_clip's train and val transforms), JPEGs decode in draft mode:
    libjpeg's DCT scaling by 1/2, 1/4 or 1/8, the smallest that keeps both sides at least the
    output size. Images are converted to RGB once, and only when they are not RGB already. Any
    other transform is applied per sample as given.
    """

    def __init__(self, preprocess: Callable):
        self.preprocess = preprocess
        steps = list(getattr(preprocess, "transforms", []))
        names = [type(t).__name__ for t in steps]
        self.fast = len(steps) >= 2 and names[-1] == "Normalize" and names[-2] in ("ToTensor", "MaybeToTensor")
        self.draft_size = 0
        if self.fast:
            # decode() already gives RGB: the transform's own RGB conversion would only copy
            self.geometric = [s for s in steps[:-2] if not _is_rgb_conversion(s)]
            norm = steps[-1]
            self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
            self.std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1) * 255.0
            self.draft_size = _draft_size(self.geometric)

    def open(self, data: bytes) -> Image.Image:
        """The decoded RGB image; a JPEG in draft mode (never smaller than draft_size) when allowed."""
        img = Image.open(io.BytesIO(data))
        if self.draft_size and img.format == "JPEG":
            img.draft("RGB", (self.draft_size, self.draft_size))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")

    def decode(self, data: bytes) -> Any:
        """One sample: the transformed PIL image (fast path) or the transform's tensor."""
        img = self.open(data)
        if not self.fast:
            return self.preprocess(img)
        for step in self.geometric:
            img = step(img)
        return img

    def batch_shape(self, images: list[Any]) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the tensor `collate` makes of these decoded samples."""
        if not self.fast:
            return (len(images), *images[0].shape), images[0].dtype
        width, height = images[0].size
        return (len(images), 3, height, width), torch.float32

    def collate(self, images: list[Any], out: torch.Tensor | None = None) -> torch.Tensor:
        """The batch as one tensor, written into `out` when given (else a new one, in shared
        memory inside a DataLoader worker)."""
        if out is None:
            out = _batch_tensor(*self.batch_shape(images))
        if not self.fast:
            return torch.stack(images, out=out)
        width, height = images[0].size
        with warnings.catch_warnings():  # torch warns that PIL's buffer is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            for row, img in zip(out, images, strict=True):
                if img.size != (width, height):
                    raise ValueError(f"the transform gave images of sizes {(width, height)} and "
                                     f"{img.size}: they cannot form one batch")
                pixels = torch.from_numpy(np.asarray(img))  # H, W, C uint8, no copy
                # one sample at a time, so the in-place normalize works on data still in the cache
                row.copy_(pixels.permute(2, 0, 1))
                row.sub_(self.mean).div_(self.std)
        return out


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in shared memory inside a DataLoader worker, as default_collate does."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


class BufferPool:
    """Shared-memory batch tensors that DataLoader workers reuse once the trainer let go of them.

    A fresh shared-memory tensor per batch (what torch does for every batch a worker sends) costs
    the worker the kernel's zeroing and a page fault per 4 KiB page, about as much as decoding
    and resizing a sixth of the batch's images. Here each worker has a few slots: it fills a free
    slot's tensor (with none free, a fresh one) and sends it; the main process watches the
    tensor's storage with a weak reference and frees the slot once nothing in the main process
    refers to it any more (no tensor, view or array), or as soon as pin_memory has copied it.
    A slot is tagged with the loader iteration that took it, so the slots of batches the
    DataLoader discarded (an iteration left early) are freed when the next iteration starts.
    In the main process itself (workers=0) batches are always fresh: the trainer keeps them.
    Don't send a batch on to another process while using it (its memory would be reused).
    """

    FREE = 0

    def __init__(self, num_workers: int, slots_per_worker: int):
        self.slots_per_worker = slots_per_worker
        self.flags = mp.Array("i", max(1, num_workers) * slots_per_worker, lock=False)  # FREE or tag
        self.iteration = mp.Value("i", 1)
        self.pooled = 0                                # main process: batches that came in a slot
        self._tensors: dict[int, torch.Tensor] = {}   # worker process: its slots' tensors
        self._watched: dict[int, Any] = {}            # main process: slot -> StorageWeakRef

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tensors": {}, "_watched": {}}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, tag: int) -> tuple[int, torch.Tensor | None]:
        """Worker: (slot, its tensor) to fill; (-1, None) when the batch gets a fresh tensor."""
        info = get_worker_info()
        if info is None:
            return -1, None
        first = info.id * self.slots_per_worker
        for slot in range(first, first + self.slots_per_worker):
            if self.flags[slot] != self.FREE:
                continue
            tensor = self._tensors.get(slot)
            if tensor is None:
                tensor = self._tensors[slot] = _batch_tensor(shape, dtype)
            elif tensor.shape != shape or tensor.dtype != dtype:
                return -1, None  # e.g. the last, partial validation batch
            self.flags[slot] = tag
            return slot, tensor
        return -1, None

    def start_iteration(self) -> None:
        """Main process, before the DataLoader starts an iteration."""
        self.iteration.value += 1

    def release(self, iteration_started: bool = False) -> None:
        """Main process: free the slots whose tensors nothing refers to any more. Once the new
        iteration's first message is in, the DataLoader has dropped every batch of earlier ones
        that it had not handed out: their slots are free too, unless still watched."""
        for slot, ref in list(self._watched.items()):
            if ref.expired():
                del self._watched[slot]
                self.flags[slot] = self.FREE
        if iteration_started:
            current = self.iteration.value
            for slot in range(len(self.flags)):
                if self.flags[slot] not in (self.FREE, current) and slot not in self._watched:
                    self.flags[slot] = self.FREE

    def watch(self, slot: int, images: torch.Tensor, pinned: bool) -> None:
        """Main process: a batch from `slot` came in; its slot is freed when its storage dies."""
        if slot < 0:
            return
        self.pooled += 1
        if pinned:  # pin_memory has copied it: nothing here refers to the shared tensor
            self.flags[slot] = self.FREE
        else:
            self._watched[slot] = StorageWeakRef(images.untyped_storage())


def _is_rgb_conversion(step: Any) -> bool:
    """open_clip's MaybeConvertMode('RGB') (or the older _convert_to_rgb function)."""
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", None) == "RGB"
    return getattr(step, "__name__", None) == "_convert_to_rgb"


def _draft_size(steps: list[Any]) -> int:
    """The size JPEG draft mode may decode to: the output size when the first geometric step
    resizes the whole image to it (RandomResizedCrop, Resize), else 0 (no draft: a crop before
    any resize would see a different part of a smaller image)."""
    if not steps or type(steps[0]).__name__ not in ("RandomResizedCrop", "Resize"):
        return 0
    size = getattr(steps[0], "size", None)
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) for s in size):
        return int(max(size))
    return 0


def _group_samples(files: Iterator[dict]) -> Iterator[dict]:
    """Consecutive tar members with the same key form one sample."""
    current: dict | None = None
    try:
        for f in files:
            prefix, suffix = base_plus_ext(f["fname"])
            if prefix is None:
                continue
            if current is None or prefix != current["__key__"] or suffix.lower() in current:
                if current is not None:
                    yield current
                current = {"__key__": prefix}
            current[suffix.lower()] = f["data"]
    except Exception:  # a shard cut off after a whole sample still yields that sample
        if current is not None:
            yield current
        raise
    # not in a `finally`: a consumer that stops early closes us, and a closed generator must not yield
    if current is not None:
        yield current


def _reraise(exc: Exception) -> bool:
    raise exc


# ---------------------------------------------------------------- the per-worker stream

@dataclass
class _Batch:
    """A batch with where it came from; the loader strips this before the trainer sees it."""

    images: torch.Tensor | None  # None: the worker's closing report, no data
    texts: torch.Tensor | None
    worker: int
    skipped: int
    slot: int = -1        # the BufferPool slot the images are in (-1: a tensor of their own)
    pinned: bool = False  # copied by pin_memory: the slot's tensor is no longer referred to

    def pin_memory(self) -> _Batch:
        if self.images is None:
            return self
        return _Batch(self.images.pin_memory(), self.texts.pin_memory(), self.worker, self.skipped,
                      self.slot, pinned=True)


@dataclass
class _Plan:
    shards: list[str]
    samples: list[int | None]
    weights: list[float]
    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    num_batches: int | None       # None: read each shard once (validation)
    resampled: bool
    shuffle: bool


class ShardStream(IterableDataset):
    """Yields `_Batch`es for one rank; each DataLoader worker reads its own shards."""

    def __init__(self, plan: _Plan, decoder: ImageDecoder, tokenizer: Callable, prefetch: int = PREFETCH):
        super().__init__()
        self.plan = plan
        self.decoder = decoder
        self.tokenizer = tokenizer
        # slots per worker: its prefetched batches, the one it fills, the one the trainer uses and
        # the one it used before (still referred to while the next batch is fetched)
        self.pool = BufferPool(plan.num_workers, prefetch + 3)
        self.epoch = mp.Value("i", 0)        # shared with persistent workers
        self.skip_batches = mp.Value("i", 0)  # resume: batches of this epoch already consumed
        self.skipped = 0
        self.barren = 0

    def __iter__(self) -> Iterator[_Batch]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, skip = self.epoch.value, self.skip_batches.value
        tag = self.pool.iteration.value  # marks the pool slots this iteration's batches use
        # The DataLoader asks its workers in turn from worker 0; after a resume the turn is at
        # worker skip % num_workers, so the workers take on the parts that keep the batch order.
        worker = (loader_worker + skip) % num_workers
        self.skipped = 0
        self.barren = 0  # shards in a row that gave no sample
        p = self.plan
        quota, replayed = None, 0
        if p.num_batches is not None:
            quota = worker_quota(p.num_batches, worker, num_workers)
            replayed = batches_done_by_worker(skip, p.num_batches, worker, num_workers) if skip else 0
        rng = random.Random(f"samples:{p.seed}:{epoch}:{p.rank}:{worker}")
        passes = self._passes(epoch, worker, num_workers)
        samples = (s for shards in passes for s in self._shuffled(self._samples(shards), rng))
        if quota is not None and quota <= replayed:
            return
        if replayed:
            samples = self._drop_consumed(samples, replayed * p.batch_size)
        yield from self._batches(samples, loader_worker, quota - replayed if quota is not None else None, tag)
        yield _Batch(None, None, loader_worker, self.skipped)  # reports skips after the last batch

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.plan.shuffle:
            return samples
        return _shuffle(samples, SAMPLE_SHUFFLE, SAMPLE_SHUFFLE_INITIAL, rng)

    def _passes(self, epoch: int, worker: int, num_workers: int) -> Iterator[list[int]]:
        """Groups of shard indices; the sample shuffle buffer drains at the end of each group, so a
        worker that goes round its shards again never reads far past what its quota needs."""
        group: list[int] = []
        for index in self._shard_sequence(epoch, worker, num_workers):
            if index == _PASS_END:
                if group:
                    yield group
                group = []
            else:
                group.append(index)
                if len(group) >= 64:  # resampled streams have no passes: bound the group
                    yield group
                    group = []
        if group:
            yield group

    def _shard_sequence(self, epoch: int, worker: int, num_workers: int) -> Iterator[int]:
        p = self.plan
        if p.resampled:
            rng = random.Random(f"resample:{p.seed}:{epoch}:{p.rank}:{worker}")
            population = range(len(p.shards))
            while True:
                yield rng.choices(population, weights=p.weights, k=1)[0]
        if not p.shuffle:  # validation: each shard once, split over ranks and workers
            yield from list(range(p.rank, len(p.shards), p.world_size))[worker::num_workers]
            return
        mine = rank_worker_shards(len(p.shards), p.seed, epoch, p.rank, p.world_size, worker, num_workers)
        yield from mine
        for cycle in range(1, sys.maxsize):  # out of shards before the quota: go round again
            yield _PASS_END
            again = list(mine)
            random.Random(f"cycle:{p.seed}:{epoch}:{p.rank}:{worker}:{cycle}").shuffle(again)
            yield from again

    def _samples(self, shard_indices: Iterator[int]) -> Iterator[dict]:
        """Raw samples of the shards in turn; a shard that breaks off is logged and counted."""
        for index in shard_indices:
            got = 0
            url = self.plan.shards[index]
            try:
                with storage.open_read(url) as stream:
                    for sample in _group_samples(tar_file_iterator(stream, handler=_reraise)):
                        got += 1
                        yield sample
            except Exception as exc:  # noqa: BLE001 - a bad shard must not stop training
                self.skipped += 1
                log.warning("shard %s unreadable after %d samples (%s: %s); skipping the rest of it",
                            url, got, type(exc).__name__, exc)
            self.barren = 0 if got else self.barren + 1
            if self.barren >= len(self.plan.shards) * 2:
                raise DataError(f"no samples could be read from {self.barren} shards in a row, e.g. {url}")

    def _drop_consumed(self, samples: Iterator[dict], count: int) -> Iterator[dict]:
        """Resume: pass over the samples the checkpointed run already trained on, without decoding
        them (a header check stands in for the decode, so the stream lines up with the original)."""
        for sample in samples:
            if count <= 0:
                yield sample
            elif self._looks_decodable(sample):
                count -= 1
            else:
                self.skipped += 1

    @staticmethod
    def _looks_decodable(sample: dict) -> bool:
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None or TEXT_KEY not in sample:
            return False
        try:
            Image.open(io.BytesIO(sample[image_key]))
            return True
        except Exception:  # noqa: BLE001 - any failure means the decode would fail too
            return False

    def _decode(self, sample: dict) -> tuple[Any, str] | None:
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None or TEXT_KEY not in sample:
            return None
        try:
            return self.decoder.decode(sample[image_key]), sample[TEXT_KEY].decode("utf-8")
        except Exception as exc:  # noqa: BLE001 - undecodable samples are skipped, not fatal
            log.debug("skipping sample %s: %s: %s", sample.get("__key__"), type(exc).__name__, exc)
            return None

    def _batches(self, samples: Iterator[dict], worker: int, quota: int | None, tag: int) -> Iterator[_Batch]:
        images: list[Any] = []
        texts: list[str] = []
        made = 0
        for sample in samples:
            decoded = self._decode(sample)
            if decoded is None:
                self.skipped += 1
                continue
            images.append(decoded[0])
            texts.append(decoded[1])
            if len(images) == self.plan.batch_size:
                yield self._collate(images, texts, worker, tag)
                images, texts = [], []
                made += 1
                if quota is not None and made >= quota:
                    return
        if images and quota is None:  # validation keeps its last, partial batch
            yield self._collate(images, texts, worker, tag)

    def _collate(self, images: list[Any], texts: list[str], worker: int, tag: int) -> _Batch:
        slot, out = self.pool.take(*self.decoder.batch_shape(images), tag=tag)
        return _Batch(self.decoder.collate(images, out), self.tokenizer(texts), worker, self.skipped, slot)


# ---------------------------------------------------------------- the loader the trainer uses

class TrackingLoader(DataLoader):
    """A DataLoader yielding (images, texts) that remembers how far the current epoch has got."""

    def __init__(self, dataset: ShardStream, **kwargs: Any):
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)
        self.consumed = 0
        self.skipped_done = 0
        self._skipped_now: dict[int, int] = {}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped_done += sum(self._skipped_now.values())
        self._skipped_now = {}
        self.consumed = self.dataset.skip_batches.value
        pool = self.dataset.pool
        pool.start_iteration()
        started = False
        for batch in super().__iter__():
            pool.release(iteration_started=not started)
            started = True
            self._skipped_now[batch.worker] = batch.skipped
            if batch.images is None:
                continue
            pool.watch(batch.slot, batch.images, batch.pinned)
            self.consumed += 1
            yield batch.images, batch.texts
        self.skipped_done += sum(self._skipped_now.values())
        self._skipped_now = {}
        self.dataset.skip_batches.value = 0  # a resumed epoch skips only once

    def skipped(self) -> int:
        return self.skipped_done + sum(self._skipped_now.values())


def _identity(batch: Any) -> Any:
    return batch


@dataclass
class DataInfo:
    loader: TrackingLoader
    num_batches: int        # batches per epoch PER RANK, identical on every rank
    num_samples: int        # samples per epoch, all ranks together
    epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.loader.dataset.skip_batches.value = 0
        self.epoch = epoch
        self.loader.dataset.epoch.value = epoch

    def skipped_samples(self) -> int:
        return self.loader.skipped()

    def batches_left(self) -> int:
        """Batches the next pass over the loader yields (fewer than num_batches right after a resume)."""
        return self.num_batches - self.loader.dataset.skip_batches.value

    def state(self) -> dict:
        """Position in the data: epoch and batches consumed in it (the same on every rank)."""
        return {"epoch": self.epoch, "batches": self.loader.consumed, **self.extra}

    def state_dict(self) -> dict:
        """This rank's data position, plain values only (the checkpoint manager gathers every rank's)."""
        return self.state()

    def load_state_dict(self, state: dict) -> None:
        """Resume from {"world_size": W, "ranks": [each rank's state_dict()]}; "ranks" [] is an epoch start.

        The position here is the same on every rank, so rank 0's entry serves all of them.
        """
        ranks = state.get("ranks") or []
        self.loader.dataset.skip_batches.value = _resume_batches(
            ranks[0] if ranks else None, self.epoch, self.num_batches, self.extra["global_batch_size"])


# ---------------------------------------------------------------- building loaders

def _epoch_size(cfg: Any, sources: list[Source]) -> int:
    if cfg.train_num_samples:
        return int(cfg.train_num_samples)
    counts = [n for s in sources for n in s.samples]
    if any(n is None for n in counts):
        raise DataError(f"--train-data {cfg.train_data}: the shards' sample counts are unknown (no "
                        "manifest or sizes.json); give --train-num-samples")
    return int(sum(counts))


def _loader(dataset: ShardStream, workers: int) -> TrackingLoader:
    return TrackingLoader(dataset, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available(),
                          prefetch_factor=PREFETCH if workers > 0 else None)


def _resume_batches(resume_state: dict | None, epoch: int, num_batches: int, per_batch: int) -> int:
    """Batches of `epoch` a checkpoint had consumed, in this run's batch size and world size."""
    if not resume_state or resume_state.get("epoch") != epoch:
        return 0
    batches = int(resume_state.get("batches", 0))
    old_per_batch = resume_state.get("global_batch_size", per_batch)
    if old_per_batch != per_batch:
        batches = batches * old_per_batch // per_batch
    return min(batches, num_batches)


def get_train_data(cfg: Any, preprocess: Callable, tokenizer: Callable, *, rank: int, world_size: int,
                   epoch: int = 0) -> DataInfo:
    sources = resolve_sources(cfg.train_data, getattr(cfg, "train_data_upsampling_factors", None) or None)
    if any(s.weight != 1.0 for s in sources) and not cfg.dataset_resampled:
        raise DataError("--train-data-upsampling-factors needs --dataset-resampled (sampling with "
                        "replacement), as in open_clip_train")
    num_samples = _epoch_size(cfg, sources)
    global_batch = cfg.batch_size * world_size
    num_batches = max(1, math.ceil(num_samples / global_batch))
    workers = max(0, int(cfg.workers))
    n_shards = sum(len(s.shards) for s in sources)
    if not cfg.dataset_resampled and n_shards < world_size * max(1, workers):
        log.warning("%d shards for %d ranks x %d workers: some workers share shards this epoch; "
                    "write more, smaller shards", n_shards, world_size, max(1, workers))
    plan = _Plan(shards=[u for s in sources for u in s.shards],
                 samples=[n for s in sources for n in s.samples],
                 weights=[s.weight for s in sources for _ in s.shards],
                 seed=cfg.seed, rank=rank, world_size=world_size, num_workers=max(1, workers),
                 batch_size=cfg.batch_size, num_batches=num_batches,
                 resampled=bool(cfg.dataset_resampled), shuffle=True)
    dataset = ShardStream(plan, ImageDecoder(preprocess), tokenizer)
    info = DataInfo(_loader(dataset, workers), num_batches, num_batches * global_batch,
                    extra={"global_batch_size": global_batch})
    info.set_epoch(epoch)
    return info


def _val_spec(cfg: Any) -> str | None:
    val = (cfg.val_data or "").strip()
    if val.lower() in ("", "none"):
        return None
    if val.lower() != "auto":
        return val
    train = cfg.train_data.strip()
    if "::" in train or any(c in train for c in "{*?[") or train.endswith(".tar"):
        return None
    return train


def get_val_data(cfg: Any, preprocess: Callable, tokenizer: Callable, *, rank: int,
                 world_size: int) -> DataInfo | None:
    """Validation batches in shard order (last one partial); None when there is no val data."""
    spec = _val_spec(cfg)
    if spec is None:
        return None
    auto = cfg.val_data.strip().lower() == "auto"
    try:
        sources = resolve_sources(spec, None, split="val")
    except DataError:
        if auto:
            return None  # a manifest without a val split just means no validation
        raise
    shards = [u for s in sources for u in s.shards]
    counts = [n for s in sources for n in s.samples]
    mine = [n for i, n in enumerate(counts) if i % world_size == rank]
    num_samples = int(sum(n or 0 for n in counts))
    workers = min(max(0, int(cfg.workers)), math.ceil(len(shards) / world_size))
    plan = _Plan(shards=shards, samples=counts, weights=[1.0] * len(shards), seed=cfg.seed, rank=rank,
                 world_size=world_size, num_workers=max(1, workers), batch_size=cfg.batch_size,
                 num_batches=None, resampled=False, shuffle=False)
    dataset = ShardStream(plan, ImageDecoder(preprocess), tokenizer)
    num_batches = math.ceil(sum(n or 0 for n in mine) / cfg.batch_size)
    return DataInfo(_loader(dataset, workers), num_batches, num_samples)
