"""The process group of a stage under torchrun or a PyTorchJob: device, rank, collectives, store.

torchrun turns the training operator's `PET_*` variables into RANK, LOCAL_RANK, WORLD_SIZE and
MASTER_ADDR/PORT for each worker; a pod started without torchrun gets them from the operator
directly. Either way the env:// rendezvous below applies. Imported by the train and evaluate stages
only: `import stages.common` must not import torch.

Restarts across nodes: torchrun's c10d rendezvous by default keeps one TCP store for every round, so
a new round's ranks would find the previous round's addresses in it and try to connect to dead
peers. Every launcher we ship sets `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (see `RESTART_ENV`), which
makes rank 0 host a fresh store each round. A single agent (`--standalone`) sharing its store is
safe with a per-restart key prefix, since one agent has one restart count; several agents count
their restarts separately, so there no prefix can be agreed on and we warn instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
from typing import Any

import torch
import torch.distributed as dist

from stages.common.errors import ConfigError

log = logging.getLogger(__name__)

# What torchrun's agents need in their environment for restarts that rejoin in one round.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
DEFAULT_TIMEOUT_S = 600.0  # collectives; the long pauses (checkpoint, validation) wait outside them
TIMEOUT_ENV = "CLIPFORGE_DIST_TIMEOUT_S"
_job_store = None  # the rendezvous store as torchrun hands it over, before any per-attempt prefix


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    store: Any = None  # the process group's key-value store, under `store_prefix` (None: one rank)
    store_prefix: str = "clipforge"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int, same_device: bool = False) -> torch.device:
    """'auto' or '' (a GPU when there is one), 'cpu', 'cuda' (this rank's GPU, or GPU 0 with
    `same_device`: open_clip_train's --no-set-device-rank) or 'cuda:N'."""
    if requested.startswith("cuda") or (requested in ("auto", "") and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: no CUDA device is visible to this process")
        if ":" in requested:
            torch.cuda.set_device(torch.device(requested))
        else:
            torch.cuda.set_device(0 if same_device else local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if requested not in ("auto", "", "cpu"):
        raise ConfigError(f"--device {requested}: use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def collective_timeout(default_s: float = DEFAULT_TIMEOUT_S) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, default_s)))


def _store_prefix() -> str:
    """A key prefix for a store shared across restarts; '' when each round has its own store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return ""
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agents = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if agents > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        log.warning("torchrun shares one rendezvous store across restarts of this %d-node job: after "
                    "a restart, ranks may meet stale peers. Start torchrun with "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment", agents)
    return f"clipforge/attempt_{restarts}"


def init_distributed(requested_device: str = "auto", timeout: datetime.timedelta | None = None,
                     backend: str = "", url: str = "", same_device: bool = False) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1: NCCL on GPUs, gloo on CPU.

    `backend`/`url` are open_clip_train's --dist-backend/--dist-url; `same_device` its --no-set-device-rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank, same_device)
    if world_size <= 1:
        return DistInfo(rank=0, local_rank=local_rank, world_size=1, device=device)
    timeout = timeout or collective_timeout()
    global _job_store
    store, _, _ = next(dist.rendezvous(url or "env://", rank, world_size, timeout=timeout))
    _job_store = store
    if prefix := _store_prefix():
        store = dist.PrefixStore(prefix, store)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"), store=store,
                                rank=rank, world_size=world_size, timeout=timeout)
    own_prefix = f"{prefix}/clipforge" if prefix else "clipforge"
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                    store=dist.PrefixStore("clipforge", store), store_prefix=own_prefix)


def agree_run_id(run_id: str, given: bool, info: DistInfo) -> str:
    """One run id for every rank and every restart of a job that was given no --run-id.

    torchrun names each job (TORCHELASTIC_RUN_ID: --rdzv-id, or a fresh uuid per --standalone
    launch, the same in every worker and restart); without one (static rendezvous, "none"), rank 0
    puts its id into the job's rendezvous store, which torchrun's agent keeps across restarts.
    """
    if given:
        return run_id
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if job and job != "none":
        agreed = re.sub(r"[^A-Za-z0-9._-]", "-", job)
        log.info("run id %s: torchrun's job id (no --run-id given)", agreed)
        return agreed
    if not info.distributed or _job_store is None:
        return run_id
    key = "clipforge/run_id"
    if info.is_main:  # kept if an earlier attempt of this job already wrote one
        value = _job_store.compare_set(key, "", run_id)
    else:
        _job_store.wait([key])
        value = _job_store.get(key)
    agreed = value.decode() if isinstance(value, bytes) else str(value)
    log.info("run id %s: agreed through the job's rendezvous store (no --run-id given)", agreed)
    return agreed


def open_store(info: DistInfo, timeout_s: float):
    """A second client of the process group's store, for a thread that must not share the first."""
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.PrefixStore(info.store_prefix, client)


def wrap_ddp(model: torch.nn.Module, info: DistInfo, static_graph: bool) -> torch.nn.Module:
    """DDP on GPUs pins the device; on CPU device_ids must be None."""
    if not info.distributed:
        return model
    device_ids = [info.device] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                     static_graph=static_graph)


def all_true(flag: bool | torch.Tensor, info: DistInfo) -> bool:
    """True only when the flag holds on every rank (so all ranks take the same branch).

    A tensor flag stays on the device until the one host sync at the end.
    """
    t = torch.as_tensor(flag, device=info.device).to(torch.int32).reshape(1)
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's object, in rank order (a one-item list when not distributed)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
