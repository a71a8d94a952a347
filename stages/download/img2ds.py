"""Run img2dataset in this process, resuming a killed run shard by shard."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from stages.common import storage
from stages.download.config import RESERVED_COLUMNS, DownloadConfig
from stages.download.shards import remove_partial
from stages.download.urllist import UrlList


def img2dataset_kwargs(cfg: DownloadConfig, urls: UrlList) -> dict:
    has_columns = not urls.input_format.startswith("txt")
    caption_col = cfg.caption_col if has_columns and cfg.caption_col else None
    extra = cfg.save_additional_columns or [
        c for c in urls.columns if c not in {cfg.url_col, cfg.caption_col} | RESERVED_COLUMNS]
    return dict(
        url_list=urls.uri, input_format=urls.input_format, output_folder=cfg.data_dir,
        output_format="webdataset", url_col=cfg.url_col, caption_col=caption_col,
        save_additional_columns=(extra or None) if has_columns else None,
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality, number_sample_per_shard=cfg.samples_per_shard,
        processes_count=cfg.processes, thread_count=cfg.threads, retries=cfg.retries,
        timeout=cfg.timeout, incremental_mode="incremental", enable_wandb=False)


def prepare_resume(data_dir: str) -> list[str]:
    """Make a rerun safe: drop a killed run's partial shards and our own manifest.

    img2dataset treats every `*.json` in the folder as a finished shard's stats (and parses its
    name as a shard id), so manifest.json must not be there while it runs; it is rewritten after.
    """
    storage.delete(storage.join(data_dir, "manifest.json"))
    return remove_partial(data_dir)


def run_img2dataset(kwargs: dict) -> None:
    """Call img2dataset.download; its stdout chatter goes to stderr, its SIGINT handler is undone."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    previous = signal.getsignal(signal.SIGINT)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            download(**kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)
    storage.delete(storage.join(kwargs["output_folder"], "_tmp"), recursive=True)
