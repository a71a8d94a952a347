"""open_clip_train's own checkpoints (`epoch_N.pt`, written here by open_clip_train itself):
resumed, fine-tuned from, and read by the evaluate and export stages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainrun import load_checkpoint, run, stage_cmd, step_lines, train_env

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC = ["--dataset-type", "synthetic", "--train-num-samples", "32", "--batch-size", "8", "--workers", "0"]
OPEN_CLIP_TRAIN = ("import sys; from stages.common.models import register_builtin_configs; "
                   "register_builtin_configs(); from open_clip_train.main import main; main(sys.argv[1:])")


@pytest.fixture(scope="module")
def open_clip_run(tmp_path_factory) -> Path:
    """One epoch of open_clip_train (4 steps of 8 synthetic samples): logs/oc/checkpoints/epoch_1.pt."""
    import os

    logs = tmp_path_factory.mktemp("logs")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-c", OPEN_CLIP_TRAIN, *SYNTHETIC, "--epochs", "1", "--model", "clipforge-micro",
           "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--warmup", "2", "--logs", str(logs),
           "--name", "oc", "--log-every-n-steps", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = logs / "oc"
    assert (run_dir / "checkpoints" / "epoch_1.pt").exists(), proc.stderr[-3000:]
    return run_dir


def test_resume_continues_an_open_clip_train_run(open_clip_run, tmp_path, cli_env):
    """--logs/--name as open_clip_train's, --resume its epoch_1.pt: epoch 2 continues at step 4."""
    theirs = load_checkpoint(str(open_clip_run / "checkpoints" / "epoch_1.pt"))
    rc, out = run(stage_cmd(*SYNTHETIC, "--epochs", "2", "--logs", str(open_clip_run.parent), "--name", "oc",
                            "--warmup", "2", "--resume", str(open_clip_run / "checkpoints" / "epoch_1.pt")),
                  train_env(cli_env), tmp_path / "resume.log", timeout=600)
    assert rc == 0, out
    assert "open_clip_train checkpoint of epoch 1: continuing at step 4" in out
    steps = step_lines(out)
    assert [s for s, _, _ in steps] == [5, 6, 7, 8]
    ours = load_checkpoint(str(open_clip_run / "checkpoints" / "step_8.pt"))
    assert ours["epoch"] == 2 and ours["step"] == 8
    # AdamW's per-parameter step counts carried on from open_clip_train's 4 to 8
    counts = {float(s["step"]) for s in ours["optimizer"]["state"].values()}
    assert counts == {8.0}, counts
    assert {float(s["step"]) for s in theirs["optimizer"]["state"].values()} == {4.0}
    # the cosine schedule went on where open_clip_train left it (step 4 of 8, warmup 2)
    from open_clip_train.scheduler import cosine_lr

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    assert steps[0][1] == pytest.approx(cosine_lr(opt, 1e-3, 2, 8)(4), rel=1e-3)


def test_fine_tune_from_an_open_clip_train_checkpoint(open_clip_run, tmp_path, cli_env):
    rc, out = run(stage_cmd(*SYNTHETIC, "--steps", "1", "--lr", "0", "--root", str(tmp_path / "runs"),
                            "--run-id", "ft", "--pretrained", str(open_clip_run / "checkpoints" / "epoch_1.pt")),
                  train_env(cli_env), tmp_path / "ft.log", timeout=600)
    assert rc == 0, out
    theirs = load_checkpoint(str(open_clip_run / "checkpoints" / "epoch_1.pt"))["state_dict"]
    ours = load_checkpoint(str(tmp_path / "runs/ft/checkpoints/step_1.pt"))["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_evaluate_and_export_read_an_open_clip_train_checkpoint(open_clip_run, tmp_path, cli_env):
    """The model comes from the params.txt open_clip_train writes beside checkpoints/."""
    from stages.evaluate.model import load_model

    path = str(open_clip_run / "checkpoints" / "epoch_1.pt")
    theirs = load_checkpoint(path)["state_dict"]
    loaded = load_model(path, torch.device("cpu"))
    assert loaded.name == "clipforge-micro"
    assert all(torch.equal(loaded.model.state_dict()[k], theirs[k]) for k in theirs)
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "stages.export", "--checkpoint", path, "--output", str(out),
                           "--root", str(tmp_path / "runs")], env=cli_env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 32


def test_a_corrupt_weights_only_or_missing_epoch_file_is_refused_for_resume(tmp_path, cli_env):
    from stages.common import checkpoints
    from stages.common.errors import DataError

    (tmp_path / "epoch_3.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="epoch_3.pt is not a loadable"):
        checkpoints.read(str(tmp_path / "epoch_3.pt"))
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "epoch_4.pt")
    assert checkpoints.read(str(tmp_path / "epoch_4.pt")).trainer is None  # weights only
    rc, out = run(stage_cmd(*SYNTHETIC, "--steps", "1", "--root", str(tmp_path / "runs"), "--run-id", "w",
                            "--resume", str(tmp_path / "epoch_4.pt")),
                  train_env(cli_env), tmp_path / "w.log", timeout=600)
    assert rc != 0 and "no optimizer state" in out and "use --pretrained" in out
    with pytest.raises(DataError, match="epoch_9.pt"):
        checkpoints.read(str(tmp_path / "epoch_9.pt"))
