"""Faults a long run meets: the store going away mid-checkpoint, NaN losses, resuming elsewhere."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

import boto3
import pytest
import torch
from trainrun import latest, load_checkpoint, run, run_json, stage_cmd, start, step_lines, train_env, wait_for

from stages.common import checkpoints


def _aws_env(cli_env: dict, **extra: str) -> dict:
    env = train_env(cli_env, **extra)
    env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    return env


@pytest.mark.slow
def test_store_down_during_checkpoint_write_is_retried(flaky_s3, moto_server, train_shards, tmp_path,
                                                       cli_env):
    bucket_uri, proxy = flaky_s3
    bucket = bucket_uri.removeprefix("s3://")
    direct = boto3.client("s3", endpoint_url=moto_server.endpoint)  # bypasses the proxy
    env = _aws_env(cli_env, CLIPFORGE_STORAGE_RETRIES="10", CLIPFORGE_STORAGE_BACKOFF_S="0.1")
    cmd = stage_cmd("--train-data", str(train_shards), "--root", bucket_uri, "--run-id", "flaky",
                    "--steps", "30", "--save-every-steps", "5", "--log-every-n-steps", "5")
    log = tmp_path / "log"
    proc = start(cmd, env, log)
    seen = []

    def latest_is_whole():
        """LATEST, read straight from the store, always names a complete checkpoint."""
        try:
            pointer = json.loads(direct.get_object(Bucket=bucket, Key="flaky/checkpoints/LATEST")["Body"].read())
        except direct.exceptions.NoSuchKey:
            return None
        key = pointer["uri"].removeprefix(f"s3://{bucket}/")
        body = direct.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == pointer["sha256"], pointer
        seen.append(pointer["step"])
        return pointer

    try:
        wait_for(lambda: "checkpoint step 5 ->" in log.read_text(), 120, "the first checkpoint", proc)
        proxy.down()  # the next checkpoint write (step 10) meets a store that is gone
        wait_for(lambda: re.search(r"writing \S+step_10\.pt: transient", log.read_text()), 60,
                 "a failed checkpoint write", proc)
        latest_is_whole()
        proxy.up()
        while proc.poll() is None:
            latest_is_whole()
        assert proc.returncode == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    final = latest_is_whole()
    assert final["step"] == 30 and set(seen) <= {5, 10, 15, 20, 25, 30}
    assert "checkpoint step 10 ->" in log.read_text()
    ckpt = checkpoints.read(f"{bucket_uri}/flaky/checkpoints")
    assert ckpt.step == 30 and ckpt.model_name == "clipforge-micro" and ckpt.fallbacks == []


@pytest.mark.slow
def test_nan_loss_is_skipped_then_stops_clearly(train_shards, tmp_path, cli_env):
    args = ["--train-data", str(train_shards), "--root", str(tmp_path), "--steps", "20",
            "--save-every-steps", "2", "--max-nonfinite-steps", "3"]
    rc, log = run(stage_cmd(*args, "--run-id", "once"), train_env(cli_env, CLIPFORGE_DEBUG_NAN_AT_STEP="3"),
                  tmp_path / "once.log")
    assert rc == 0, log[-3000:]
    assert "step 3: non-finite loss, update skipped (1 in a row, 1 in all)" in log
    assert run_json(tmp_path / "once")["stages"]["train"]["outputs"]["nonfinite_steps"] == 1

    rc, log = run(stage_cmd(*args, "--run-id", "stuck"), train_env(cli_env, CLIPFORGE_DEBUG_NAN_AT_STEP="4-"),
                  tmp_path / "stuck.log")
    assert rc == 5, log[-3000:]
    assert "the loss was NaN/Inf for 3 steps in a row (up to step 6" in log and "Traceback" not in log
    ckpts = tmp_path / "stuck" / "checkpoints"
    assert latest(ckpts)["step"] == 6
    for path in ckpts.glob("step_*.pt"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(str(path))["model"].values()), path


@pytest.mark.slow
def test_resume_from_s3_continues_steps_lr_and_data(s3, train_shards, tmp_path, cli_env):
    env = _aws_env(cli_env)
    args = ["--train-data", str(train_shards), "--root", s3, "--steps", "16", "--save-every-steps", "8"]
    rc, first = run(stage_cmd(*args, "--run-id", "a"), env, tmp_path / "a.log")
    assert rc == 0, first[-3000:]
    rc, second = run(stage_cmd(*args, "--run-id", "b", "--resume", f"{s3}/a/checkpoints/step_8.pt"),
                     env, tmp_path / "b.log")
    assert rc == 0, second[-3000:]
    assert f"resumed from {s3}/a/checkpoints/step_8.pt at step 8" in second
    uninterrupted = step_lines(first)
    resumed = step_lines(second)
    assert [s for s, _, _ in resumed] == list(range(9, 17))
    assert [lr for _, lr, _ in resumed] == [lr for _, lr, _ in uninterrupted[8:]]
    # weights and optimizer carried over: the loss goes on from where it was (a fresh model starts
    # near ln(16) = 2.8); random crops in the loader's workers keep it from matching to the digit
    assert [loss for _, _, loss in resumed] == pytest.approx([loss for _, _, loss in uninterrupted[8:]],
                                                             rel=0.05)
    lr9 = 1e-3 * 0.5 * (1 + math.cos(math.pi * (8 - 2) / (16 - 2)))  # open_clip's cosine after warmup 2
    assert resumed[0][1] == pytest.approx(lr9, rel=1e-3)
    assert checkpoints.read_latest(f"{s3}/b/checkpoints")["step"] == 16


@pytest.mark.slow
def test_a_checkpoint_store_that_stays_down_stops_the_run_clearly(flaky_s3, moto_server, train_shards,
                                                                  tmp_path, cli_env):
    bucket_uri, proxy = flaky_s3
    bucket = bucket_uri.removeprefix("s3://")
    direct = boto3.client("s3", endpoint_url=moto_server.endpoint)  # bypasses the proxy
    env = _aws_env(cli_env, CLIPFORGE_STORAGE_RETRIES="2", CLIPFORGE_STORAGE_BACKOFF_S="0.05")
    cmd = stage_cmd("--train-data", str(train_shards), "--root", bucket_uri, "--run-id", "gone",
                    "--steps", "60", "--save-every-steps", "5", "--log-every-n-steps", "5")
    log = tmp_path / "log"
    proc = start(cmd, env, log)
    try:
        wait_for(lambda: "checkpoint step 5 ->" in log.read_text(), 120, "the first checkpoint", proc)
        proxy.down()  # and it stays down
        assert proc.wait(120) == 4, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    failed = re.search(r"clipforge train: error: checkpoint step (\d+) could not be written: .* failed after "
                       r"3 attempts: .*; LATEST still names \S+step_(\d+)\.pt", text)
    assert failed, text[-3000:]
    pointer = json.loads(direct.get_object(Bucket=bucket, Key="gone/checkpoints/LATEST")["Body"].read())
    assert pointer["step"] == int(failed[2]) < int(failed[1])
    body = direct.get_object(Bucket=bucket, Key=pointer["uri"].removeprefix(f"{bucket_uri}/"))["Body"].read()
    assert hashlib.sha256(body).hexdigest() == pointer["sha256"]  # LATEST names a whole checkpoint
