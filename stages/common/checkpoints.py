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

A sharded checkpoint (--fsdp, or --checkpoint-format sharded) is a folder `step_<N>/` written by
torch.distributed.checkpoint (DCP): one `__<rank>_<i>.distcp` file per rank, DCP's `.metadata`
(written last, by rank 0, once every rank's files are complete) holding "model" and "optimizer"
(keyed by parameter name); beside them `trainer.pt`, a torch-saved dict of everything else listed
above (format, step, progress, scheduler, data, rng, config, model_name, ...), and each rank's
`__<rank>_files.json` (bytes and sha256 of the files it wrote). Its LATEST entry is
{step, uri (the folder), format "sharded", sha256 (of .metadata), bytes, files {name: {bytes,
sha256}}[, consolidated {uri, sha256, bytes}]}. A folder *verifies* when `.metadata` is there and
every file it names, and trainer.pt, is there with the bytes and sha256 that LATEST records (named
directly without a LATEST that knows it: when they are all there). On request the whole checkpoint
is also written as one format-2 file, `step_<N>/consolidated.pt`.

`read()` is the one way to read a checkpoint (train's resume and --pretrained, evaluate, export);
it also accepts format 1 files, sharded folders (read in this process, no process group needed)
and open_clip_train's `{"state_dict", "epoch"}` checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from stages.common import storage
from stages.common.errors import DataError, StorageError

log = logging.getLogger(__name__)

FORMAT = "clipforge.checkpoint/2"
FORMAT_V1 = "clipforge.checkpoint/1"
LATEST = "LATEST"
HISTORY = 3  # earlier checkpoints LATEST remembers for fallback (pruning spares the newest of them)
_STEP_RE = re.compile(r"step_(\d+)(?:\.pt)?/?$")  # step_<N>.pt, or a sharded step_<N>/ folder
SHARDED = "sharded"               # the LATEST entry's format of a step_<N>/ folder
DCP_METADATA = ".metadata"        # DCP's; written last, after every rank's shard files
TRAINER_FILE = "trainer.pt"       # a sharded checkpoint's non-tensor state (and the RNG states)
CONSOLIDATED = "consolidated.pt"  # the whole checkpoint as one file, on request


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
    shards: str | None = None  # a sharded checkpoint's folder: resume loads model and optimizer from it

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


def sharded_uri(ckpt_dir: str, step: int) -> str:
    return storage.join(ckpt_dir, f"step_{step}")


def is_folder(uri: str) -> bool:
    """Whether a step checkpoint URI is a sharded folder (not a step_<N>.pt)."""
    return not uri.rstrip("/").endswith(".pt")


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, uri) of every step checkpoint (file or sharded folder) in a folder, by step."""
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

def read(uri: str, map_location: str = "cpu", tensors: bool = True) -> Checkpoint:
    """The one reader: a step_<N>.pt, a sharded step_<N>/ folder, a LATEST file, a checkpoints/
    folder or a run folder.

    Through LATEST the sha256 is verified and a missing, corrupt or unloadable target falls back
    to the newest earlier entry that verifies (logged, and listed in `.fallbacks`). A file named
    directly is verified when LATEST in its folder knows its hash. `tensors=False`: a sharded
    checkpoint is verified but its model is not loaded (a resume loads it sharded, from `.shards`).
    """
    if uri.rstrip("/").endswith(".pt"):
        return _read_file(uri.rstrip("/"), _known_sha256(uri.rstrip("/")), map_location)
    if storage.exists(storage.join(uri.rstrip("/"), DCP_METADATA)):
        folder = uri.rstrip("/")
        return _read_folder(folder, _known_entry(folder).get("files"), tensors)
    found = _find_pointer(uri)
    if found is None:
        raise DataError(f"{uri}: no checkpoint there (expected a step_<N>.pt file, a LATEST pointer, "
                        "a checkpoints/ folder or a run folder with checkpoints/LATEST)")
    return read_through(found[1], map_location, where=f"{found[0]}/{LATEST}", tensors=tensors)


def read_through(pointer: dict[str, Any], map_location: str = "cpu", where: str = LATEST,
                 tensors: bool = True) -> Checkpoint:
    skipped: list[tuple[str, str]] = []
    for entry in pointer_entries(pointer):
        try:
            if is_folder(entry["uri"]):
                ckpt = _read_folder(entry["uri"].rstrip("/"), entry.get("files"), tensors)
            else:
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


def _known_entry(path: str) -> dict[str, Any]:
    """LATEST's entry (in the folder above) for the step checkpoint at `path`; {} when none knows it."""
    folder = path.rsplit("/", 1)[0]
    try:
        pointer = read_latest(folder)
    except (DataError, StorageError):
        return {}
    for entry in pointer_entries(pointer) if pointer else []:
        if _step_of(entry.get("uri", "")) == _step_of(path):
            return entry
    return {}


def _known_sha256(path: str) -> str | None:
    if path.endswith("/" + CONSOLIDATED):  # step_<N>/consolidated.pt: its folder's entry knows it
        return (_known_entry(path.rsplit("/", 1)[0]).get("consolidated") or {}).get("sha256")
    return _known_entry(path).get("sha256")


# ---------------------------------------------------------------- sharded folders

def load_sharded(folder: str, keys: set[str] | None = None) -> dict[str, Any]:
    """Full tensors of a DCP checkpoint, read in this process (no process group), as
    torch.distributed.checkpoint.format_utils.dcp_to_torch_save reads them, on any fsspec store.
    `keys`: top-level entries to read ("model", "optimizer"); None: all."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=shard_reader(folder),
                     planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return state


def shard_reader(folder: str):
    """DCP's fsspec reader on the filesystem stages.common.storage configures (S3 endpoint, timeouts)."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    reader = FsspecReader(folder)
    reader.fs.fs = storage.filesystem(folder)[0]
    return reader


@contextlib.contextmanager
def _missing_is(message: str) -> Iterator[None]:
    """A store error for an object that is not there becomes DataError(message); others stay."""
    try:
        yield
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise DataError(message) from exc
        raise


def shard_files(folder: str) -> set[str]:
    """The files DCP's .metadata names (relative to the folder)."""
    import pickle

    try:
        with _missing_is(f"{folder}: no {DCP_METADATA}; the sharded checkpoint is incomplete"):
            metadata = pickle.loads(storage.read_bytes(storage.join(folder, DCP_METADATA)))
        return {info.relative_path for info in metadata.storage_data.values()}
    except (DataError, StorageError):
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt metadata file
        raise DataError(f"{folder}/{DCP_METADATA} is not DCP metadata: {exc}") from exc


def verify_folder(folder: str, files: dict[str, dict[str, Any]] | None) -> None:
    """Raise DataError unless the folder verifies (see the module docstring)."""
    if files and DCP_METADATA in files:
        _verify_file(folder, DCP_METADATA, files[DCP_METADATA])
    needed = shard_files(folder) | {TRAINER_FILE}
    for name in sorted(needed):
        if files is None:
            if not storage.exists(storage.join(folder, name)):
                raise DataError(f"{folder}: {name} is missing; the sharded checkpoint is incomplete")
        elif name not in files:
            raise DataError(f"{folder}: {name} is not among the files LATEST records for it")
        else:
            _verify_file(folder, name, files[name])


def _verify_file(folder: str, name: str, record: dict[str, Any]) -> None:
    uri = storage.join(folder, name)
    with _missing_is(f"{uri}: missing; the sharded checkpoint is incomplete"):
        found = storage.size(uri)
    if found != record["bytes"]:
        raise DataError(f"{uri}: {found} bytes, LATEST records {record['bytes']}; the shard is "
                        "truncated or was replaced")
    if hash_object(uri) != record["sha256"]:
        raise DataError(f"{uri}: sha256 does not match LATEST; the shard is corrupt or was replaced")


def hash_object(uri: str, chunk: int = 16 * 2**20) -> str:
    digest = hashlib.sha256()
    with storage.open_read(uri) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_folder(folder: str, files: dict[str, dict[str, Any]] | None, tensors: bool = True) -> Checkpoint:
    import io

    import torch

    verify_folder(folder, files)
    side_uri = storage.join(folder, TRAINER_FILE)
    try:
        side = torch.load(io.BytesIO(storage.read_bytes(side_uri)), map_location="cpu", weights_only=True)
        model = load_sharded(folder, {"model"})["model"] if tensors else {}
    except (DataError, StorageError):
        raise
    except Exception as exc:
        raise DataError(f"{folder} is not a loadable sharded clipforge checkpoint: {exc}") from exc
    trainer = {k: side.get(k) for k in _TRAINER_KEYS}  # "optimizer" stays in the shards
    return Checkpoint(folder, side["format"], int(side["step"]), int(side["epoch"]), int(side["samples_seen"]),
                      model, side.get("model_name") or "", side.get("model_cfg"),
                      side.get("preprocess_cfg") or {}, trainer, side.get("config") or {}, shards=folder)


def _read_file(path: str, sha256: str | None, map_location: str) -> Checkpoint:
    import io

    import torch

    with _missing_is(f"{path}: no such checkpoint"):
        data = storage.read_bytes(path)
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

class HashingStream:
    """A stream to the store that hashes and counts what is written through it; every other call
    (flush, tell, fileno: what torch.save and DCP's writer use) goes to the real stream."""

    def __init__(self, out: BinaryIO):
        self.out, self.sha256, self.bytes = out, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        size = memoryview(data).nbytes
        self.bytes += size
        self.out.write(data)
        return size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.out, name)


def write_stream(uri: str, write: Callable[[Any], None]) -> tuple[str, int]:
    """Stream `write(stream)` to a new object at `uri`; returns (sha256, bytes).

    Local: a temporary file renamed into place. S3: fsspec's buffered writer, a multipart upload
    the store publishes only on completion. Either way a reader never sees a part, and nothing
    holds a second whole copy in memory. Transient failures rewrite the object from the start.
    """
    def attempt() -> tuple[str, int]:
        with storage.open_atomic_write(uri) as out:
            stream = HashingStream(out)
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
            storage.delete(uri, recursive=is_folder(uri))
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
