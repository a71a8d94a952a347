"""open_clip's README training commands, run through `clipforge train` with only the data paths and
sizes changed (model, batch size, epochs, warmup, workers, sample counts), a few steps each.

Every command runs for two optimizer steps (per epoch) on one shared set of data: a CSV table with
its images and 4 webdataset shards. Where the README adds a flag to "a command" (`--accum-freq`,
`--resume latest`) it is added to the single-process CSV command, so one pair of runs covers them.
Each single-process command is its own process, forked from one that has imported the stage
(PreloadedStage), so the file pays torch's and open_clip's import once; torchrun launches as usual.

The README's `--imagenet-val`/`--zeroshot-frequency` are left out: zero-shot evaluation is the
evaluate stage's, and clipforge train refuses them with a message saying so (test_openclip_flags).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from shards import COLOURS, SHAPES, caption_for, draw_shape, make_shards
from trainrun import PreloadedStage, latest, load_checkpoint, run, step_lines, train_env

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def clipforge(*args: str) -> list[str]:
    """`clipforge train ARGS`, for PreloadedStage.run."""
    return list(args)


@pytest.fixture(scope="module")
def stage():
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = PreloadedStage(train_env(env))
    yield server
    server.close()


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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 CSV rows (2 batches of 8), 8 validation rows, and 32 samples in 4 webdataset shards."""
    root = tmp_path_factory.mktemp("readme-data")
    make_shards(str(root / "cc12m"), n_samples=32, samples_per_shard=8, image_size=40, seed=0)
    return {"train": write_csv(root, "train_data", 16), "val": write_csv(root, "validation_data", 8),
            "shards": root / "cc12m"}


def test_csv_command_with_accum_freq_then_resume_latest(data, stage, tmp_path, cli_env):
    """README "Single-process running code" (CSV, tensorboard, --save-frequency 1) with the README's
    `--accum-freq`, for one epoch; then the same command for 2 epochs with `--resume latest`."""
    command = ["--save-frequency", "1", "--report-to", "tensorboard", f"--train-data={data['train']}",
               f"--val-data={data['val']}", "--csv-img-key", "filepath", "--csv-caption-key", "title",
               "--warmup", "2", "--batch-size=4", "--accum-freq", "2", "--lr=1e-3", "--wd=0.1", "--workers=1",
               "--model", "clipforge-micro", "--log-every-n-steps", "1", "--precision", "fp32",
               "--logs", str(tmp_path / "logs"), "--name", "csv"]
    rc, out = stage.run(clipforge(*command, "--epochs=1"), train_env(cli_env), tmp_path / "first.log", timeout=600)
    assert rc == 0, out
    ckpts = tmp_path / "logs/csv/checkpoints"
    assert [s for s, _, _ in step_lines(out)] == [1, 2]  # 16 rows / (4 x accum 2)
    assert latest(ckpts)["step"] == 2
    rc, out = stage.run(clipforge(*command, "--epochs=2", "--resume", "latest"), train_env(cli_env),
                  tmp_path / "second.log", timeout=600)
    assert rc == 0, out
    assert [s for s, _, _ in step_lines(out)] == [3, 4]
    assert {p.name for p in ckpts.glob("step_*.pt")} == {"step_2.pt", "step_4.pt"}  # one per epoch
    assert "Eval Step: 4" in out  # the val table, at the end (open_clip_train: every --val-frequency epochs)
    assert any((tmp_path / "logs/csv/tensorboard").iterdir())


def test_torchrun_webdataset_local_loss_resampled(data, tmp_path, cli_env):
    """README multi-GPU webdataset command with --local-loss --gather-with-grad, on 2 CPU ranks."""
    rc, out = run(torchrun(
        "--train-data", f"{data['shards']}/{{00000..00003}}.tar", "--train-num-samples", "32", "--dataset-type",
        "webdataset", "--dataset-resampled", "--batch-size", "8", "--precision", "fp32", "--workers", "1",
        "--local-loss", "--gather-with-grad", "--model", "clipforge-micro", "--warmup", "2", "--epochs", "1",
        "--dist-backend", "gloo", "--dist-url", "env://", "--use-bn-sync", "--log-local",
        # under torchrun, --root: torchrun's own parser takes --logs for an abbreviation of its --logs-specs
        "--val-data", "none", "--log-every-n-steps", "1", "--root", str(tmp_path / "logs"), "--run-id", "wds"),
        train_env(cli_env), tmp_path / "wds.log", timeout=600)
    assert rc == 0, out
    assert [s for s, _, _ in step_lines(out)] == [1, 2]  # 32 samples / (8 x 2 ranks)


def test_lit_coca_csv_and_wandb(data, stage, tmp_path, cli_env):
    """README CoCa fine-tuning command (CSV, wandb, caption loss only), then LiT from its weights."""
    env = train_env(cli_env, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"))
    rc, out = stage.run(clipforge(
        "--dataset-type", "csv", "--train-data", str(data["train"]), "--warmup", "1", "--batch-size", "8",
        "--lr", "1e-5", "--wd", "0.1", "--epochs", "1", "--workers", "1", "--model", "coca_clipforge-micro",
        "--report-to", "wandb", "--coca-contrastive-loss-weight", "0", "--coca-caption-loss-weight", "1",
        "--log-every-n-steps", "1", "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--name", "coca",
        "--val-data", "none"), env, tmp_path / "coca.log", timeout=600)
    assert rc == 0, out
    assert len(step_lines(out)) == 2 and list((tmp_path / "wb" / "wandb").glob("offline-run-*-coca"))
    source = latest(tmp_path / "logs/coca/checkpoints")["uri"]
    rc, out = stage.run(clipforge(
        "--dataset-type", "csv", "--train-data", str(data["train"]), "--batch-size", "8", "--epochs", "1",
        "--model", "coca_clipforge-micro", "--pretrained", source, "--lock-image",
        "--lock-image-unlocked-groups", "1", "--lock-text", "--lock-text-unlocked-layers", "1",
        "--precision", "fp32", "--warmup", "1", "--workers", "1", "--val-data", "none",
        "--logs", str(tmp_path / "logs"), "--name", "lit"), train_env(cli_env), tmp_path / "lit.log", timeout=600)
    assert rc == 0, out
    before, after = load_checkpoint(source)["model"], load_checkpoint(latest(tmp_path / "logs/lit/checkpoints")["uri"])["model"]
    # open_clip's groups: the last one of each tower is its projection; everything before it stays put
    assert torch.equal(after["visual.conv1.weight"], before["visual.conv1.weight"])
    assert torch.equal(after["text.token_embedding.weight"], before["text.token_embedding.weight"])
    assert not torch.equal(after["visual.proj"], before["visual.proj"])
    assert not torch.equal(after["text.text_projection"], before["text.text_projection"])
