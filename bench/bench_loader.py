"""Loader throughput per DataLoader worker: clipforge's loader vs open_clip_train's get_wds_dataset.

Both read the same img2dataset-layout shards of 256, 384 and 512 px JPEGs and produce 224 px
training batches (open_clip's train transform, ViT-B-32 preprocessing) with one worker, so the
ratio is samples/s per worker. Target: >= 1.5x. Writes bench/results/loader-<date>.json.

    python -m bench.bench_loader [--samples 1536] [--batch-size 64] [--workers 1]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.common import write_result

REPO = Path(__file__).resolve().parents[1]


def make_bench_shards(root: str, samples: int) -> list[str]:
    """Shards of 256, 384 and 512 px JPEGs, a third of the samples each."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from shards import make_shards

    shards: list[str] = []
    for i, size in enumerate((256, 384, 512)):
        manifest = make_shards(f"{root}/{size}", samples // 3, 64, image_size=size, seed=i)
        shards += manifest["splits"]["train"]["shards"]
    return shards


def open_clip_loader(shards: list[str], preprocess, tokenizer, batch_size: int, workers: int, samples: int):
    import webdataset as wds
    from open_clip_train import data as oc_data

    # the one fix bench/open_clip_train_ref.py also applies: webdataset >= 0.2.96 needs eof_value=None here
    oc_data.tar_file_expander = functools.partial(wds.tariterators.tar_file_expander, eof_value=None)
    args = SimpleNamespace(train_data="::".join(shards), val_data=None, dataset_resampled=False,
                           train_num_samples=samples, train_data_upsampling_factors=None, seed=0,
                           batch_size=batch_size, workers=workers, world_size=1)
    info = oc_data.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    return info.dataloader


def clipforge_loader(shards: list[str], preprocess, tokenizer, batch_size: int, workers: int, samples: int):
    from stages.train import data

    cfg = SimpleNamespace(train_data="::".join(shards), train_data_upsampling_factors=None, val_data="none",
                          dataset_resampled=False, train_num_samples=samples, batch_size=batch_size,
                          workers=workers, seed=0)
    return data.get_train_data(cfg, preprocess, tokenizer, rank=0, world_size=1).loader


def measure(loader, warmup_batches: int = 2) -> dict:
    """Samples/s over one epoch after the first batches (worker start-up is not throughput)."""
    n = 0
    start = None
    for i, (images, _) in enumerate(loader):
        if i == warmup_batches:
            start, n = time.perf_counter(), 0
        n += images.shape[0]
    elapsed = time.perf_counter() - start
    return {"samples": n, "seconds": round(elapsed, 3), "samples_per_s": round(n / elapsed, 1),
            "image_shape": list(images.shape[1:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import open_clip

    preprocess = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_bench_shards(tmp, args.samples)
        runs = {}
        for name, build in (("open_clip_train", open_clip_loader), ("clipforge", clipforge_loader)):
            loader = build(shards, preprocess, tokenizer, args.batch_size, args.workers, args.samples)
            runs[name] = measure(loader)
            print(f"{name:16s} {runs[name]['samples_per_s']:8.1f} samples/s", flush=True)
    per_worker = {k: round(v["samples_per_s"] / max(1, args.workers), 1) for k, v in runs.items()}
    ratio = round(runs["clipforge"]["samples_per_s"] / runs["open_clip_train"]["samples_per_s"], 3)
    result = {"config": vars(args) | {"image_sizes": [256, 384, 512], "output_size": 224},
              "runs": runs, "samples_per_s_per_worker": per_worker, "speedup": ratio, "target": 1.5}
    print(f"speedup {ratio}x (target 1.5x) -> {write_result('loader', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
