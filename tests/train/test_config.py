"""Bad options fail with one clear line before any training; the pieces that guard the run."""

from __future__ import annotations

import math

import pytest
import torch

from stages.train import cli
from stages.train.checkpoint_manager import NonFiniteWeightsError, assert_finite
from stages.train.loop import NonFiniteGuard, NonFiniteLossError, parse_step_set


def _fails(capsys, tmp_path, *args: str) -> tuple[int, str]:
    rc = cli.main(["--root", str(tmp_path / "runs"), "--run-id", "bad", "--workers", "0", *args])
    err = capsys.readouterr().err
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists(), "trained despite a bad config"
    return rc, err


def test_unknown_model(capsys, tmp_path, train_shards):
    rc, err = _fails(capsys, tmp_path, "--train-data", str(train_shards), "--model", "ViT-Nope-99")
    assert rc == 2 and "--model 'ViT-Nope-99' is not a known open_clip model" in err


def test_missing_shards(capsys, tmp_path):
    rc, err = _fails(capsys, tmp_path, "--train-data", str(tmp_path / "nowhere" / "{00000..00003}.tar"))
    assert rc != 0 and "nowhere" in err and "Traceback" not in err


def test_batch_size_zero(capsys, tmp_path, train_shards):
    rc, err = _fails(capsys, tmp_path, "--train-data", str(train_shards), "--batch-size", "0")
    assert rc == 2 and "--batch-size 0: must be at least 1" in err


def test_fsdp_with_ddp_static_graph(capsys, tmp_path, train_shards):
    rc, err = _fails(capsys, tmp_path, "--train-data", str(train_shards), "--fsdp", "--ddp-static-graph")
    assert rc == 2 and "--ddp-static-graph applies to DDP; with --fsdp" in err


@pytest.mark.parametrize("fmt", [[], ["--checkpoint-format", "single"]])
def test_consolidating_a_single_file_checkpoint(capsys, tmp_path, train_shards, fmt):
    rc, err = _fails(capsys, tmp_path, "--train-data", str(train_shards), "--consolidate-checkpoint", *fmt,
                     *(["--fsdp"] if fmt else []))
    assert rc == 2 and "--consolidate-checkpoint applies to sharded checkpoints" in err


def test_accum_needs_more_data_than_given(capsys, tmp_path, train_shards):
    rc, err = _fails(capsys, tmp_path, "--train-data", str(train_shards), "--batch-size", "16",
                     "--accum-freq", "4", "--train-num-samples", "32")
    assert rc == 2 and "--train-num-samples 32 is less than one optimizer step" in err


def test_accum_needs_more_batches_than_an_epoch_has(capsys, tmp_path, train_shards):
    # 512 samples / 64 per batch = 8 batches per epoch, one step needs 16
    rc, err = _fails(capsys, tmp_path, "--train-data", str(train_shards), "--batch-size", "64",
                     "--accum-freq", "16", "--steps", "2")
    assert rc == 2 and "8 batches per rank per epoch" in err and "--accum-freq 16" in err


def test_check_config_prints_resolved_options(capsys, tmp_path, train_shards):
    assert cli.main(["--train-data", str(train_shards), "--root", str(tmp_path), "--accum-freq", "2",
                     "--precision", "amp_bf16", "--check-config"]) == 0
    out = capsys.readouterr().out
    assert '"accum_freq": 2' in out and '"precision": "amp_bf16"' in out


def test_nonfinite_guard_stops_after_k_in_a_row():
    guard = NonFiniteGuard(limit=3)
    for step, finite in enumerate([True, False, True, False, False]):
        guard.observe(finite, step)
    assert guard.total == 3
    with pytest.raises(NonFiniteLossError, match="NaN/Inf for 3 steps in a row"):
        guard.observe(False, 5)


def test_nan_weights_are_never_checkpointed():
    weights = {"w": torch.ones(3), "b": torch.tensor([1.0, math.nan])}
    with pytest.raises(NonFiniteWeightsError, match=r"\['b'\] are NaN/Inf"):
        assert_finite(weights, step=7)


def test_debug_nan_step_spec():
    hit = parse_step_set("3,7-8,20-")
    assert [s for s in range(25) if hit(s)] == [3, 7, 8, 20, 21, 22, 23, 24]
    assert not any(parse_step_set("")(s) for s in range(5))


def test_weight_decay_groups_follow_open_clip_train(tmp_path):
    import open_clip

    from stages.common.models import register_builtin_configs
    from stages.train.config import TrainConfig
    from stages.train.optim import create_optimizer

    register_builtin_configs()
    model = open_clip.create_model("clipforge-micro")
    opt = create_optimizer(model, TrainConfig(wd=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    no_wd = {names[id(p)] for p in opt.param_groups[0]["params"]}
    wd = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 0.1
    assert {"logit_scale", "visual.class_embedding", "ln_final.weight", "ln_final.bias"} <= no_wd
    assert "visual.conv1.weight" in wd and "text_projection" in wd
    assert not any(n.endswith(".bias") for n in wd)


def test_model_config_alone_names_the_model(capsys, tmp_path, train_shards):
    config = tmp_path / "my-clip.json"
    config.write_text('{"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, '
                      '"patch_size": 8, "head_width": 16}, "text_cfg": {"context_length": 16, '
                      '"vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}')
    rc = cli.main(["--root", str(tmp_path / "runs"), "--run-id", "c", "--train-data", str(train_shards),
                   "--model-config", str(config), "--check-config"])
    out = capsys.readouterr().out
    assert rc == 0 and '"model": "my-clip"' in out
    rc, err = _fails(capsys, tmp_path, "--train-data", str(train_shards), "--model-config", str(config),
                     "--model", "clipforge-tiny")
    assert rc == 2 and "differs from the config file's name 'my-clip'" in err


def test_yaml_values_convert_like_flags(tmp_path, train_shards):
    from stages.common.config import parse_config
    from stages.download.config import DownloadConfig
    from stages.train.config import TrainConfig

    config = tmp_path / "train.yaml"
    config.write_text(f"lr: 1e-3\ntrain_data: {train_shards}\nbatch-size: '32'\nlock_image: true\n")
    cfg, _ = parse_config(TrainConfig, ["--config", str(config)], "clipforge train")
    assert cfg.lr == 0.001 and cfg.batch_size == 32 and cfg.lock_image is True
    download = tmp_path / "download.yaml"
    download.write_text("min_success_rate: 8e-1\n")
    dcfg, _ = parse_config(DownloadConfig, ["--config", str(download), "--url-list", "x.parquet"], "clipforge download")
    assert dcfg.min_success_rate == 0.8


@pytest.mark.parametrize("line, message", [
    ("device: gpu", "device: 'gpu' is not one of auto, cpu, cuda"),
    ("precision: fp8", "precision: 'fp8' is not one of amp, amp_bf16, amp_bfloat16, bf16, fp16, pure_bf16, "
                       "pure_fp16, fp32"),
    ("lr_scheduler: linear", "lr_scheduler: 'linear' is not one of cosine, const, const-cooldown"),
    ("batch_size: 6.5", "batch_size: 6.5 is not an integer"),
    ("lock_image: sometimes", "lock_image: 'sometimes' is not true or false"),
])
def test_bad_yaml_values_fail_naming_key_and_choices_before_any_data(capsys, tmp_path, line, message):
    config = tmp_path / "bad.yaml"
    # the shards do not exist: the error must come from the value, before any data is looked at
    config.write_text(f"{line}\ntrain_data: {tmp_path}/nowhere/{{00000..00003}}.tar\n")
    rc, err = _fails(capsys, tmp_path, "--config", str(config))
    assert rc == 2 and message in err and "nowhere" not in err and "Traceback" not in err


def test_validate_reads_nothing_and_changes_nothing(tmp_path):
    from stages.train.config import TrainConfig

    cfg = TrainConfig(train_data=str(tmp_path / "nowhere" / "{00000..00003}.tar"), model="", workers=0)
    cfg.validate()  # no storage, no model lookup
    assert cfg.model == ""
    with pytest.raises(Exception, match="nowhere"):
        cfg.check_inputs(world_size=1)
