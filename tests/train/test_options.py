"""Fine-tuning options on a real run: --pretrained from a checkpoint, LiT's --lock-image, --siglip,
--grad-checkpointing."""

from __future__ import annotations

import torch
from trainrun import load_checkpoint, run, stage_cmd, train_env


def _towers(state: dict) -> tuple[dict, dict]:
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    text = {k: v for k, v in state.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
    return visual, text


def test_pretrained_locked_image_tower_with_siglip_and_grad_checkpointing(train_shards, tmp_path, cli_env):
    env, root = train_env(cli_env), str(tmp_path / "runs")
    common = ["--train-data", str(train_shards), "--root", root, "--siglip", "--steps", "2",
              "--save-every-steps", "0"]
    rc, out = run(stage_cmd(*common, "--run-id", "base"), env, tmp_path / "base.log")
    assert rc == 0, out[-3000:]
    base = tmp_path / "runs" / "base" / "checkpoints" / "step_2.pt"

    rc, out = run(stage_cmd(*common, "--run-id", "lit", "--pretrained", str(base), "--lock-image",
                            "--grad-checkpointing"), env, tmp_path / "lit.log")
    assert rc == 0, out[-3000:]
    assert f"loaded pretrained weights from {base}" in out
    before = load_checkpoint(str(base))["model"]
    after = load_checkpoint(str(tmp_path / "runs" / "lit" / "checkpoints" / "step_2.pt"))["model"]
    assert "logit_bias" in after  # the SigLIP head
    (vis_before, text_before), (vis_after, text_after) = _towers(before), _towers(after)
    assert vis_before and all(torch.equal(vis_before[k], vis_after[k]) for k in vis_before), "locked tower moved"
    assert any(not torch.equal(text_before[k], text_after[k]) for k in text_before), "text tower did not train"
