"""img2dataset for real against a loopback server: good images, 404s, a timeout, a non-image."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dlkit import read_manifest, run_download, tar_members

from stages.common import storage

GOOD, MISSING, NOT_IMAGE = 10, 3, 2


def write_list(uri: str, base: str) -> None:
    urls = ([f"{base}/img/{i}.png" for i in range(GOOD)] + [f"{base}/missing/{i}.png" for i in range(MISSING)]
            + [f"{base}/text/{i}.html" for i in range(NOT_IMAGE)] + [f"{base}/slow/0.png"])
    table = pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))],
                      "source": [f"src-{i}" for i in range(len(urls))]})
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def check_shards(manifest: dict) -> None:
    """The manifest's counts are what the tars hold; each sample has image, caption, metadata."""
    total = 0
    for shard in manifest["shards"]:
        members = tar_members(storage.read_bytes(shard["uri"]))
        assert len(members) == shard["samples"]
        for files in members.values():
            assert set(files) == {"jpg", "txt", "json"}
            meta = json.loads(files["json"])
            assert files["txt"].decode() == meta["caption"]
            assert meta["source"].startswith("src-")
        total += len(members)
    assert total == manifest["total_samples"] == GOOD


def check_manifest(manifest: dict) -> None:
    assert manifest["format"] == "clipforge.manifest/1"
    assert manifest["attempted"] == GOOD + MISSING + NOT_IMAGE + 1
    assert manifest["failures_by_reason"] == {"http_404": MISSING, "not_an_image": NOT_IMAGE, "timeout": 1}
    assert manifest["success_rate"] == pytest.approx(GOOD / manifest["attempted"], abs=1e-5)
    train, val = (set(manifest["splits"][s]["shards"]) for s in ("train", "val"))
    assert train and val and not train & val
    assert train | val == {s["uri"] for s in manifest["shards"]}
    assert sum(manifest["splits"][s]["samples"] for s in ("train", "val")) == GOOD
    check_shards(manifest)


ARGS = ["--samples-per-shard", "4", "--timeout", "1", "--processes", "1", "--threads", "4",
        "--image-size", "32", "--split-proportions", "train=0.5,val=0.5", "--split-seed", "3",
        "--allow-private-networks"]


def test_local_download_counts_failures_and_resumes_nothing(tmp_path, image_server, cli_env):
    urls = str(tmp_path / "urls.parquet")
    write_list(urls, image_server.base)
    root = tmp_path / "runs"
    proc = run_download(["--url-list", urls, "--root", str(root), "--run-id", "r1", *ARGS], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "downloaded 10/16 images" in proc.stdout
    manifest = read_manifest(str(root / "r1" / "data"))
    check_manifest(manifest)
    run = json.loads((root / "r1" / "run.json").read_text())
    assert run["stages"]["download"]["outputs"]["total_samples"] == GOOD
    assert run["stages"]["download"]["inputs"]["url_list"] == urls

    # Rerun of a finished run: nothing is fetched again, the manifest is the same, and a
    # success-rate floor above the yield fails the stage with a clear message.
    hits = sum(image_server.hits.values())
    proc = run_download(["--url-list", urls, "--root", str(root), "--run-id", "r1",
                         "--min-success-rate", "0.9", *ARGS], cli_env)
    assert proc.returncode == 3
    assert "below --min-success-rate 90.0%" in proc.stderr
    assert "no manifest.json was published" in proc.stderr
    assert sum(image_server.hits.values()) == hits
    data = root / "r1" / "data"
    assert not (data / "manifest.json").exists(), "a failed gate must leave no manifest to train on"
    rejected = json.loads((data / "manifest.rejected.json").read_text())
    assert rejected["splits"] == manifest["splits"] and "below --min-success-rate" in rejected["rejected"]


@pytest.mark.slow
def test_s3_download(s3, image_server, cli_env):
    urls = f"{s3}/lists/urls.parquet"
    write_list(urls, image_server.base)
    proc = run_download(["--url-list", urls, "--root", f"{s3}/runs", "--run-id", "r2", *ARGS], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(f"{s3}/runs/r2/data")
    assert manifest["shards"][0]["uri"].startswith(f"{s3}/runs/r2/data/")
    check_manifest(manifest)
    assert not storage.glob(f"{s3}/runs/r2/data/_tmp/*")
    assert storage.exists(f"{s3}/runs/r2/run.json")
