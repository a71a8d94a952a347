"""URL lists of many files on any store, checked by streaming; bad lists exit cleanly with our code."""

from __future__ import annotations

import io
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from dlkit import run_download

from stages.common import storage
from stages.download.cli import main

MILLION = 1_000_000


def urls_table(n: int) -> pa.Table:
    return pa.table({"url": pa.array([f"https://images.example/{i:07d}.jpg" for i in range(n)]),
                     "caption": pa.array([f"caption number {i}" for i in range(n)])})


def peak_rss_mib_checking(path: str, cli_env: dict) -> tuple[int, str]:
    """Peak memory of a `--check-input` run in a fresh process, and what it printed."""
    code = ("import resource, sys\nfrom stages.download.cli import main\n"
            "assert main(sys.argv[1:]) == 0\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    out = subprocess.run([sys.executable, "-c", code, "--url-list", path, "--check-input",
                          "--samples-per-shard", "10000"], env=cli_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.rsplit("PEAK", 1)[1]), out.stdout


@pytest.mark.slow
def test_checking_a_million_rows_keeps_memory_flat(tmp_path, cli_env):
    small, big = tmp_path / "small", tmp_path / "big"
    for folder, n in ((small, 10_000), (big, MILLION)):
        folder.mkdir()
        table = urls_table(n)
        pacsv.write_csv(table, folder / "urls.csv")
        pq.write_table(table, folder / "urls.parquet", row_group_size=100_000)
        del table
    for name in ("urls.csv", "urls.parquet"):
        base, _ = peak_rss_mib_checking(str(small / name), cli_env)
        peak, printed = peak_rss_mib_checking(str(big / name), cli_env)
        assert f"{MILLION} rows, 100 shards" in printed
        # The csv alone is ~60 MiB and would be ~150 MiB as a table: reading it whole would show.
        assert peak - base < 40, f"{name}: {peak} MiB peak for 1M rows vs {base} MiB for 10k"


def test_folder_glob_and_list_of_files(tmp_path, capsys):
    for i, n in enumerate((5, 12, 3)):
        buf = io.BytesIO()
        pq.write_table(urls_table(n), buf)
        (tmp_path / f"part-{i}.parquet").write_bytes(buf.getvalue())
    (tmp_path / "README.md").write_text("not a list")
    common = ["--check-input", "--samples-per-shard", "4", "--root", str(tmp_path / "runs")]
    assert main(["--url-list", str(tmp_path), *common]) == 0
    out = capsys.readouterr().out
    assert "3 files, 20 rows, 6 shards" in out  # 2 + 3 + 1 shards, numbered file by file
    assert "part-1.parquet: 12 rows, shards 2..4" in out
    assert main(["--url-list", str(tmp_path / "part-[02].parquet"), *common]) == 0
    assert "2 files, 8 rows, 3 shards" in capsys.readouterr().out
    assert main(["--url-list", str(tmp_path / "part-2.parquet"), str(tmp_path / "part-0.parquet"),
                 *common, "--num-parts", "2", "--part-index", "1"]) == 0
    out = capsys.readouterr().out
    assert "part-00001-of-00002: shards 1..2 (2) from 1 files" in out
    assert not (tmp_path / "runs").exists(), "checking writes nothing"


@pytest.mark.parametrize("name,content,message", [
    ("lists/*.parquet", None, "the pattern matches no file"),
    ("lists/", b"", "no file in a URL list format"),
    ("mixed/", b"", "the files mix formats"),
])
def test_bad_collections(tmp_path, capsys, name, content, message):
    (tmp_path / "lists").mkdir()
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.csv").write_text("url\nhttp://x/1.png\n")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"url": "http://x/2.png"}\n')
    code = main(["--url-list", str(tmp_path / name), "--root", str(tmp_path / "runs")])
    assert code == 3 and message in capsys.readouterr().err


def test_bad_url_column_on_s3_exits_cleanly(s3, cli_env):
    """A list on S3 without the url column: our message and exit code 3, not an abort (134)."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"link": ["http://x/1.png"], "caption": ["a"]}), buf)
    storage.write_bytes(f"{s3}/lists/a.parquet", buf.getvalue())
    storage.write_bytes(f"{s3}/lists/b.parquet", buf.getvalue())
    proc = run_download(["--url-list", f"{s3}/lists/", "--root", f"{s3}/runs", "--run-id", "bad"], cli_env,
                        timeout=120)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines()[-1] == (
        f"clipforge download: error: URL list {s3}/lists/a.parquet: no column 'url' (--url-col); "
        "it has ['link', 'caption']")
    assert not storage.glob(f"{s3}/runs/**")
