"""Step checkpoints through the stages.common.checkpoints contract (step_<N>.pt, then LATEST).

Everything saved is a tensor, a number, a string, or lists/dicts of them, so `weights_only=True`
loads it: RNG states are stored as tensors and lists, the config as a plain dict.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
import torch

from stages.common import checkpoints
from stages.common.errors import ClipforgeError, DataError
from stages.train.model import unwrap

log = logging.getLogger(__name__)


class NonFiniteWeightsError(ClipforgeError):
    """Refused to write a checkpoint whose weights are NaN/Inf."""

    exit_code = 5


def rng_state() -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                       "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
             "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def assert_finite(state_dict: dict[str, torch.Tensor], step: int) -> None:
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeightsError(f"step {step}: weights {bad[:5]} are NaN/Inf; not writing a "
                                    "checkpoint of them (LATEST still names the last good one)")


def save(ckpt_dir: str, *, step: int, model, optimizer, scaler, trainer_state: dict[str, Any],
         keep_last: int) -> tuple[dict[str, Any], float]:
    """Write step_<step>.pt and LATEST; prune old ones. Returns (LATEST record, seconds taken)."""
    start = time.perf_counter()
    weights = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    assert_finite(weights, step)
    state = {"model": weights, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "rng": rng_state(), **trainer_state}
    pointer = checkpoints.save(ckpt_dir, step, state)
    removed = checkpoints.prune(ckpt_dir, keep_last)
    seconds = time.perf_counter() - start
    log.info("checkpoint step %d -> %s (%.1f MB, %.2fs%s)", step, pointer["uri"], pointer["bytes"] / 1e6,
             seconds, f", pruned {len(removed)}" if removed else "")
    return pointer, seconds


def find_resume(resume: str, ckpt_dir: str) -> str | None:
    """The checkpoint URI to resume from; None when 'latest' finds nothing yet (a fresh start)."""
    if not resume:
        return None
    if resume == "latest":
        latest = checkpoints.read_latest(ckpt_dir)
        return latest["uri"] if latest else None
    return resume


def load_for_resume(uri: str) -> dict[str, Any]:
    ckpt = checkpoints.load(uri)
    if ckpt.get("format") != checkpoints.FORMAT or "optimizer" not in ckpt:
        raise DataError(f"--resume {uri}: not a clipforge training checkpoint (no optimizer state); "
                        "use --pretrained to start from its weights instead")
    return ckpt


def restore(ckpt: dict[str, Any], *, model, optimizer, scaler, rng: bool = True) -> None:
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if rng and ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
