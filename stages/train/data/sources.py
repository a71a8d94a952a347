"""What --train-data / --val-data name: '::'-joined sources of shards, their sample counts and weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

from braceexpand import braceexpand

from stages.common import shards as wds_shards
from stages.common import storage
from stages.common.errors import DataError


@dataclass
class Source:
    """One '::' part of --train-data: its shards, their sample counts (None: unknown), its weight."""

    spec: str
    shards: list[str]
    samples: list[int | None]
    weight: float = 1.0


def _expand_pattern(spec: str) -> list[str]:
    out: list[str] = []
    for item in braceexpand(spec):
        out.extend(storage.glob(item) if any(c in item for c in "*?[") else [item])
    return out


def _check_present(spec: str, shards: list[str]) -> None:
    """Every shard exists; one listing per folder rather than one request per shard."""
    by_dir: dict[str, list[str]] = {}
    for uri in shards:
        by_dir.setdefault(uri.rsplit("/", 1)[0] if "/" in uri else ".", []).append(uri)
    missing: list[str] = []
    for folder, uris in by_dir.items():
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in storage.listdir(folder)}
        missing += [u for u in uris if u.rsplit("/", 1)[-1] not in present]
    if missing:
        raise DataError(f"data source {spec!r}: {len(missing)} of {len(shards)} shards do not "
                        f"exist, e.g. {missing[0]}")


def _sizes_json(shards: list[str]) -> list[int | None]:
    """Sample counts from a sizes.json beside the shards (open_clip's convention), if there is one."""
    folder = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
    uri = storage.join(folder, "sizes.json")
    sizes = storage.read_json(uri) if storage.exists(uri) else {}
    return [sizes.get(s.rsplit("/", 1)[-1]) for s in shards]


def is_pattern(spec: str) -> bool:
    return any(c in spec for c in "{*?[") or spec.endswith(".tar")


def _resolve_source(spec: str, split: str = "train") -> Source:
    spec = spec.strip()
    if not spec:
        raise DataError("--train-data has an empty '::' source")
    if not is_pattern(spec):
        manifest = wds_shards.find_manifest(spec)
        if manifest is None:
            raise DataError(f"data source {spec!r}: no manifest.json there (nor in data/), and it is "
                            "not a shard pattern such as s3://bucket/data/{00000..00099}.tar")
        try:
            shards, counts = wds_shards.read_split(manifest, split)
        except DataError as exc:
            raise DataError(f"{spec}: {exc}") from exc
        if not shards:
            raise DataError(f"data source {spec!r}: the manifest {manifest} lists no {split} shards")
        return Source(spec, shards, counts)
    shards = _expand_pattern(spec)
    if not shards:
        raise DataError(f"data source {spec!r} matches no shards")
    _check_present(spec, shards)
    return Source(spec, shards, _sizes_json(shards))


def _parse_factors(factors: str | None, n_sources: int) -> list[float]:
    if not factors:
        return [1.0] * n_sources
    parts = [p.strip() for p in factors.split("::")]
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise DataError(f"--train-data-upsampling-factors {factors!r}: not numbers joined by '::'") from exc
    if len(values) != n_sources:
        raise DataError(f"--train-data-upsampling-factors {factors!r} gives {len(values)} factors for "
                        f"{n_sources} '::' sources of --train-data")
    if any(v <= 0 or not math.isfinite(v) for v in values):
        raise DataError(f"--train-data-upsampling-factors {factors!r}: factors must be positive")
    return values


def resolve_sources(spec: str, upsampling_factors: str | None, split: str = "train") -> list[Source]:
    if not spec or not spec.strip():
        raise DataError("--train-data is empty: give a manifest, run folder or shard pattern")
    parts = spec.split("::")
    factors = _parse_factors(upsampling_factors, len(parts))
    sources = [_resolve_source(p, split) for p in parts]
    for source, factor in zip(sources, factors, strict=True):
        source.weight = factor
    return sources


def resolve_train_shards(spec: str, upsampling_factors: str | None) -> list[tuple[list[str], float]]:
    """(shards, upsampling factor) per '::' source; DataError naming the source that has no shards."""
    return [(s.shards, s.weight) for s in resolve_sources(spec, upsampling_factors)]


def val_spec(val_data: str, train_data: str) -> str | None:
    """The val source --val-data names; 'auto' is the train manifest's val split (if any)."""
    val = (val_data or "").strip()
    if val.lower() in ("", "none"):
        return None
    if val.lower() != "auto":
        return val
    train = train_data.strip()
    if "::" in train or is_pattern(train):
        return None
    return train
