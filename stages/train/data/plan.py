"""The epoch plan: which samples each worker of each rank reads, as pure functions of the options.

An epoch is a list of `Item`s (a shard, or part of one), in an order that depends only on
(seed, epoch); `stages.common.shards.assign` hands them to ranks and workers. A worker's position
(`WorkerState`: the item and sample offset it reads next, and the positions its shuffle buffer
holds) is all a resume needs. On another layout (world size, workers, batch size) `remainder`
turns the saved positions of every rank into the samples the epoch has not used yet, and
`repartition` cuts those into equal parts for the new layout.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from stages.common.shards import assign


@dataclass(frozen=True)
class Item:
    """Samples of one shard: offsets in [start, stop) (stop None: to its end), plus `picks`
    (offsets before start still to read: samples a shuffle buffer held at a checkpoint)."""

    shard: int
    start: int = 0
    stop: int | None = None
    picks: tuple[int, ...] = ()

    def first(self) -> int:
        return min((*self.picks, self.start)) if self.picks else self.start

    def keep(self, offset: int) -> bool:
        return offset in self.picks or (offset >= self.start and (self.stop is None or offset < self.stop))

    def done(self, offset: int) -> bool:
        """No offset from here on is kept."""
        return self.stop is not None and offset >= self.stop and offset >= max(self.picks, default=-1)

    def count(self, shard_samples: int | None) -> int | None:
        end = self.stop if self.stop is not None else shard_samples
        if end is None:
            return None
        if shard_samples is not None:
            end = min(end, shard_samples)
        return len(self.picks) + max(0, end - self.start)

    def offsets(self, shard_samples: int) -> list[int]:
        end = min(self.stop if self.stop is not None else shard_samples, shard_samples)
        return sorted(self.picks) + list(range(self.start, end))

    def to_state(self) -> list:
        return [self.shard, self.start, self.stop, list(self.picks)]

    @classmethod
    def from_state(cls, s: list) -> Item:
        return cls(int(s[0]), int(s[1]), None if s[2] is None else int(s[2]), tuple(int(p) for p in s[3]))


def epoch_items(n_shards: int, seed: int, epoch: int) -> list[Item]:
    """Every shard once, in the order of this epoch."""
    order = list(range(n_shards))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return [Item(i) for i in order]


def rank_worker_shards(n_shards: int, seed: int, epoch: int, rank: int, world_size: int,
                       worker: int, num_workers: int) -> list[int]:
    """Indices of the shards one worker of one rank reads in an epoch (without replacement)."""
    return [it.shard for it in assign(epoch_items(n_shards, seed, epoch), rank, world_size, worker, num_workers)]


def worker_quota(num_batches: int, worker: int, num_workers: int) -> int:
    """Batches a worker yields per pass; they add up to num_batches exactly."""
    return num_batches // num_workers + (1 if worker < num_batches % num_workers else 0)


@dataclass
class WorkerState:
    """Where one worker is in its pass over its items (all plain values, for checkpoints)."""

    cycle: int = 0                         # 0: the epoch's own pass; >0: going round again
    item: int = 0                          # index of the item read next in the cycle's list
    offset: int | None = None              # sample offset read next in it (None: its first)
    byte: int | None = None                # where that sample's header starts (None: unknown)
    buffer: list[list[int]] = field(default_factory=list)  # [item, offset, byte] the shuffle buffer holds
    rng: list | None = None                # the shuffle's random.Random state
    made: int = 0                          # batches this worker made in the pass
    skipped: int = 0                       # unusable samples it passed over in the pass

    def to_state(self) -> dict[str, Any]:
        return {"cycle": self.cycle, "item": self.item, "offset": self.offset, "byte": self.byte,
                "buffer": [list(p) for p in self.buffer], "rng": self.rng, "made": self.made,
                "skipped": self.skipped}

    @classmethod
    def from_state(cls, s: dict) -> WorkerState:
        return cls(int(s["cycle"]), int(s["item"]), s["offset"], s.get("byte"), [list(p) for p in s["buffer"]],
                   s["rng"], int(s["made"]), int(s.get("skipped", 0)))


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def _left_in_worker(items: list[Item], state: dict | None) -> list[Item]:
    """The items (or parts) of the epoch's own pass a worker had not used at its checkpoint."""
    if state is None:
        return list(items)
    ws = WorkerState.from_state(state)
    if ws.cycle > 0:
        return []  # it had gone round again: its part of the epoch was all used
    held: dict[int, list[int]] = {}
    for i, offset, *_ in ws.buffer:
        held.setdefault(i, []).append(offset)
    left = []
    for i, item in enumerate(items):
        if i < ws.item:
            if held.get(i):
                left.append(Item(item.shard, 0, 0, tuple(sorted(held[i]))))
        elif i == ws.item:
            start = item.first() if ws.offset is None else ws.offset
            picks = tuple(sorted({*held.get(i, []), *(p for p in item.picks if p >= start)}))
            left.append(Item(item.shard, max(start, item.start), item.stop, picks))
        else:
            left.append(item)
    return left


def remainder(saved: dict, n_shards: int, seed: int) -> list[Item]:
    """The samples of the saved epoch no rank had used: every rank's workers' leftovers, in turn."""
    world = int(saved["world_size"])
    left: list[Item] = []
    for rank, rs in enumerate(saved["ranks"]):
        workers = int(rs["layout"]["workers"])
        own = rs.get("worker_items")
        default = epoch_items(n_shards, seed, int(rs["epoch"])) if own is None else None
        for w in range(workers):
            items = [Item.from_state(x) for x in own[w]] if own is not None else \
                assign(default, rank, world, w, workers)
            left += _left_in_worker(items, rs["workers"][w])
    return left


def repartition(items: list[Item], counts: list[int | None], world_size: int, num_workers: int,
                batch_size: int) -> tuple[list[list[list[Item]]], int]:
    """Split the remaining items into [rank][worker] lists of equal sample counts, and the batches
    per rank that covers them. Items are cut at sample offsets, so nothing is read twice or left
    out as long as the shards' sample counts are known; without counts, items are dealt round."""
    slots = [[[] for _ in range(num_workers)] for _ in range(world_size)]
    sizes = [it.count(counts[it.shard]) for it in items]
    if any(s is None for s in sizes):
        for k, item in enumerate(items):
            slots[k % world_size][(k // world_size) % num_workers].append(item)
        return slots, max(1, len(items))
    total = sum(sizes)
    batches = max(1, math.ceil(total / (batch_size * world_size)))
    flat = [(it.shard, off) for it in items for off in it.offsets(counts[it.shard])]
    pos = 0
    for rank in range(world_size):
        for w in range(num_workers):
            want = worker_quota(batches, w, num_workers) * batch_size
            slots[rank][w] = _as_items(flat[pos:pos + want])
            pos += want
    return slots, batches


def _as_items(positions: list[tuple[int, int]]) -> list[Item]:
    """Runs of consecutive offsets of one shard become one Item each."""
    out: list[Item] = []
    for shard, offset in positions:
        last = out[-1] if out else None
        if last is not None and last.shard == shard and not last.picks and last.stop == offset:
            out[-1] = Item(shard, last.start, offset + 1)
        else:
            out.append(Item(shard, offset, offset + 1))
    return out
