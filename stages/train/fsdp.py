"""FSDP2 for `--fsdp`: parameters, gradients and optimizer state sharded across the ranks.

As torchtitan does it: `fully_shard` on every transformer block of both towers (each block's
parameters are all-gathered just before its forward and freed after it), then on the root for
what is left (embeddings, projections, final norms). FSDP2 shards no 0-d parameters, so the
logit scale (and SigLIP's bias) stay replicated and their gradients are averaged as DDP would. The mixed-precision policy
follows --precision: amp/amp_bf16 compute in fp16/bf16 while the sharded master weights, the
gradient reduction and the optimizer stay in fp32; fp32 and pure bf16 need no policy.

Checkpoints are sharded by default under --fsdp (stages.train.sharded_checkpoint). The Statefuls
here serve single-file checkpoints (--checkpoint-format single): through
torch.distributed.checkpoint.state_dict they gather full, unsharded tensors keyed like a DDP
checkpoint's (the optimizer state keyed by parameter name), which every reader reads unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from stages.common.errors import ConfigError, DataError

_COMPUTE_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16}
# gathered onto rank 0 only, in CPU memory: what one checkpoint file needs, no more per rank
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    compute = _COMPUTE_DTYPES.get(precision)
    if compute is None:  # fp32, or pure bf16 (the weights themselves are bf16)
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The residual blocks of the image and the text tower (CLIP and CustomTextCLIP layouts)."""
    towers = [getattr(model, "visual", None), model, getattr(model, "text", None)]
    blocks: list[torch.nn.Module] = []
    for tower in towers:
        transformer = getattr(tower, "transformer", None)
        resblocks = getattr(transformer, "resblocks", None)
        if resblocks is not None:
            blocks.extend(resblocks)
    return blocks


def shard(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """fully_shard each block, then the root; the model is changed in place and returned."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"--fsdp: {type(model).__name__} has no transformer blocks to shard "
                          "(only open_clip transformer towers are supported)")
    policy = mixed_precision(precision)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    fully_shard(model, mp_policy=policy, ignored_params=scalars or None)
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_grad)
    return model


def _average_grad(param: torch.Tensor) -> None:
    """The all-reduce DDP would do, for the scalars FSDP2 cannot shard (logit scale and bias).

    Averaging after every accumulation is exact: the part accumulated before is already equal
    on every rank, so averaging the sum averages only the new micro-batch's gradient.
    """
    dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)


def local_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this rank holds (its shards under FSDP)."""

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    total = sum(nbytes(p) for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


class ShardedModelState:
    """The model as a Stateful whose state_dict() is collective: every rank must call it."""

    collective = True

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.model, options=FULL)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))


class OptimizerState:
    """The optimizer as a Stateful that resumes from a checkpoint of either layout.

    A --fsdp checkpoint keys the optimizer state by parameter name (torch.distributed.checkpoint's
    full optimizer state dict); a DDP one by position in the parameter groups (torch's own
    optimizer.state_dict()). Either is loaded into either, so a run can switch between DDP and
    --fsdp on resume. Sharded, state_dict() is collective: every rank must call it.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool):
        self.model, self.optimizer, self.collective = model, optimizer, sharded

    def state_dict(self) -> dict[str, Any]:
        if not self.collective:
            return self.optimizer.state_dict()
        return get_optimizer_state_dict(self.model, self.optimizer, options=FULL)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        by_name = any(isinstance(p, str) for g in state.get("param_groups", []) for p in g["params"])
        if not by_name:
            if not self.collective:
                self.optimizer.load_state_dict(state)
                return
            state = self._by_name(state)
        set_optimizer_state_dict(self.model, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

    def _by_name(self, state: dict[str, Any]) -> dict[str, Any]:
        """Positions -> parameter names, in the order the optimizer holds its parameters."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        saved = [i for g in state["param_groups"] for i in g["params"]]
        if len(saved) != len(order):
            raise DataError(f"the checkpoint's optimizer holds {len(saved)} parameters, this model "
                            f"trains {len(order)} (were --lock-image/--lock-text the same?)")
        name_of = dict(zip(saved, order, strict=True))
        return {"state": {name_of[i]: v for i, v in state["state"].items()},
                "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]}
                                 for g in state["param_groups"]]}
