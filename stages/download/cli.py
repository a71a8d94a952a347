"""`clipforge download`: check the URL list, run img2dataset, write manifest.json and run.json."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence

from stages.common import storage
from stages.common.cli import stage_main
from stages.common.config import to_dict
from stages.common.errors import DataError
from stages.common.logs import setup_logging
from stages.common.redact import redact_text
from stages.common.runinfo import record_stage
from stages.download import demo, shards
from stages.download.config import DownloadConfig
from stages.download.demo_server import ImageServer
from stages.download.img2ds import img2dataset_kwargs, prepare_resume, run_img2dataset
from stages.download.manifest import build_manifest
from stages.download.metrics import DownloadMetrics
from stages.download.urllist import UrlList, check_url_list, detect_format, local_copy_if_signed
from stages.download.watch import ShardWatcher

PACKAGES = ("img2dataset", "webdataset", "fsspec", "s3fs", "pyarrow", "pillow")


@contextlib.contextmanager
def demo_url_list(cfg: DownloadConfig, log: logging.Logger) -> Iterator[str]:
    """Generate the demo images, serve them on loopback, and yield a URL list pointing there."""
    samples = demo.train_samples(cfg.demo_samples, cfg.demo_seed, cfg.image_size)
    evalset = storage.join(cfg.run_dir, "evalsets", "demo")
    demo.write_eval_set(evalset, cfg.demo_eval_samples, cfg.demo_seed, cfg.image_size)
    log.info("demo: %d images to download, eval set of %d at %s", len(samples),
             cfg.demo_eval_samples, evalset)
    with ImageServer(demo.image_files(samples)) as server, \
            tempfile.TemporaryDirectory(prefix="clipforge-demo-") as tmp:
        path = os.path.join(tmp, "urls.parquet")
        with open(path, "wb") as f:
            f.write(demo.url_table_parquet(samples, server.base_url))
        log.info("demo: serving on %s", server.base_url)
        yield path


def _add_shard(metrics: DownloadMetrics, data_dir: str, shard_id: int, stats_uri: str) -> None:
    stats = shards.read_stats(data_dir, shard_id, stats_uri)
    metrics.add_shard(stats, storage.size(stats.tar_uri) if storage.exists(stats.tar_uri) else 0)


def download(cfg: DownloadConfig, urls: UrlList, input_label: str, log: logging.Logger,
             metrics: DownloadMetrics) -> dict:
    """Run img2dataset over the checked list (resuming), then write the manifest; returns it."""
    data_dir = cfg.data_dir
    started = time.time()
    removed = prepare_resume(data_dir)
    if removed:
        log.info("removed %d partial shard files left by an interrupted run", len(removed))
    done_before = shards.stats_uris(data_dir)
    for shard_id, uri in done_before.items():
        _add_shard(metrics, data_dir, shard_id, uri)
    total_shards = math.ceil(urls.rows / cfg.samples_per_shard)
    log.info("%d URLs in %d shards; %d shards already complete", urls.rows, total_shards, len(done_before))
    with ShardWatcher(data_dir, total_shards, set(done_before),
                      lambda sid, uri: _add_shard(metrics, data_dir, sid, uri), log):
        run_img2dataset(img2dataset_kwargs(cfg, urls))
    complete = shards.stats_uris(data_dir)
    if len(complete) < total_shards:
        raise DataError(f"{total_shards - len(complete)} of {total_shards} shards did not finish "
                        f"(see the img2dataset errors above); rerun the same command to retry them")
    stats = [shards.read_stats(data_dir, sid, uri) for sid, uri in sorted(complete.items())]
    elapsed = time.time() - started
    new_images = sum(s.succeeded for s in stats if s.shard_id not in done_before)
    manifest = build_manifest(run_id=cfg.run_id, input_uri=input_label, data_dir=data_dir, stats=stats,
                              seed=cfg.split_seed, proportions=cfg.split, elapsed_s=elapsed,
                              new_images=new_images)
    storage.write_json(storage.join(data_dir, "manifest.json"), manifest)
    metrics.set_rate(new_images, elapsed)
    return manifest


def check_yield(cfg: DownloadConfig, manifest: dict) -> None:
    if manifest["total_samples"] == 0:
        raise DataError(f"no image of {manifest['input']} could be downloaded "
                        f"(failures: {manifest['failures_by_reason']})")
    if manifest["success_rate"] < cfg.min_success_rate:
        raise DataError(f"only {manifest['success_rate']:.1%} of the URLs arrived, below "
                        f"--min-success-rate {cfg.min_success_rate:.1%} "
                        f"(failures: {manifest['failures_by_reason']}); the shards and "
                        f"manifest stay in {cfg.data_dir}")


def summary(manifest: dict, evalset: str | None) -> str:
    lines = [f"downloaded {manifest['total_samples']}/{manifest['attempted']} images "
             f"({manifest['success_rate']:.1%}) into {len(manifest['shards'])} shards "
             f"in {manifest['elapsed_s']:.1f}s ({manifest['images_per_s']:.0f} images/s)"]
    lines += [f"  {name}: {len(s['shards'])} shards, {s['samples']} samples"
              for name, s in manifest["splits"].items()]
    if manifest["failures_by_reason"]:
        lines.append(f"  failures: {manifest['failures_by_reason']}")
    lines.append(f"  manifest: {storage.join(manifest['data_dir'], 'manifest.json')}")
    if evalset:
        lines.append(f"  demo eval set: {evalset}")
    return "\n".join(lines)


def run(cfg: DownloadConfig) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if "://" not in cfg.root:  # the manifest's URIs must work from any working directory
        cfg.root = os.path.abspath(cfg.root)
    log = setup_logging("download", cfg.run_id, level=cfg.log_level)
    started = time.time()
    if not cfg.demo:  # check the list before anything else happens
        check_url_list(cfg.url_list, detect_format(cfg.url_list, cfg.input_format), cfg.url_col,
                       cfg.caption_col, cfg.save_additional_columns)
    metrics = DownloadMetrics(cfg.run_id)
    metrics.stage.serve(cfg.metrics_port, cfg.metrics_addr)
    try:
        with (demo_url_list(cfg, log) if cfg.demo else local_copy_if_signed(cfg.url_list)) as uri:
            fmt = "parquet" if cfg.demo else detect_format(uri, cfg.input_format)
            urls = check_url_list(uri, fmt, cfg.url_col, cfg.caption_col, cfg.save_additional_columns)
            label = f"demo:samples={cfg.demo_samples},seed={cfg.demo_seed}" if cfg.demo else redact_text(cfg.url_list)
            manifest = download(cfg, urls, label, log, metrics)
        evalset = storage.join(cfg.run_dir, "evalsets", "demo") if cfg.demo else None
        outputs = {"data": cfg.data_dir, "manifest": storage.join(cfg.data_dir, "manifest.json"),
                   "total_samples": manifest["total_samples"], "success_rate": manifest["success_rate"]}
        if evalset:
            outputs["evalsets"] = {"demo": evalset}
        record_stage(cfg.run_dir, "download", config=to_dict(cfg), inputs={"url_list": label},
                     outputs=outputs, started=started, packages=PACKAGES)
        print(summary(manifest, evalset), flush=True)
        check_yield(cfg, manifest)
        metrics.stage.mark_success()
    finally:
        metrics.stage.push(cfg.pushgateway)
        metrics.stage.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("download", DownloadConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
