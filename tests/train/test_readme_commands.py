"""open_clip's README training commands, run through `clipforge train` with only the data paths and
sizes changed (model, batch size, epochs, warmup, workers, sample counts), a few steps each.

The README's `--imagenet-val`/`--zeroshot-frequency` are left out: zero-shot evaluation is the
evaluate stage's, and clipforge train refuses them with a message saying so (test_openclip_flags).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from shards import COLOURS, SHAPES, caption_for, draw_shape, make_shards
from trainrun import latest, run, step_lines, train_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def clipforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", *args]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "stages.train", *args]


def write_csv(folder: Path, name: str, rows: int) -> Path:
    """open_clip_train's CSV layout: tab-separated filepath and title columns; images beside the table."""
    rng = random.Random(name)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i in range(rows):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        draw_shape(colour, shape, 40, rng).save(folder / "images" / f"{name}-{i}.jpg")
        lines.append(f"images/{name}-{i}.jpg\t{caption_for(colour, shape)}")
    table = folder / f"{name}.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def test_csv_command(tmp_path, cli_env):
    """README "Single-process running code" (CSV, tensorboard), sizes changed."""
    train, val = write_csv(tmp_path, "train_data", 32), write_csv(tmp_path, "validation_data", 16)
    rc, out = run(clipforge(
        "--save-frequency", "1", "--report-to", "tensorboard", f"--train-data={train}", f"--val-data={val}",
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--warmup", "2", "--batch-size=8",
        "--lr=1e-3", "--wd=0.1", "--epochs=2", "--workers=1", "--model", "clipforge-micro",
        "--logs", str(tmp_path / "logs"), "--name", "csv", "--precision", "fp32"),
        train_env(cli_env), tmp_path / "csv.log", timeout=600)
    assert rc == 0, out
    ckpts = tmp_path / "logs/csv/checkpoints"
    assert {p.name for p in ckpts.glob("step_*.pt")} == {"step_4.pt", "step_8.pt"}  # one per epoch
    assert "Eval Step: 8" in out  # the val table, at the end (open_clip_train: every --val-frequency epochs)
    assert any((tmp_path / "logs/csv/tensorboard").iterdir())


def test_torchrun_webdataset_local_loss_resampled(tmp_path, cli_env):
    """README multi-GPU webdataset command with --local-loss --gather-with-grad, on 2 CPU ranks."""
    data = tmp_path / "cc12m"
    make_shards(str(data), n_samples=64, samples_per_shard=16, image_size=40, seed=0)
    rc, out = run(torchrun(
        "--train-data", f"{data}/{{00000..00003}}.tar", "--train-num-samples", "64", "--dataset-type",
        "webdataset", "--dataset-resampled", "--batch-size", "8", "--precision", "fp32", "--workers", "1",
        "--local-loss", "--gather-with-grad", "--model", "clipforge-micro", "--warmup", "2", "--epochs", "1",
        "--dist-backend", "gloo", "--dist-url", "env://", "--use-bn-sync", "--log-local",
        # under torchrun, --root: torchrun's own parser takes --logs for an abbreviation of its --logs-specs
        "--val-data", "none", "--log-every-n-steps", "1", "--root", str(tmp_path / "logs"), "--run-id", "wds"),
        train_env(cli_env), tmp_path / "wds.log", timeout=600)
    assert rc == 0, out
    assert [s for s, _, _ in step_lines(out)] == [1, 2, 3, 4]  # 64 samples / (8 x 2 ranks)


def test_accum_freq_then_resume_latest(tmp_path, cli_env):
    data = tmp_path / "data"
    make_shards(str(data), n_samples=64, samples_per_shard=16, image_size=40, seed=1)
    common = ["--train-data", str(data), "--batch-size", "8", "--accum-freq", "2", "--model", "clipforge-micro",
              "--warmup", "2", "--workers", "1", "--val-data", "none", "--log-every-n-steps", "1",
              "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--name", "acc"]
    rc, out = run(clipforge(*common, "--epochs", "1"), train_env(cli_env), tmp_path / "first.log", timeout=600)
    assert rc == 0, out
    assert latest(tmp_path / "logs/acc/checkpoints")["step"] == 4  # 64 / (8 x 2) steps per epoch
    rc, out = run(clipforge(*common, "--epochs", "2", "--resume", "latest"), train_env(cli_env),
                  tmp_path / "second.log", timeout=600)
    assert rc == 0, out
    assert [s for s, _, _ in step_lines(out)] == [5, 6, 7, 8]


def test_lit_coca_csv_and_wandb(tmp_path, cli_env):
    """README CoCa fine-tuning command (CSV, wandb, caption loss only), then LiT from its weights."""
    train = write_csv(tmp_path, "train2014", 16)
    env = train_env(cli_env, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"))
    rc, out = run(clipforge(
        "--dataset-type", "csv", "--train-data", str(train), "--warmup", "1", "--batch-size", "8", "--lr", "1e-5",
        "--wd", "0.1", "--epochs", "1", "--workers", "1", "--model", "coca_clipforge-micro", "--report-to", "wandb",
        "--coca-contrastive-loss-weight", "0", "--coca-caption-loss-weight", "1", "--log-every-n-steps", "1",
        "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--name", "coca", "--val-data", "none"),
        env, tmp_path / "coca.log", timeout=600)
    assert rc == 0, out
    assert len(step_lines(out)) == 2 and list((tmp_path / "wb" / "wandb").glob("offline-run-*-coca"))
    source = latest(tmp_path / "logs/coca/checkpoints")["uri"]
    rc, out = run(clipforge(
        "--dataset-type", "csv", "--train-data", str(train), "--batch-size", "8", "--epochs", "1",
        "--model", "coca_clipforge-micro", "--pretrained", source, "--lock-image",
        "--lock-image-unlocked-groups", "1", "--lock-text", "--lock-text-unlocked-layers", "1",
        "--precision", "fp32", "--warmup", "1", "--workers", "1", "--val-data", "none",
        "--logs", str(tmp_path / "logs"), "--name", "lit"), train_env(cli_env), tmp_path / "lit.log", timeout=600)
    assert rc == 0, out
