"""Resuming from open_clip_train's own checkpoints (`epoch_N.pt`, `epoch_latest.pt`).

open_clip_train saves {epoch, name, state_dict, optimizer[, scaler]} at the end of an epoch; its
optimizer groups are the ones clipforge builds, so model, optimizer and GradScaler carry over and
the run continues at the first step of epoch N with the same LR schedule. Its checkpoints carry no
loader position or RNG state: the data order of the next epoch is clipforge's.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import torch

from stages.common import storage
from stages.common.errors import DataError
from stages.train import checkpoint

log = logging.getLogger(__name__)

FORMAT = "open_clip_train"
_EPOCH_FILE = re.compile(r"epoch_(\d+|latest)\.pt$")


def load_for_resume(uri: str) -> dict[str, Any]:
    """A checkpoint for resume: clipforge's (through stages.train.checkpoint) or open_clip_train's."""
    if not _EPOCH_FILE.search(uri.rstrip("/")):
        return checkpoint.load_for_resume(uri)
    if not storage.exists(uri):
        raise DataError(f"--resume {uri}: no such checkpoint")
    try:
        raw = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"--resume {uri}: not a loadable checkpoint: {exc}") from exc
    if not isinstance(raw, dict) or "state_dict" not in raw or "epoch" not in raw or "optimizer" not in raw:
        if isinstance(raw, dict) and raw.get("format"):
            return checkpoint.load_for_resume(uri)
        raise DataError(f"--resume {uri}: not an open_clip_train training checkpoint (needs epoch, state_dict "
                        "and optimizer); use --pretrained to start from its weights instead")
    state = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}
    return {"format": FORMAT, "model": state, "optimizer": raw["optimizer"], "scaler": raw.get("scaler"),
            "epoch": int(raw["epoch"]), "step": 0, "samples_seen": 0, "data_state": None, "rng": None,
            "uri": uri}


def place(ckpt: dict[str, Any] | None, progress: Any, steps_per_epoch: int) -> None:
    """open_clip_train counts epochs; the step an epoch-N checkpoint resumes at is N x steps per epoch."""
    if not ckpt or ckpt.get("format") != FORMAT:
        return
    progress.step = ckpt["epoch"] * steps_per_epoch
    log.info("open_clip_train checkpoint of epoch %d: continuing at step %d", ckpt["epoch"], progress.step)
