"""Loaders over indexable datasets (CSV tables, synthetic data) with the trainer's DataInfo interface.

Each epoch is a permutation seeded by `--seed` and the epoch, split across ranks as
`DistributedSampler` does and cut to whole batches (open_clip_train drops the last partial batch
too). The loader counts the batches it has handed out, so a step checkpoint resumes mid-epoch
without replaying data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """This rank's indices of one epoch, after the first `skip` batches."""

    def __init__(self, size: int, *, seed: int, rank: int, world_size: int, batch_size: int, shuffle: bool):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world_size
        self.batch_size, self.shuffle = batch_size, shuffle
        self.epoch, self.skip = 0, 0
        per_rank = size // world_size if shuffle else math.ceil(size / world_size)
        self.num_batches = per_rank // batch_size if shuffle else math.ceil(per_rank / batch_size)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            mine = order[self.rank::self.world][:self.num_batches * self.batch_size]
        else:
            mine = list(range(self.size))[self.rank::self.world]
        return mine[self.skip * self.batch_size:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


class CountingLoader:
    """A DataLoader that remembers how many batches of the current epoch it has handed out."""

    def __init__(self, dataset: Dataset, sampler: EpochSampler, workers: int, drop_last: bool):
        self.sampler = sampler
        self.loader = DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler,
                                 num_workers=workers, drop_last=drop_last,
                                 persistent_workers=False, pin_memory=torch.cuda.is_available())
        self.consumed = 0

    def __iter__(self) -> Iterator[Any]:
        self.consumed = self.sampler.skip
        for batch in self.loader:
            self.consumed += 1
            yield batch
        self.sampler.skip = 0  # a resumed epoch skips only once


class MapDataInfo:
    def __init__(self, loader: CountingLoader, num_samples: int, global_batch: int):
        self.loader, self.num_samples = loader, num_samples
        self.num_batches = loader.sampler.num_batches
        self.global_batch, self.epoch = global_batch, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.loader.sampler.skip = 0
        self.epoch = self.loader.sampler.epoch = epoch

    def skipped_samples(self) -> int:
        return 0

    def batches_left(self) -> int:
        return self.num_batches - self.loader.sampler.skip

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches": self.loader.consumed, "global_batch_size": self.global_batch}

    def state_dict(self) -> dict:
        """This rank's position (every rank of a map-style set is at the same batch)."""
        return self.state()

    def load_state_dict(self, state: dict) -> None:
        """Skip the batches the saved run used; another global batch restarts the epoch's order."""
        ranks = state.get("ranks") or []
        if ranks:
            _skip_to(self, ranks[0])


def map_data(dataset: Dataset, cfg: Any, *, rank: int, world_size: int, train: bool, epoch: int = 0,
             resume_state: dict | None = None) -> MapDataInfo:
    sampler = EpochSampler(len(dataset), seed=cfg.seed, rank=rank, world_size=world_size,
                           batch_size=cfg.batch_size, shuffle=train)
    info = MapDataInfo(CountingLoader(dataset, sampler, max(0, int(cfg.workers)), drop_last=train),
                       num_samples=sampler.num_batches * cfg.batch_size * world_size if train else len(dataset),
                       global_batch=cfg.batch_size * world_size)
    info.set_epoch(epoch)
    if resume_state:
        _skip_to(info, resume_state)
    return info


def _skip_to(info: MapDataInfo, position: dict) -> None:
    if position.get("epoch") == info.epoch and \
            position.get("global_batch_size", info.global_batch) == info.global_batch:
        info.loader.sampler.skip = min(int(position.get("batches", 0)), info.loader.sampler.num_batches)
