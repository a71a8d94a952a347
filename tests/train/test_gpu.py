"""On a CUDA machine: NCCL, mixed precision and the fused optimizer on the GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from trainrun import load_checkpoint, run, step_lines, torchrun_cmd, train_env


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["amp_bf16", "amp"])
def test_ranks_train_on_cuda_with_mixed_precision(train_shards, tmp_path, cli_env, precision):
    ranks = min(2, torch.cuda.device_count())  # NCCL wants one GPU per rank
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", str(ranks),
                       train_args=["--train-data", str(train_shards), "--root", str(tmp_path / "runs"),
                                   "--run-id", "gpu", "--steps", "6", "--save-every-steps", "3",
                                   "--precision", precision, "--device", "cuda"])
    rc, out = run(cmd, train_env(cli_env), tmp_path / "gpu.log")
    assert rc == 0, out[-3000:]
    assert [step for step, _, _ in step_lines(out)][-1] == 6
    state = load_checkpoint(str(tmp_path / "runs" / "gpu" / "checkpoints" / "step_6.pt"))
    assert state["scheduler"]["step"] == 6 and all(t.device.type == "cpu" for t in state["model"].values())
