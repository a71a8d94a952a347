"""Every open_clip_train precision mode on a GPU: a few steps through the real stage, finite losses;
and --no-set-device-rank's device choice."""

from __future__ import annotations

import pytest
from trainrun import run, stage_cmd, step_lines, train_env

from stages.train.config import PRECISIONS


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_modes_on_cuda(tmp_path, cli_env, precision):
    rc, out = run(stage_cmd("--dataset-type", "synthetic", "--train-num-samples", "32", "--batch-size", "8",
                            "--steps", "3", "--device", "cuda", "--precision", precision, "--workers", "0",
                            "--root", str(tmp_path / "runs"), "--run-id", precision),
                  train_env(cli_env), tmp_path / f"{precision}.log", timeout=600)
    assert rc == 0, out
    losses = [loss for _, _, loss in step_lines(out)]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # no NaN


@pytest.mark.gpu
def test_no_set_device_rank_puts_every_rank_on_gpu_0():
    """open_clip_train's --no-set-device-rank: each process sees its own GPU as device 0."""
    import torch

    from stages.common.distributed import pick_device

    assert {pick_device("cuda", local_rank, same_device=True) for local_rank in (0, 1, 3)} == {torch.device("cuda", 0)}
