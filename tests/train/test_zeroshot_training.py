"""Zero-shot classification during a 2-rank training run: rows at the asked interval in
{run}/eval/during_training.jsonl that match `clipforge evaluate` of the same checkpoint."""

from __future__ import annotations

import json
import subprocess

import pytest
from trainrun import run, torchrun_cmd, train_env

from stages.common import storage
from stages.common.errors import DataError
from stages.train import zeroshot
from stages.train.config import TrainConfig
from tests.conftest import which
from tests.evaluate.evalkit import CLASSNAMES, encode, square, tar_bytes, write_classification_set


def _imagenet_folder(path, per_class: int = 2) -> None:
    """An ImageNet-val-like folder: class folders in sorted order, images inside."""
    for index, colour in enumerate(CLASSNAMES[:3]):
        folder = path / f"n0000000{index}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i}.png").write_bytes(encode(square(colour, 60 + i), "png"))


# ImageNet classes named after the colours the demo images have, so that top-5 can hit.
V2_CLASSES = {"red": 277, "green": 39, "blue": 131, "yellow": 986, "white": 127, "black": 100}


def _imagenet_v2_folder(path, wds_uri: str, per_class: int = 2) -> None:
    """ImageNetV2 matched-frequency: folders named by class index (not in sorted-name order: 39
    sorts after 131 as text), plus a stray non-numeric folder; the same images, with the same
    labels, as a CLIP_benchmark wds set named imagenetv2 (no classnames.txt: built-in names)."""
    (path / "extras").mkdir(parents=True)
    samples = []
    for colour, index in V2_CLASSES.items():
        (path / str(index)).mkdir()
        for i in range(per_class):
            data = encode(square(colour, 80 + i), "png")
            (path / str(index) / f"{i}.png").write_bytes(data)
            samples.append({"__key__": f"v{len(samples):04d}", "png": data, "cls": index})
    (path / "extras" / "0.png").write_bytes(encode(square("red", 1), "png"))
    storage.write_bytes(storage.join(wds_uri, "test", "0.tar"), tar_bytes(samples))
    storage.write_text(storage.join(wds_uri, "test", "nshards.txt"), "1\n")


def test_imagenet_v2_labels_are_the_folder_numbers(tmp_path):
    _imagenet_v2_folder(tmp_path / "v2", str(tmp_path / "wds"))
    (zs,) = zeroshot.open_sets(TrainConfig(train_data="x", imagenet_v2=str(tmp_path / "v2")))
    assert zs.name == "imagenet-v2" and len(zs.classnames) == 1000
    assert sorted({label for _, label in zs.images}) == sorted(V2_CLASSES.values())
    assert all(path.split("/")[-2] == str(label) for path, label in zs.images)


@pytest.mark.slow
def test_two_ranks_write_rows_that_match_a_separate_evaluate(train_shards, tmp_path, cli_env):
    colours = tmp_path / "colours"
    write_classification_set(str(colours), per_class=3, shards=3)
    _imagenet_folder(tmp_path / "imagenet-val")
    _imagenet_v2_folder(tmp_path / "imagenet-v2", str(tmp_path / "imagenetv2-wds"))
    args = ["--train-data", str(train_shards), "--root", str(tmp_path), "--run-id", "zs", "--steps", "8",
            "--save-every-steps", "4", "--zeroshot-every-steps", "4", "--zeroshot-frequency", "0",
            "--zeroshot-data", f"colours={colours}", "--imagenet-val", str(tmp_path / "imagenet-val"),
            "--imagenet-v2", str(tmp_path / "imagenet-v2"), "--zeroshot-batch-size", "5"]
    rc, text = run(torchrun_cmd("--standalone", "--nproc-per-node", "2", train_args=args), train_env(cli_env),
                   tmp_path / "train.log", timeout=600)
    assert rc == 0, text[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "zs" / "eval" / "during_training.jsonl").read_text().splitlines()]
    assert [(r["step"], r["dataset"]) for r in rows] == [
        (step, name) for step in (4, 8) for name in ("imagenet-val", "imagenet-v2", "colours")]
    assert all(r["samples"] == 18 for r in rows if r["dataset"] == "colours")  # both ranks' shares
    assert all(r["samples"] == 6 for r in rows if r["dataset"] == "imagenet-val")
    assert all(r["samples"] == 12 for r in rows if r["dataset"] == "imagenet-v2")  # "extras" is not a class
    assert "imagenet-zeroshot-val-top1" in rows[0]["metrics"]
    assert set(rows[1]["metrics"]) == {"imagenet-v2-zeroshot-top1", "imagenet-v2-zeroshot-top5"}
    assert "Zero-shot Step: 4 colours (18 samples) colours-zeroshot-top1" in text
    assert "Zero-shot Step: 8 imagenet-v2 (12 samples) imagenet-v2-zeroshot-top1" in text

    # `clipforge evaluate` reads CLIP_benchmark's wds layout, not image folders: the v2 images are
    # evaluated from their wds copy, whose built-in names and templates are those of the folder.
    for step in (4, 8):
        out = tmp_path / f"eval-{step}.json"
        proc = subprocess.run([which("clipforge"), "evaluate", "--checkpoint",
                               str(tmp_path / "zs" / "checkpoints" / f"step_{step}.pt"),
                               "--eval-data", f"colours={colours}", f"imagenetv2={tmp_path / 'imagenetv2-wds'}",
                               "--root", str(tmp_path), "--run-id", "zs", "--workers", "0", "--output", str(out)],
                              env=cli_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        datasets = json.loads(out.read_text())["datasets"]
        assert datasets["imagenetv2"]["samples"] == 12
        for row in (r for r in rows if r["step"] == step and r["dataset"] != "imagenet-val"):
            name, prefix = {"colours": ("colours", "colours"), "imagenet-v2": ("imagenetv2", "imagenet-v2")}[
                row["dataset"]]
            metrics = datasets[name]["metrics"]
            # the same fraction of the samples; evaluate's is a float32 mean, as CLIP_benchmark's is
            assert row["metrics"][f"{prefix}-zeroshot-top1"] == pytest.approx(metrics["acc1"], abs=1e-6)
            assert row["metrics"][f"{prefix}-zeroshot-top5"] == pytest.approx(metrics["acc5"], abs=1e-6)


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
