"""Every random generator a rank draws from (torch, CUDA, numpy, Python), as a weights_only-loadable state.

Tensors and plain lists only, so `torch.load(weights_only=True)` reads it back.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


class RNGState:
    """Stateful: this rank's generators."""

    def state_dict(self) -> dict[str, Any]:
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        py_version, py_internal, py_gauss = random.getstate()
        state = {"torch": torch.get_rng_state(),
                 "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                           "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
                 "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
