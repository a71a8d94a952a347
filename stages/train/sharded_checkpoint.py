"""Sharded checkpoints: every rank writes its own shard through torch.distributed.checkpoint.

The model and the optimizer go through DCP as their sharded state dicts (DTensor shards under
--fsdp, nothing gathered onto one rank), with `dcp.async_save` and one DefaultStager kept for the
run: the copy of this rank's shards to CPU memory is taken on the stager's thread (into the
buffers of the previous copy, which DCP's stager caches), so only the next optimizer step waits
for whatever is left of it, as for single files; the files are written on DCP's thread, and
DCP's `.metadata` is written by rank 0 once every rank's files are complete. Resume goes through
`dcp.load` into the state dicts of the model as it is sharded now, so a checkpoint written on N
ranks resumes on M (DCP reshards). The folder layout and what "verifies" means are
stages.common.checkpoints'; when to save, LATEST and pruning are the checkpoint manager's.

Why a writer of ours (ShardWriter) on DCP's FsspecWriter: that writer neither retries transient
store errors nor records what it wrote. Ours is the same writer on the filesystem
stages.common.storage configures (S3 endpoint, timeouts), retries a rank's whole write (its files
are rewritten from the start) and its .metadata with storage.retrying, and hashes every file as
it streams out, so LATEST can record the bytes and sha256 of each shard without reading them back.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.futures import Future

from stages.common import checkpoints, storage


class _HashingFileSystem(FileSystem):
    """DCP's fsspec filesystem that records {file name: {bytes, sha256}} of every file it writes."""

    def __init__(self, fs: Any):
        super().__init__()
        self.fs, self.files = fs, {}

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            hashing = checkpoints.HashingStream(stream)
            yield hashing
        self.files[os.path.basename(os.fspath(path))] = {"bytes": hashing.bytes,
                                                         "sha256": hashing.sha256.hexdigest()}

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        record = self.files.pop(os.path.basename(os.fspath(path)), None)
        if record is not None:
            self.files[os.path.basename(os.fspath(new_path))] = record


class ShardWriter(FsspecWriter):
    """DCP's fsspec writer with retries and a record of what each rank wrote (see the module docstring).

    Each rank leaves `__<rank>_files.json` beside its files; rank 0 (the coordinator), after
    writing .metadata, merges them into `manifest`, which LATEST records.
    """

    def __init__(self, folder: str):
        super().__init__(folder, overwrite=True)
        self.fs = _HashingFileSystem(storage.filesystem(folder)[0])
        self.manifest: dict[str, dict[str, Any]] = {}

    def write_data(self, plan, planner) -> Future:
        prefix = plan.storage_data.prefix  # DCP's "__<rank>_"
        results = storage.retrying("writing the shard in", str(self.path),
                                   lambda: FsspecWriter.write_data(self, plan, planner).wait())
        mine = {name: rec for name, rec in self.fs.files.items() if name.startswith(prefix)}
        storage.write_json(storage.join(str(self.path), f"{prefix}files.json"), mine)
        done: Future = Future()
        done.set_result(results)
        return done

    def finish(self, metadata, results) -> None:
        folder = str(self.path)
        storage.retrying("writing the metadata of", folder,
                         lambda: FsspecWriter.finish(self, metadata, results))
        manifest: dict[str, dict[str, Any]] = {}
        for rank in range(len(results)):
            manifest.update(storage.read_json(storage.join(folder, f"__{rank}_files.json")))
        manifest[checkpoints.DCP_METADATA] = self.fs.files[checkpoints.DCP_METADATA]
        self.manifest = manifest


class ShardedState:
    """The model and optimizer as DCP state dicts: sharded under --fsdp, whole under DDP."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.model),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}

    def load(self, folder: str, process_group: dist.ProcessGroup | None) -> None:
        """Load a sharded checkpoint into the model as it is laid out now (resharding as needed)."""
        state = self.state_dict()
        dcp.load(state, storage_reader=checkpoints.shard_reader(folder), process_group=process_group)
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])


def has_nonfinite(model_state: dict[str, torch.Tensor]) -> bool:
    """Whether this rank's part of the weights holds NaN/Inf (no collective)."""
    for value in model_state.values():
        local = value.to_local() if isinstance(value, DTensor) else value
        if local.is_floating_point() and not torch.isfinite(local).all():
            return True
    return False


def stager() -> DefaultStager:
    """The run's stager: copies in a background thread (pinned memory on a GPU), buffers reused."""
    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                        use_async_staging=True, use_non_blocking_copy=cuda))


def start_save(folder: str, state: dict[str, Any], process_group: dist.ProcessGroup | None,
               staging: DefaultStager) -> tuple[Any, Any, ShardWriter]:
    """Copy this rank's shards to CPU memory and write them, both in the background.

    Returns (staged, written, writer): `staged` completes once the copy is taken (the tensors may
    change after that), `written` once the checkpoint is complete (rank 0: .metadata written).
    """
    writer = ShardWriter(folder)
    response = dcp.async_save(state, storage_writer=writer, process_group=process_group,
                              async_stager=staging)
    return response.staging_completion, response.upload_completion, writer
