"""`clipforge download`: check the URL list, run img2dataset, write manifest.json and run.json."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
from stages.download.guard import FetchPolicy
from stages.download.img2ds import MANIFEST, REJECTED, img2dataset_options, prepare_resume, run_part
from stages.download.manifest import build_manifest, build_part_manifest, merge_parts, part_manifest_uri
from stages.download.metrics import DownloadMetrics
from stages.download.parts import FileShards, Part, number_shards, plan, resolve_index, shard_digits
from stages.download.urllist import InputFile, check_url_list, local_copies_if_signed
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


@dataclass
class PartResult:
    stats: list[shards.ShardStats]
    elapsed_s: float
    new_images: int


def download_part(cfg: DownloadConfig, files: list[InputFile], layout: list[FileShards], part: Part,
                  log: logging.Logger, metrics: DownloadMetrics) -> PartResult:
    """Run img2dataset over the part's shards that are not complete yet; returns their stats."""
    data_dir = cfg.data_dir
    started = time.time()
    removed = prepare_resume(data_dir, part, single=part.count == 1)
    if removed:
        log.info("removed %d partial shard files left by an interrupted run", len(removed))
    done_before = {sid: uri for sid, uri in shards.stats_uris(data_dir).items() if sid in part.shard_ids}
    for shard_id, uri in done_before.items():
        _add_shard(metrics, data_dir, shard_id, uri)
    todo = len(part.shard_ids) - len(done_before)
    rows = sum(f.rows for f in files)
    log.info("%d URLs in %d files, %d shards; %s: shards %d..%d, %d already complete", rows, len(files),
             layout[-1].end_shard, part.name, part.first_shard, part.end_shard - 1, len(done_before))
    if todo:
        # the demo fetches from its own server on 127.0.0.1, started above
        policy = FetchPolicy(cfg.allow_private_networks or cfg.demo, cfg.max_response_bytes,
                             cfg.max_download_seconds)
        if cfg.allow_private_networks:
            log.warning("--allow-private-networks: URLs may reach loopback, private and link-local "
                        "addresses")
        with ShardWatcher(data_dir, len(part.shard_ids), set(done_before),
                          lambda sid, uri: _add_shard(metrics, data_dir, sid, uri), log,
                          owned=part.shard_ids):
            run_part(img2dataset_options(cfg, files), part, data_dir, set(done_before),
                     shard_digits(layout[-1].end_shard), policy)
    complete = {sid: uri for sid, uri in shards.stats_uris(data_dir).items() if sid in part.shard_ids}
    if len(complete) < len(part.shard_ids):
        raise DataError(f"{len(part.shard_ids) - len(complete)} of {len(part.shard_ids)} shards did not "
                        "finish (see the img2dataset errors above); rerun the same command to retry them")
    stats = [shards.read_stats(data_dir, sid, uri) for sid, uri in sorted(complete.items())]
    elapsed = time.time() - started
    new_images = sum(s.succeeded for s in stats if s.shard_id not in done_before)
    metrics.set_rate(new_images, elapsed)
    return PartResult(stats, elapsed, new_images)


def gate_problem(cfg: DownloadConfig, manifest: dict) -> str | None:
    """Why the manifest must not be published, or None."""
    if manifest["total_samples"] == 0:
        return (f"no image of {manifest['input']} could be downloaded "
                f"(failures: {manifest['failures_by_reason']})")
    if manifest["success_rate"] < cfg.min_success_rate:
        return (f"only {manifest['success_rate']:.1%} of the URLs arrived, below "
                f"--min-success-rate {cfg.min_success_rate:.1%} "
                f"(failures: {manifest['failures_by_reason']})")
    return None


def publish(cfg: DownloadConfig, manifest: dict, inputs: dict, started: float,
            evalset: str | None = None) -> None:
    """Gate, then write manifest.json and run.json; a failed gate writes manifest.rejected.json
    instead (the counts, for inspection; downstream stages read only manifest.json)."""
    data_dir = cfg.data_dir
    print(summary(manifest, evalset), flush=True)
    problem = gate_problem(cfg, manifest)
    if problem:
        storage.delete(storage.join(data_dir, MANIFEST))
        storage.write_json(storage.join(data_dir, REJECTED), {**manifest, "rejected": problem})
        raise DataError(f"{problem}; no manifest.json was published: the shards and their counts "
                        f"({REJECTED}) stay in {data_dir}")
    storage.write_json(storage.join(data_dir, MANIFEST), manifest)
    storage.delete(storage.join(data_dir, REJECTED))
    outputs = {"data": data_dir, "manifest": storage.join(data_dir, MANIFEST),
               "total_samples": manifest["total_samples"], "success_rate": manifest["success_rate"]}
    if evalset:
        outputs["evalsets"] = {"demo": evalset}
    record_stage(cfg.run_dir, "download", config=to_dict(cfg), inputs=inputs, outputs=outputs,
                 started=started, packages=PACKAGES)
    print(f"  manifest: {outputs['manifest']}", flush=True)


def summary(manifest: dict, evalset: str | None) -> str:
    lines = [f"downloaded {manifest['total_samples']}/{manifest['attempted']} images "
             f"({manifest['success_rate']:.1%}) into {len(manifest['shards'])} shards "
             f"in {manifest['elapsed_s']:.1f}s ({manifest['images_per_s']:.0f} images/s)"]
    lines += [f"  {name}: {len(s['shards'])} shards, {s['samples']} samples"
              for name, s in manifest["splits"].items()]
    if manifest["failures_by_reason"]:
        lines.append(f"  failures: {manifest['failures_by_reason']}")
    if evalset:
        lines.append(f"  demo eval set: {evalset}")
    return "\n".join(lines)


def input_label(entries: list[str]) -> str:
    """The URL list as run.json and the manifest name it: credentials and signatures redacted."""
    return redact_text(entries[0] if len(entries) == 1 else ", ".join(entries))


def check_input(cfg: DownloadConfig, entries: list[str]) -> tuple[list[InputFile], list[FileShards], Part]:
    """Check the list (streaming) and find this task's part of it; nothing is written."""
    required = [("--caption-col", cfg.caption_col), ("--bbox-col", cfg.bbox_col),
                ("--verify-hash", cfg.verify_hash),
                *[("--save-additional-columns", c) for c in cfg.save_additional_columns]]
    fmt = "parquet" if cfg.demo else cfg.input_format
    files = check_url_list(entries, fmt, cfg.url_col, required)
    layout = number_shards(files, cfg.samples_per_shard)
    index = resolve_index(cfg.part_index, cfg.num_parts) if cfg.part_index else 0
    return files, layout, plan(layout, cfg.num_parts)[index]


def describe_input(files: list[InputFile], layout: list[FileShards], part: Part) -> str:
    lines = [f"{len(files)} files, {sum(f.rows for f in files)} rows, {layout[-1].end_shard} shards"]
    lines += [f"  {f.uri}: {f.rows} rows, shards {f.first_shard}..{f.end_shard - 1}" for f in layout]
    lines.append(f"{part.name}: shards {part.first_shard}..{part.end_shard - 1} "
                 f"({len(part.shard_ids)}) from {len(part.files)} files")
    return "\n".join(lines)


def run_download(cfg: DownloadConfig, log: logging.Logger, metrics: DownloadMetrics, started: float,
                 checked: tuple[list[InputFile], list[FileShards], Part] | None) -> None:
    """Download this task's part (the demo's list is made and checked here), then publish it."""
    with (demo_url_list(cfg, log) if cfg.demo else contextlib.nullcontext()) as demo_list:
        files, layout, part = check_input(cfg, [demo_list]) if cfg.demo else checked
        label = (f"demo:samples={cfg.demo_samples},seed={cfg.demo_seed}" if cfg.demo
                 else input_label(cfg.url_list))
        result = download_part(cfg, files, layout, part, log, metrics)
    evalset = storage.join(cfg.run_dir, "evalsets", "demo") if cfg.demo else None
    if part.count > 1:
        uri = part_manifest_uri(cfg.data_dir, part.index, part.count)
        storage.write_json(uri, build_part_manifest(
            run_id=cfg.run_id, input_uri=label, part=part, layout=layout,
            samples_per_shard=cfg.samples_per_shard, stats=result.stats, elapsed_s=result.elapsed_s,
            new_images=result.new_images))
        print(f"{part.name}: {sum(s.succeeded for s in result.stats)}/"
              f"{sum(s.attempted for s in result.stats)} images in {len(result.stats)} shards; "
              f"wrote {uri}; merge with --merge-parts {part.count} when all parts are done", flush=True)
        return
    manifest = build_manifest(run_id=cfg.run_id, input_uri=label, data_dir=cfg.data_dir,
                              stats=result.stats, seed=cfg.split_seed, proportions=cfg.split,
                              elapsed_s=result.elapsed_s, new_images=result.new_images)
    publish(cfg, manifest, {"url_list": label}, started, evalset)


def run_merge(cfg: DownloadConfig, started: float) -> None:
    manifest = merge_parts(run_id=cfg.run_id, data_dir=cfg.data_dir, count=cfg.merge_parts,
                           seed=cfg.split_seed, proportions=cfg.split)
    publish(cfg, manifest, {"url_list": manifest["input"], "parts": cfg.merge_parts}, started)


def run(cfg: DownloadConfig) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if "://" not in cfg.root:  # the manifest's URIs must work from any working directory
        cfg.root = os.path.abspath(cfg.root)
    log = setup_logging("download", cfg.run_id, level=cfg.log_level)
    started = time.time()
    if cfg.merge_parts:
        run_merge(cfg, started)
        return 0
    with local_copies_if_signed([] if cfg.demo else cfg.url_list) as entries:
        checked = None
        if not cfg.demo:  # check the list before anything else happens
            checked = check_input(cfg, entries)
            if cfg.check_input:
                print(describe_input(*checked), flush=True)
                return 0
        metrics = DownloadMetrics(cfg.run_id)
        metrics.stage.serve(cfg.metrics_port, cfg.metrics_addr)
        try:
            run_download(cfg, log, metrics, started, checked)
            metrics.stage.mark_success()
        finally:
            metrics.stage.push(cfg.pushgateway)
            metrics.stage.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("download", DownloadConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
