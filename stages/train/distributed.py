"""Process group set-up for torchrun (standalone or multi-node) and PyTorchJob pods.

torchrun turns the training operator's `PET_*` variables into RANK, LOCAL_RANK, WORLD_SIZE and
MASTER_ADDR/PORT for each worker; a pod started without torchrun gets RANK/WORLD_SIZE/MASTER_*
from the operator directly. Either way the env:// rendezvous below applies.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re

import torch
import torch.distributed as dist

from stages.common.errors import ConfigError

log = logging.getLogger("clipforge.train")
_job_store = None  # the job's rendezvous store, shared by every worker and kept across restarts


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to this process")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(requested_device: str) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1: NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("CLIPFORGE_DIST_TIMEOUT_S", "1800")))
        global _job_store
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        _job_store = store
        # torchrun may hand a restarted worker group the same store: without a per-attempt prefix
        # the new ranks would read the killed ranks' addresses and fail to connect
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"clipforge/attempt_{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def agree_run_id(cfg, info: DistInfo) -> str:
    """One run id for every rank and every restart of a job that was given no --run-id.

    torchrun names each job (TORCHELASTIC_RUN_ID: --rdzv-id, or a fresh uuid per --standalone
    launch, the same in every worker and restart); without one (static rendezvous, "none"), rank 0
    puts its id into the job's rendezvous store, which torchrun's agent keeps across restarts.
    """
    if getattr(cfg, "run_id_given", True):
        return cfg.run_id
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if job and job != "none":
        run_id = re.sub(r"[^A-Za-z0-9._-]", "-", job)
        log.info("run id %s: torchrun's job id (no --run-id given)", run_id)
        return run_id
    if not info.distributed or _job_store is None:
        return cfg.run_id
    key = "clipforge/run_id"
    if info.is_main:  # kept if an earlier attempt of this job already wrote one
        agreed = _job_store.compare_set(key, "", cfg.run_id)
    else:
        _job_store.wait([key])
        agreed = _job_store.get(key)
    run_id = agreed.decode() if isinstance(agreed, bytes) else str(agreed)
    log.info("run id %s: agreed through the job's rendezvous store (no --run-id given)", run_id)
    return run_id


def wrap_ddp(model: torch.nn.Module, info: DistInfo, static_graph: bool) -> torch.nn.Module:
    """DDP on GPUs pins the device; on CPU device_ids must be None."""
    if not info.distributed:
        return model
    device_ids = [info.device] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                     static_graph=static_graph)


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only when the flag holds on every rank (so all ranks take the same branch)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=info.device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
