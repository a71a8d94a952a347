"""`clipforge pipeline run --local` on the demo data: the whole pipeline through kfp.local."""

from __future__ import annotations

import json
import subprocess
import sys

import fsspec
import pytest


@pytest.mark.slow
def test_local_run_of_the_whole_pipeline_on_demo_data(s3, cli_env, tmp_path):
    root = f"{s3}/runs"
    cmd = [sys.executable, "-m", "stages.cli", "pipeline", "run", "--local", "--root", root, "--run-id", "e2e",
           "--local-outputs", str(tmp_path / "kfp"), "--demo-samples", "300", "--samples-per-shard", "100",
           "--steps", "8", "--save-every-steps", "4", "--batch-size", "32", "--workers", "0",
           "--procs-per-node", "2"]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = f"{root}/e2e"
    fs = fsspec.filesystem("s3")
    latest = json.loads(fs.cat(f"{run}/checkpoints/LATEST"))
    assert latest["step"] == 8
    results = json.loads(fs.cat(f"{run}/eval/results.json"))
    assert set(results["datasets"]) == {"demo", "val"}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/export", detail=False)}
    manifest = json.loads(fs.cat(f"{run}/data/manifest.json"))
    assert manifest["total_samples"] > 0

    # what `make run` shows its user: the eval table, then the export folder
    out = proc.stdout
    assert "dataset" in out and "acc1" in out and "image_retrieval_recall@1" in out
    assert f"export: {run}/export" in out and "open_clip_model.safetensors" in out
    assert "8 steps of 64 samples" in proc.stdout + proc.stderr  # 2 torchrun ranks x batch 32
