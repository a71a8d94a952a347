"""Every bad input gets a clear error before any download; the split is deterministic."""

from __future__ import annotations

import gzip
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.download.cli import main
from stages.download.split import parse_proportions, split_counts, split_shards

GOOD = "http://127.0.0.1:9/a.png"


def fail(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def parquet(path, **cols) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


@pytest.fixture
def run_args(tmp_path):
    return ["--root", str(tmp_path / "runs"), "--run-id", "bad"]


@pytest.mark.parametrize("name,content,message", [
    ("urls.xlsx", b"x", "unknown URL list format"),
    ("urls.parquet", b"not parquet at all", "could not be read as parquet"),
    ("urls.jsonl", b'{"url": "http://x/1.png"\n', "could not be read as jsonl"),
    ("urls.csv", b"link,caption\nhttp://x/1.png,a\n", "no column 'url' (--url-col)"),
    ("urls.tsv", b"url\tcaption\n", "is empty"),
    ("urls.txt", b"http://x/1.png\nftp://x/2.png\n/local/3.png\n", "2 of the first 3 URLs are not http(s)"),
    ("urls.txt.gz", gzip.compress(b"file:///etc/passwd\n"), "1 of the first 1 URLs are not http(s)"),
])
def test_bad_url_lists(tmp_path, run_args, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    code, err = fail(["--url-list", str(path), *run_args], capsys)
    assert code in (2, 3)
    assert str(path) in err and message in err
    assert not (tmp_path / "runs").exists(), "nothing may be written before the input is checked"


def test_missing_file_and_columns(tmp_path, run_args, capsys):
    code, err = fail(["--url-list", str(tmp_path / "nope.parquet"), *run_args], capsys)
    assert code == 3 and "nope.parquet does not exist" in err
    urls = parquet(tmp_path / "u.parquet", url=[GOOD], text=["a cat"])
    code, err = fail(["--url-list", urls, *run_args], capsys)
    assert code == 3 and "no column 'caption' (--caption-col)" in err
    code, err = fail(["--url-list", urls, "--caption-col", "text", "--save-additional-columns", "lbl",
                      *run_args], capsys)
    assert code == 3 and "no column 'lbl' (--save-additional-columns)" in err
    code, err = fail(["--url-list", urls, "--url-col", "link", "--caption-col", "text", *run_args], capsys)
    assert code == 3 and "no column 'link' (--url-col)" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv,message", [
    ([], "give exactly one of --url-list URI or --demo"),
    (["--demo", "--url-list", "x.parquet"], "give exactly one of --url-list URI or --demo"),
    (["--demo", "--split-proportions", "train=0.8,val=0.1"], "sums to 0.9, not 1"),
    (["--demo", "--split-proportions", "train:1"], "expected name=fraction pairs"),
    (["--demo", "--min-success-rate", "1.5"], "--min-success-rate 1.5 is not between 0 and 1"),
    (["--demo", "--samples-per-shard", "0"], "--samples-per-shard 0 must be at least 1"),
    (["--demo", "--save-additional-columns", "url"], "img2dataset's own fields"),
])
def test_bad_options(run_args, capsys, argv, message):
    code, err = fail([*argv, *run_args], capsys)
    assert code == 2 and message in err


def test_check_config_resolves_demo_image_size(run_args, capsys):
    assert main(["--demo", "--check-config", *run_args]) == 0
    out = capsys.readouterr().out
    assert '"image_size": 64' in out and '"demo": true' in out


def test_split_is_deterministic_disjoint_and_complete():
    shards = [f"s3://b/data/{i:05d}.tar" for i in range(23)]
    props = parse_proportions("train=0.8,val=0.1,test=0.1")
    first = split_shards(shards, props, seed=7)
    assert first == split_shards(list(reversed(shards)), props, seed=7)
    assert first != split_shards(shards, props, seed=8)
    assert [len(first[k]) for k in ("train", "val", "test")] == [19, 2, 2]  # 18.4, 2.3, 2.3 rounded
    parts = [set(v) for v in first.values()]
    assert set().union(*parts) == set(shards) and sum(map(len, parts)) == len(shards)


def test_small_runs_still_get_a_validation_shard():
    assert split_counts(2, {"train": 0.9, "val": 0.1}) == {"train": 1, "val": 1}
    assert split_counts(1, {"train": 0.9, "val": 0.1}) == {"train": 1, "val": 0}
    assert split_counts(10, {"train": 1.0, "val": 0.0}) == {"train": 10, "val": 0}


def test_import_does_not_load_torch():
    code = "import sys, stages.download, stages.download.cli, stages.download.demo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
