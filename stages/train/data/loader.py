"""The loaders the trainer uses: train batches with a saveable position, and validation batches."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from stages.common import shards as wds_shards
from stages.common.errors import DataError
from stages.common.shards import SampleKeys
from stages.train.data.decode import ImageDecoder
from stages.train.data.plan import remainder, repartition
from stages.train.data.sources import Source, resolve_sources, val_spec
from stages.train.data.stream import PREFETCH, ShardStream, StreamPlan

log = logging.getLogger("stages.train.data")
STATE_VERSION = 1


class TrackingLoader(DataLoader):
    """A DataLoader yielding (images, texts) that keeps every worker's position after the batches
    the trainer has taken, and the samples skipped so far.

    With CLIPFORGE_DEBUG_SAMPLE_KEYS=DIR set, every batch taken appends a line
    `pid epoch index key key ...` to DIR/rank<R>.keys (to check what a resumed run reads).
    """

    def __init__(self, dataset: ShardStream, data_timeout: float = 0.0, **kwargs: Any):
        super().__init__(dataset, batch_size=None, collate_fn=_identity, timeout=data_timeout, **kwargs)
        self.data_timeout = data_timeout
        self.consumed = 0
        self.skipped_done = 0
        self.worker_states: list[dict | None] = [None] * dataset.plan.num_workers
        self._skipped_now: dict[int, int] = {}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.dataset
        spec = ds.active_resume(ds.epoch.value)
        self.skipped_done += sum(self._skipped_now.values())
        self._skipped_now = {}
        self.consumed = spec["rotate"] if spec else 0
        self.worker_states = list(spec["workers"]) if spec else [None] * ds.plan.num_workers
        if spec:
            self._skipped_now = {w: int(s.get("skipped", 0)) for w, s in enumerate(spec["workers"]) if s}
        pool = ds.pool
        pool.start_iteration()
        started = False
        for batch in self._batches():
            pool.release(iteration_started=not started)
            started = True
            if batch.error:
                raise DataError(batch.error)
            self._skipped_now[batch.plan_worker] = batch.skipped
            if batch.images is None:
                continue
            pool.watch(batch.slot, batch.images, batch.pinned)
            self.consumed += 1
            if batch.state is not None:
                self.worker_states[batch.plan_worker] = batch.state
            self._log_keys(batch.keys)
            yield batch.images, batch.texts
        self.skipped_done += sum(self._skipped_now.values())
        self._skipped_now = {}
        ds.resume_active.value = 0  # a resumed pass resumes only once

    def _batches(self) -> Iterator[Any]:
        try:
            yield from super().__iter__()
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                raise
            raise DataError(f"no batch from the data workers in {self.data_timeout:g}s (--data-timeout): "
                            "a worker is stuck reading or decoding; check the store and the shards") from exc

    def _log_keys(self, keys: list[str] | None) -> None:
        folder = os.environ.get("CLIPFORGE_DEBUG_SAMPLE_KEYS")
        if not folder or keys is None:
            return
        plan = self.dataset.plan
        with open(os.path.join(folder, f"rank{plan.rank}.keys"), "a") as f:
            f.write(f"{os.getpid()} {self.dataset.epoch.value} {self.consumed} {' '.join(keys)}\n")

    def skipped(self) -> int:
        return self.skipped_done + sum(self._skipped_now.values())


def _identity(batch: Any) -> Any:
    return batch


@dataclass
class DataInfo:
    """One rank's data: the loader, batches per epoch, and its position as a state dict."""

    loader: TrackingLoader
    num_batches: int        # batches per epoch PER RANK, identical on every rank
    num_samples: int        # samples per epoch, all ranks together
    epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stream(self) -> ShardStream:
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.epoch.value = epoch

    def skipped_samples(self) -> int:
        return self.loader.skipped()

    def batches_left(self) -> int:
        """Batches the next pass over the loader yields (fewer than num_batches right after a resume)."""
        spec = self.stream.active_resume(self.epoch)
        return spec["batches"] - spec["rotate"] if spec else self.num_batches

    def _pass(self) -> dict | None:
        return self.stream.active_resume(self.epoch)

    def state_dict(self) -> dict:
        """This rank's position: epoch, batches taken in this pass, each worker's (item, sample
        offset, shuffle buffer) after its last batch taken. Plain values only."""
        spec, plan, loader = self._pass(), self.stream.plan, self.loader
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "resampled": plan.resampled,
            "layout": {"world_size": plan.world_size, "rank": plan.rank, "workers": plan.num_workers,
                       "batch_size": plan.batch_size},
            "pass_batches": spec["batches"] if spec else self.num_batches,
            "consumed": loader.consumed,
            "generation": spec.get("generation", 0) if spec else 0,
            "worker_items": spec.get("items") if spec else None,
            "workers": [None if s is None else dict(s) for s in loader.worker_states],
            "skipped_before": loader.skipped_done,
            "skipped": loader.skipped(),
        }

    def state(self) -> dict:
        return self.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from saved positions: {"world_size": W, "ranks": [state_dict() of each rank]}.
        "ranks": [] is the start of an epoch. On the saved layout every worker continues where it
        was; on another one the samples the epoch has not used are split over the new layout."""
        if getattr(self.loader, "_iterator", None) is not None:
            raise RuntimeError("load_state_dict() must come before the loader's first batch "
                               "(its workers already hold the old position)")
        ranks = state.get("ranks") or []
        if not ranks:
            self.stream.resume = None
            self.stream.resume_active.value = 0
            return
        plan = self.stream.plan
        saved_world = int(state.get("world_size", len(ranks)))
        epochs = {int(r["epoch"]) for r in ranks}
        if len(epochs) != 1 or len(ranks) != saved_world:
            raise DataError(f"data state to resume from is inconsistent: {len(ranks)} ranks saved for a "
                            f"world size of {saved_world}, epochs {sorted(epochs)}")
        epoch = epochs.pop()
        mine = ranks[plan.rank] if saved_world == plan.world_size else None
        same = mine is not None and mine["layout"]["workers"] == plan.num_workers \
            and mine["layout"]["batch_size"] == plan.batch_size
        if same:
            spec = {"epoch": epoch, "rotate": int(mine["consumed"]), "batches": int(mine["pass_batches"]),
                    "workers": list(mine["workers"]), "items": mine.get("worker_items"),
                    "generation": int(mine.get("generation", 0))}
            if plan.resampled:  # a re-seed is enough: fresh draws for what is left of the epoch
                spec.update(workers=[None] * plan.num_workers, batches=spec["batches"] - spec["rotate"],
                            rotate=0, generation=spec["generation"] + spec["rotate"] + 1)
            self.loader.skipped_done = int(mine.get("skipped_before", 0))
        else:
            spec = self._remapped(state, ranks, epoch)
            if plan.rank < len(ranks):
                self.loader.skipped_done = int(ranks[plan.rank].get("skipped", 0))
            if plan.rank == 0:
                old = ranks[0]["layout"]
                log.info("data resume on a new layout: %d ranks x %d workers x batch %d (was %d x %d x %d); "
                         "the %d batches per rank left in epoch %d cover the samples it has not used",
                         plan.world_size, plan.num_workers, plan.batch_size, saved_world, old["workers"],
                         old["batch_size"], spec["batches"], epoch)
        self.set_epoch(epoch)
        self.stream.resume = spec
        self.stream.resume_active.value = 1

    def _remapped(self, state: dict, ranks: list[dict], epoch: int) -> dict:
        plan = self.stream.plan
        if plan.resampled:
            left = sum((int(r["pass_batches"]) - int(r["consumed"])) * int(r["layout"]["batch_size"])
                       for r in ranks)
            batches = max(1, math.ceil(left / (plan.batch_size * plan.world_size)))
            generation = 1 + sum(int(r["consumed"]) for r in ranks)
            return {"epoch": epoch, "rotate": 0, "batches": batches, "items": None,
                    "workers": [None] * plan.num_workers, "generation": generation}
        items = remainder({"world_size": state.get("world_size", len(ranks)), "ranks": ranks},
                          len(plan.shards), plan.seed)
        slots, batches = repartition(items, plan.samples, plan.world_size, plan.num_workers, plan.batch_size)
        return {"epoch": epoch, "rotate": 0, "batches": batches, "generation": 0,
                "items": [[it.to_state() for it in w] for w in slots[plan.rank]],
                "workers": [None] * plan.num_workers}


# ---------------------------------------------------------------- building loaders

def sample_keys(cfg: Any) -> SampleKeys:
    return SampleKeys.from_flags(getattr(cfg, "image_key", ""), getattr(cfg, "caption_key", ""),
                                 getattr(cfg, "max_image_pixels", 0))


def _epoch_size(cfg: Any, sources: list[Source]) -> int:
    if cfg.train_num_samples:
        return int(cfg.train_num_samples)
    counts = [n for s in sources for n in s.samples]
    if any(n is None for n in counts):
        raise DataError(f"--train-data {cfg.train_data}: the shards' sample counts are unknown (no "
                        "manifest or sizes.json); give --train-num-samples")
    return int(sum(counts))


def _loader(dataset: ShardStream, workers: int, cfg: Any) -> TrackingLoader:
    timeout = float(getattr(cfg, "data_timeout", 0) or 0) if workers > 0 else 0.0
    return TrackingLoader(dataset, data_timeout=timeout, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=PREFETCH if workers > 0 else None)


def get_train_data(cfg: Any, preprocess: Callable, tokenizer: Callable, *, rank: int, world_size: int,
                   epoch: int = 0, resume_state: dict | None = None) -> DataInfo:
    """This rank's training batches; `resume_state` ({"world_size", "ranks"}) is load_state_dict's."""
    wds_shards.register_fsspec_openers()
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
    plan = StreamPlan(shards=[u for s in sources for u in s.shards],
                      samples=[n for s in sources for n in s.samples],
                      weights=[s.weight for s in sources for _ in s.shards],
                      seed=cfg.seed, rank=rank, world_size=world_size, num_workers=max(1, workers),
                      batch_size=cfg.batch_size, num_batches=num_batches,
                      resampled=bool(cfg.dataset_resampled), shuffle=True, keys=sample_keys(cfg),
                      max_unusable=int(getattr(cfg, "max_unusable_samples", 1000) or 1000))
    dataset = ShardStream(plan, ImageDecoder(preprocess, plan.keys), tokenizer)
    info = DataInfo(_loader(dataset, workers, cfg), num_batches, num_batches * global_batch,
                    extra={"global_batch_size": global_batch})
    info.set_epoch(epoch)
    if resume_state:
        info.load_state_dict(resume_state)
    return info


def get_val_data(cfg: Any, preprocess: Callable, tokenizer: Callable, *, rank: int,
                 world_size: int) -> DataInfo | None:
    """This rank's part of the validation set in shard order (last batch partial), at most
    --val-num-samples over all ranks; None when there is no val data."""
    spec = val_spec(cfg.val_data, cfg.train_data)
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
    mine = counts[rank::world_size]
    cap_total = getattr(cfg, "val_num_samples", None)
    cap = None if not cap_total else int(cap_total) // world_size + (1 if rank < int(cap_total) % world_size else 0)
    known = int(sum(n or 0 for n in mine))
    expected = min(known, cap) if cap is not None else known
    workers = min(max(0, int(cfg.workers)), max(1, math.ceil(len(shards) / world_size)))
    plan = StreamPlan(shards=shards, samples=counts, weights=[1.0] * len(shards), seed=cfg.seed, rank=rank,
                      world_size=world_size, num_workers=max(1, workers), batch_size=cfg.batch_size,
                      num_batches=None, resampled=False, shuffle=False, keys=sample_keys(cfg),
                      max_samples=cap)
    dataset = ShardStream(plan, ImageDecoder(preprocess, plan.keys), tokenizer)
    total = int(sum(n or 0 for n in counts))
    return DataInfo(_loader(dataset, workers, cfg), math.ceil(expected / cfg.batch_size),
                    min(total, int(cap_total)) if cap_total else total)


def probe_train_data(cfg: Any, samples: int = 16) -> None:
    """Read the first samples of each --train-data source and check that the image and caption
    are where --image-key/--caption-key say; a clear DataError otherwise. Runs before the model."""
    keys = sample_keys(cfg)
    for source in resolve_sources(cfg.train_data, getattr(cfg, "train_data_upsampling_factors", None) or None):
        wds_shards.probe(source.shards, keys, f"--train-data source {source.spec}", samples)
