"""`clipforge pipeline run --local` on the demo data: the whole pipeline through kfp.local."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import pytest

from tests.conftest import free_port


def _samples(fs, manifest: dict) -> Counter:
    """(caption, image sha256) of every sample in the manifest's shards: the data, whatever the shard names."""
    out = Counter()
    for shard in manifest["shards"]:
        with tarfile.open(fileobj=io.BytesIO(fs.cat(shard["uri"]))) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                caption = members[name[:-4] + ".txt"].decode()
                out[(caption, hashlib.sha256(data).hexdigest())] += 1
    return out


def _executor_outputs(kfp_dir: Path, step: str) -> dict:
    (path,) = kfp_dir.glob(f"clipforge-*/{step}/executor_output.json")
    return json.loads(path.read_text())


@pytest.fixture
def served_demo(s3, cli_env):
    """The demo set written to the store by its own command and served on 127.0.0.1 by it."""
    port = free_port()
    folder = f"{s3}/demo-set"
    proc = subprocess.Popen([sys.executable, "-m", "stages.download.demo", "--output", folder, "--samples", "300",
                             "--eval-samples", "60", "--port", str(port), "--serve"], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        while line and "serving" not in line:
            line = proc.stdout.readline()
        assert "serving" in line, "the demo server did not start"
        yield folder
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_local_run_with_three_download_tasks_trains_evaluates_and_records_artifacts(s3, served_demo, cli_env,
                                                                                     tmp_path):
    root = f"{s3}/runs"
    data = ["--url-list", f"{served_demo}/urls.parquet", "--samples-per-shard", "50", "--image-size", "64"]
    cmd = [sys.executable, "-m", "stages.cli", "pipeline", "run", "--local", "--root", root, "--run-id", "e2e",
           "--local-outputs", str(tmp_path / "kfp"), *data, "--download-tasks", "3",
           "--download-args=--allow-private-networks", "--eval-data", f"demo={served_demo}/evalsets/demo",
           "--steps", "8", "--save-every-steps", "4", "--batch-size", "32", "--workers", "0",
           "--procs-per-node", "2"]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = f"{root}/e2e"
    fs = fsspec.filesystem("s3")
    assert json.loads(fs.cat(f"{run}/checkpoints/LATEST"))["step"] == 8
    results = json.loads(fs.cat(f"{run}/eval/results.json"))
    assert set(results["datasets"]) == {"demo", "val"}

    # three download tasks, one manifest, the same data as one task downloads
    merged = json.loads(fs.cat(f"{run}/data/manifest.json"))
    assert merged["parts"] == 3
    assert len(fs.ls(f"{run}/data/parts")) == 3
    single = subprocess.run([sys.executable, "-m", "stages.download", *data, "--allow-private-networks",
                             "--root", root, "--run-id", "single"], env=cli_env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads(fs.cat(f"{root}/single/data/manifest.json"))
    for key in ("total_samples", "attempted", "success_rate", "failures_by_reason", "split"):
        assert merged[key] == one[key], key
    assert [(s["uri"].rsplit("/", 1)[-1], s["samples"], s["split"]) for s in merged["shards"]] == \
        [(s["uri"].rsplit("/", 1)[-1], s["samples"], s["split"]) for s in one["shards"]]
    assert _samples(fs, merged) == _samples(fs, one) and sum(_samples(fs, one).values()) == 300

    # what the KFP UI shows: the eval values as Metrics, the table as Markdown, the export as a Model
    evaluate = _executor_outputs(tmp_path / "kfp", "evaluate")["artifacts"]
    (metrics,) = evaluate["metrics"]["artifacts"]
    assert metrics["metadata"]["demo/acc1"] == pytest.approx(results["datasets"]["demo"]["metrics"]["acc1"])
    assert metrics["metadata"]["val/image_retrieval_recall@1"] == pytest.approx(
        results["datasets"]["val"]["metrics"]["image_retrieval_recall@1"])
    (table,) = evaluate["table"]["artifacts"]
    assert "| demo | zeroshot_classification |" in Path(table["uri"]).read_text()
    (model,) = _executor_outputs(tmp_path / "kfp", "export")["artifacts"]["model"]["artifacts"]
    assert model["uri"] == f"{run}/export"
    assert model["metadata"]["framework"] == "open_clip" and model["metadata"]["checkpoint"] == \
        f"{run}/checkpoints/LATEST"
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md"} <= set(model["metadata"]["files"])

    # what `make run` shows its user: the eval table, the export folder, the artifacts
    out = proc.stdout
    assert "dataset" in out and "acc1" in out and "image_retrieval_recall@1" in out
    assert f"export: {run}/export" in out and "open_clip_model.safetensors" in out
    assert f"Model    {run}/export" in out
    assert "8 steps of 64 samples" in proc.stdout + proc.stderr  # 2 torchrun ranks x batch 32
