"""A list split into parts: one numbering, parts that never collide, a merge equal to one task."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dlkit import read_manifest, run_download

from stages.common import storage
from stages.common.errors import ConfigError
from stages.download.parts import FileShards, plan, resolve_index, shard_digits

ROWS = [9, 5, 7]  # three files; 3 rows a shard: 3 + 2 + 3 = 8 shards
PER_SHARD = 3


def layout(shards: list[int]) -> list[FileShards]:
    out, first = [], 0
    for i, n in enumerate(shards):
        out.append(FileShards(f"f{i}.parquet", "parquet", n * 10, first, n))
        first += n
    return out


def check_tiling(parts, total: int) -> None:
    ids = [i for p in parts for i in p.shard_ids]
    assert ids == list(range(total)), "each shard in exactly one part, in order"


def test_parts_follow_files_when_there_are_enough():
    files = layout([4, 1, 1, 4, 2])
    parts = plan(files, 3)
    check_tiling(parts, 12)
    assert [[f.uri for f in p.files] for p in parts] == [
        ["f0.parquet"], ["f1.parquet", "f2.parquet"], ["f3.parquet", "f4.parquet"]]  # 4, 2, 6 shards
    assert plan(files, 3) == parts, "the same list always splits the same way"
    assert [len(p.files) for p in plan(files, 5)] == [1, 1, 1, 1, 1]


def test_parts_cut_rows_when_files_are_few():
    files = layout([7, 3])
    parts = plan(files, 4)
    check_tiling(parts, 10)
    assert [len(p.shard_ids) for p in parts] == [2, 3, 2, 3]
    assert [f.uri for f in parts[1].files] == ["f0.parquet"]
    assert [f.uri for f in parts[3].files] == ["f0.parquet", "f1.parquet"][1:]
    tiny = plan(layout([1]), 3)  # fewer shards than parts: some parts have nothing to do
    check_tiling(tiny, 1)
    assert sum(len(p.shard_ids) for p in tiny) == 1
    assert plan(layout([5]), 1)[0].shard_ids == range(0, 5)


def test_part_index(monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert resolve_index("auto", 4) == 2 and resolve_index("1", 4) == 1
    with pytest.raises(ConfigError, match="not in 0..1"):
        resolve_index("auto", 2)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX is not set"):
        resolve_index("auto", 2)
    with pytest.raises(ConfigError, match="is not a number"):
        resolve_index("x", 2)
    assert shard_digits(10) == 5 and shard_digits(100000) == 5 and shard_digits(100001) == 6


def write_lists(folder: str, base: str) -> int:
    """Three parquet files of good, missing and non-image URLs; returns the good count."""
    good = 0
    for f, rows in enumerate(ROWS):
        urls = []
        for r in range(rows):
            kind = ("img", "img", "missing", "text")[(f + r) % 4]
            urls.append(f"{base}/{kind}/{f * 100 + r}.{'html' if kind == 'text' else 'png'}")
            good += kind == "img"
        table = pa.table({"url": urls, "caption": [f"file {f} row {r}" for r in range(rows)]})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(f"{folder}/urls-{f}.parquet", buf.getvalue())
    return good


ARGS = ["--samples-per-shard", str(PER_SHARD), "--processes", "1", "--threads", "4", "--image-size", "32",
        "--timeout", "2", "--allow-private-networks", "--min-success-rate", "0.3"]


def comparable(manifest: dict) -> dict:
    """The manifest without timings, with shard URIs relative to the data folder."""
    rel = lambda uri: uri.rsplit("/", 1)[-1]  # noqa: E731
    return {"shards": [(rel(s["uri"]), s["samples"], s["split"]) for s in manifest["shards"]],
            "splits": {k: ([rel(u) for u in v["shards"]], v["samples"]) for k, v in manifest["splits"].items()},
            **{k: manifest[k] for k in ("input", "total_samples", "attempted", "success_rate",
                                        "failures_by_reason", "split")}}


@pytest.mark.slow
def test_three_files_on_s3_in_parts_merge_to_the_single_task_manifest(s3, image_server, cli_env):
    good = write_lists(f"{s3}/lists", image_server.base)
    urls = f"{s3}/lists/"
    proc = run_download(["--url-list", urls, "--root", f"{s3}/runs", "--run-id", "one", *ARGS], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = read_manifest(f"{s3}/runs/one/data")
    assert single["total_samples"] == good and single["attempted"] == sum(ROWS)
    assert len(single["shards"]) == 8

    # Three parts side by side into one folder, as an Indexed Job's pods would run them.
    parts = [subprocess.Popen([sys.executable, "-m", "stages.download", "--url-list", urls, "--root",
                               f"{s3}/runs", "--run-id", "split", "--num-parts", "3", "--part-index",
                               "auto", *ARGS], env={**cli_env, "JOB_COMPLETION_INDEX": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (2, 0)]
    for p in parts:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    data = f"{s3}/runs/split/data"
    assert not storage.exists(f"{data}/manifest.json"), "a part never publishes the manifest"
    merge = ["--root", f"{s3}/runs", "--run-id", "split", "--merge-parts", "3", *ARGS[-2:]]
    proc = run_download(merge, cli_env)
    assert proc.returncode == 3
    assert "1 of 3 parts have not finished (part 1;" in proc.stderr
    assert f"{data}/parts/part-00001-of-00003.json" in proc.stderr
    assert not storage.exists(f"{data}/manifest.json")

    proc = run_download(["--url-list", urls, "--root", f"{s3}/runs", "--run-id", "split",
                         "--num-parts", "3", "--part-index", "1", *ARGS], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    part = storage.read_json(f"{data}/parts/part-00001-of-00003.json")
    assert part["shard_range"] == [3, 5] and [s["shard_id"] for s in part["shards"]] == [3, 4]
    proc = run_download(merge, cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = read_manifest(data)
    assert comparable(merged) == comparable(single)
    assert merged["parts"] == 3
    assert json.loads(storage.read_text(f"{s3}/runs/split/run.json"))["stages"]["download"]["outputs"][
        "total_samples"] == good

    # The gate applies to the merge too: a floor above the yield publishes nothing.
    proc = run_download([*merge[:-2], "--min-success-rate", "0.9"], cli_env)
    assert proc.returncode == 3 and "below --min-success-rate 90.0%" in proc.stderr
    assert not storage.exists(f"{data}/manifest.json")
    assert storage.exists(f"{data}/manifest.rejected.json")
