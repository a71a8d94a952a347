"""The demo dataset: deterministic, served on loopback, downloaded in one command, eval set written."""

from __future__ import annotations

import json
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dlkit import read_manifest, run_download, tar_members

from stages.download.demo import main as demo_main
from stages.download.demo_images import CLASSNAMES
from tests.conftest import free_port, wait_for_port

PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"


def check_evalset(root: Path, n: int) -> None:
    classnames = (root / "classnames.txt").read_text().splitlines()
    assert classnames == CLASSNAMES
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)
    nshards = int((root / "test" / "nshards.txt").read_text())
    labels = []
    for i in range(nshards):
        with tarfile.open(root / "test" / f"{i}.tar") as tar:
            names = tar.getnames()
            labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
        assert {Path(x).suffix for x in names} == {".png", ".cls"}
    assert len(labels) == n and set(labels) <= set(range(len(CLASSNAMES)))


def test_demo_data_is_deterministic_by_seed(tmp_path):
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert demo_main(["--output", str(tmp_path / name), "--samples", "40", "--eval-samples", "24",
                          "--seed", str(seed)]) == 0
        outs.append(tmp_path / name)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) == 40
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    assert (outs[0] / "urls.parquet").read_bytes() != (outs[2] / "urls.parquet").read_bytes()
    table = pq.read_table(outs[0] / "urls.parquet").to_pylist()
    assert all(row["classname"] in row["caption"] for row in table)
    assert all(row["url"].startswith("http://127.0.0.1:8765/images/") for row in table)
    check_evalset(outs[0] / "evalsets" / "demo", 24)
    train_imgs = {p.read_bytes() for p in (outs[0] / "images").glob("*.png")}
    eval_imgs = set()
    with tarfile.open(outs[0] / "evalsets/demo/test/0.tar") as tar:
        eval_imgs = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")}
    assert not train_imgs & eval_imgs


@pytest.fixture
def pushgateway():
    port = free_port()
    proc = subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.mark.slow
def test_demo_download_in_one_command(tmp_path, cli_env, pushgateway):
    root = tmp_path / "runs"
    proc = run_download(["--demo", "--demo-samples", "90", "--demo-eval-samples", "30",
                         "--samples-per-shard", "30", "--root", str(root), "--run-id", "demo1",
                         "--threads", "8", "--pushgateway", pushgateway], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(str(root / "demo1" / "data"))
    assert manifest["total_samples"] == 90 and manifest["success_rate"] == 1.0
    assert len(manifest["splits"]["train"]["shards"]) == 2 and len(manifest["splits"]["val"]["shards"]) == 1
    for shard in manifest["shards"]:
        for files in tar_members(Path(shard["uri"]).read_bytes()).values():
            meta = json.loads(files["json"])
            assert meta["classname"] in files["txt"].decode() and meta["width"] == 64
            assert CLASSNAMES[meta["label"]] == meta["classname"]
    check_evalset(root / "demo1" / "evalsets" / "demo", 30)
    run = json.loads((root / "demo1" / "run.json").read_text())
    assert run["stages"]["download"]["outputs"]["evalsets"]["demo"].endswith("/demo1/evalsets/demo")
    with urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5) as r:
        pushed = r.read().decode()
    line = next(ln for ln in pushed.splitlines()
                if ln.startswith("clipforge_download_images_succeeded_total{"))
    assert 'run_id="demo1"' in line and line.endswith(" 90")
    assert "clipforge_download_last_success_timestamp_seconds{" in pushed
