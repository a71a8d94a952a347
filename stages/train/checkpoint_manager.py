"""The train stage's checkpoint manager: when to save, what to gather, how to resume.

In the spirit of torchtitan's CheckpointManager: the parts of training that have state expose
`state_dict()` / `load_state_dict()` (the Stateful protocol below) and the manager gathers them.
Replicated parts (model, optimizer, scaler, LR schedule, progress) are taken from rank 0 (a part
marked `collective`, such as a sharded model, is called on every rank and gathers onto rank 0); per-rank
parts (the data loader's position, the RNG) are gathered from every rank with all_gather_object
and saved as lists, so each rank gets its own back. The file layout and LATEST are
stages.common.checkpoints'; the background write is stages.train.async_save's.

With sharded checkpoints (--fsdp, or --checkpoint-format sharded) the model and optimizer are not
gathered: every rank hands its shards to torch.distributed.checkpoint's async_save
(stages.train.sharded_checkpoint), on a gloo group of its own so that DCP's collectives on its
thread never interleave with training's. Rank 0's writer thread waits for DCP to finish (every
rank's files and .metadata written), then writes trainer.pt (everything else), optionally the
consolidated file, and only then LATEST.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from stages.common import checkpoints, storage
from stages.common.config import to_dict
from stages.common.errors import ClipforgeError, DataError, StorageError
from stages.train import sharded_checkpoint
from stages.train.async_save import BackgroundWriter, snapshot

log = logging.getLogger("clipforge.train")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteWeightsError(ClipforgeError):
    """Refused to write a checkpoint whose weights are NaN/Inf."""

    exit_code = 5


class CheckpointWriteError(StorageError):
    """A background checkpoint write failed for good; the run stops rather than train unsaved."""


def assert_finite(state_dict: dict[str, torch.Tensor], step: int) -> None:
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeightsError(f"step {step}: weights {bad[:5]} are NaN/Inf; not writing a "
                                    "checkpoint of them (LATEST still names the last good one)")


class CheckpointManager:
    """Owns the save interval, --keep-last, save, load, LATEST and the fallback.

    `replicated` must hold "model", "optimizer", "scheduler", "progress" (and "scaler" with amp);
    `per_rank` holds "data" and "rng"; `sharded` is the model and optimizer for DCP (sharded
    saves, and resuming from a sharded checkpoint in any layout). `meta` is what readers need to
    rebuild the model (model_name, model_cfg, preprocess_cfg).
    """

    def __init__(self, cfg, info, metrics) -> None:
        self.cfg, self.info, self.metrics = cfg, info, metrics
        self.dir = cfg.checkpoint_dir
        self.writer = BackgroundWriter() if info.is_main else None
        self.last_pointer: dict | None = None
        self.fallbacks = 0          # checkpoints a resume skipped (missing/corrupt/unloadable)
        self.prune_failures = 0     # old checkpoints --keep-last could not delete
        self.replicated: dict[str, Stateful] = {}
        self.per_rank: dict[str, Stateful] = {}
        self.meta: dict[str, Any] = {}
        self._staged: Any = None  # the last snapshot's tensors, copied into by the next save
        self._snapshot_done: threading.Event | None = None
        self.blocked = 0.0           # seconds the loop waited for the last save (gather + snapshot left)
        self.snapshot_seconds = 0.0  # seconds the last snapshot took in the background
        self.sharded: sharded_checkpoint.ShardedState | None = None  # model + optimizer, for DCP
        self._dcp_future: Any = None  # this rank's DCP write in flight (sharded checkpoints)
        # DCP's collectives run on its writer thread: a group of their own, never training's
        self._group = (dist.new_group(backend="gloo") if info.distributed and cfg.sharded_checkpoints
                       else None)
        self._stager = sharded_checkpoint.stager() if cfg.sharded_checkpoints else None
        self._dcp_staged: Any = None  # completes once DCP's copy of this rank's shards is taken

    # ------------------------------------------------------------ resume

    def load(self) -> checkpoints.Checkpoint | None:
        """The checkpoint --resume names (verified; through LATEST with fallback), or None."""
        resume = self.cfg.resume
        if not resume:
            return None
        if resume == "latest":
            ckpt = self._read_latest()
            if ckpt is None:
                return None
        else:
            ckpt = checkpoints.read(resume, tensors=False)
        for uri, why in ckpt.fallbacks:
            self.fallbacks += 1
            self.metrics.ckpt_fallbacks.inc()
            log.warning("resume: skipped %s (%s)", uri, why)
        if ckpt.trainer is None:
            raise DataError(f"--resume {resume}: {ckpt.uri} is not a clipforge training checkpoint "
                            "(no optimizer state); use --pretrained to start from its weights instead")
        return ckpt

    def _read_latest(self) -> checkpoints.Checkpoint | None:
        try:
            pointer = checkpoints.read_latest(self.dir)
        except (DataError, StorageError) as exc:  # LATEST itself unreadable: try the files, newest first
            log.warning("resume: %s/LATEST is unreadable (%s); trying the step files", self.dir, exc)
            found = checkpoints.list_checkpoints(self.dir)
            if not found:
                raise
            entries = [{"step": s, "uri": u} for s, u in reversed(found)]
            pointer = {**entries[0], "history": entries[1:]}
            self.fallbacks += 1
            self.metrics.ckpt_fallbacks.inc()
        if pointer is None:
            return None
        return checkpoints.read_through(pointer, where=f"{self.dir}/{checkpoints.LATEST}", tensors=False)

    def restore(self, ckpt: checkpoints.Checkpoint) -> None:
        """Every part's state back from a checkpoint; each rank takes its own per-rank entry."""
        trainer = ckpt.trainer
        for name, part in self.replicated.items():
            if ckpt.shards and name in ("model", "optimizer"):
                continue  # loaded below, each rank its own shards
            state = ckpt.model if name == "model" else trainer.get(name)
            if state is not None:
                part.load_state_dict(state)
        if ckpt.shards:
            self.sharded.load(ckpt.shards, self._group)
        ckpt.model = {}
        data = trainer.get("data") or {"world_size": 0, "ranks": []}
        self.per_rank["data"].load_state_dict(data)
        rng_ranks = (trainer.get("rng") or {}).get("ranks") or []
        if self.info.rank < len(rng_ranks):
            self.per_rank["rng"].load_state_dict(rng_ranks[self.info.rank])
            return
        from stages.train.model import random_seed

        log.info("rank %d: the checkpoint has no RNG state for it; seeding afresh", self.info.rank)
        random_seed(self.cfg.seed + ckpt.step, self.info.rank)

    # ------------------------------------------------------------ saving

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.save_every_steps
        return last or bool(every and step % every == 0)

    def guard(self, optimizer: torch.optim.Optimizer) -> None:
        """Make each optimizer step wait for a save's snapshot: the step is what changes the tensors.

        Between steps (forward, backward, validation) the weights and optimizer state stand
        still, so the snapshot is taken in the background while the next step computes, and the
        loop blocks only for whatever part of the copy is left when it reaches optimizer.step().
        """
        optimizer.register_step_pre_hook(lambda *_: self._await_snapshot())

    def save(self, step: int, epoch_done: bool) -> float:
        """Gather the state and hand it to the writer; returns seconds the loop blocked here."""
        start = time.perf_counter()
        self._wait_in_flight()  # at most one write in flight
        mine = {name: part.state_dict() for name, part in self.per_rank.items()}
        if epoch_done:
            mine["data"] = None
        gathered = self._gather(mine)
        if self.cfg.sharded_checkpoints:
            return self._save_sharded(step, epoch_done, gathered, start)
        # a sharded part (--fsdp) gathers its full state with collectives: every rank calls it
        collective = {name: part.state_dict() for name, part in self.replicated.items()
                      if getattr(part, "collective", False)}
        if not self.info.is_main:
            return time.perf_counter() - start
        live = {name: collective[name] if name in collective else part.state_dict()
                for name, part in self.replicated.items()}  # tensors by reference
        extra = self._resume_state(live["progress"], gathered, epoch_done)
        self._snapshot_done = threading.Event()
        self.blocked = time.perf_counter() - start
        self.metrics.ckpt_blocking_seconds.set(self.blocked)
        self.writer.submit(lambda: self._write(live, extra, step, self._snapshot_done))
        return self.blocked

    def _resume_state(self, progress: dict[str, Any], gathered: list[dict[str, Any]],
                      epoch_done: bool) -> dict[str, Any]:
        """Per-rank data positions and RNG states, and the config; `progress` moves on at an epoch end."""
        if epoch_done:  # an epoch-end checkpoint resumes at the start of the next epoch
            progress.update(epoch=progress["epoch"] + 1, epoch_samples=0)
        world = self.info.world_size
        return {"data": {"world_size": world, "ranks": [] if epoch_done else [g["data"] for g in gathered]},
                "rng": {"world_size": world, "ranks": [g["rng"] for g in gathered]},
                "config": to_dict(self.cfg)}

    def _wait_in_flight(self) -> None:
        """Rank 0: its writer thread's job (DCP's write, then LATEST); other ranks: their DCP write."""
        if self.writer is not None:
            self.writer.wait()
        future, self._dcp_future = self._dcp_future, None
        if future is not None:
            try:
                future.result()
            except Exception as exc:
                raise CheckpointWriteError(f"rank {self.info.rank}: its part of a sharded checkpoint "
                                           f"could not be written: {exc}") from exc

    def _save_sharded(self, step: int, epoch_done: bool, gathered: list[dict[str, Any]],
                      start: float) -> float:
        """Every rank: its shards to DCP's async_save; rank 0 then queues the rest and LATEST."""
        state = self.sharded.state_dict()
        bad = torch.tensor([float(sharded_checkpoint.has_nonfinite(state["model"]))])
        if self.info.distributed:
            # every rank refuses, or none does; on the checkpoint group (gloo: a CPU flag even
            # under NCCL), idle here since the previous write is complete on every rank
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self._group)
        if bad.item():
            raise NonFiniteWeightsError(f"step {step}: weights are NaN/Inf; not writing a checkpoint of "
                                        "them (LATEST still names the last good one)")
        folder = checkpoints.sharded_uri(self.dir, step)
        self._dcp_staged, future, shard_writer = sharded_checkpoint.start_save(folder, state, self._group,
                                                                              self._stager)
        del state
        self.blocked = time.perf_counter() - start
        self.metrics.ckpt_blocking_seconds.set(self.blocked)
        if not self.info.is_main:
            self._dcp_future = future
            return self.blocked
        live = {name: part.state_dict() for name, part in self.replicated.items()
                if name not in ("model", "optimizer")}
        extra = self._resume_state(live["progress"], gathered, epoch_done)
        progress = live["progress"]
        side = snapshot({"format": checkpoints.FORMAT, "step": step, "epoch": progress["epoch"],
                         "samples_seen": progress["samples_seen"], **self.meta, **live, **extra})
        self.writer.submit(lambda: self._finish_sharded(folder, future, shard_writer, side, step))
        return self.blocked

    def _finish_sharded(self, folder: str, future: Any, shard_writer: Any, side: dict[str, Any],
                        step: int) -> dict[str, Any]:
        """Rank 0's writer thread: once DCP is done, trainer.pt, the consolidated file, LATEST."""
        start = time.perf_counter()
        named = self._named()
        try:
            future.result()
        except Exception as exc:
            raise CheckpointWriteError(f"sharded checkpoint step {step} could not be written: {exc}; "
                                       f"LATEST still names {named}") from exc
        dcp_seconds = time.perf_counter() - start
        try:
            trainer_uri = storage.join(folder, checkpoints.TRAINER_FILE)
            sha256, size = checkpoints.write_stream(trainer_uri, lambda f: torch.save(side, f))
            files = {**shard_writer.manifest, checkpoints.TRAINER_FILE: {"bytes": size, "sha256": sha256}}
            entry = {"step": step, "uri": folder, "format": checkpoints.SHARDED,
                     "sha256": files[checkpoints.DCP_METADATA]["sha256"],
                     "bytes": sum(f["bytes"] for f in files.values()), "files": files}
            if self.cfg.consolidate_checkpoint:
                entry["consolidated"] = self._consolidate(folder, side)
            pointer = checkpoints.publish(self.dir, entry)
        except StorageError as exc:
            raise CheckpointWriteError(f"checkpoint step {step} could not be written: {exc}; "
                                       f"LATEST still names {named}") from exc
        seconds, pruned = self._published(pointer, step, start)
        log.info("checkpoint step %d -> %s (%.1f MB sharded, %.2fs in the background, of which %.2fs "
                 "DCP's write; %.2fs blocking%s)", step, folder, entry["bytes"] / 1e6, seconds, dcp_seconds,
                 self.blocked, pruned)
        return pointer

    def _consolidate(self, folder: str, side: dict[str, Any]) -> dict[str, Any]:
        """The whole checkpoint as one format-2 file in the folder, read back as any reader reads it."""
        full = checkpoints.load_sharded(folder)
        record = {**side, "model": full["model"], "optimizer": full["optimizer"]}
        uri = storage.join(folder, checkpoints.CONSOLIDATED)
        sha256, size = checkpoints.write_stream(uri, lambda f: torch.save(record, f))
        return {"uri": uri, "sha256": sha256, "bytes": size}

    def _await_snapshot(self) -> None:
        staged, self._dcp_staged = self._dcp_staged, None
        if staged is not None:  # a sharded save: DCP's stager copies on its own thread
            self._blocking(staged.result)
        done = self._snapshot_done
        if done is not None and not done.is_set():
            self._blocking(done.wait)

    def _blocking(self, wait: Callable[[], Any]) -> None:
        """Wait on the loop's thread, counted as checkpoint blocking time."""
        start = time.perf_counter()
        wait()
        self.blocked += time.perf_counter() - start
        self.metrics.ckpt_blocking_seconds.set(self.blocked)

    def _stage(self, live: dict[str, Any], done: threading.Event) -> dict[str, Any]:
        """The CPU copy of the live state (into the previous copy's buffers), then release the loop."""
        start = time.perf_counter()
        try:
            state = snapshot(live, reuse=self._staged)
        finally:
            done.set()
        self._staged = {"model": state["model"], "optimizer": state["optimizer"]}
        self.snapshot_seconds = time.perf_counter() - start
        return state

    def _gather(self, mine: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.info.distributed:
            return [mine]
        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, mine)
        return out

    def _write(self, live: dict[str, Any], extra: dict[str, Any], step: int,
               snapshot_done: threading.Event) -> dict[str, Any]:
        start = time.perf_counter()
        state = self._stage(live, snapshot_done)
        del live
        assert_finite(state["model"], step)  # of the copy that gets written
        progress = state["progress"]
        record = checkpoints.file_record(step=step, epoch=progress["epoch"],
                                         samples_seen=progress["samples_seen"], model=state.pop("model"),
                                         **self.meta, **state, **extra)
        uri = checkpoints.checkpoint_uri(self.dir, step)
        try:
            sha256, size = checkpoints.write_stream(uri, lambda f: torch.save(record, f))
            pointer = checkpoints.publish(self.dir, {"step": step, "uri": uri, "sha256": sha256,
                                                     "bytes": size})
        except StorageError as exc:
            raise CheckpointWriteError(f"checkpoint step {step} could not be written: {exc}; "
                                       f"LATEST still names {self._named()}") from exc
        seconds, pruned = self._published(pointer, step, start)
        log.info("checkpoint step %d -> %s (%.1f MB, %.2fs in the background, of which %.2fs copying; "
                 "%.2fs blocking%s)", step, uri, size / 1e6, seconds, self.snapshot_seconds, self.blocked,
                 pruned)
        return pointer

    def _named(self) -> str:
        """What LATEST names now, for an error that leaves it there."""
        return self.last_pointer["uri"] if self.last_pointer else "nothing yet"

    def _published(self, pointer: dict[str, Any], step: int, start: float) -> tuple[float, str]:
        """LATEST names the new checkpoint: prune, set the metrics; (seconds, the log's prune note)."""
        self.last_pointer = pointer
        pruned = self._prune()
        seconds = time.perf_counter() - start
        self.metrics.ckpt_seconds.set(seconds)
        self.metrics.ckpt_step.set(step)
        self.metrics.ckpt_time.set_to_current_time()
        return seconds, f", pruned {pruned}" if pruned else ""

    def _prune(self) -> int:
        deleted, failures = checkpoints.prune(self.dir, self.cfg.keep_last)
        for failure in failures:
            self.prune_failures += 1
            self.metrics.ckpt_prune_failures.inc()
            log.warning("--keep-last %d: could not delete an old checkpoint (%s); training goes on",
                        self.cfg.keep_last, failure)
        return len(deleted)

    def check(self) -> None:
        """Raise a failed background write on the training thread (rank 0)."""
        if self.writer is not None:
            self.writer.check()

    def wait(self) -> None:
        """Block until the write in flight is complete and LATEST names it (rank 0), or this
        rank's part of it is (the others, with sharded checkpoints)."""
        self._wait_in_flight()

    def close(self) -> None:
        try:
            if self.writer is None:
                self._wait_in_flight()
        finally:
            if self.writer is not None:
                self.writer.close()
            if self._stager is not None:
                self._stager.close()

    def close_after_error(self) -> None:
        """Close while another error stops the run: that error is the one to report."""
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - logged; the error in flight is re-raised by the caller
            log.error("the checkpoint write in flight failed as well: %s", exc)
