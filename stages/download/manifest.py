"""data/manifest.json, the download stage's contract with train and evaluate (docs/CONTRACTS.md)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from stages.common import storage
from stages.common.errors import DataError
from stages.download.parts import FileShards, Part
from stages.download.shards import ShardStats
from stages.download.split import split_shards

FORMAT = "clipforge.manifest/1"


def build_manifest(*, run_id: str, input_uri: str, data_dir: str, stats: list[ShardStats],
                   seed: int, proportions: dict[str, float], elapsed_s: float,
                   new_images: int) -> dict[str, Any]:
    """The manifest for every complete shard. Shards with no image are left out of the splits.

    `images_per_s` counts the images this invocation downloaded (a resumed run counts only what
    it fetched) over its wall time.
    """
    samples = {s.tar_uri: s.succeeded for s in stats if s.succeeded > 0}
    splits = split_shards(list(samples), proportions, seed)
    split_of = {uri: name for name, uris in splits.items() for uri in uris}
    attempted = sum(s.attempted for s in stats)
    total = sum(samples.values())
    failed: dict[str, int] = {}
    for s in stats:
        for reason, n in s.failures.items():
            failed[reason] = failed.get(reason, 0) + n
    return {
        "format": FORMAT,
        "run_id": run_id,
        "input": input_uri,
        "data_dir": data_dir,
        "shards": [{"uri": uri, "samples": n, "split": split_of[uri]} for uri, n in sorted(samples.items())],
        "splits": {name: {"shards": uris, "samples": sum(samples[u] for u in uris)}
                   for name, uris in splits.items()},
        "split": {"seed": seed, "proportions": proportions},
        "total_samples": total,
        "attempted": attempted,
        "success_rate": round(total / attempted, 6) if attempted else 0.0,
        "failures_by_reason": dict(sorted(failed.items())),
        "elapsed_s": round(elapsed_s, 3),
        "images_per_s": round(new_images / max(elapsed_s, 1e-9), 2),
    }


PART_FORMAT = "clipforge.download-part/1"


def part_manifest_uri(data_dir: str, index: int, count: int) -> str:
    return storage.join(data_dir, "parts", f"part-{index:05d}-of-{count:05d}.json")


def build_part_manifest(*, run_id: str, input_uri: str, part: Part, layout: list[FileShards],
                        samples_per_shard: int, stats: list[ShardStats], elapsed_s: float,
                        new_images: int) -> dict[str, Any]:
    """What a finished part leaves for the merge: its shards' counts and the layout it assumed."""
    return {
        "format": PART_FORMAT,
        "run_id": run_id,
        "input": input_uri,
        "part_index": part.index,
        "num_parts": part.count,
        "shard_range": [part.first_shard, part.end_shard],
        "samples_per_shard": samples_per_shard,
        "layout": [{"uri": f.uri, "rows": f.rows, "first_shard": f.first_shard, "shards": f.shards}
                   for f in layout],
        "shards": [s.to_json() for s in sorted(stats, key=lambda s: s.shard_id)],
        "elapsed_s": round(elapsed_s, 3),
        "new_images": new_images,
    }


def read_part_manifests(data_dir: str, count: int) -> list[dict[str, Any]]:
    """The count part manifests, checked to be one consistent, complete split of one list."""
    uris = [part_manifest_uri(data_dir, i, count) for i in range(count)]
    missing = [(i, u) for i, u in enumerate(uris) if not storage.exists(u)]
    if missing:
        raise DataError(f"cannot merge: {len(missing)} of {count} parts have not finished "
                        f"(part {', '.join(str(i) for i, _ in missing)}; no "
                        f"{', '.join(u for _, u in missing[:5])}{' …' if len(missing) > 5 else ''}); "
                        "rerun those parts, then merge again")
    parts = [storage.read_json(u) for u in uris]
    first = parts[0]
    for p, uri in zip(parts, uris, strict=True):
        if p.get("format") != PART_FORMAT or p.get("num_parts") != count:
            raise DataError(f"{uri} is not a part manifest of a {count}-part download")
        if p["layout"] != first["layout"] or p["samples_per_shard"] != first["samples_per_shard"]:
            raise DataError(f"{uri} was written for another URL list or --samples-per-shard than "
                            f"{uris[0]}; every part must download the same list the same way")
    ranges = sorted(tuple(p["shard_range"]) for p in parts)
    total = sum(f["shards"] for f in first["layout"])
    if ranges[0][0] != 0 or ranges[-1][1] != total or any(a[1] != b[0] for a, b in pairwise(ranges)):
        raise DataError(f"the part manifests in {storage.join(data_dir, 'parts')} do not cover "
                        f"shards 0..{total - 1} exactly once")
    return parts


def merge_parts(*, run_id: str, data_dir: str, count: int, seed: int,
                proportions: dict[str, float]) -> dict[str, Any]:
    """One manifest for the whole list from its parts: the same one a single task would write
    (timings aside: the parts ran side by side, so the slowest part's time counts)."""
    parts = read_part_manifests(data_dir, count)
    stats = [ShardStats.from_json(s) for p in parts for s in p["shards"]]
    elapsed = max(p["elapsed_s"] for p in parts)
    manifest = build_manifest(run_id=run_id, input_uri=parts[0]["input"], data_dir=data_dir,
                              stats=stats, seed=seed, proportions=proportions, elapsed_s=elapsed,
                              new_images=sum(p["new_images"] for p in parts))
    manifest["parts"] = count
    return manifest
