"""Container image names of the stages: one image per stage, registry and tag configurable."""

from __future__ import annotations

import os

STAGES = ("download", "train", "evaluate", "export")
DEFAULT_REGISTRY = "ghcr.io/clipforge"
DEFAULT_TAG = "latest"


def image(stage: str, registry: str = "", tag: str = "") -> str:
    """`{registry}/clipforge-{stage}:{tag}`; $CLIPFORGE_REGISTRY / $CLIPFORGE_TAG override the defaults."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    registry = (registry or os.environ.get("CLIPFORGE_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")
    tag = tag or os.environ.get("CLIPFORGE_TAG") or DEFAULT_TAG
    return f"{registry}/clipforge-{stage}:{tag}"
