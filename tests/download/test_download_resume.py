"""Kill the download mid-way (the whole process group, like a killed pod), rerun, get it all."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dlkit import LoopbackImages, read_manifest, run_download, start_download, tar_members

from tests.conftest import free_port

IMAGES, PER_SHARD = 30, 6  # 5 shards: one img2dataset worker process (it restarts after 5)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def scrape_when(port: int, name: str) -> str | None:
    text = scrape(port)
    return text if metric(text, name) >= 1 else None


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_kill_and_rerun_completes_without_redoing_shards(tmp_path, cli_env):
    server = LoopbackImages(delay_s=0.3)
    try:
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [f"{server.base}/delayed/{i}.png" for i in range(IMAGES)],
                                 "caption": [f"image {i}" for i in range(IMAGES)]}), urls)
        data = tmp_path / "runs" / "k" / "data"
        args = ["--url-list", str(urls), "--root", str(tmp_path / "runs"), "--run-id", "k",
                "--samples-per-shard", str(PER_SHARD), "--processes", "1", "--threads", "2",
                "--image-size", "32", "--allow-private-networks"]
        port = free_port()
        proc = start_download([*args, "--metrics-port", str(port)], cli_env)
        try:
            wait_for(lambda: list(data.glob("*_stats.json")), 120, "a first complete shard")
            # metrics are served while the download runs and follow the completed shards
            text = wait_for(lambda: scrape_when(port, "clipforge_download_shards_total"), 10,
                            "shards_total >= 1")
            assert metric(text, "clipforge_download_images_succeeded_total") >= PER_SHARD
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        done = {int(p.name[:5]) for p in data.glob("*_stats.json")}
        tars = {int(p.name[:5]) for p in data.glob("*.tar")}
        assert 0 < len(done) < IMAGES // PER_SHARD, "the kill should land mid-download"
        assert tars - done, "a shard should have been half-written when killed"
        hits_before = dict(server.hits)

        proc = run_download(args, cli_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for shard in done:  # complete shards were not fetched again
            for i in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
                path = f"/delayed/{i}.png"
                assert server.hits[path] == hits_before[path] == 1
        manifest = read_manifest(str(data))
        assert manifest["total_samples"] == IMAGES
        assert len(manifest["shards"]) == IMAGES // PER_SHARD
        keys = set()
        for shard in manifest["shards"]:
            members = tar_members(open(shard["uri"], "rb").read())
            assert len(members) == shard["samples"] == PER_SHARD
            keys |= {files["txt"] for files in members.values()}
        assert keys == {f"image {i}".encode() for i in range(IMAGES)}
        assert {p.name[:5] for p in data.glob("*.tar")} == {p.name[:5] for p in data.glob("*_stats.json")}
    finally:
        server.close()
