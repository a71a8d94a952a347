"""Run img2dataset over one part of the URL list, resuming a killed run shard by shard.

`img2dataset.download()` takes one file or folder, numbers its shards from 0, finds finished
shards by globbing the output folder, keeps its temporary files in `{output}/_tmp` (which it
deletes whole at the end) and fetches with plain urllib. A part of a many-file list, written into
a folder other parts write to at the same time, behind the fetch guard, needs a hook into each of
those, so `run_part` assembles the same img2dataset components `download()` assembles (reader,
resizer, blurrer, downloader, writer, distributor, wandb logger) with the part's reader, a
private temporary folder, and the guarded downloader. Every option keeps img2dataset's meaning.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

from stages.common import storage
from stages.common.errors import ConfigError
from stages.download.config import RESERVED_COLUMNS, DownloadConfig
from stages.download.guard import FetchPolicy
from stages.download.parts import Part
from stages.download.shards import remove_partial
from stages.download.urllist import InputFile

MANIFEST, REJECTED = "manifest.json", "manifest.rejected.json"


def img2dataset_options(cfg: DownloadConfig, files: list[InputFile]) -> dict:
    """img2dataset's download() options (its names) from the config; the list, folder, format and
    resume mode are clipforge's to choose."""
    has_columns = not files[0].input_format.startswith("txt")
    caption_col = cfg.caption_col if has_columns and cfg.caption_col else None
    extra = cfg.save_additional_columns or [
        c for c in files[0].columns if c not in {cfg.url_col, cfg.caption_col} | RESERVED_COLUMNS]
    opts = dict(
        input_format=files[0].input_format, url_col=cfg.url_col, caption_col=caption_col,
        save_additional_columns=(extra or None) if has_columns else None,
        bbox_col=(cfg.bbox_col or None) if has_columns else None,
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality, number_sample_per_shard=cfg.samples_per_shard,
        processes_count=cfg.processes, thread_count=cfg.threads, retries=cfg.retries,
        timeout=cfg.timeout, resize_only_if_bigger=cfg.resize_only_if_bigger,
        skip_reencode=cfg.skip_reencode, min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area or float("inf"),
        max_aspect_ratio=cfg.max_aspect_ratio or float("inf"),
        compute_hash=None if cfg.compute_hash == "none" else cfg.compute_hash,
        verify_hash=[cfg.verify_hash, cfg.compute_hash] if cfg.verify_hash else None,
        user_agent_token=cfg.user_agent_token or None,
        disallowed_header_directives=[d for d in cfg.disallowed_header_directives if d != "none"],
        extract_exif=cfg.extract_exif, max_shard_retry=cfg.max_shard_retry,
        distributor=cfg.distributor, enable_wandb=cfg.enable_wandb, wandb_project=cfg.wandb_project,
        upscale_interpolation="lanczos", downscale_interpolation="area", disable_all_reencoding=False,
        subjob_size=1000)
    opts.update(cfg.passed_through)
    return opts


def prepare_resume(data_dir: str, part: Part, single: bool) -> list[str]:
    """Make a rerun safe: drop this part's partial shards (and, for a whole-list run, the old
    manifests, which are rewritten after)."""
    if single:
        for name in (MANIFEST, REJECTED):
            storage.delete(storage.join(data_dir, name))
    return remove_partial(data_dir, owned=part.shard_ids)


@contextlib.contextmanager
def _temporary_folder(data_dir: str, part: Part, distributor: str) -> Iterator[str]:
    """Where the reader leaves each shard's rows for the workers: local disk when the workers are
    local processes, else a folder of this part's own beside the shards."""
    if distributor == "multiprocessing":
        path = tempfile.mkdtemp(prefix=f"clipforge-{part.name}-")
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        uri = storage.join(data_dir, "_tmp", part.name)
        storage.makedirs(uri)
        try:
            yield uri
        finally:
            storage.delete(uri, recursive=True)


def run_part(opts: dict, part: Part, data_dir: str, done: set[int], digits: int,
             policy: FetchPolicy) -> None:
    """Download the part's shards that are not done; img2dataset's chatter goes to stderr."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    with contextlib.redirect_stdout(sys.stderr), \
            _temporary_folder(data_dir, part, opts["distributor"]) as tmp:
        _run(dict(opts), part, data_dir, done, digits, policy, tmp)


def _run(o: dict, part: Part, data_dir: str, done: set[int], digits: int, policy: FetchPolicy,
         tmp: str) -> None:
    from img2dataset import distributor as distributors
    from img2dataset.blurrer import BoundingBoxBlurrer
    from img2dataset.logger import LoggerProcess
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    from stages.download.workers import GuardedDownloader, OutsidePart, PartReader

    extra = list(o["save_additional_columns"] or [])
    if o["bbox_col"] and o["bbox_col"] not in extra:
        extra.append(o["bbox_col"])
    verify_col, verify_type = o["verify_hash"] or (None, None)
    storage.makedirs(data_dir)
    reader = PartReader(part, done, input_format=o["input_format"], url_col=o["url_col"],
                        caption_col=o["caption_col"], verify_hash_col=verify_col,
                        verify_hash_type=verify_type, save_additional_columns=extra or None,
                        number_sample_per_shard=o["number_sample_per_shard"], tmp_path=tmp)
    try:
        resizer = _resizer(o, Resizer, BoundingBoxBlurrer)
    except ValueError as exc:  # img2dataset's own checks of its options
        raise ConfigError(f"img2dataset refused the options: {exc}") from exc
    downloader = GuardedDownloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=o["thread_count"],
        save_caption=o["caption_col"] is not None, extract_exif=o["extract_exif"],
        output_folder=data_dir, column_list=reader.column_list, timeout=o["timeout"],
        number_sample_per_shard=o["number_sample_per_shard"], oom_shard_count=digits,
        compute_hash=o["compute_hash"], verify_hash_type=verify_type,
        encode_format=o["encode_format"], retries=o["retries"], user_agent_token=o["user_agent_token"],
        disallowed_header_directives=o["disallowed_header_directives"] or None,
        blurring_bbox_col=o["bbox_col"], fetch_policy=policy)
    distribute = {"multiprocessing": distributors.multiprocessing_distributor,
                  "pyspark": distributors.pyspark_distributor,
                  "ray": distributors.ray_distributor}[o["distributor"]]
    logger = None
    if o["enable_wandb"]:
        logger = LoggerProcess(data_dir, True, o["wandb_project"], dict(o, part=part.name))
        logger.done_shards = OutsidePart(part, done)  # it reports only this part's new shards
        logger.start()
    try:
        distribute(o["processes_count"], downloader, reader, o["subjob_size"], o["max_shard_retry"])
    finally:
        if logger is not None:
            logger.join()


def _resizer(o: dict, resizer_cls: type, blurrer_cls: type):
    """img2dataset's Resizer (with the face blurrer when a box column is given)."""
    return resizer_cls(
        image_size=o["image_size"], resize_mode=o["resize_mode"],
        resize_only_if_bigger=o["resize_only_if_bigger"],
        upscale_interpolation=o["upscale_interpolation"],
        downscale_interpolation=o["downscale_interpolation"], encode_quality=o["encode_quality"],
        encode_format=o["encode_format"], skip_reencode=o["skip_reencode"],
        disable_all_reencoding=o["disable_all_reencoding"], min_image_size=o["min_image_size"],
        max_image_area=o["max_image_area"], max_aspect_ratio=o["max_aspect_ratio"],
        blurrer=blurrer_cls() if o["bbox_col"] else None)
