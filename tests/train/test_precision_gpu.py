"""Every open_clip_train precision mode on a GPU: a few steps through the real stage, finite losses."""

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
