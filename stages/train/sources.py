"""`--dataset-type`: webdataset shards (stages.train.data), a CSV table, or synthetic data.

`auto` is open_clip_train's rule: a `.csv`/`.tsv` file is a table; anything else here is
webdataset (a run folder, data/ folder, manifest or shard pattern).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TABLE_ENDINGS = (".csv", ".tsv")


def dataset_type(cfg: Any, spec: str | None = None) -> str:
    spec = cfg.train_data if spec is None else spec
    if cfg.dataset_type != "auto":
        return cfg.dataset_type
    return "csv" if spec.strip().lower().endswith(TABLE_ENDINGS) else "webdataset"


def check_sources(cfg: Any) -> bool:
    """Cheap checks of a CSV table's columns; True when the webdataset shards need checking."""
    kind = dataset_type(cfg)
    if kind == "csv":
        from stages.train.csvdata import read_table

        read_table(cfg.train_data, cfg.csv_separator, cfg.csv_img_key, cfg.csv_caption_key)
    return kind == "webdataset"


def get_train_data(cfg: Any, preprocess: Callable, tokenizer: Callable, *, rank: int, world_size: int,
                   epoch: int = 0, resume_state: dict | None = None):
    kind = dataset_type(cfg)
    if kind == "webdataset":
        from stages.train import data

        return data.get_train_data(cfg, preprocess, tokenizer, rank=rank, world_size=world_size,
                                   epoch=epoch, resume_state=resume_state)
    from stages.train.mapdata import map_data

    return map_data(_dataset(cfg, kind, cfg.train_data, preprocess, tokenizer), cfg, rank=rank,
                    world_size=world_size, train=True, epoch=epoch, resume_state=resume_state)


def get_val_data(cfg: Any, preprocess: Callable, tokenizer: Callable, *, rank: int, world_size: int):
    val = (cfg.val_data or "").strip()
    if val.lower() in ("", "none"):
        return None
    if val.lower() == "auto" and dataset_type(cfg) != "webdataset":
        return None  # 'auto' means the manifest's val split, which only shards have
    kind = dataset_type(cfg, val)
    if kind == "synthetic":
        return None
    if kind == "webdataset":
        from stages.train import data

        return data.get_val_data(cfg, preprocess, tokenizer, rank=rank, world_size=world_size)
    from stages.train.mapdata import map_data

    return map_data(_dataset(cfg, kind, val, preprocess, tokenizer), cfg, rank=rank, world_size=world_size,
                    train=False)


def _dataset(cfg: Any, kind: str, spec: str, preprocess: Callable, tokenizer: Callable):
    if kind == "csv":
        from stages.train.csvdata import CsvDataset

        return CsvDataset(spec, preprocess, tokenizer, cfg)
    from open_clip_train.data import SyntheticDataset

    size = preprocess.transforms[0].size  # as open_clip_train's get_synthetic_dataset
    return SyntheticDataset(transform=preprocess, image_size=size, dataset_size=cfg.train_num_samples or 100,
                            tokenizer=tokenizer)
