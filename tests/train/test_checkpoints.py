"""Checkpoints of real training runs: verified resume with fallback, resuming on another world size,
pruning against a store that refuses deletes, one run id per torchrun job."""

from __future__ import annotations

import json
import os
import re

import boto3
import pytest
import requests
from trainrun import kill_a_worker_when, run, stage_cmd, start, step_lines, torchrun_cmd, train_env

from stages.common import checkpoints, storage
from tests.conftest import MotoServer, free_port


def _env(cli_env: dict, **extra: str) -> dict:
    env = train_env(cli_env, **extra)
    env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    return env


def _run_record(run_dir: str) -> dict:
    return storage.read_json(storage.join(run_dir, "run.json"))["stages"]["train"]


def _flip_a_byte(uri: str) -> None:
    data = bytearray(storage.read_bytes(uri))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(uri, bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_flipped_byte_in_the_latest_target_falls_back_and_ends_at_the_requested_step(
        store, request, train_shards, tmp_path, cli_env):
    root = str(tmp_path / "runs") if store == "local" else request.getfixturevalue("s3")
    env = _env(cli_env)
    args = ["--train-data", str(train_shards), "--root", root, "--run-id", "r", "--save-every-steps", "4"]
    rc, first = run(stage_cmd(*args, "--steps", "12"), env, tmp_path / "first.log")
    assert rc == 0, first[-3000:]
    ckpt_dir = f"{root}/r/checkpoints"
    assert checkpoints.read_latest(ckpt_dir)["step"] == 12
    _flip_a_byte(checkpoints.checkpoint_uri(ckpt_dir, 12))

    rc, log = run(stage_cmd(*args, "--steps", "16", "--resume", "latest"), env, tmp_path / "second.log")
    assert rc == 0, log[-3000:]
    assert re.search(r"checkpoint \S+step_12\.pt is unusable \(.*sha256 does not match LATEST", log)
    assert re.search(r"resumed from \S+step_8\.pt at step 8 ", log)
    assert [s for s, _, _ in step_lines(log)] == list(range(9, 17))
    final = checkpoints.read(ckpt_dir)
    assert final.step == 16 and final.fallbacks == [] and final.samples_seen == 16 * 16
    outputs = _run_record(f"{root}/r")["outputs"]
    assert outputs["step"] == 16 and outputs["checkpoint_fallbacks"] == 1


@pytest.mark.slow
def test_two_ranks_then_one_rank_continues_the_lr_and_the_samples(train_shards, tmp_path, cli_env):
    """2 ranks x 16 to step 6, then 1 rank x 32 (the same global batch), and 1 rank x 16 (half of it)."""
    common = ["--train-data", str(train_shards), "--root", str(tmp_path), "--steps", "12", "--warmup", "3"]
    rc, whole = run(torchrun_cmd("--standalone", "--nproc-per-node", "2",
                                 train_args=[*common, "--run-id", "two", "--save-every-steps", "6"]),
                    train_env(cli_env), tmp_path / "two.log")
    assert rc == 0, whole[-3000:]
    step_6 = str(tmp_path / "two" / "checkpoints" / "step_6.pt")
    rc, same = run(stage_cmd(*common, "--run-id", "one", "--batch-size", "32", "--resume", step_6),
                   train_env(cli_env), tmp_path / "one.log")
    assert rc == 0, same[-3000:]
    assert "resume: world size 2 -> 1, --batch-size 16 -> 32 (global batch 32 -> 32)" in same
    lr_whole = {s: lr for s, lr, _ in step_lines(whole)}
    lr_same = {s: lr for s, lr, _ in step_lines(same)}
    assert sorted(lr_same) == list(range(7, 13))
    assert [lr_same[s] for s in range(7, 13)] == [lr_whole[s] for s in range(7, 13)]
    for run_id in ("two", "one"):
        assert _run_record(str(tmp_path / run_id))["outputs"]["samples_seen"] == 12 * 32

    rc, half = run(stage_cmd(*common, "--run-id", "half", "--resume", step_6), train_env(cli_env),
                   tmp_path / "half.log")
    assert rc == 0, half[-3000:]
    assert "resume: world size 2 -> 1 (global batch 32 -> 16)" in half
    lr_half = {s: lr for s, lr, _ in step_lines(half)}
    assert sorted(lr_half) == list(range(7, 19))  # --steps 12 of the first run's 32 samples
    # two steps of 16 samples cover one step of 32 on the same LR curve
    assert [lr_half[7 + 2 * j] for j in range(6)] == [lr_whole[7 + j] for j in range(6)]
    assert _run_record(str(tmp_path / "half"))["outputs"]["samples_seen"] == 12 * 32


@pytest.fixture
def bucket_denying_deletes(monkeypatch):
    """A real moto S3 server enforcing IAM: the trainer's key may read and write, but not delete."""
    server = MotoServer()
    server.start()
    admin = {"endpoint_url": server.endpoint, "aws_access_key_id": "admin", "aws_secret_access_key": "admin",
             "region_name": "us-east-1"}
    try:
        boto3.client("s3", **admin).create_bucket(Bucket="no-deletes")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="no-deletes", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:DeleteObject", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        requests.post(f"{server.endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        for name, value in {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(name, value)
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()
        yield "s3://no-deletes"
    finally:
        server.stop()


@pytest.mark.slow
def test_a_bucket_that_denies_deletes_does_not_stop_the_run(bucket_denying_deletes, train_shards, tmp_path,
                                                            cli_env):
    root = bucket_denying_deletes
    rc, log = run(stage_cmd("--train-data", str(train_shards), "--root", root, "--run-id", "r",
                            "--steps", "12", "--save-every-steps", "2", "--keep-last", "2"),
                  _env(cli_env, CLIPFORGE_STORAGE_RETRIES="1"), tmp_path / "log")
    assert rc == 0, log[-3000:]
    failures = re.findall(r"--keep-last 2: could not delete an old checkpoint \(deleting \S+step_(\d+)\.pt "
                          r"failed: .*access denied", log)
    assert failures, log[-3000:]
    ckpt_dir = f"{root}/r/checkpoints"
    assert [s for s, _ in checkpoints.list_checkpoints(ckpt_dir)] == [2, 4, 6, 8, 10, 12]  # nothing went
    assert checkpoints.read(ckpt_dir).step == 12
    assert _run_record(f"{root}/r")["outputs"]["checkpoint_prune_failures"] == len(failures)


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["standalone", "static"])
def test_torchrun_without_run_id_killed_and_restarted_resumes(rendezvous, train_shards, tmp_path, cli_env):
    root = tmp_path / "runs"
    launch = (["--standalone"] if rendezvous == "standalone"
              else ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", str(free_port())])
    cmd = torchrun_cmd(*launch, "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.2",
                       train_args=["--train-data", str(train_shards), "--root", str(root), "--steps", "24",
                                   "--save-every-steps", "4", "--resume", "latest"])
    proc = start(cmd, train_env(cli_env), tmp_path / "log")

    def saved():
        pointers = list(root.glob("*/checkpoints/LATEST"))
        return pointers and json.loads(pointers[0].read_text())["step"] >= 8

    kill_a_worker_when(saved, "a checkpoint at step 8", proc, tmp_path / "log")
    log = (tmp_path / "log").read_text()
    runs = sorted(p.name for p in root.iterdir())
    assert len(runs) == 1, runs  # every rank and the restart agreed on one run id
    assert len(re.findall(r"resumed from \S+step_(\d+)\.pt at step", log)) == 1
    assert checkpoints.read(str(root / runs[0])).step == 24
    assert _run_record(str(root / runs[0]))["outputs"]["step"] == 24


@pytest.mark.slow
def test_the_final_checkpoint_is_complete_before_the_final_validation(train_shards, tmp_path, cli_env):
    rc, log = run(stage_cmd("--train-data", str(train_shards), "--val-data", "auto", "--root", str(tmp_path),
                            "--run-id", "r", "--steps", "6", "--save-every-steps", "0"),
                  train_env(cli_env), tmp_path / "log")
    assert rc == 0, log[-3000:]
    saved, validated = log.find("checkpoint step 6 ->"), log.find("Eval Step: 6 ")
    assert 0 <= saved < validated, log[-3000:]  # LATEST named step 6 before validation began
    assert json.loads((tmp_path / "r" / "checkpoints" / "LATEST").read_text())["step"] == 6
