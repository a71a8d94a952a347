"""Data resume cost: time from building the train loader to its first batch, resuming at 0% and
at 90% of an epoch, for a small and a 10x larger epoch (same shard size). Target: the 90% - 0%
difference does not grow with the epoch size (resume seeks; it never re-reads consumed samples).
Writes bench/results/data-resume-<date>.json.

    python -m bench.bench_data_resume [--sizes 2000 20000 40000] [--shard-samples 500] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.common import write_result

REPO = Path(__file__).resolve().parents[1]


def _cfg(root: str, workers: int, batch_size: int) -> SimpleNamespace:
    return SimpleNamespace(train_data=root, train_data_upsampling_factors=None, val_data="none",
                           dataset_resampled=False, train_num_samples=None, batch_size=batch_size,
                           workers=workers, seed=0)


def _state_at(cfg, preprocess, tokenizer, fraction: float) -> tuple[dict, int]:
    from stages.train import data

    info = data.get_train_data(cfg, preprocess, tokenizer, rank=0, world_size=1)
    taken = int(info.num_batches * fraction)
    it = iter(info.loader)
    for _ in range(taken):
        next(it)
    return {"world_size": 1, "ranks": [info.state_dict()] if taken else []}, taken


def _first_batch_seconds(cfg, preprocess, tokenizer, state: dict) -> float:
    from stages.train import data

    start = time.perf_counter()
    info = data.get_train_data(cfg, preprocess, tokenizer, rank=0, world_size=1)
    info.load_state_dict(state)
    next(iter(info.loader))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 40000])
    parser.add_argument("--shard-samples", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO / "tests" / "train"))
    import open_clip
    from shards import make_shards

    preprocess = open_clip.image_transform(32, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = f"{tmp}/{size}"
            make_shards(root, size, args.shard_samples, image_size=48, seed=size)
            cfg = _cfg(root, args.workers, args.batch_size)
            row = {}
            for label, fraction in (("at_0", 0.0), ("at_90", 0.9)):
                state, taken = _state_at(cfg, preprocess, tokenizer, fraction)
                times = [_first_batch_seconds(cfg, preprocess, tokenizer, state) for _ in range(args.repeats)]
                row[label] = {"batches_taken_before": taken, "seconds_to_first_batch": round(min(times), 3),
                              "all_seconds": [round(t, 3) for t in times]}
            row["difference_s"] = round(row["at_90"]["seconds_to_first_batch"] - row["at_0"]["seconds_to_first_batch"], 3)
            runs[str(size)] = row
            print(f"{size:6d} samples: 0% {row['at_0']['seconds_to_first_batch']:.3f}s  "
                  f"90% {row['at_90']['seconds_to_first_batch']:.3f}s  diff {row['difference_s']:+.3f}s", flush=True)
    diffs = [runs[str(s)]["difference_s"] for s in args.sizes]
    result = {"config": vars(args), "runs": runs,
              "difference_growth_s": round(diffs[-1] - diffs[0], 3),
              "target": "the 90%-0% difference does not grow with the epoch size"}
    print(f"-> {write_result('data-resume', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
