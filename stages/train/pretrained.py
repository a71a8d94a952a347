"""What `--pretrained` names: a released tag, a Hugging Face Hub repo, or weights at a URI.

Tags (`--pretrained laion2b_s34b_b79k`) and `hf-hub:ORG/REPO` go through open_clip's own loading,
so the Hugging Face cache, `--cache-dir`, `HF_HUB_OFFLINE=1` and `HF_ENDPOINT` work as they do for
open_clip. Anything else is a URI in any store (`.safetensors`, a clipforge or open_clip_train
checkpoint), read by clipforge because open_clip only reads local files.
"""

from __future__ import annotations

import os
from typing import Any

from stages.common.errors import ConfigError, DataError

HF_HUB = "hf-hub:"
_FILE_ENDINGS = (".pt", ".pth", ".bin", ".safetensors", "/LATEST", "/checkpoints")


def kind(spec: str) -> str:
    """'' (none), 'hub', 'tag' or 'uri'."""
    if not spec:
        return ""
    if spec.startswith(HF_HUB):
        return "hub"
    if "://" in spec or "/" in spec or spec.endswith(_FILE_ENDINGS) or os.path.exists(spec):
        return "uri"
    return "tag"


def check_pretrained(cfg: Any) -> None:
    """A tag must be one open_clip knows for the model; checked before anything is downloaded."""
    for flag, spec, model in (("--pretrained", cfg.pretrained, cfg.model),
                              ("--distill-pretrained", cfg.distill_pretrained, cfg.distill_model)):
        if kind(spec) != "tag" or model.startswith(HF_HUB):
            continue
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model)
        if spec not in tags:
            raise ConfigError(f"{flag} {spec}: not a released tag of {model} (its tags: {tags or 'none'}); "
                              "give a tag, hf-hub:ORG/REPO, or a weights URI")
    if kind(cfg.pretrained) == "hub" and cfg.model.startswith(HF_HUB) and cfg.model != cfg.pretrained:
        raise ConfigError(f"--model {cfg.model} and --pretrained {cfg.pretrained} name different Hub repos")


def check_pretrained_image(cfg: Any) -> None:
    """--pretrained-image needs a timm image tower: open_clip has ImageNet weights for those only.

    open_clip (and open_clip_train) silently ignore the flag on other towers; here it is an error,
    once the model name is resolved. timm reads the weights from the Hugging Face cache
    (HF_HOME/HF_HUB_CACHE, HF_HUB_OFFLINE), not from --cache-dir, which open_clip does not pass on.
    """
    if not cfg.pretrained_image or cfg.model.startswith((HF_HUB, "local-dir:")):
        return
    from stages.common.models import model_config

    if "timm_model_name" not in model_config(cfg.model).get("vision_cfg", {}):
        raise ConfigError(f"--pretrained-image: the image tower of {cfg.model} is not a timm model, and "
                          "open_clip has ImageNet weights for timm towers only; drop the flag or choose a "
                          "model with a timm tower (e.g. convnext_base)")


def open_clip_args(model: str, spec: str) -> tuple[str, str | None]:
    """(model name, pretrained) for open_clip.create_model: released weights are open_clip's to load."""
    if spec.startswith(HF_HUB) and (not model or model == spec):
        return spec, None
    if kind(spec) == "tag":
        return model, spec
    return model, None


def hub_weights(spec: str, cache_dir: str | None) -> str:
    """The local path of a Hub repo's open_clip weights, through open_clip's downloader and HF's cache."""
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        return download_pretrained_from_hf(spec[len(HF_HUB):], cache_dir=cache_dir)
    except Exception as exc:
        raise DataError(f"--pretrained {spec}: {exc}{offline_hint()}") from exc


def offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return " (HF_HUB_OFFLINE is set: the weights must already be in the Hugging Face cache or --cache-dir)"
    return ""
