"""Build the model to evaluate from a clipforge/open_clip checkpoint or an exported open_clip folder."""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from collections.abc import Callable

import torch

from stages.common import checkpoint_model, storage
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
    loaded = checkpoint_model.load(uri)
    ckpt = loaded.checkpoint
    return LoadedModel(loaded.model, loaded.preprocess, loaded.tokenizer, ckpt.model_name or loaded.name,
                       ckpt.uri, ckpt.step)


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
