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
from stages.common.errors import ConfigError, DataError
from stages.common.models import model_config
from stages.train import pretrained
from stages.train.config import TrainConfig
from stages.train.openclip_flags import aug_cfg_dict, bnb_linear_class, check_bnb_device

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
    check_bnb_device(cfg.use_bnb_linear, device.type)
    random_seed(cfg.seed, 0)
    kwargs: dict[str, Any] = {}
    if cfg.siglip:  # SigLIP's initial temperature and bias, as open_clip_train sets them
        kwargs.update(init_logit_scale=np.log(10), init_logit_bias=-10)
    name, tag = pretrained.open_clip_args(cfg.model, cfg.pretrained)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, tag, precision=cfg.precision, device=device, output_dict=True,
            **model_options(cfg), **kwargs)
    except RuntimeError as exc:
        if not tag and not name.startswith(pretrained.HF_HUB):
            raise
        raise DataError(f"--pretrained {cfg.pretrained}: {exc}{pretrained.offline_hint()}") from exc
    if not tag:
        init_caption_decoder(model)
    if pretrained.kind(cfg.pretrained) == "hub" and name != cfg.pretrained:
        open_clip.load_checkpoint(model, pretrained.hub_weights(cfg.pretrained, cfg.cache_dir or None))
    elif pretrained.kind(cfg.pretrained) == "uri":
        load_pretrained(model, cfg.pretrained)
    if cfg.use_bnb_linear:
        model = _bnb_linear(model, cfg.use_bnb_linear, device)
    random_seed(cfg.seed, rank)
    lock_towers(model, cfg)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    return ModelBundle(model=model, preprocess_train=preprocess_train, preprocess_val=preprocess_val,
                       tokenizer=open_clip.get_tokenizer(name, cache_dir=cfg.cache_dir or None,
                                                         context_length=cfg.force_context_length),
                       model_name=_saved_name(name), model_cfg=_model_cfg(name, model, cfg),
                       preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)))


def init_caption_decoder(model: torch.nn.Module) -> None:
    """CoCa's caption-head projection, initialised as open_clip means it to be (normal, std width^-0.5).

    open_clip 3.3 creates MultimodalTransformer.text_projection with torch.empty and never
    initialises it (its `init_parameters`, the only code that would, refers to a missing attribute
    and is never called). From scratch, runs then start from whatever memory held: different weights
    each time, or values near 1e30 that make the first loss inf/NaN. Seeded like the rest of the
    model; weights loaded afterwards (pretrained, resume) replace it. The decoder's blocks keep
    their PyTorch default init, as in open_clip_train.
    """
    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if isinstance(projection, torch.nn.Parameter):
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=decoder.width ** -0.5)


def lock_towers(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """LiT (https://arxiv.org/abs/2111.07991) and text locking, through the towers' own `lock`.

    The towers are called directly because CoCa has no lock_*_tower methods (open_clip_train fails
    on it). open_clip's own text transformer can only lock LayerNorms with their layers, which is
    what it gets (open_clip_train stops on an assertion there unless --lock-text-freeze-layer-norm
    is given); Hugging Face text towers take the flag as it is.
    """
    from open_clip.transformer import TextTransformer

    if cfg.lock_image:
        model.visual.lock(unlocked_groups=cfg.lock_image_unlocked_groups,
                          freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if not cfg.lock_text:
        return
    text = getattr(model, "text", None)
    if text is None:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=True)
    else:
        text.lock(cfg.lock_text_unlocked_layers,
                  True if isinstance(text, TextTransformer) else cfg.lock_text_freeze_layer_norm)


def model_options(cfg: TrainConfig) -> dict[str, Any]:
    """open_clip_train's model and transform overrides, as create_model_and_transforms takes them."""
    size = cfg.force_image_size
    return dict(force_quick_gelu=cfg.force_quick_gelu, force_custom_text=cfg.force_custom_text,
                force_patch_dropout=cfg.force_patch_dropout,
                force_image_size=size[0] if size and len(size) == 1 else (tuple(size) if size else None),
                force_context_length=cfg.force_context_length, image_mean=cfg.image_mean,
                image_std=cfg.image_std, image_interpolation=cfg.image_interpolation,
                image_resize_mode=cfg.image_resize_mode, aug_cfg=aug_cfg_dict(cfg.aug_cfg),
                pretrained_image=cfg.pretrained_image, cache_dir=cfg.cache_dir or None)


def build_distill_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module | None:
    """The frozen teacher of --distill-model/--distill-pretrained (open_clip_train's distillation)."""
    if not cfg.distill_model:
        return None
    name, tag = pretrained.open_clip_args(cfg.distill_model, cfg.distill_pretrained)
    teacher = open_clip.create_model(name, tag, precision=cfg.precision, device=device, output_dict=True,
                                     cache_dir=cfg.cache_dir or None)
    if pretrained.kind(cfg.distill_pretrained) == "uri":
        load_pretrained(teacher, cfg.distill_pretrained)
    elif pretrained.kind(cfg.distill_pretrained) == "hub" and name != cfg.distill_pretrained:
        open_clip.load_checkpoint(teacher, pretrained.hub_weights(cfg.distill_pretrained, cfg.cache_dir or None))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def _bnb_linear(model: torch.nn.Module, module_name: str, device: torch.device) -> torch.nn.Module:
    from open_clip.utils import replace_linear

    replace_linear(model, bnb_linear_class(module_name))
    return model.to(device)


def _saved_name(name: str) -> str:
    """A name the other stages can register a config under (a Hub id has slashes)."""
    return name.removeprefix(pretrained.HF_HUB).replace("/", "--") if name.startswith(pretrained.HF_HUB) else name


def _model_cfg(name: str, model: torch.nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    if name.startswith(pretrained.HF_HUB):
        from open_clip.factory import _get_hf_config

        return _get_hf_config(name[len(pretrained.HF_HUB):], cache_dir=cfg.cache_dir or None)["model_cfg"]
    model_cfg = model_config(name)
    if cfg.force_quick_gelu:
        model_cfg["quick_gelu"] = True
    if cfg.force_custom_text:
        model_cfg["custom_text"] = True
    if cfg.force_image_size:
        model_cfg["vision_cfg"]["image_size"] = model_options(cfg)["force_image_size"]
    if cfg.force_context_length:
        model_cfg["text_cfg"]["context_length"] = cfg.force_context_length
    return model_cfg


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


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """--use-bn-sync: torch's SyncBatchNorm, which runs on accelerators only.

    On the CPU its first forward would fail deep in the step; a model with BatchNorm layers is a
    ConfigError before the first step, and one without (ViTs) has nothing to convert.
    """
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type == "cpu":
        raise ConfigError("--use-bn-sync: torch's SyncBatchNorm runs on GPUs only, and this model's "
                          "BatchNorm layers would run on the CPU; drop the flag (BatchNorm then stays per rank)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


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
