"""Process group set-up for torchrun (standalone or multi-node) and PyTorchJob pods.

torchrun turns the training operator's `PET_*` variables into RANK, LOCAL_RANK, WORLD_SIZE and
MASTER_ADDR/PORT for each worker; a pod started without torchrun gets RANK/WORLD_SIZE/MASTER_*
from the operator directly. Either way the env:// rendezvous below applies.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from stages.common.errors import ConfigError


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


def pick_device(requested: str, local_rank: int, same_device: bool = False) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to this process")
        torch.cuda.set_device(0 if same_device else local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(requested_device: str, backend: str = "", url: str = "",
                     same_device: bool = False) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1: NCCL on GPUs, gloo on CPU.

    `backend`/`url` are open_clip_train's --dist-backend/--dist-url; `same_device` its --no-set-device-rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank, same_device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=float(os.environ.get("CLIPFORGE_DIST_TIMEOUT_S", "1800")))
        store, _, _ = next(dist.rendezvous(url or "env://", rank, world_size, timeout=timeout))
        # torchrun may hand a restarted worker group the same store: without a per-attempt prefix
        # the new ranks would read the killed ranks' addresses and fail to connect
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"clipforge/attempt_{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


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
