"""`--precision amp` through the real stage on the CPU: fp16 autocast with a GradScaler whose state
is in the checkpoint, and a resume that carries it on (this torch has CPU fp16 kernels and
`torch.amp.GradScaler("cpu")`). The other modes' CPU steps are in test_openclip_options; every
mode on CUDA is in test_precision_gpu.
"""

from __future__ import annotations

import math

import torch
from trainrun import load_checkpoint, run, stage_cmd, step_lines, train_env


def amp_run(shards, runs, run_id: str, *extra: str) -> list[str]:
    return stage_cmd("--train-data", str(shards), "--batch-size", "8", "--precision", "amp", "--workers", "0",
                     "--steps", "4", "--root", str(runs), "--run-id", run_id, *extra)


def test_amp_scaler_state_is_checkpointed_and_resumed(train_shards, tmp_path, cli_env):
    """A run resumed at step 2 ends with the GradScaler state of the uninterrupted run."""
    runs = tmp_path / "runs"
    rc, out = run(amp_run(train_shards, runs, "whole", "--save-every-steps", "2"),
                  train_env(cli_env), tmp_path / "whole.log", timeout=600)
    assert rc == 0, out
    losses = [loss for _, _, loss in step_lines(out)]
    assert len(losses) == 4 and len(set(losses)) > 1 and all(math.isfinite(loss) for loss in losses)
    half = load_checkpoint(str(runs / "whole/checkpoints/step_2.pt"))
    scaler = half["scaler"]
    # two steps in: the scale has backed off from an overflow, or the growth tracker has counted
    assert (scaler["scale"], scaler["_growth_tracker"]) != (torch.amp.GradScaler("cpu").get_scale(), 0)

    rc, out = run(amp_run(train_shards, runs, "resumed", "--resume", str(runs / "whole/checkpoints/step_2.pt")),
                  train_env(cli_env), tmp_path / "resumed.log", timeout=600)
    assert rc == 0, out
    resumed_steps = step_lines(out)
    assert [s for s, _, _ in resumed_steps] == [3, 4]
    # same batches and crops, so the same losses
    assert [loss for _, _, loss in resumed_steps] == losses[2:]
    whole = load_checkpoint(str(runs / "whole/checkpoints/step_4.pt"))
    resumed = load_checkpoint(str(runs / "resumed/checkpoints/step_4.pt"))
    assert resumed["scaler"] == whole["scaler"]  # a fresh scaler would count steps 3-4 from zero
