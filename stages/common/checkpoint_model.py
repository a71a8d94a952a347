"""Checkpoint -> open_clip model: the one loader evaluate and export share.

The model is rebuilt from what the checkpoint carries (its open_clip config when it has one, else
a registered model name) with the checkpoint's preprocess config, and its weights are loaded
strictly. Imports open_clip lazily: `import stages.common` stays torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from stages.common import checkpoints, models
from stages.common.errors import DataError


@dataclasses.dataclass
class CheckpointModel:
    model: Any                  # open_clip model, eval mode, on the CPU
    preprocess: Callable        # open_clip's inference transform
    tokenizer: Callable
    name: str                   # the open_clip name it was built as
    model_cfg: dict[str, Any]   # its open_clip config
    checkpoint: checkpoints.Checkpoint


def load(uri: str) -> CheckpointModel:
    """Read (verified, with LATEST fallback) and build the model of a checkpoint."""
    import open_clip

    ckpt = checkpoints.read(uri)
    name, model_cfg = _register(ckpt)
    preprocess_cfg = ckpt.preprocess_cfg
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, image_mean=preprocess_cfg.get("mean"), image_std=preprocess_cfg.get("std"),
        image_interpolation=preprocess_cfg.get("interpolation"),
        image_resize_mode=preprocess_cfg.get("resize_mode"))
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        raise DataError(f"{ckpt.uri}: its weights do not fit model {name!r}: {exc}") from exc
    ckpt.model = {}  # the weights live in the model now; do not keep a second copy
    return CheckpointModel(model.eval(), preprocess, open_clip.get_tokenizer(name), name, model_cfg, ckpt)


def _register(ckpt: checkpoints.Checkpoint) -> tuple[str, dict[str, Any]]:
    """The open_clip name to build and its config; a config carried in the checkpoint is registered."""
    import open_clip

    name = ckpt.model_name
    if isinstance(ckpt.model_cfg, dict):
        name = name or "clipforge-checkpoint"
        models.register_config(name, ckpt.model_cfg, ckpt.uri)
        return name, ckpt.model_cfg
    models.register_builtin_configs()
    model_cfg = open_clip.get_model_config(name) if name else None
    if model_cfg is None:
        raise DataError(f"{ckpt.uri}: the checkpoint names no usable model (model_name={name!r}, no "
                        "model_cfg); it is not a clipforge checkpoint")
    return name, model_cfg
