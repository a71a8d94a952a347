"""A checkpoint's model, checked against its config, as the files of open_clip's Hub layout."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from stages.common import checkpoint_model
from stages.common.redact import redact

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_checkpoint_model(uri: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(model with the checkpoint's weights, the checkpoint's facts, its open_clip model config)."""
    loaded = checkpoint_model.load(uri)
    return loaded.model, loaded.checkpoint.summary(), loaded.model_cfg


def hub_config(model: torch.nn.Module, model_cfg: dict[str, Any], ckpt: dict[str, Any]) -> dict[str, Any]:
    """open_clip_config.json: what `local-dir:`/`hf-hub:` loading reads, plus where it came from."""
    return {"model_cfg": model_cfg,
            "preprocess_cfg": dict(model.visual.preprocess_cfg),
            "clipforge": {"model_name": ckpt.get("model_name") or "", "step": ckpt.get("step"),
                          "checkpoint": ckpt["uri"]}}


def cast_state_dict(model: torch.nn.Module, dtype: str) -> dict[str, torch.Tensor]:
    """Weights only: floating-point tensors in `dtype`, others as they are; contiguous for safetensors."""
    target = TORCH_DTYPES[dtype]
    return {k: (v.to(target) if v.is_floating_point() else v).contiguous()
            for k, v in model.state_dict().items()}


def write_layout(folder: str, model: torch.nn.Module, model_cfg: dict[str, Any], ckpt: dict[str, Any],
                 dtype: str) -> None:
    from safetensors.torch import save_file

    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(redact(hub_config(model, model_cfg, ckpt)), f, indent=2)  # public, like the card
    save_file(cast_state_dict(model, dtype), os.path.join(folder, WEIGHTS_NAME),
              metadata={"format": "pt", "dtype": dtype})
