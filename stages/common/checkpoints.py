"""The checkpoint contract between train, evaluate and export: one record, one reader, LATEST.

`{run}/checkpoints/step_<N>.pt` is a torch-saved dict of tensors and plain values, so a plain
`torch.load(path, weights_only=True)` reads it. Its keys (format "clipforge.checkpoint/2"):

    format          "clipforge.checkpoint/2"
    step, epoch, samples_seen       where training stood (epoch: the epoch a resume continues in)
    model           the model's state_dict (unwrapped from DDP/compile), on the CPU
    model_name, model_cfg, preprocess_cfg   the open_clip name, config and preprocess config
    optimizer, scaler               their state_dicts (scaler None unless --precision amp)
    scheduler       the LR schedule's definition and progress (see stages.train.optim)
    progress        {step, epoch, samples_seen, nonfinite_steps, world_size, global_batch_size}
    data            {"world_size": W, "ranks": [each rank's data loader state]} ("ranks" [] at an epoch end)
    rng             {"world_size": W, "ranks": [each rank's torch/numpy/python (and cuda) RNG state]}
    config          the train config that wrote it

`{run}/checkpoints/LATEST` is JSON {step, uri, sha256, bytes, time, history}, written only after
the checkpoint object is complete; `history` lists the previous entries (newest first, at most
HISTORY) that a reader falls back to when the target is missing, corrupt or unloadable. S3 has no
rename, so readers trust only LATEST.

`read()` is the one way to read a checkpoint (train's resume and --pretrained, evaluate, export);
it also accepts format 1 files and open_clip_train's `{"state_dict", "epoch"}` checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from stages.common import storage
from stages.common.errors import DataError, StorageError

log = logging.getLogger(__name__)

FORMAT = "clipforge.checkpoint/2"
FORMAT_V1 = "clipforge.checkpoint/1"
LATEST = "LATEST"
HISTORY = 3  # earlier checkpoints LATEST remembers for fallback (pruning spares the newest of them)
_STEP_RE = re.compile(r"step_(\d+)\.pt$")


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint as every stage sees it; `trainer` holds what only a resume needs."""

    uri: str
    format: str
    step: int
    epoch: int
    samples_seen: int
    model: dict[str, Any]
    model_name: str = ""
    model_cfg: dict[str, Any] | None = None
    preprocess_cfg: dict[str, Any] = dataclasses.field(default_factory=dict)
    trainer: dict[str, Any] | None = None  # optimizer, scaler, scheduler, progress, data, rng, config
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the train config that wrote it
    fallbacks: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (skipped uri, why)

    def summary(self) -> dict[str, Any]:
        """Plain facts about it (no tensors), for model cards and run records."""
        return {"uri": self.uri, "format": self.format, "step": self.step, "epoch": self.epoch,
                "samples_seen": self.samples_seen, "model_name": self.model_name, "config": self.config}


def file_record(*, step: int, epoch: int, samples_seen: int, model: dict, model_name: str,
                model_cfg: dict | None, preprocess_cfg: dict, **trainer: Any) -> dict[str, Any]:
    """The dict a step_<N>.pt holds (format 2); `trainer` keys as listed in the module docstring."""
    return {"format": FORMAT, "step": step, "epoch": epoch, "samples_seen": samples_seen,
            "model": model, "model_name": model_name, "model_cfg": model_cfg,
            "preprocess_cfg": preprocess_cfg, **trainer}


_TRAINER_KEYS = ("optimizer", "scaler", "scheduler", "progress", "data", "rng", "config")


def from_file_dict(uri: str, raw: dict[str, Any]) -> Checkpoint:
    """Type a loaded dict: format 2, format 1, or open_clip_train's layout."""
    fmt = raw.get("format")
    if fmt == FORMAT:
        trainer = {k: raw.get(k) for k in _TRAINER_KEYS} if raw.get("optimizer") is not None else None
        return Checkpoint(uri, fmt, int(raw["step"]), int(raw["epoch"]), int(raw["samples_seen"]),
                          raw["model"], raw.get("model_name") or "", raw.get("model_cfg"),
                          raw.get("preprocess_cfg") or {}, trainer, raw.get("config") or {})
    if fmt == FORMAT_V1:
        return _from_v1(uri, raw)
    if isinstance(raw.get("state_dict"), dict):  # open_clip_train, maybe DDP-prefixed
        return _from_open_clip_train(uri, raw)
    raise DataError(f"{uri} is not a clipforge/open_clip checkpoint: no 'model' or 'state_dict'")


def _from_open_clip_train(uri: str, raw: dict[str, Any]) -> Checkpoint:
    """open_clip_train's {epoch, name, state_dict, optimizer[, scaler]}, written at an epoch's end.

    Its `name` is the experiment's; the model's name is in the params.txt it writes beside
    checkpoints/. It has no loader position or RNG state: a resume starts epoch `epoch` afresh
    (the step it continues at follows from the steps per epoch, which only the trainer knows).
    """
    state = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}
    epoch = int(raw.get("epoch", 0))
    trainer = None
    if raw.get("optimizer") is not None:
        trainer = {"optimizer": raw["optimizer"], "scaler": raw.get("scaler"),
                   "progress": {"step": 0, "epoch": epoch, "samples_seen": 0, "epoch_samples": 0},
                   "data": {"world_size": 0, "ranks": []}, "rng": {"world_size": 0, "ranks": []}}
    return Checkpoint(uri, "open_clip_train", int(raw.get("step", 0)), epoch, 0, state,
                      open_clip_train_model(uri), trainer=trainer)


def _from_v1(uri: str, raw: dict[str, Any]) -> Checkpoint:
    """Format 1 kept rank 0's RNG and data position only; it maps onto format 2's per-rank lists."""
    trainer = None
    if raw.get("optimizer") is not None:
        world = int((raw.get("config") or {}).get("world_size", 0) or 0)
        trainer = {k: raw.get(k) for k in ("optimizer", "scaler", "scheduler", "config")}
        trainer["progress"] = {"step": int(raw["step"]), "epoch": int(raw.get("epoch", 0)),
                               "samples_seen": int(raw.get("samples_seen", 0)),
                               "nonfinite_steps": int(raw.get("nonfinite_steps", 0))}
        data = raw.get("data_state")
        trainer["data"] = {"world_size": world, "ranks": [data] if data else []}
        trainer["rng"] = {"world_size": world, "ranks": [raw["rng"]] if raw.get("rng") else []}
    return Checkpoint(uri, FORMAT_V1, int(raw["step"]), int(raw.get("epoch", 0)), int(raw.get("samples_seen", 0)),
                      raw["model"], raw.get("model_name") or "", raw.get("model_cfg"),
                      raw.get("preprocess_cfg") or {}, trainer, raw.get("config") or {})


# ---------------------------------------------------------------- where checkpoints are

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


def _step_of(uri: str) -> int | None:
    """The step a checkpoint URI names (URIs of one file may differ: relative vs absolute paths)."""
    m = _STEP_RE.search(uri)
    return int(m.group(1)) if m else None


def read_latest(ckpt_dir: str) -> dict[str, Any] | None:
    uri = storage.join(ckpt_dir, LATEST)
    if not storage.exists(uri):
        return None
    pointer = storage.read_json(uri)
    if not isinstance(pointer, dict) or "uri" not in pointer:
        raise DataError(f"{uri} is not a clipforge LATEST pointer (no 'uri')")
    return pointer


def pointer_entries(pointer: dict[str, Any]) -> list[dict[str, Any]]:
    """LATEST's target, then its history, newest first."""
    head = {k: v for k, v in pointer.items() if k != "history"}
    return [head, *pointer.get("history", [])]


def _find_pointer(uri: str) -> tuple[str, dict[str, Any]] | None:
    """The LATEST a URI means (itself, in it, or in its checkpoints/), with its folder."""
    stripped = uri.rstrip("/")
    if stripped.endswith("/" + LATEST) or stripped == LATEST:
        folder = stripped.rsplit("/", 1)[0] if "/" in stripped else "."
        pointer = read_latest(folder)
        if pointer is None:
            raise DataError(f"{uri}: no such LATEST pointer")
        return folder, pointer
    for folder in (stripped, storage.join(stripped, "checkpoints")):
        pointer = read_latest(folder)
        if pointer is not None:
            return folder, pointer
    return None


# ---------------------------------------------------------------- reading

def read(uri: str, map_location: str = "cpu") -> Checkpoint:
    """The one reader: a step_<N>.pt, a LATEST file, a checkpoints/ folder or a run folder.

    Through LATEST the sha256 is verified and a missing, corrupt or unloadable target falls back
    to the newest earlier entry that verifies (logged, and listed in `.fallbacks`). A file named
    directly is verified when LATEST in its folder knows its hash.
    """
    if uri.rstrip("/").endswith(".pt"):
        return _read_file(uri.rstrip("/"), _known_sha256(uri.rstrip("/")), map_location)
    found = _find_pointer(uri)
    if found is None:
        raise DataError(f"{uri}: no checkpoint there (expected a step_<N>.pt file, a LATEST pointer, "
                        "a checkpoints/ folder or a run folder with checkpoints/LATEST)")
    return read_through(found[1], map_location, where=f"{found[0]}/{LATEST}")


def read_through(pointer: dict[str, Any], map_location: str = "cpu", where: str = LATEST) -> Checkpoint:
    skipped: list[tuple[str, str]] = []
    for entry in pointer_entries(pointer):
        try:
            ckpt = _read_file(entry["uri"], entry.get("sha256"), map_location)
        except (DataError, StorageError) as exc:
            skipped.append((entry["uri"], str(exc)))
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one", entry["uri"], exc)
            continue
        if skipped:
            log.warning("%s: loaded %s (step %d) instead of %s", where, ckpt.uri, ckpt.step, skipped[0][0])
        ckpt.fallbacks = skipped
        return ckpt
    raise DataError(f"{where}: no checkpoint it names verifies: "
                    + "; ".join(f"{u}: {why}" for u, why in skipped))


def _known_sha256(path: str) -> str | None:
    folder = path.rsplit("/", 1)[0]
    try:
        pointer = read_latest(folder)
    except (DataError, StorageError):
        return None
    for entry in pointer_entries(pointer) if pointer else []:
        if _step_of(entry.get("uri", "")) == _step_of(path):
            return entry.get("sha256")
    return None


def _read_file(path: str, sha256: str | None, map_location: str) -> Checkpoint:
    import io

    import torch

    try:
        data = storage.read_bytes(path)
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise DataError(f"{path}: no such checkpoint") from exc
        raise
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{path}: sha256 does not match LATEST; the checkpoint is corrupt, incomplete "
                        "or was replaced")
    try:
        raw = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise DataError(f"{path} is not a loadable clipforge/open_clip checkpoint: {exc}") from exc
    del data
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a clipforge/open_clip checkpoint (a {type(raw).__name__})")
    try:
        return from_file_dict(path, raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: a clipforge checkpoint without a valid {exc}") from exc


# ---------------------------------------------------------------- writing

class _Hashing:
    """A write-only stream that hashes and counts what passes through it to the store."""

    def __init__(self, out: BinaryIO):
        self.out, self.sha256, self.bytes = out, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def write_stream(uri: str, write: Callable[[Any], None]) -> tuple[str, int]:
    """Stream `write(stream)` to a new object at `uri`; returns (sha256, bytes).

    Local: a temporary file renamed into place. S3: fsspec's buffered writer, a multipart upload
    the store publishes only on completion. Either way a reader never sees a part, and nothing
    holds a second whole copy in memory. Transient failures rewrite the object from the start.
    """
    def attempt() -> tuple[str, int]:
        with storage.open_atomic_write(uri) as out:
            stream = _Hashing(out)
            write(stream)
        return stream.sha256.hexdigest(), stream.bytes
    return storage.retrying("writing", uri, attempt)


def publish(ckpt_dir: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Point LATEST at a complete checkpoint, keeping the previous HISTORY entries for fallback."""
    previous = read_latest(ckpt_dir)
    history = [e for e in pointer_entries(previous) if e["uri"] != entry["uri"]] if previous else []
    pointer = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "history": history[:HISTORY]}
    storage.write_json(storage.join(ckpt_dir, LATEST), pointer)
    return pointer


def save(ckpt_dir: str, step: int, state: dict[str, Any]) -> dict[str, Any]:
    """Write step_<step>.pt synchronously, then LATEST. Returns the LATEST record."""
    import torch

    record = {"format": FORMAT, "step": step, "epoch": 0, "samples_seen": 0, **state}
    uri = checkpoint_uri(ckpt_dir, step)
    sha256, size = write_stream(uri, lambda f: torch.save(record, f))
    return publish(ckpt_dir, {"step": step, "uri": uri, "sha256": sha256, "bytes": size})


def prune(ckpt_dir: str, keep_last: int) -> tuple[list[str], list[str]]:
    """Delete all but the newest `keep_last` step checkpoints; returns (deleted, failures).

    Never deletes LATEST's target nor the newest earlier checkpoint it falls back to, so at
    least two survive. A delete that fails is reported, not raised: a store that refuses deletes
    must not stop a healthy run.
    """
    if keep_last <= 0:
        return [], []
    try:
        latest = read_latest(ckpt_dir)
        protected = {_step_of(e["uri"]) for e in pointer_entries(latest)[:2]} if latest else set()
        doomed = [uri for step, uri in list_checkpoints(ckpt_dir)[:-keep_last] if step not in protected]
    except (DataError, StorageError) as exc:
        return [], [f"{ckpt_dir}: {exc}"]
    deleted, failures = [], []
    for uri in doomed:
        try:
            storage.delete(uri)
            deleted.append(uri)
        except StorageError as exc:
            failures.append(str(exc))
    return deleted, failures


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
