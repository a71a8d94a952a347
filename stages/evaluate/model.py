"""Build the model to evaluate from a clipforge/open_clip checkpoint or an exported open_clip folder."""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from stages.common import checkpoints, models, storage
from stages.common.errors import DataError

EXPORT_CONFIG = "open_clip_config.json"


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    name: str
    checkpoint: str
    step: int | None


def load_model(uri: str, device: torch.device) -> LoadedModel:
    """A checkpoint (file, LATEST, checkpoints/ or run folder) or an export folder, ready for eval."""
    if storage.exists(storage.join(uri.rstrip("/"), EXPORT_CONFIG)):
        loaded = _from_export(uri.rstrip("/"))
    else:
        loaded = _from_checkpoint(uri)
    loaded.model.to(device).eval()
    return loaded


def _from_checkpoint(uri: str) -> LoadedModel:
    import open_clip

    ckpt = checkpoints.load(uri)
    path = ckpt["uri"]
    name = _register(ckpt, path)
    preprocess_cfg = ckpt.get("preprocess_cfg") or {}
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, image_mean=preprocess_cfg.get("mean"), image_std=preprocess_cfg.get("std"),
        image_interpolation=preprocess_cfg.get("interpolation"),
        image_resize_mode=preprocess_cfg.get("resize_mode"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise DataError(f"{path}: its weights do not fit model {name!r}: {exc}") from exc
    step = ckpt.get("step")
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name), ckpt.get("model_name") or name,
                       path, int(step) if step is not None else None)


def _register(ckpt: dict[str, Any], path: str) -> str:
    """The open_clip name to build; a config carried in the checkpoint is registered under it."""
    import open_clip

    name = ckpt.get("model_name") or ""
    model_cfg = ckpt.get("model_cfg")
    if isinstance(model_cfg, dict):
        name = name or "clipforge-checkpoint"
        models.register_config(name, model_cfg, path)
        return name
    models.register_builtin_configs()
    if name and name in open_clip.list_models():
        return name
    raise DataError(f"{path}: the checkpoint names no usable model (model_name={name!r}, no model_cfg); "
                    "it is not a clipforge checkpoint")


def _from_export(uri: str) -> LoadedModel:
    """open_clip's own `local-dir:` loader, after copying a remote export to a local folder."""
    import open_clip

    local = storage.local_path(uri)
    if local is None:
        local = tempfile.mkdtemp(prefix="clipforge-export-")
        atexit.register(shutil.rmtree, local, ignore_errors=True)
        storage.download_folder(uri, local)
    config = storage.read_json(storage.join(uri, EXPORT_CONFIG))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{local}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{local}")
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{uri}: not a loadable open_clip export: {exc}") from exc
    info = config.get("clipforge", {}) if isinstance(config, dict) else {}
    step = info.get("step")
    return LoadedModel(model, preprocess, tokenizer, info.get("model_name", "local-dir"),
                       uri, int(step) if step is not None else None)
