"""Stock models for a baseline row: an open_clip name with a pretrained tag, hf-hub:, local-dir:,
or a name with a weights file (an open_clip_train epoch_N.pt checkpoint included), all through
open_clip's own loading, so weights come from the Hugging Face cache as open_clip fetches them
(HF_HUB_OFFLINE=1 reads only the cache)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

from stages.common import models, storage
from stages.common.errors import ConfigError, DataError
from stages.evaluate.model import LoadedModel

HUB_PREFIXES = ("hf-hub:", "local-dir:")


def check(model: str, pretrained: str) -> None:
    """Cheap checks before anything is downloaded: the name and the tag are known to open_clip."""
    import open_clip

    models.register_builtin_configs()
    if model.startswith(HUB_PREFIXES):
        if pretrained:
            raise ConfigError(f"--model {model}: the weights come with it; leave --pretrained out")
        return
    if model not in open_clip.list_models():
        raise ConfigError(f"--model {model!r} is not a known open_clip model (open_clip.list_models()); "
                          "or give hf-hub:ORG/REPO / local-dir:PATH")
    if pretrained and not _is_path(pretrained) and not pretrained.startswith("hf-hub:"):
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise ConfigError(f"--pretrained {pretrained!r} is not a tag of {model} (tags: {tags}); "
                              "or give a weights file URI")


def _is_path(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _local(uri: str) -> str:
    local = storage.local_path(uri)
    if local is not None:
        return local
    folder = tempfile.mkdtemp(prefix="clipforge-weights-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    target = os.path.join(folder, uri.rstrip("/").rsplit("/", 1)[-1])
    storage.download_file(uri, target)
    return target


def load(model: str, pretrained: str, device: torch.device) -> LoadedModel:
    import open_clip

    check(model, pretrained)
    weights = _local(pretrained) if pretrained and _is_path(pretrained) else pretrained or None
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights,
                                                                   load_weights=True)
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"--model {model} --pretrained {pretrained}: cannot load the weights: {exc}") from exc
    label = f"{model}:{pretrained}" if pretrained else model
    net.to(device).eval()
    return LoadedModel(net, preprocess, open_clip.get_tokenizer(model), label, pretrained or model, None)
