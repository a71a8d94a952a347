"""--fsdp (FSDP2) on 2 gloo ranks under real torchrun, against DDP at the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
from tests.conftest import REPO
from trainrun import latest, load_checkpoint, run, run_json, step_lines, torchrun_cmd, train_env

REL = 1e-4
STEPS = 10


def _train(root, shards, env, name: str, *args: str, ranks: int = 2) -> tuple[list[float], dict]:
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", str(ranks), train_args=[
        "--train-data", str(shards), "--root", str(root), "--run-id", name, "--batch-size", "8",
        "--steps", str(STEPS), "--save-every-steps", "5", *args])
    rc, text = run(cmd, env, root / f"{name}.log", timeout=400)
    assert rc == 0, text[-3000:]
    return [loss for _, _, loss in step_lines(text)], run_json(root / name)


@pytest.fixture(scope="module")
def runs(train_shards, tmp_path_factory):
    """DDP and --fsdp, each with accum 1, and accum 2 with local loss + gathered gradients."""
    root = tmp_path_factory.mktemp("fsdp")
    env = train_env({**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                     "TOKENIZERS_PARALLELISM": "false"})
    out = {"root": root, "shards": train_shards, "env": env}
    for accum, extra in ((1, []), (2, ["--local-loss", "--gather-with-grad"])):
        flags = ["--accum-freq", str(accum), *extra]
        out[("ddp", accum)] = _train(root, train_shards, env, f"ddp{accum}", *flags)
        out[("fsdp", accum)] = _train(root, train_shards, env, f"fsdp{accum}", *flags, "--fsdp")
    return out


def _assert_same_losses(ours: list[float], theirs: list[float], steps: int = STEPS) -> None:
    assert len(ours) == len(theirs) == steps
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert abs(a - b) <= REL * abs(b), f"step {step}: --fsdp {a} vs DDP {b}"
    assert ours[-1] < ours[0]  # it trains: the comparison is not between two constants


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_fsdp_losses_equal_ddp_at_the_same_global_batch(runs, accum):
    (fsdp_losses, fsdp_run), (ddp_losses, ddp_run) = runs[("fsdp", accum)], runs[("ddp", accum)]
    _assert_same_losses(fsdp_losses, ddp_losses)
    outputs = fsdp_run["stages"]["train"]["outputs"]
    assert outputs["parallel"] == "fsdp" and ddp_run["stages"]["train"]["outputs"]["parallel"] == "ddp"
    assert outputs["samples_seen"] == STEPS * 8 * accum * 2


@pytest.mark.slow
def test_fsdp_holds_about_half_the_parameter_and_optimizer_state_per_rank(runs):
    fsdp_bytes = runs[("fsdp", 1)][1]["stages"]["train"]["outputs"]["state_bytes_per_rank"]
    ddp_bytes = runs[("ddp", 1)][1]["stages"]["train"]["outputs"]["state_bytes_per_rank"]
    # parameters + AdamW's two moments: three full copies under DDP, a half of each under FSDP
    assert ddp_bytes > 3 * 3e6 * 4
    assert 0.45 <= fsdp_bytes / ddp_bytes <= 0.55, (fsdp_bytes, ddp_bytes)


def _step_file(runs, name: str, step: int) -> str:
    pointer = latest(runs["root"] / name / "checkpoints")
    assert pointer["step"] == STEPS
    return pointer["uri"].replace(f"step_{STEPS}.pt", f"step_{step}.pt")


@pytest.mark.slow
def test_an_fsdp_checkpoint_holds_the_full_weights_as_a_ddp_one_does(runs):
    fsdp_ckpt = load_checkpoint(_step_file(runs, "fsdp1", STEPS))
    ddp_ckpt = load_checkpoint(_step_file(runs, "ddp1", STEPS))
    assert fsdp_ckpt["model"].keys() == ddp_ckpt["model"].keys()
    for key, ddp_value in ddp_ckpt["model"].items():
        torch.testing.assert_close(fsdp_ckpt["model"][key], ddp_value, rtol=1e-3, atol=1e-5, msg=key)
    assert fsdp_ckpt["model_name"] == ddp_ckpt["model_name"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 1])
def test_an_fsdp_checkpoint_resumes_on_the_same_curve_on_2_and_on_1_rank(runs, ranks):
    uninterrupted, _ = runs[("fsdp", 1)]
    resumed, _ = _train(runs["root"], runs["shards"], runs["env"], f"resume{ranks}", "--fsdp",
                        "--resume", _step_file(runs, "fsdp1", 5), "--batch-size", str(16 // ranks),
                        ranks=ranks)  # the same global batch of 16
    _assert_same_losses(resumed, uninterrupted[5:], steps=STEPS - 5)
