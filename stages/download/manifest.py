"""data/manifest.json, the download stage's contract with train and evaluate (docs/CONTRACTS.md)."""

from __future__ import annotations

from typing import Any

from stages.download.shards import ShardStats, failures
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
        for reason, n in failures(s).items():
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
