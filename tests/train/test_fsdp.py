"""--fsdp (FSDP2) on 2 gloo ranks under real torchrun, against DDP at the same global batch."""

from __future__ import annotations

import os
import re

import pytest
import torch
from trainrun import (
    kill_a_worker_when,
    latest,
    load_checkpoint,
    run,
    run_json,
    start,
    step_lines,
    torchrun_cmd,
    train_env,
)

from tests.conftest import REPO

REL = 1e-4
STEPS = 10


def _train(root, shards, env, name: str, *args: str, ranks: int = 2,
           steps: int = STEPS) -> tuple[list[float], dict]:
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", str(ranks), train_args=[
        "--train-data", str(shards), "--root", str(root), "--run-id", name, "--batch-size", "8",
        "--steps", str(steps), "--save-every-steps", "5", *args])
    rc, text = run(cmd, env, root / f"{name}.log", timeout=400)
    assert rc == 0, text[-3000:]
    return [loss for _, _, loss in step_lines(text)], run_json(root / name)["stages"]["train"]["outputs"]


def _env() -> dict:
    """cli_env's environment, for a module-scoped fixture (cli_env is per test)."""
    return train_env({**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                      "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture(scope="module")
def runs(train_shards, tmp_path_factory):
    """DDP and --fsdp, each with accum 1, and accum 2 with local loss + gathered gradients."""
    root, env = tmp_path_factory.mktemp("fsdp"), _env()
    out = {"root": root, "shards": train_shards, "env": env}
    for accum, extra in ((1, []), (2, ["--local-loss", "--gather-with-grad"])):
        flags = ["--accum-freq", str(accum), *extra]
        out[("ddp", accum)] = _train(root, train_shards, env, f"ddp{accum}", *flags)
        out[("fsdp", accum)] = _train(root, train_shards, env, f"fsdp{accum}", *flags, "--fsdp")
    return out


def _resume(runs, written_by: str, fsdp: bool, ranks: int) -> list[float]:
    """Resume step 5 of a run on `ranks` ranks at the same global batch of 16; the losses after."""
    key = ("resume", written_by, fsdp, ranks)
    if key not in runs:
        name = f"resume-{written_by}-{'fsdp' if fsdp else 'ddp'}-{ranks}"
        flags = ["--resume", _step_file(runs, written_by, 5), "--batch-size", str(16 // ranks)]
        runs[key] = _train(runs["root"], runs["shards"], runs["env"], name, *flags,
                           *(["--fsdp"] if fsdp else []), ranks=ranks)[0]
    return runs[key]


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
    assert fsdp_run["parallel"] == "fsdp" and ddp_run["parallel"] == "ddp"
    assert fsdp_run["samples_seen"] == STEPS * 8 * accum * 2


@pytest.mark.slow
def test_fsdp_holds_about_half_the_parameter_and_optimizer_state_per_rank(runs):
    fsdp_bytes = runs[("fsdp", 1)][1]["state_bytes_per_rank"]
    ddp_bytes = runs[("ddp", 1)][1]["state_bytes_per_rank"]
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
@pytest.mark.parametrize(("written_by", "fsdp", "ranks"), [
    ("fsdp1", True, 2), ("fsdp1", True, 1), ("fsdp1", False, 2), ("ddp1", True, 2)])
def test_a_checkpoint_resumes_the_same_with_and_without_fsdp_on_2_and_on_1_rank(runs, written_by, fsdp,
                                                                                 ranks):
    # the reference: the DDP checkpoint of the same run resumed under DDP on as many ranks
    # (so both read the data from the same position in the same layout)
    _assert_same_losses(_resume(runs, written_by, fsdp, ranks), _resume(runs, "ddp1", False, ranks),
                        steps=STEPS - 5)


@pytest.mark.slow
def test_siglip_with_a_locked_image_tower_and_grad_checkpointing_matches_ddp(runs):
    flags = ["--siglip", "--lock-image", "--grad-checkpointing", "--val-data", "auto"]
    ddp = _train(runs["root"], runs["shards"], runs["env"], "siglip-ddp", *flags, steps=4)
    fsdp = _train(runs["root"], runs["shards"], runs["env"], "siglip-fsdp", *flags, "--fsdp", steps=4)
    _assert_same_losses(fsdp[0], ddp[0], steps=4)
    assert fsdp[1]["val"]["num_samples"] == ddp[1]["val"]["num_samples"] == 128
    assert abs(fsdp[1]["val"]["val_loss"] - ddp[1]["val"]["val_loss"]) <= REL * ddp[1]["val"]["val_loss"]


def _embeddings(model, size: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, size, size, generator=generator)
    texts = torch.randint(1, 400, (4, context), generator=generator)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


@pytest.mark.slow
def test_export_and_evaluate_read_an_fsdp_checkpoint_as_the_ddp_one(runs):
    import open_clip

    from stages.evaluate.model import load_model
    from stages.export.cli import main as export

    root = runs["root"]
    got = {}
    for name in ("fsdp1", "ddp1"):
        assert export(["--root", str(root), "--run-id", name]) == 0
        exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{root / name / 'export'}")
        evaluated = load_model(str(root / name), torch.device("cpu"))
        assert evaluated.step == STEPS
        size, context = exported.visual.image_size[0], exported.context_length
        got[name] = [*_embeddings(exported.eval(), size, context), *_embeddings(evaluated.model, size, context)]
    for fsdp_value, ddp_value in zip(got["fsdp1"], got["ddp1"], strict=True):
        torch.testing.assert_close(fsdp_value, ddp_value, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got["fsdp1"][0], got["fsdp1"][2])  # export and evaluate: one model


@pytest.mark.slow
def test_an_fsdp_rank_killed_mid_run_restarts_from_latest_and_finishes(train_shards, tmp_path):
    root = tmp_path / "runs"
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                       "--monitor-interval", "0.2", train_args=[
                           "--train-data", str(train_shards), "--root", str(root), "--run-id", "k",
                           "--batch-size", "8", "--steps", "16", "--save-every-steps", "4",
                           "--resume", "latest", "--fsdp"])
    proc = start(cmd, _env(), tmp_path / "log")
    saved = lambda: (latest(root / "k" / "checkpoints") or {}).get("step", 0) >= 8  # noqa: E731
    kill_a_worker_when(saved, "an --fsdp checkpoint at step 8", proc, tmp_path / "log")
    log = (tmp_path / "log").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+)\.pt at step", log)]
    assert len(resumed) == 1 and resumed[0] >= 8, log[-3000:]
    outputs = run_json(root / "k")["stages"]["train"]["outputs"]
    assert outputs["step"] == 16 and outputs["parallel"] == "fsdp"
    final = load_checkpoint(latest(root / "k" / "checkpoints")["uri"])
    assert final["step"] == final["progress"]["step"] == 16
    assert "logit_scale" in final["optimizer"]["state"]  # the --fsdp layout: keyed by parameter name
