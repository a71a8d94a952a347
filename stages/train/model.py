"""Build the open_clip model, its transforms and tokenizer; load --pretrained weights from any store."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import open_clip
import torch

from stages.common import checkpoints, storage
from stages.common.errors import DataError
from stages.common.models import model_config
from stages.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    model_name: str
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]


def random_seed(seed: int, rank: int = 0) -> None:
    """Seed torch, numpy and random the way open_clip_train does (seed + rank)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def build_model(cfg: TrainConfig, device: torch.device, rank: int) -> ModelBundle:
    """The model on its device; identical initial weights on every rank (seeded before creation)."""
    random_seed(cfg.seed, 0)
    kwargs: dict[str, Any] = {}
    if cfg.siglip:  # SigLIP's initial temperature and bias, as open_clip_train sets them
        kwargs.update(init_logit_scale=np.log(10), init_logit_bias=-10)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        cfg.model, precision=cfg.precision, device=device, output_dict=True,
        force_patch_dropout=cfg.force_patch_dropout, **kwargs)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    random_seed(cfg.seed, rank)
    if cfg.lock_image:
        model.lock_image_tower()
    if cfg.lock_text:
        model.lock_text_tower()
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    return ModelBundle(model=model, preprocess_train=preprocess_train, preprocess_val=preprocess_val,
                       tokenizer=open_clip.get_tokenizer(cfg.model), model_name=cfg.model,
                       model_cfg=model_config(cfg.model),
                       preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)))


def read_weights(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a clipforge/open_clip checkpoint, in any store."""
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(storage.read_bytes(uri))
        except Exception as exc:
            raise DataError(f"--pretrained {uri}: not a readable safetensors file: {exc}") from exc
    return checkpoints.read(uri).model


def load_pretrained(model: torch.nn.Module, uri: str) -> None:
    state = read_weights(uri)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DataError(f"--pretrained {uri} does not fit the model: missing {result.missing_keys[:5]}, "
                        f"unexpected {result.unexpected_keys[:5]}")
    log.info("loaded pretrained weights from %s", uri)


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    if not enabled:
        return model
    for name in ("torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return torch.compile(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain open_clip model under DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Clamp to ln(100), as in the CLIP paper and open_clip_train."""
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, math.log(100))
