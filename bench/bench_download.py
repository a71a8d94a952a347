"""Download throughput (images/s): demo images served on loopback, fetched by `clipforge download`.

Each setting runs the real command (img2dataset in its own processes) into a fresh folder; the
rate counted is successful images over the command's whole wall time (start-up included) and,
separately, the manifest's images_per_s (the download step alone: no interpreter start-up or input check). Writes bench/results/download.json.

    python -m bench.bench_download [--images 3000] [--settings 1x16 2x16 2x64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import environment

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
DOWNLOAD_PACKAGES = ("img2dataset", "webdataset", "fsspec", "pyarrow", "pillow")


def run_setting(url_list: str, processes: int, threads: int, images: int, workdir: str) -> dict:
    run_id = f"bench-{processes}x{threads}"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "stages.download", "--url-list", url_list, "--root", workdir,
           "--run-id", run_id, "--processes", str(processes), "--threads", str(threads),
           "--image-size", "64", "--samples-per-shard", "500", "--log-level", "WARNING"]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{run_id} failed: {proc.stderr[-2000:]}")
    manifest = json.loads(Path(workdir, run_id, "data", "manifest.json").read_text())
    assert manifest["total_samples"] == images, manifest["total_samples"]
    return {"processes": processes, "threads": threads, "images": images, "wall_s": round(wall, 2),
            "images_per_s_wall": round(images / wall, 1),
            "images_per_s_img2dataset": manifest["images_per_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_download", description=__doc__)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--settings", nargs="+", default=["1x16", "2x16", "2x64"],
                        help="PROCESSESxTHREADS")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from stages.download import demo
    from stages.download.demo_server import ImageServer

    samples = demo.train_samples(args.images, seed=0, size=64)
    results = []
    with ImageServer(demo.image_files(samples)) as server, tempfile.TemporaryDirectory() as tmp:
        url_list = os.path.join(tmp, "urls.parquet")
        Path(url_list).write_bytes(demo.url_table_parquet(samples, server.base_url))
        for setting in args.settings:
            processes, threads = (int(x) for x in setting.split("x"))
            results.append(run_setting(url_list, processes, threads, args.images, tmp))
            print(json.dumps(results[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "download.json"
    out.write_text(json.dumps({"benchmark": "download", "environment": environment(DOWNLOAD_PACKAGES),
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
