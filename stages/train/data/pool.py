"""Shared-memory batch tensors that DataLoader workers fill in place and reuse."""

from __future__ import annotations

import math
import multiprocessing as mp
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import get_worker_info


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
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
                tensor = self._tensors[slot] = batch_tensor(shape, dtype)
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

