"""--fsdp (FSDP2) on 2 gloo ranks under real torchrun, against DDP at the same global batch, and
its sharded checkpoints (torch.distributed.checkpoint folders): resharded resume, readers, faults."""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest
import torch
from trainrun import (
    children,
    kill_a_worker_when,
    latest,
    load_checkpoint,
    run,
    run_json,
    start,
    step_lines,
    torchrun_cmd,
    train_env,
    wait_for,
)

from stages.common import checkpoints
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
        consolidate = ["--consolidate-checkpoint"] if accum == 1 else []
        out[("fsdp", accum)] = _train(root, train_shards, env, f"fsdp{accum}", *flags, "--fsdp", *consolidate)
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
    """The step checkpoint of a run: step_<N>.pt (DDP) or the sharded folder step_<N> (--fsdp)."""
    pointer = latest(runs["root"] / name / "checkpoints")
    assert pointer["step"] == STEPS
    return pointer["uri"].replace(f"step_{STEPS}", f"step_{step}")


@pytest.mark.slow
def test_an_fsdp_run_writes_sharded_checkpoints_that_latest_records_file_by_file(runs):
    pointer = latest(runs["root"] / "fsdp1" / "checkpoints")
    folder = runs["root"] / "fsdp1" / "checkpoints" / f"step_{STEPS}"
    assert pointer["format"] == "sharded" and pointer["uri"] == str(folder)
    shards = sorted(name for name in pointer["files"] if name.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    assert {".metadata", "trainer.pt"} <= pointer["files"].keys()
    for name, record in pointer["files"].items():
        assert (folder / name).stat().st_size == record["bytes"], name
    assert [e["step"] for e in pointer["history"]] == [5]
    # DDP's checkpoint stays a single file
    assert latest(runs["root"] / "ddp1" / "checkpoints")["uri"].endswith(f"step_{STEPS}.pt")


@pytest.mark.slow
def test_a_sharded_checkpoint_reads_without_a_process_group_as_the_ddp_one_and_its_consolidated_file(runs):
    sharded = checkpoints.read(str(runs["root"] / "fsdp1"))  # run folder -> LATEST -> step_10/
    consolidated_uri = latest(runs["root"] / "fsdp1" / "checkpoints")["consolidated"]["uri"]
    consolidated = checkpoints.read(consolidated_uri)  # verified against LATEST's sha256
    ddp = checkpoints.read(str(runs["root"] / "ddp1"))
    assert sharded.step == consolidated.step == ddp.step == STEPS
    assert sharded.model.keys() == ddp.model.keys() == consolidated.model.keys()
    for key, ddp_value in ddp.model.items():
        torch.testing.assert_close(sharded.model[key], ddp_value, rtol=1e-3, atol=1e-5, msg=key)
        torch.testing.assert_close(consolidated.model[key], sharded.model[key], rtol=0, atol=0, msg=key)
    assert sharded.model_name == ddp.model_name
    # the consolidated file is a plain format-2 checkpoint: torch.load reads it, optimizer and all
    raw = load_checkpoint(consolidated_uri)
    assert raw["format"] == checkpoints.FORMAT and "logit_scale" in raw["optimizer"]["state"]


@pytest.mark.slow
@pytest.mark.parametrize(("written_by", "fsdp", "ranks"), [
    ("fsdp1", True, 2), ("fsdp1", True, 1), ("fsdp1", False, 2), ("ddp1", True, 2)])
def test_a_checkpoint_resumes_the_same_with_and_without_fsdp_on_2_and_on_1_rank(runs, written_by, fsdp,
                                                                                 ranks):
    # fsdp1's are sharded (resumed through dcp.load, resharded onto 1 rank), ddp1's single files.
    # On 2 ranks (the layout that wrote them) the reference is the uninterrupted run; on 1 rank the
    # batches are made by another layout, so it is the DDP checkpoint resumed under DDP on 1 rank.
    resumed = _resume(runs, written_by, fsdp, ranks)
    if ranks == 2:
        _assert_same_losses(resumed, runs[("ddp", 1)][0][5:], steps=STEPS - 5)
    _assert_same_losses(resumed, _resume(runs, "ddp1", False, ranks), steps=STEPS - 5)


@pytest.mark.slow
def test_a_sharded_checkpoint_written_on_1_rank_reshards_onto_2(runs):
    """1 -> 2: the sharded folder resumed under --fsdp on 2 ranks continues as its consolidated
    single file (the same state, read as one file) does under DDP on 2 ranks."""
    root, shards, env = runs["root"], runs["shards"], runs["env"]
    _train(root, shards, env, "one", "--batch-size", "16", "--checkpoint-format", "sharded",
           "--consolidate-checkpoint", ranks=1, steps=5)
    pointer = latest(root / "one" / "checkpoints")
    assert pointer["format"] == "sharded" and pointer["step"] == 5
    resumed = {}
    for name, source, extra in (("one-fsdp", pointer["uri"], ["--fsdp"]),
                                ("one-ddp", pointer["consolidated"]["uri"], [])):
        resumed[name] = _train(root, shards, env, name, "--resume", source, *extra)[0]
    _assert_same_losses(resumed["one-fsdp"], resumed["one-ddp"], steps=STEPS - 5)


def _copy_checkpoints(runs, tmp_path, name: str = "fsdp1"):
    ckpts = tmp_path / name / "checkpoints"
    shutil.copytree(runs["root"] / name / "checkpoints", ckpts)
    pointer = latest(ckpts)
    for entry in [pointer, *pointer["history"]]:  # LATEST names absolute folders: point it at the copy
        entry["uri"] = entry["uri"].replace(str(runs["root"]), str(tmp_path))
    (ckpts / "LATEST").write_text(__import__("json").dumps(pointer))
    return ckpts


def _flip_a_byte(path) -> None:
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {
    "a flipped byte in rank 1's shard": (lambda d: _flip_a_byte(d / "__1_0.distcp"), "sha256 does not match"),
    "rank 0's shard deleted": (lambda d: (d / "__0_0.distcp").unlink(), "missing"),
    ".metadata deleted": (lambda d: (d / ".metadata").unlink(), "incomplete"),
    "trainer.pt truncated": (lambda d: os.truncate(d / "trainer.pt", 100), "bytes, LATEST records"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_sharded_checkpoint_is_detected_and_the_reader_falls_back(runs, tmp_path, damage):
    from stages.common.errors import DataError

    ckpts = _copy_checkpoints(runs, tmp_path)
    folder = ckpts / f"step_{STEPS}"
    harm, why = DAMAGE[damage]
    harm(folder)
    ckpt = checkpoints.read(str(ckpts))
    assert ckpt.step == 5 and ckpt.uri == str(ckpts / "step_5")
    assert [uri for uri, _ in ckpt.fallbacks] == [str(folder)]
    assert why in ckpt.fallbacks[0][1], ckpt.fallbacks
    with pytest.raises(DataError):  # named directly, the damaged folder is refused, not half-read
        checkpoints.read(str(folder))


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
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+) at step", log)]
    assert len(resumed) == 1 and resumed[0] >= 8, log[-3000:]
    outputs = run_json(root / "k")["stages"]["train"]["outputs"]
    assert outputs["step"] == 16 and outputs["parallel"] == "fsdp"
    final = checkpoints.read(str(root / "k"))
    assert final.step == final.trainer["progress"]["step"] == 16
    optimizer = checkpoints.load_sharded(final.shards, {"optimizer"})["optimizer"]
    assert "logit_scale" in optimizer["state"]  # keyed by parameter name


@pytest.mark.slow
def test_a_rank_killed_mid_save_on_s3_leaves_latest_on_the_last_complete_checkpoint(flaky_s3, train_shards,
                                                                                    tmp_path):
    """The store crawls while the step-8 shards upload; a rank dies inside that write. LATEST
    still names step 4, the restart resumes from it, and --keep-last prunes whole folders."""
    bucket, proxy = flaky_s3
    env = {**_env(), **{k: v for k, v in os.environ.items() if k.startswith(("AWS_", "CLIPFORGE_STORAGE"))}}
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                       "--monitor-interval", "0.2", train_args=[
                           "--train-data", str(train_shards), "--root", bucket, "--run-id", "cut",
                           "--batch-size", "8", "--steps", "16", "--save-every-steps", "4",
                           "--keep-last", "2", "--resume", "latest", "--fsdp"])
    proc = start(cmd, env, tmp_path / "log")
    ckpts = f"{bucket}/cut/checkpoints"
    try:
        wait_for(lambda: "checkpoint step 4 ->" in (tmp_path / "log").read_text(), 240, "step 4", proc)
        proxy.delay_s = 0.2
        wait_for(lambda: any("step_8/__" in r for r in proxy.requests), 120, "the step-8 shards uploading",
                 proc)
        assert checkpoints.read_latest(ckpts)["step"] == 4
        os.kill(wait_for(lambda: children(proc.pid), 10, "torchrun's workers", proc)[-1], signal.SIGKILL)
        proxy.delay_s = 0.0
        assert proc.wait(400) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        proxy.delay_s = 0.0
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log").read_text()
    before_kill = log.split("resumed from", 1)[0]
    assert "checkpoint step 8 ->" not in before_kill, "the save was not interrupted"
    assert re.findall(r"resumed from \S+step_(\d+) at step", log) == ["4"], log[-3000:]
    pointer = checkpoints.read_latest(ckpts)
    assert pointer["step"] == 16 and pointer["format"] == "sharded"
    assert checkpoints.read(ckpts).step == 16  # verifies, on S3 as locally
    # --keep-last 2: old folders are deleted whole (the cut step-8 one was rewritten after the resume)
    assert [step for step, _ in checkpoints.list_checkpoints(ckpts)] == [12, 16]


@pytest.mark.slow
def test_torchcompile_composes_with_fsdp(runs):
    """--fsdp --torchcompile: the compiled, sharded model trains as the eager DDP run does (inductor's
    fused kernels round differently, hence the looser tolerance)."""
    losses, outputs = _train(runs["root"], runs["shards"], runs["env"], "fsdp-compiled", "--fsdp",
                             "--torchcompile", steps=4)
    eager = runs[("ddp", 1)][0][:4]
    assert outputs["parallel"] == "fsdp"
    assert losses == pytest.approx(eager, rel=1e-3), (losses, eager)
