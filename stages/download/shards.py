"""What img2dataset left in the data folder: complete shards, partial ones, and their stats.

img2dataset writes `NNNNN.tar` and `NNNNN.parquet` while a shard downloads and `NNNNN_stats.json`
last, so a shard is complete exactly when its stats file exists. A killed run leaves partial
tars behind; they are removed before a rerun so nothing half-written survives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from dataclasses import dataclass, field

from stages.common import storage
from stages.download.guard import REFUSAL_PREFIX

_STATS_RE = re.compile(r"(\d+)_stats\.json$")
_SHARD_FILE_RE = re.compile(r"(\d+)\.(tar|parquet)$")


@dataclass
class ShardStats:
    shard_id: int
    tar_uri: str
    attempted: int
    succeeded: int
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count
    duration_s: float = 0.0

    def to_json(self) -> dict:
        return {"shard_id": self.shard_id, "tar": self.tar_uri, "attempted": self.attempted,
                "succeeded": self.succeeded, "failures": self.failures,
                "duration_s": round(self.duration_s, 3)}

    @classmethod
    def from_json(cls, d: dict) -> ShardStats:
        return cls(shard_id=int(d["shard_id"]), tar_uri=d["tar"], attempted=int(d["attempted"]),
                   succeeded=int(d["succeeded"]), failures={k: int(v) for k, v in d["failures"].items()},
                   duration_s=float(d.get("duration_s", 0.0)))


def failure_reason(message: str) -> str:
    """Group img2dataset's error messages into a few stable reasons (metric label values)."""
    if message.startswith(REFUSAL_PREFIX):  # the fetch guard's own reasons, e.g. "refused_private"
        return message[len(REFUSAL_PREFIX):].split(":", 1)[0].strip()
    text = message.lower()
    if m := re.search(r"http error (\d{3})", text):
        return f"http_{m.group(1)}"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "cannot identify image" in text or "image file is truncated" in text or "decod" in text:
        return "not_an_image"
    if "x-robots-tag" in text:
        return "disallowed"
    if "hash mismatch" in text:
        return "hash_mismatch"
    if any(s in text for s in ("connection refused", "connection reset", "urlopen error",
                               "remote end closed", "name or service not known")):
        return "connection_error"
    if any(s in text for s in ("image too small", "area too large", "aspect ratio too large")):
        return "filtered"
    return "other"


def stats_uris(data_dir: str) -> dict[int, str]:
    """shard id → URI of its _stats.json, for every complete shard.

    Other processes write the folder, so a cached listing (s3fs keeps one) would be stale.
    """
    fs, path = storage.filesystem(data_dir)
    fs.invalidate_cache(path)
    out = {}
    for uri in storage.listdir(data_dir):
        if m := _STATS_RE.search(uri):
            out[int(m.group(1))] = uri
    return out


def read_stats(data_dir: str, shard_id: int, stats_uri: str) -> ShardStats:
    raw = json.loads(storage.read_bytes(stats_uri))
    name = stats_uri.rsplit("/", 1)[-1].removesuffix("_stats.json")
    status = {k: int(v) for k, v in (raw.get("status_dict") or {}).items()}
    return ShardStats(shard_id=shard_id, tar_uri=storage.join(data_dir, f"{name}.tar"),
                      attempted=int(raw.get("count", 0)), succeeded=int(raw.get("successes", 0)),
                      failures=group_failures(status), duration_s=float(raw.get("duration", 0.0)))


def group_failures(status: dict[str, int]) -> dict[str, int]:
    """img2dataset's per-message counts grouped by reason (successes left out)."""
    out: dict[str, int] = {}
    for message, n in status.items():
        if message != "success":
            reason = failure_reason(message)
            out[reason] = out.get(reason, 0) + n
    return dict(sorted(out.items()))


def remove_partial(data_dir: str, owned: Container[int] | None = None) -> list[str]:
    """Delete tars/parquets of shards without stats (a killed run's leftovers); returns them.

    With `owned`, only those shard ids are touched: other parts may be writing theirs right now.
    """
    complete = set(stats_uris(data_dir))
    doomed = [uri for uri in storage.listdir(data_dir)
              if (m := _SHARD_FILE_RE.search(uri)) and int(m.group(1)) not in complete
              and (owned is None or int(m.group(1)) in owned)]
    for uri in doomed:
        storage.delete(uri)
    return doomed


def tar_sizes(data_dir: str) -> dict[str, int]:
    """URI → size in bytes of every tar in the folder, from one listing."""
    fs, path = storage.filesystem(data_dir)
    entries = storage.retrying("listing", data_dir, lambda: fs.ls(path, detail=True))
    out = {}
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".tar"):
            out[storage.join(data_dir, name)] = int(entry.get("size") or 0)
    return out
