"""Download throughput: `clipforge download` vs bare img2dataset with the same settings.

Demo images are served on loopback; each setting (processes x threads) runs both commands, in
alternating order, `--repeats` times, each into a fresh folder. The rate is successful images
over the command's whole wall time (interpreter start-up, the input check, the manifest and the
fetch guard included: everything a user waits for). The overhead is clipforge's median wall time
over img2dataset's, minus one; the target is at most 5 %. The same is reported for the fetching
phase alone (first shard start to last shard end, from img2dataset's per-shard stats), where
start-up costs drop out and the fetch guard's cost shows. Writes bench/results/download-<date>.json.

    python -m bench.bench_download [--images 3000] [--settings 1x16 2x16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, write_result

DOWNLOAD_PACKAGES = ("img2dataset", "webdataset", "fsspec", "pyarrow", "pillow")
IMAGE_SIZE, PER_SHARD = 64, 500

BARE = f"""
import sys
from img2dataset import download
download(url_list=sys.argv[1], output_folder=sys.argv[2], processes_count=int(sys.argv[3]),
         thread_count=int(sys.argv[4]), image_size={IMAGE_SIZE}, resize_mode="border", encode_format="jpg",
         encode_quality=95, number_sample_per_shard={PER_SHARD}, output_format="webdataset",
         input_format="parquet", url_col="url", caption_col="caption",
         save_additional_columns=["label", "classname"], timeout=10, retries=0,
         compute_hash="sha256", extract_exif=True, incremental_mode="incremental", enable_wandb=False)
"""


def _env() -> dict:
    return dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _timed(cmd: list[str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr[-2000:]}")
    return wall


def run_clipforge(url_list: str, out: str, processes: int, threads: int) -> float:
    root, run_id = os.path.split(out)
    return _timed([sys.executable, "-m", "stages.download", "--url-list", url_list, "--root", root,
                   "--run-id", run_id, "--processes", str(processes), "--threads", str(threads),
                   "--image-size", str(IMAGE_SIZE), "--samples-per-shard", str(PER_SHARD),
                   "--allow-private-networks", "--log-level", "WARNING"])


def run_bare(url_list: str, out: str, processes: int, threads: int) -> float:
    return _timed([sys.executable, "-c", BARE, url_list, os.path.join(out, "data"), str(processes),
                   str(threads)])


def shard_stats(data_dir: Path) -> tuple[int, float]:
    """(images, seconds from the first shard's start to the last shard's end), from img2dataset's
    own per-shard stats: the fetching phase alone, the same measure for both commands."""
    stats = [json.loads(p.read_text()) for p in data_dir.glob("*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return sum(s["successes"] for s in stats), span


def run_setting(url_list: str, processes: int, threads: int, images: int, repeats: int, tmp: str) -> dict:
    walls: dict[str, list[float]] = {"clipforge": [], "img2dataset": []}
    fetching: dict[str, list[float]] = {"clipforge": [], "img2dataset": []}
    runners = {"clipforge": run_clipforge, "img2dataset": run_bare}
    for r in range(repeats):
        order = ["clipforge", "img2dataset"] if r % 2 == 0 else ["img2dataset", "clipforge"]
        for name in order:
            out = os.path.join(tmp, f"{name}-{processes}x{threads}-{r}")
            walls[name].append(runners[name](url_list, out, processes, threads))
            got, span = shard_stats(Path(out, "data"))
            assert got == images, f"{name} downloaded {got} of {images} images"
            fetching[name].append(span)
    med = {name: statistics.median(w) for name, w in walls.items()}
    fetch_med = {name: statistics.median(w) for name, w in fetching.items()}
    return {"processes": processes, "threads": threads, "images": images, "repeats": repeats,
            "wall_s": {k: [round(x, 2) for x in v] for k, v in walls.items()},
            "images_per_s": {k: round(images / m, 1) for k, m in med.items()},
            "overhead": round(med["clipforge"] / med["img2dataset"] - 1, 4),
            "fetching_s": {k: [round(x, 2) for x in v] for k, v in fetching.items()},
            "images_per_s_fetching": {k: round(images / m, 1) for k, m in fetch_med.items()},
            "overhead_fetching": round(fetch_med["clipforge"] / fetch_med["img2dataset"] - 1, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_download", description=__doc__)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--settings", nargs="+", default=["1x16", "2x16"], help="PROCESSESxTHREADS")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from stages.download import demo
    from stages.download.demo_server import ImageServer

    samples = demo.train_samples(args.images, seed=0, size=IMAGE_SIZE)
    results = []
    with ImageServer(demo.image_files(samples)) as server, tempfile.TemporaryDirectory() as tmp:
        url_list = os.path.join(tmp, "urls.parquet")
        Path(url_list).write_bytes(demo.url_table_parquet(samples, server.base_url))
        for setting in args.settings:
            processes, threads = (int(x) for x in setting.split("x"))
            results.append(run_setting(url_list, processes, threads, args.images, args.repeats, tmp))
            print(json.dumps(results[-1]), flush=True)
    worst = max(max(r["overhead"], r["overhead_fetching"]) for r in results)
    path = write_result("download", {"target_overhead": 0.05, "worst_overhead": worst,
                                     "meets_target": worst <= 0.05, "results": results},
                        DOWNLOAD_PACKAGES)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
