"""`--report-to tensorboard,wandb`: wandb's own client offline, TensorBoard events in the run's store."""

from __future__ import annotations

import pytest
from trainrun import run, stage_cmd, train_env

SYNTHETIC = ["--dataset-type", "synthetic", "--train-num-samples", "24", "--batch-size", "8", "--workers", "0",
             "--steps", "3"]


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_wandb_offline_and_tensorboard_in_the_run_folder(tmp_path, cli_env):
    env = train_env(cli_env, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"), WANDB_SILENT="true")
    rc, out = run(stage_cmd(*SYNTHETIC, "--report-to", "wandb,tensorboard", "--wandb-project-name", "cf-test",
                            "--root", str(tmp_path / "runs"), "--run-id", "rep"), env, tmp_path / "rep.log",
                  timeout=600)
    assert rc == 0, out
    scalars = tensorboard_scalars(tmp_path / "runs/rep/tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert {"train/lr", "train/scale", "train/samples_per_second"} <= scalars.keys()
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*-rep")
    (records,) = run_dir.glob("run-rep.wandb")
    data = records.read_bytes()  # protobuf records: the metric names and the project are in them as text
    for text in (b"train/loss", b"train/lr", b"cf-test"):
        assert text in data, text


def test_tensorboard_events_are_uploaded_to_an_s3_run(s3, tmp_path, cli_env):  # s3 before cli_env
    import fsspec

    rc, out = run(stage_cmd(*SYNTHETIC, "--report-to", "tensorboard", "--root", f"{s3}/runs", "--run-id", "tb"),
                  train_env(cli_env), tmp_path / "tb.log", timeout=600)
    assert rc == 0, out
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    remote = fs.ls(f"{s3}/runs/tb/tensorboard")
    assert remote and all("events.out.tfevents" in r for r in remote)
    local = tmp_path / "tb"
    local.mkdir()
    for r in remote:
        fs.get(r, str(local / r.rsplit("/", 1)[-1]))
    assert [s for s, _ in tensorboard_scalars(local)["train/loss"]] == [1, 2, 3]


def test_report_to_an_unknown_target_stops_before_training(tmp_path, cli_env):
    rc, out = run(stage_cmd(*SYNTHETIC, "--report-to", "wandb,mlflow", "--root", str(tmp_path / "runs")),
                  train_env(cli_env), tmp_path / "bad.log")
    assert rc == 2 and "--report-to wandb,mlflow: unknown ['mlflow']" in out


pytestmark = pytest.mark.timeout(600)
