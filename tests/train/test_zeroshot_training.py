"""Zero-shot classification during a 2-rank training run: rows at the asked interval in
{run}/eval/during_training.jsonl that match `clipforge evaluate` of the same checkpoint."""

from __future__ import annotations

import json
import subprocess

import pytest
from trainrun import run, torchrun_cmd, train_env

from stages.common.errors import DataError
from stages.train import zeroshot
from stages.train.config import TrainConfig
from tests.conftest import which
from tests.evaluate.evalkit import CLASSNAMES, encode, square, write_classification_set


def _imagenet_folder(path, per_class: int = 2) -> None:
    """An ImageNet-val-like folder: class folders in sorted order, images inside."""
    for index, colour in enumerate(CLASSNAMES[:3]):
        folder = path / f"n0000000{index}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i}.png").write_bytes(encode(square(colour, 60 + i), "png"))


@pytest.mark.slow
def test_two_ranks_write_rows_that_match_a_separate_evaluate(train_shards, tmp_path, cli_env):
    colours = tmp_path / "colours"
    write_classification_set(str(colours), per_class=3, shards=3)
    _imagenet_folder(tmp_path / "imagenet-val")
    args = ["--train-data", str(train_shards), "--root", str(tmp_path), "--run-id", "zs", "--steps", "8",
            "--save-every-steps", "4", "--zeroshot-every-steps", "4", "--zeroshot-frequency", "0",
            "--zeroshot-data", f"colours={colours}", "--imagenet-val", str(tmp_path / "imagenet-val"),
            "--zeroshot-batch-size", "5"]
    rc, text = run(torchrun_cmd("--standalone", "--nproc-per-node", "2", train_args=args), train_env(cli_env),
                   tmp_path / "train.log", timeout=600)
    assert rc == 0, text[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "zs" / "eval" / "during_training.jsonl").read_text().splitlines()]
    assert [(r["step"], r["dataset"]) for r in rows] == [(4, "imagenet-val"), (4, "colours"),
                                                         (8, "imagenet-val"), (8, "colours")]
    assert all(r["samples"] == 18 for r in rows if r["dataset"] == "colours")  # both ranks' shares
    assert all(r["samples"] == 6 for r in rows if r["dataset"] == "imagenet-val")
    assert "imagenet-zeroshot-val-top1" in rows[0]["metrics"]
    assert "Zero-shot Step: 4 colours (18 samples) colours-zeroshot-top1" in text

    for row in (r for r in rows if r["dataset"] == "colours"):
        out = tmp_path / f"eval-{row['step']}.json"
        proc = subprocess.run([which("clipforge"), "evaluate", "--checkpoint",
                               str(tmp_path / "zs" / "checkpoints" / f"step_{row['step']}.pt"),
                               "--eval-data", f"colours={colours}", "--root", str(tmp_path), "--run-id", "zs",
                               "--workers", "0", "--output", str(out)],
                              env=cli_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics = json.loads(out.read_text())["datasets"]["colours"]["metrics"]
        assert row["metrics"]["colours-zeroshot-top1"] == pytest.approx(metrics["acc1"], abs=1e-9)
        assert row["metrics"]["colours-zeroshot-top5"] == pytest.approx(metrics["acc5"], abs=1e-9)


def test_interval_rules_follow_open_clip_train():
    cfg = TrainConfig(train_data="x", zeroshot_frequency=2, zeroshot_every_steps=0)
    # 10 steps per epoch: epochs 2 and 4 end at steps 20 and 40; the last step always evaluates
    assert [s for s in range(1, 46) if zeroshot.due(cfg, s, 10, last=s == 45)] == [20, 40, 45]
    cfg.zeroshot_frequency, cfg.zeroshot_every_steps = 0, 7
    assert [s for s in range(1, 30) if zeroshot.due(cfg, s, 10, last=s == 29)] == [7, 14, 21, 28]


def test_bad_zero_shot_inputs_fail_before_training(tmp_path):
    missing = TrainConfig(train_data="x", imagenet_val=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="--imagenet-val .*nope: not a folder"):
        zeroshot.open_sets(missing)
    unknown = tmp_path / "mystery"
    write_classification_set(str(unknown), per_class=1, shards=1)
    (unknown / "classnames.txt").unlink()
    with pytest.raises(DataError, match="classnames.txt: missing, and 'mystery'"):
        zeroshot.open_sets(TrainConfig(train_data="x", zeroshot_data=[str(unknown)]))
