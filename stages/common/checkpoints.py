"""The checkpoint contract between train, evaluate and export.

`{run}/checkpoints/step_<N>.pt` is a torch-saved dict of tensors and plain values (loadable with
`weights_only=True`):

    format        "clipforge.checkpoint/1"
    step, epoch, samples_seen
    model         the model's state_dict (unwrapped from DDP/compile)
    model_name    open_clip model name; model_cfg: its open_clip config (so any reader can rebuild it)
    preprocess_cfg  open_clip preprocess config (image size, mean, std, interpolation, resize mode)
    optimizer, scaler, scheduler, data_state, rng, config   (trainer state, for resume)

`{run}/checkpoints/LATEST` is JSON {step, uri, sha256, bytes, time}, written only after the
checkpoint object is complete. S3 has no rename, so readers trust only LATEST.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from typing import Any

from stages.common import storage
from stages.common.errors import DataError

FORMAT = "clipforge.checkpoint/1"
LATEST = "LATEST"
_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def checkpoint_uri(ckpt_dir: str, step: int) -> str:
    return storage.join(ckpt_dir, f"step_{step}.pt")


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, uri) of every step checkpoint in a folder, by step."""
    found = []
    for uri in storage.listdir(ckpt_dir):
        m = _STEP_RE.search(uri)
        if m:
            found.append((int(m.group(1)), uri))
    return sorted(found)


def save(ckpt_dir: str, step: int, state: dict[str, Any]) -> dict[str, Any]:
    """Write step_<step>.pt, then point LATEST at it. Returns the LATEST record."""
    import torch

    buf = io.BytesIO()
    torch.save({"format": FORMAT, "step": step, **state}, buf)
    data = buf.getvalue()
    uri = checkpoint_uri(ckpt_dir, step)
    storage.write_bytes(uri, data)
    pointer = {"step": step, "uri": uri, "sha256": hashlib.sha256(data).hexdigest(),
               "bytes": len(data), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json(storage.join(ckpt_dir, LATEST), pointer)
    return pointer


def prune(ckpt_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` step checkpoints (never the one LATEST names)."""
    if keep_last <= 0:
        return []
    latest = read_latest(ckpt_dir)
    keep_uri = latest["uri"] if latest else None
    doomed = [uri for _, uri in list_checkpoints(ckpt_dir)[:-keep_last] if uri != keep_uri]
    for uri in doomed:
        storage.delete(uri)
    return doomed


def read_latest(ckpt_dir: str) -> dict[str, Any] | None:
    uri = storage.join(ckpt_dir, LATEST)
    return storage.read_json(uri) if storage.exists(uri) else None


def resolve(uri: str) -> tuple[str, str | None]:
    """The checkpoint file a URI means, and its expected sha256 when known.

    Accepts a checkpoint file, a LATEST file, a checkpoints folder, or a run folder.
    """
    stripped = uri.rstrip("/")
    if stripped.endswith(".pt"):
        return stripped, None
    for candidate in (stripped if stripped.endswith(LATEST) else None,
                      storage.join(stripped, LATEST), storage.join(stripped, "checkpoints", LATEST)):
        if candidate and storage.exists(candidate):
            pointer = storage.read_json(candidate)
            if not isinstance(pointer, dict) or "uri" not in pointer:
                raise DataError(f"{candidate} is not a clipforge LATEST pointer (no 'uri')")
            return pointer["uri"], pointer.get("sha256")
    raise DataError(f"{uri}: no checkpoint there (expected a step_<N>.pt file, a LATEST pointer, "
                    "a checkpoints/ folder or a run folder with checkpoints/LATEST)")


def load(uri: str, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) after resolving LATEST and checking its sha256."""
    import torch

    path, sha256 = resolve(uri)
    data = storage.read_bytes(path)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{path}: sha256 does not match LATEST; the checkpoint is incomplete or was replaced")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise DataError(f"{path} is not a loadable clipforge/open_clip checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise DataError(f"{path} is not a clipforge/open_clip checkpoint (a {type(ckpt).__name__})")
    if ckpt.get("format") != FORMAT:
        ckpt = _from_open_clip(path, ckpt)
    ckpt["uri"] = path
    return ckpt


def _from_open_clip(path: str, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Accept open_clip_train's checkpoints ({'state_dict', 'epoch', ...}, maybe DDP-prefixed)."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise DataError(f"{path} is not a clipforge/open_clip checkpoint: no 'model' or 'state_dict'")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {"format": "open_clip_train", "model": state, "step": ckpt.get("step", 0),
            "epoch": ckpt.get("epoch", 0), "model_name": open_clip_train_model(path) or ckpt.get("name", "")}


def open_clip_train_model(path: str) -> str:
    """The --model of the open_clip_train run a checkpoint belongs to, from the params.txt it writes
    beside checkpoints/ ({logs}/{name}/params.txt); '' when there is none."""
    params = storage.join(path.rsplit("/", 2)[0], "params.txt") if path.count("/") >= 2 else ""
    if not params or not storage.exists(params):
        return ""
    for line in storage.read_text(params).splitlines():
        key, _, value = line.partition(": ")
        if key == "model":
            return value.strip()
    return ""
