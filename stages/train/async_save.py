"""Checkpoint writes off the training loop: a CPU snapshot, then one background writer thread.

The writer thread first takes `snapshot()`, a copy of the state off the device (on a GPU into
pinned memory; on the CPU a copy, since training goes on changing the tensors in place), into the
previous snapshot's buffers once its write is done, so later saves skip the allocation. The
training loop runs on meanwhile: only the next optimizer step waits for the copy to be complete
(stages.train.checkpoint_manager.CheckpointManager.guard). The thread then streams `torch.save` of
that snapshot to the store (stages.common.checkpoints.write_stream: no
serialised copy in memory, a multipart upload on S3), points LATEST at it and prunes. At most one
write is in flight: the next save, and the end of the run, wait for it. A write that still fails
after the store's retries is kept and raised on the training thread by `check()`/`wait()`, so the
run stops with that error; LATEST is written only after the object is complete.

Why not torch.distributed.checkpoint's async_save: it writes a folder of per-rank shards plus a
metadata file, which neither a plain `torch.load(weights_only=True)` nor the step_<N>.pt + sha256
LATEST contract reads; converting it back (dcp_to_torch_save) would cost the full second copy
this avoids. With DDP every rank holds the same weights and optimizer state, so one writer on
rank 0 already has everything, and sharded writes buy nothing until the model is sharded: with
--fsdp, checkpoints are sharded by default and go through DCP (stages.train.sharded_checkpoint).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def snapshot(tree: Any, reuse: Any = None) -> Any:
    """A copy of a state tree with every tensor on the CPU, sharing nothing with the original.

    `reuse`: an earlier snapshot no longer in use; tensors of the same shape and dtype at the same
    place are copied into, which spares the allocation and page faults of fresh memory (most of
    a copy's cost on the CPU), as torch.distributed.checkpoint's cached staging does.
    """
    devices: set[torch.device] = set()  # this may run on a thread whose current device is another

    def copy(value: Any, old: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.device.type == "cuda":
                devices.add(value.device)
            if (isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype):
                out = old
            elif value.device.type == "cpu":
                return value.clone()
            else:
                out = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=True)
            return out.copy_(value, non_blocking=value.device.type != "cpu")
        if isinstance(value, dict):
            old = old if isinstance(old, dict) else {}
            return {k: copy(v, old.get(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            old = old if isinstance(old, (list, tuple)) and len(old) == len(value) else [None] * len(value)
            return type(value)(copy(v, o) for v, o in zip(value, old, strict=True))
        return value

    out = copy(tree, reuse)
    for device in devices:
        torch.cuda.synchronize(device)
    return out


class BackgroundWriter:
    """One write at a time on a worker thread; its failure surfaces on the caller's thread."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clipforge-ckpt")
        self._pending: concurrent.futures.Future | None = None

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def submit(self, job: Callable[[], Any]) -> None:
        self.wait()
        self._pending = self._pool.submit(job)

    def check(self) -> None:
        """Raise the error of a finished write, if it failed."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> Any:
        """Block until the write in flight is done; raise its error. Returns its result."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        start = time.perf_counter()
        result = pending.result()
        waited = time.perf_counter() - start
        if waited > 0.05:
            log.info("waited %.2fs for the previous checkpoint write", waited)
        return result

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
